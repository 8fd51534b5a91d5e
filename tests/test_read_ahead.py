"""Reading ahead (`Document.min_decode_tokens`): sentence-by-sentence policies group sentences into decodes of at
least that many tokens, because llama.cpp's CPU attention is 1.7–2.8× slower per token below 64 (docs/llama-cpp.md
§9). Decisions must be those of a one-sentence-per-decode read; only what was paid for may differ. Pure logic
(property-based, on synthetic grids) and the real SmolLM2 with the default bundle."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge2dexit.bundle import load_bundle
from edge2dexit.classifier import DEFAULT_BUNDLE, Classifier
from edge2dexit.document import Document
from edge2dexit.settings import MIN_DECODE_TOKENS
from edge2dexit.engine import EngineSettings
from edge2dexit.policies import make_policy

from fakes import FakeExecutor
from helpers import BATCHING_SCORE_TOLERANCE, all_heads, grid, near_boundary, run, without_words

N_LAYER = 6
POLICY_PARAMS = {
    "prefix-mean": {"layer": 2, "threshold": 0.6, "min_sentences": 2},
    "sentence-vote": {"tau_ignore": 0.3, "tau_acc": 1.2},
}

texts = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.lists(st.floats(-0.99, 0.99), min_size=N_LAYER, max_size=N_LAYER), min_size=n, max_size=n),
    st.lists(st.integers(1, 40), min_size=n, max_size=n),
))


@pytest.mark.parametrize("name", sorted(POLICY_PARAMS))
@settings(max_examples=60, deadline=None)
@given(text=texts, min_tokens=st.sampled_from([2, 16, MIN_DECODE_TOKENS]))
def test_reading_ahead_decides_as_sentence_by_sentence(name, text, min_tokens):
    margins, tokens = text
    P = grid(*margins)
    alone, alone_doc = run(name, P, tokens, **POLICY_PARAMS[name])
    ahead, ahead_doc = run(name, P, tokens, min_decode_tokens=min_tokens, **POLICY_PARAMS[name])
    np.testing.assert_array_equal(ahead.probabilities, alone.probabilities)
    assert (ahead.exit_sentence, ahead.exit_layer, ahead.fired) == (alone.exit_sentence, alone.exit_layer, alone.fired)
    # What was read ahead is paid for and counted, never less than the sentence-by-sentence read.
    assert ahead.sentences_read >= alone.sentences_read and ahead_doc.token_layers >= alone_doc.token_layers
    assert ahead_doc.decode_calls <= alone_doc.decode_calls


def test_decodes_hold_at_least_min_tokens_except_the_last():
    fake = FakeExecutor(states=np.log(grid(*np.zeros((10, N_LAYER)))).astype(np.float32))  # never confident
    policy = make_policy("prefix-mean", all_heads(N_LAYER), N_LAYER, POLICY_PARAMS["prefix-mean"])
    doc = Document(0, 1000, seq=1, min_decode_tokens=10)
    fake.run(policy.read(doc, [list(range(n)) for n in (3, 4, 5, 6, 2, 2, 2, 9, 1, 1)]))
    assert [c.n_tokens for c in fake.decodes()] == [12, 10, 11, 2]  # (3+4+5) (6+2+2) (2+9) (1+1): the text ended


def test_a_stream_reads_ahead_only_through_what_has_arrived():
    """A live stream never waits for text that has not arrived: a sentence fed alone is read at once, the sentences
    of one piece share decodes as a whole text's do."""
    fake = FakeExecutor(states=np.log(grid(*np.zeros((7, N_LAYER)))).astype(np.float32))  # never confident
    policy = make_policy("prefix-mean", all_heads(N_LAYER), N_LAYER, {"layer": 2, "threshold": 0.6})
    stream = policy.stream(Document(0, 100, seq=1, min_decode_tokens=5))
    pieces = [[[0, 1]], [[0, 1, 2]], [[0, 1, 2], [0], [0, 1, 2], [0, 1]], [[0]]]
    for piece in pieces:
        for i, sentence in enumerate(piece):
            assert fake.run(stream.feed(sentence, more=i + 1 < len(piece))) is None
    assert [c.n_tokens for c in fake.decodes()] == [2, 3, 7, 2, 1]  # the third piece: (3+1+3) (2)


# Both policies decide after a few sentences, before any decode of one sentence would reach 64 tokens.
REVIEW = ("What a wonderful film. I loved every minute of it. The acting is superb. The story is moving and funny. "
          "The two leads are brilliant together. The music is beautiful. The ending made me cry with joy. "
          "I have not enjoyed a film this much in years. Go and see it. Take your friends. You will thank me. "
          "It is a masterpiece. I will watch it again.")


@pytest.mark.llama
def test_the_runtime_reads_ahead_and_decides_as_one_sentence_per_decode():
    """The default bundle on the real SmolLM2: read ahead (default) and one sentence per decode decide early at the
    same sentence and layer; the states differ by llama.cpp's batching noise only (docs/llama-cpp.md §5). The LLM
    reads at the policies' points behind the words, without them (the words alone would answer this review, and
    prefix-mean's point for reading every text, τ 0.9, leaves no margin clear of its threshold by 0.1)."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    llm_read = without_words(bundle)
    results = {}
    for min_tokens in (1, MIN_DECODE_TOKENS):
        with Classifier(llm_read, settings=EngineSettings(n_ctx=512, min_decode_tokens=min_tokens)) as clf:
            results[min_tokens] = {name: clf.classify(REVIEW, policy=name) for name in POLICY_PARAMS}
    clear = [name for name in POLICY_PARAMS if not near_boundary(results[1][name], results[MIN_DECODE_TOKENS][name])]
    assert "prefix-mean" in clear  # the review was chosen to decide clearly, far from every threshold
    for name in clear:
        alone, ahead = results[1][name], results[MIN_DECODE_TOKENS][name]
        assert (ahead.label, ahead.exit_sentence, ahead.exit_layer) == (alone.label, alone.exit_sentence,
                                                                        alone.exit_layer)
        assert alone.early and ahead.tokens >= MIN_DECODE_TOKENS > alone.tokens
        assert ahead.sentences_read > alone.sentences_read and ahead.token_layers > alone.token_layers
        for label, score in alone.scores.items():
            assert ahead.scores[label] == pytest.approx(score, abs=BATCHING_SCORE_TOLERANCE)
