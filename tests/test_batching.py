"""Continuous batching on the real SmolLM2 (default bundle): several documents in flight in shared llama.cpp
decodes read the states of one at a time up to llama.cpp's batching noise (docs/llama-cpp.md §5) and so decide as
one at a time, except where a decision lies within that noise of a boundary (`helpers.assert_same_decision`); at
width 1 everything is bit-identical; one bad document never stops the others."""

from __future__ import annotations

import numpy as np
import pytest

from edge2dexit.classifier import Classifier, Result
from edge2dexit.engine import Engine, EngineSettings, Finished
from edge2dexit.errors import ContextOverflowError, InputError
from edge2dexit.document import sentence_by_sentence
from edge2dexit.sentences import Splitter

from helpers import REVIEWS, TASK_PROMPT, assert_same_decision

pytestmark = pytest.mark.llama

WIDTHS = (1, 2, 8)
N_CTX = 512


def exit_point(result: Result) -> tuple:
    return result.label, result.exit_sentence, result.exit_layer, result.sentences_read, result.sentences_total


@pytest.fixture(scope="module")
def classifiers():
    """The default bundle at each width (the engine's width is fixed when its context is made)."""
    made = {}
    try:
        for width in WIDTHS:
            made[width] = Classifier(settings=EngineSettings(n_ctx=N_CTX, width=width))
        yield made
    finally:
        for clf in made.values():
            clf.close()


@pytest.fixture(scope="module")
def one_at_a_time(classifiers):
    """policy -> the results of `classify`, one text at a time."""
    clf = classifiers[1]
    return {policy: [clf.classify(text, policy=policy) for text in REVIEWS]
            for policy in ("prefix-mean", "paper2d", "sentence-vote", "layer")}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("policy", ["prefix-mean", "paper2d", "sentence-vote", "layer"])
def test_classify_many_decides_as_one_at_a_time(classifiers, one_at_a_time, width, policy):
    clf = classifiers[width]
    assert clf.policy_name == "prefix-mean"  # the default bundle's default
    outcomes = dict(clf.classify_many(REVIEWS, policy=policy))
    assert sorted(outcomes) == list(range(len(REVIEWS)))  # plain strings are keyed by their index
    for i, single in enumerate(one_at_a_time[policy]):
        batched = outcomes[i]
        assert isinstance(batched, Result) and batched.policy == policy
        assert_same_decision(batched, single, (i, width))
        if width == 1:  # the same decode calls: bit-identical states, the same decision and the same cost
            assert exit_point(batched) == exit_point(single)
            assert batched.scores == single.scores and batched.token_layers == single.token_layers
            assert batched.operations == single.operations


def test_keys_are_kept_and_a_bad_text_becomes_an_error_record(classifiers):
    clf = classifiers[2]
    texts = [("a", REVIEWS[0]), ("empty", "  \n "), ("b", REVIEWS[1]), ("binary", "x\x00y"),
             ("long", "and then " * 300 + "the end."), ("c", REVIEWS[2])]
    outcomes = dict(clf.classify_many(texts))
    assert set(outcomes) == {"a", "empty", "b", "binary", "long", "c"}
    assert isinstance(outcomes["empty"], InputError) and "empty" in str(outcomes["empty"])
    assert isinstance(outcomes["binary"], InputError) and "binary" in str(outcomes["binary"])
    assert isinstance(outcomes["long"], ContextOverflowError) and outcomes["long"].exit_code == 6
    for key, text in (("a", REVIEWS[0]), ("b", REVIEWS[1]), ("c", REVIEWS[2])):
        assert_same_decision(outcomes[key], clf.classify(text), key)


def test_a_bad_policy_name_fails_once_before_reading(classifiers):
    from edge2dexit.errors import BundleError

    with pytest.raises(BundleError, match="policy 'fastest'"):
        list(classifiers[2].classify_many(REVIEWS, policy="fastest"))


@pytest.fixture(scope="module")
def wide_engine(smollm2_path):
    with Engine.load(smollm2_path, EngineSettings(n_ctx=N_CTX, width=8), prompt=TASK_PROMPT) as engine:
        yield engine


@pytest.fixture(scope="module")
def documents(wide_engine):
    splitter = Splitter()
    return [[wide_engine.tokenize(s) for s in splitter.split(text)] for text in REVIEWS]


def full_read(engine):
    """Every sentence in one decode at full depth, every layer read: [n_sentences, n_layer, n_embd]."""

    def reading(tokens):
        def read(doc):
            states = yield from doc.append(tokens, engine.n_layer)
            return np.stack([s.means for s in states])

        return read

    return reading


def test_run_many_reads_the_states_of_width_one_reads(wide_engine, documents):
    engine = wide_engine
    reading = full_read(engine)
    alone = [engine.run(reading(tokens)(engine.document())) for tokens in documents]
    finished = list(engine.run_many((i, reading(tokens)) for i, tokens in enumerate(documents)))
    assert all(isinstance(f, Finished) and f.error is None for f in finished)
    assert sorted(f.key for f in finished) == list(range(len(documents)))
    worst_abs, worst_rel, worst_cos = 0.0, 0.0, 1.0
    for f in finished:
        got, want = f.result, alone[f.key]
        assert got.shape == want.shape == (len(documents[f.key]), engine.n_layer, engine.n_embd)
        assert f.doc.valid_depths == (engine.n_layer,) * len(documents[f.key])
        assert f.doc.token_layers == sum(map(len, documents[f.key])) * engine.n_layer
        diff = np.abs(got - want)
        rel = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        worst_abs, worst_rel, worst_cos = max(worst_abs, diff.max()), max(worst_rel, rel.max()), min(worst_cos, cos.min())
    print(f"batched vs alone: max abs diff {worst_abs:.3g}, max relative row diff {worst_rel:.3g}, "
          f"min cosine {worst_cos:.6f}")
    assert worst_cos > 0.999 and worst_rel < 0.05


def test_run_many_with_one_document_in_flight_is_bit_identical(smollm2_engine):
    engine = smollm2_engine  # width 1
    splitter = Splitter()
    documents = [[engine.tokenize(s) for s in splitter.split(text)] for text in REVIEWS[:3]]
    reading = full_read(engine)
    alone = [engine.run(reading(tokens)(engine.document())) for tokens in documents]
    for f in engine.run_many((i, reading(tokens)) for i, tokens in enumerate(documents)):
        assert f.error is None and np.array_equal(f.result, alone[f.key])


def test_a_failing_reading_ends_as_an_error_and_the_others_finish(wide_engine, documents):
    engine = wide_engine
    reading = full_read(engine)
    alone = [engine.run(reading(tokens)(engine.document())) for tokens in documents]

    def fails_midway(doc):
        yield from doc.append(documents[0][:1], 4)
        raise ValueError("the reader gave up")

    def fails_at_once(doc):
        raise KeyError("no reading at all")

    jobs = [(0, reading(documents[0])), ("midway", fails_midway), (1, reading(documents[1])),
            ("at once", fails_at_once), (2, reading(documents[2]))]
    finished = {f.key: f for f in engine.run_many(jobs)}
    assert set(finished) == {0, 1, 2, "midway", "at once"}
    assert isinstance(finished["midway"].error, ValueError) and finished["midway"].result is None
    assert isinstance(finished["at once"].error, KeyError)
    for key in (0, 1, 2):
        assert finished[key].error is None
        np.testing.assert_allclose(finished[key].result, alone[key], rtol=0.05, atol=0.05 * np.abs(alone[key]).max())


def test_feature_extraction_in_batches_stores_the_states_of_one_at_a_time(wide_engine, smollm2_engine, tmp_path):
    from edge2dexit.convert.features import extract, open_store

    splitter = Splitter()
    labels = [1, 0, 1, 0, 1]
    alone = extract(smollm2_engine, REVIEWS, labels, splitter, tmp_path / "alone", max_sentences=4)
    batched = extract(wide_engine, REVIEWS, labels, splitter, tmp_path / "batched", max_sentences=4)
    assert batched.done == batched.n_docs == 5 and batched.labels.tolist() == labels
    np.testing.assert_array_equal(batched.offsets, alone.offsets)
    np.testing.assert_array_equal(batched.tokens, alone.tokens)
    assert np.diff(batched.offsets).tolist() == [min(4, len(splitter.split(t))) for t in REVIEWS]
    for i in range(5):
        got, want = (np.asarray(store.document(i)[0], dtype=np.float32) for store in (batched, alone))
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.min() > 0.999
        np.testing.assert_array_equal(batched.layer_means(i, 7), got[:, 7])
    # one decode per sentence at width 1: the store holds exactly the reference read (as float16)
    reference = smollm2_engine.run(sentence_by_sentence(smollm2_engine.document(),
                                                        [smollm2_engine.tokenize(s) for s in splitter.split(REVIEWS[1])[:4]],
                                                        smollm2_engine.n_layer))
    np.testing.assert_array_equal(alone.document(1)[0], reference.astype(np.float16).astype(np.float32))
    again = extract(wide_engine, REVIEWS, labels, splitter, tmp_path / "batched", max_sentences=4)  # resumes: done
    np.testing.assert_array_equal(again.states, open_store(tmp_path / "batched").states)
