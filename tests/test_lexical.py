"""The lexical exit: its numpy head computes scikit-learn's probabilities, it round-trips through the bundle and is
checked like every other part, calibration picks its threshold jointly with each policy's point (from "the words
decide everything" to "never"), and a text it is sure of never reaches llama.cpp."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from typer.testing import CliRunner

from edge2dexit import keys
from edge2dexit.bundle import load_bundle, write_bundle
from edge2dexit.calibrated import ExitScale, Scales
from edge2dexit.classifier import LEXICAL_EXIT, Classifier
from edge2dexit.cli import app
from edge2dexit.convert.calibrate import LEXICAL_THRESHOLDS, Fold, HeldOut, calibrate
from edge2dexit.errors import BundleError
from edge2dexit.keys import Keys
from edge2dexit.lexical import ANALYZER, LexicalHead, analyze, from_pipeline, lexical_pipeline
from edge2dexit.settings import EngineSettings

from helpers import (all_heads, assert_same_decision, grid, lexical_corpus, make_bundle, rewrite, tiny_convert,
                     with_lexical, write_store)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_the_numpy_head_computes_scikit_learns_probabilities(n_classes):
    train, labels = lexical_corpus(300, seed=1, n_classes=n_classes)
    test, _ = lexical_corpus(400, seed=2, n_classes=n_classes)
    test += ["", "  ", "nothing known here", "A", "LOVED<br />loved\r\nloved", "wonderful WONDERFUL Wonderful"]
    pipeline = lexical_pipeline(vocabulary_cap=300).fit(train, labels)
    head = from_pipeline(pipeline, n_classes)
    ours = np.stack([head.proba(text) for text in test])
    np.testing.assert_allclose(ours, pipeline.predict_proba(test), rtol=0, atol=1e-6)
    assert len(head.vocabulary) == 300  # the cap holds
    # the analyzer is scikit-learn's own: same n-grams, in the same order
    vectorizer = pipeline[0]
    for text in test:
        assert analyze(text) == vectorizer.build_analyzer()(text)


def test_a_bundle_with_a_lexical_head_round_trips_and_is_checked(tmp_path):
    alone = {"layer": 4, "threshold": 0.5, "min_sentences": 3}  # prefix-mean's parameters without the words
    original = dataclasses.replace(with_lexical(make_bundle(), {"prefix-mean": 0.8, "full": None}),
                                   llm_only_policies={"prefix-mean": alone})
    path = write_bundle(original, tmp_path / "b", half=False)
    reader = GGUFReader(path)
    assert reader.fields[Keys.Exits.FORMAT_VERSION.name].contents() == keys.FORMAT_VERSION
    vocabulary = next(t for t in reader.tensors if t.name == keys.LEXICAL_TENSORS[0])
    assert vocabulary.tensor_type == GGMLQuantizationType.I8  # one tensor, not a string array (see keys.py)
    loaded = load_bundle(path)
    assert loaded.lexical.vocabulary == original.lexical.vocabulary
    for name in ("idf", "weight", "bias"):
        np.testing.assert_array_equal(getattr(loaded.lexical, name), getattr(original.lexical, name))
    assert loaded.lexical_thresholds == {"prefix-mean": 0.8, "full": None}
    assert loaded.lexical_threshold("prefix-mean") == 0.8 and loaded.lexical_threshold("layer") is None
    assert loaded.policy_params("prefix-mean", behind_words=False) == alone
    assert loaded.policy_params("full", behind_words=False) == loaded.policy_params("full") == {}

    def refused(words, **changes):
        damaged = rewrite(path, tmp_path / "damaged.gguf", **changes)
        with pytest.raises(BundleError, match=words):
            load_bundle(damaged)

    text = GGUFValueType.STRING
    refused("analyzer 'word-1-3'", set_keys={Keys.Exits.LEXICAL_ANALYZER: ("word-1-3", text, None)})
    refused("not a policy of the bundle",
            set_keys={Keys.Exits.LEXICAL_THRESHOLDS: (json.dumps({"fastest": 0.9}), text, None)})
    refused("must be a probability", set_keys={Keys.Exits.LEXICAL_THRESHOLDS: ('{"full": 1.5}', text, None)})
    refused(f"missing key {Keys.Exits.LEXICAL_ANALYZER.name}", drop=[Keys.Exits.LEXICAL_ANALYZER])
    refused("needs the tensor lexical.idf", drop=["lexical.idf"])
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    refused("do not fit its", tensors={**tensors, "lexical.bias": np.zeros(3, np.float32)})
    refused("not UTF-8", tensors={**tensors, "lexical.vocabulary": np.array([-1, -1, 10, 65], np.int8)})
    refused("non-positive idf", tensors={**tensors, "lexical.idf": -tensors["lexical.idf"]})
    refused("must be an object, for a policy of the bundle",
            set_keys={Keys.Exits.LLM_ONLY_POLICIES: ('{"fastest": {}}', text, None)})
    refused(f"missing key {Keys.Exits.LLM_ONLY_POLICIES.name}", drop=[Keys.Exits.LLM_ONLY_POLICIES])
    refused("the lexical exit and its scale must come together",
            set_keys={Keys.Exits.SCALES: (json.dumps(Scales.identity(original.heads, lexical=False).to_json()),
                                          text, None)})
    for old in (4, 5):  # the formats of the lexical exit before its probabilities were calibrated
        refused(f"format version {old} by an older edge2dexit",
                set_keys={Keys.Exits.FORMAT_VERSION: (old, GGUFValueType.UINT32, None)})
    with pytest.raises(BundleError, match="lexical thresholds but no lexical head"):
        dataclasses.replace(original, lexical=None)


def synthetic_store(tmp_path, llm_right: np.ndarray, words_right: np.ndarray, words_sure: np.ndarray):
    """Documents of one sentence whose layer-l head is right where `llm_right` says, with lexical probabilities
    right where `words_right` says and sure (0.95) where `words_sure` says (else 0.6)."""
    labels = np.arange(len(llm_right)) % 2
    documents, lexical = [], []
    for label, right, w_right, sure in zip(labels, llm_right, words_right, words_sure):
        margin = 0.8 if right == (label == 1) else -0.8
        documents.append(np.log(grid([margin] * 4)).reshape(1, 4, 2))
        p = 0.95 if sure else 0.6
        lexical.append([1 - p, p] if w_right == (label == 1) else [p, 1 - p])
    store = write_store(tmp_path / "store", documents, labels.tolist(), [10] * len(labels))
    return store, np.array(lexical)


def held(store, words=None) -> HeldOut:
    """The store read by identity heads, with the words' probabilities `words` (already calibrated)."""
    return HeldOut([Fold(store.select(), all_heads(4), words)])


def test_calibration_chooses_from_all_words_to_no_words(tmp_path):
    n = 40
    # the words are right and sure everywhere: reading nothing meets the target, at no cost
    store, words = synthetic_store(tmp_path / "a", np.ones(n, bool), np.ones(n, bool), np.ones(n, bool))
    calibration = calibrate(held(store, words), ["layer"], 0.0, 0.0)
    chosen = calibration.chosen["layer"]
    assert chosen.cost == 0 and chosen.lexical_share == 1.0 and chosen.accuracy == 1.0
    assert chosen.lexical_threshold == LEXICAL_THRESHOLDS[0]
    # its parameters were never tried on a document; without the words the rule chooses among reading points only
    alone = calibration.llm_only["layer"]
    assert alone.lexical_threshold is None and alone.accuracy == 1.0 and alone.params == {"layer": 0, "pooling":
                                                                                            alone.params["pooling"]}
    # the words are wrong wherever they are sure: they never pay
    store, words = synthetic_store(tmp_path / "b", np.ones(n, bool), np.zeros(n, bool), np.ones(n, bool))
    chosen = calibrate(held(store, words), ["layer"], 0.0, 0.0).chosen["layer"]
    assert chosen.lexical_threshold is None and chosen.lexical_share == 0.0 and chosen.accuracy == 1.0
    # sure words are right, unsure ones wrong: the cheapest threshold that keeps every answer right lets the sure
    # half answer
    sure = np.arange(n) % 4 < 2
    store, words = synthetic_store(tmp_path / "c", np.ones(n, bool), sure, sure)
    calibration = calibrate(held(store, words), ["layer"], 0.0, 0.0)
    chosen = calibration.chosen["layer"]
    assert chosen.accuracy == 1.0 and chosen.lexical_share == 0.5 and 0.6 < chosen.lexical_threshold <= 0.95
    assert chosen.cost == pytest.approx(0.5 * calibration_grid_cost(chosen.params))
    assert calibration.reference == "layer" and calibration.lexical_accuracy == 0.5


def test_without_the_words_a_policy_is_chosen_as_with_no_lexical_head(tmp_path):
    """Words better than every layer make them the cascade's reference; the point for reading without them is still
    held to the best layer, and is the one a bundle converted without a lexical head would have."""
    n, accuracy_by_layer = 400, (0.8, 0.9, 0.9, 0.92)  # the documents each layer gets right are nested
    labels = np.arange(n) % 2
    documents = [np.log(grid([0.8 if (i < n * a) == (label == 1) else -0.8 for a in accuracy_by_layer]))
                 .reshape(1, 4, 2) for i, label in enumerate(labels)]
    store = write_store(tmp_path / "store", documents, labels.tolist(), [10] * n)
    words = np.where(labels[:, None] == 1, [0.05, 0.95], [0.95, 0.05])  # right and sure everywhere
    with_words = calibrate(held(store, words), ["layer"], 0.05, 0.95)
    without = calibrate(held(store), ["layer"], 0.05, 0.95)
    assert with_words.reference == "lexical" and without.reference == "layer"
    assert with_words.llm_only["layer"].params == without.chosen["layer"].params
    assert with_words.llm_only["layer"].params["layer"] == 1  # within 5 points of layer 3, not the most accurate
    assert with_words.llm_only_loss_bound["layer"] == pytest.approx(without.loss_bound["layer"])


def calibration_grid_cost(params: dict) -> float:
    """The relative cost of the layer policy at `params` on a one-sentence document of four layers."""
    return (params["layer"] + 1) / 4


@pytest.fixture(scope="module")
def lexical_bundle(tmp_path_factory, smollm2_path, tiny_bundle):
    """The session's tiny bundle converted again with the lexical exit, its features copied, not read again."""
    report = tiny_convert(tmp_path_factory.mktemp("lexical"), smollm2_path, lexical=True,
                          reuse=(tiny_bundle.bundle / "features",))
    return report


@pytest.mark.llama
def test_a_text_the_words_decide_never_reaches_llama_cpp(lexical_bundle, monkeypatch):
    from edge2dexit import llama

    bundle = load_bundle(lexical_bundle.bundle)
    assert bundle.lexical is not None and bundle.lexical_threshold(bundle.default_policy) is not None
    decodes = []
    real_decode = llama.llama_cpp.llama_decode
    monkeypatch.setattr(llama.llama_cpp, "llama_decode", lambda ctx, batch: decodes.append(1) or real_decode(ctx, batch))
    sure = "I loved every minute of it. The acting was superb. A wonderful, moving story."
    with Classifier(lexical_bundle.bundle, settings=EngineSettings(n_ctx=512)) as clf:
        assert bundle.lexical.proba(sure).max() >= bundle.lexical_threshold(clf.policy_name)
        decodes.clear()
        result = clf.classify(sure)
        assert decodes == [] and result.lexical and result.exit_layer == result.exit_sentence == LEXICAL_EXIT
        assert (result.label, result.token_layers, result.tokens, result.sentences_read) == ("pos", 0, 0, 0)
        many = dict(clf.classify_many([sure, sure.replace("loved", "hated")]))
        assert decodes == [] and all(r.lexical for r in many.values())
        read = clf.classify(sure, lexical=False)  # the LLM alone, on request
        assert decodes and not read.lexical and read.token_layers > 0
    with Classifier(lexical_bundle.bundle, settings=EngineSettings(n_ctx=512), lexical=False) as clf:
        assert not clf.classify(sure).lexical
    cli = CliRunner().invoke(app, ["classify", "-", "--bundle", str(lexical_bundle.bundle), "--n-ctx", "512"],
                             input=sure)
    assert cli.exit_code == 0 and "the words alone decided" in cli.stdout
    cli = CliRunner().invoke(app, ["classify", "-", "--bundle", str(lexical_bundle.bundle), "--n-ctx", "512",
                                   "--no-lexical", "--json"], input=sure)
    assert cli.exit_code == 0 and json.loads(cli.stdout)["exit_layer"] >= 0


@pytest.mark.llama
def test_full_is_always_the_llm_reading_every_sentence_through_every_layer(lexical_bundle):
    """`full` is the reference every speed-up is measured against: the words never answer for it, not even where
    they decide every other policy's text, and the card says so."""
    bundle = load_bundle(lexical_bundle.bundle)
    assert bundle.lexical_threshold("full") is None and bundle.policies["full"] == {}
    sure = "I loved every minute of it. The acting was superb. A wonderful, moving story."
    with Classifier(bundle, settings=EngineSettings(n_ctx=512)) as clf:
        assert clf.classify(sure).answered_by == "words"
        full = clf.classify(sure, policy="full")
    assert full.answered_by == "llm" and full.exit_layer == 29 and full.sentences_read == full.sentences_total == 3
    assert full.token_layers == full.tokens * 30
    row = next(line for line in (lexical_bundle.bundle / "README.md").read_text().splitlines()
               if line.startswith("| full |"))
    assert row.split(" | ")[8] == "—"  # "words at": never


@pytest.mark.llama
def test_without_the_words_each_policy_reads_at_its_parameters_for_that(lexical_bundle):
    """Behind words that answer every review here, each policy's own parameters were never tried on a document;
    `lexical=False` reads with those calibrated for reading every text, as a bundle without the words would."""
    bundle = load_bundle(lexical_bundle.bundle)
    assert set(bundle.llm_only_policies) == set(bundle.policies)
    assert any(bundle.llm_only_policies[name] != params for name, params in bundle.policies.items())
    alone_scales = Scales(None, {pooling: {layer: ExitScale(scale.alone) for layer, scale in layers.items()}
                                 for pooling, layers in bundle.scales.exits.items()})
    plain = dataclasses.replace(bundle, policies={**bundle.policies, **bundle.llm_only_policies}, lexical=None,
                                lexical_thresholds={}, llm_only_policies={}, trust={}, scales=alone_scales)
    texts = ["I loved every minute of it. The acting was superb.", "The film runs two hours. It was dreadful."]
    runs = {}
    for run, (loaded, settings) in {"words off": (bundle, {"lexical": False}), "off per call": (bundle, {}),
                                     "no words at all": (plain, {})}.items():
        with Classifier(loaded, settings=EngineSettings(n_ctx=512), **settings) as clf:
            runs[run] = [clf.classify(text, policy=policy, lexical=False)
                         for text in texts for policy in bundle.policies]
    for run in ("words off", "off per call"):  # each context its own: the same reads, up to a backend's noise
        for got, want in zip(runs[run], runs["no words at all"]):
            assert_same_decision(got, want, (run, want.policy))
    # abstention is calibrated for each way of reading, each bound to its own parameters
    assert bundle.trust["behind the words"].params != bundle.trust["alone"].params
    lowest = max(trust.tests[0].bound for trust in bundle.trust.values())
    with Classifier(bundle, settings=EngineSettings(n_ctx=512), max_error=lowest) as clf:
        alone = clf.reader.answering(lexical=False)
        assert alone.abstention.margin in [t.margin for t in bundle.trust["alone"].tests]
        assert clf.classify(texts[0], lexical=False).answered_by == "llm"


@pytest.mark.llama
def test_eval_measures_speed_against_the_llm_reading_everything(lexical_bundle):
    """Behind the words, `full` may read nothing (calibration lets the words answer all where full depth cannot meet
    the target): every speed-up is then against `full (LLM only)`, never a division by a cost of 0."""
    from edge2dexit.measure.evaluate import LLM_ONLY, evaluate

    texts = ["I loved every minute of it. The acting was superb.", "The film runs two hours. It was dreadful."]
    with Classifier(lexical_bundle.bundle, settings=EngineSettings(n_ctx=512)) as clf:
        ev = evaluate(clf, texts, [1, 0], ("prefix-mean",))
    assert ev.full_read.token_layers > 0
    if f"full {LLM_ONLY}" in ev.scores:
        assert ev.full_read is ev.scores[f"full {LLM_ONLY}"]
    table = ev.table()
    reference = next(line for line in table.splitlines() if line.startswith(ev.full_read.policy + " "))
    assert reference.count("1.00×") == 3 and "inf" not in table  # against itself; a row that read nothing: ∞


@pytest.mark.llama
def test_the_model_card_and_report_show_the_words_share(lexical_bundle):
    card = (lexical_bundle.bundle / "README.md").read_text()
    assert "answered by the words" in card and "lexical head" in card
    default = load_bundle(lexical_bundle.bundle).default_policy
    point = lexical_bundle.test[default]
    assert 0 <= point.lexical_share <= 1 and lexical_bundle.lexical_accuracy is not None
    assert "lexical" in lexical_bundle.summary()


def test_a_lexical_head_refuses_what_it_cannot_compute():
    idf, weight, bias = np.ones(2, np.float32), np.zeros((2, 2), np.float32), np.zeros(2, np.float32)
    with pytest.raises(BundleError, match="analyzer"):
        LexicalHead(("a", "b"), idf, weight, bias, analyzer="char-3")
    with pytest.raises(BundleError, match="distinct"):
        LexicalHead(("a", "a"), idf, weight, bias)
    with pytest.raises(BundleError, match="do not fit"):
        LexicalHead(("a", "b", "c"), idf, weight, bias)
    assert LexicalHead(("a b", "cc"), idf, weight, bias, ANALYZER).proba("cc dd") == pytest.approx([0.5, 0.5])
