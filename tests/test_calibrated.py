"""Probabilities that mean what they say, and answers that say why (no llama.cpp): scales fitted by maximum likelihood
recover a known temperature and bring the calibration error down, a stop rule on calibrated probabilities is not
fooled by an opening a head is too sure of, and an answer's evidence adds up to its log-odds."""

from __future__ import annotations

import numpy as np
import pytest

from edge2dexit.calibrated import CalibratedHeads, ExitScale, Scales, WordsScale
from edge2dexit.convert.calibrate import Fold, HeldOut, fit_scales, fit_words
from edge2dexit.heads import ExitHead, ExitHeads, Pooling
from edge2dexit.lexical import fit_lexical
from edge2dexit.stats import expected_calibration_error, reliability

from helpers import grid, lexical_corpus, run, write_store

LABELS = ("neg", "pos")


def overconfident(n: int, temperature: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Raw probabilities [n, 2] whose log-odds are `temperature` times what the labels' real odds are."""
    true_log_odds = rng.normal(0, 2, n)
    labels = (rng.uniform(size=n) < 1 / (1 + np.exp(-true_log_odds))).astype(int)
    shown = temperature * true_log_odds
    p1 = 1 / (1 + np.exp(-shown))
    return np.stack([1 - p1, p1], axis=1), labels


def test_the_words_scale_recovers_a_known_temperature_and_the_calibration_error_falls():
    rng = np.random.default_rng(0)
    raw, labels = overconfident(20_000, 3.0, rng)
    scale = fit_words(raw, labels)
    assert scale.beta == pytest.approx(1 / 3, rel=0.08)
    fresh, truth = overconfident(20_000, 3.0, rng)
    before = expected_calibration_error(fresh.max(1), fresh.argmax(1) == truth)
    after = expected_calibration_error(scale(fresh).max(1), fresh.argmax(1) == truth)
    assert before > 0.1 and after < 0.02
    assert (scale(fresh).argmax(1) == fresh.argmax(1)).all()  # a temperature never changes the answer


def linear_prefix_heads(n_layer: int, n_embd: int, rng: np.random.Generator) -> ExitHeads:
    return ExitHeads(Pooling.PREFIX, LABELS, {layer: ExitHead(
        layer, "linear", rng.normal(size=n_embd).astype(np.float32), rng.uniform(0.5, 2, n_embd).astype(np.float32),
        ((rng.normal(size=(2, n_embd)).astype(np.float32), rng.normal(size=2).astype(np.float32)),))
        for layer in range(n_layer)})


def misleading_openings(directory, n: int, rng: np.random.Generator):
    """A store of `n` documents of 8 sentences whose first two point the wrong way half of the time, loudly."""
    n_embd, documents, labels = 2, [], []
    for i in range(n):
        label = i % 2
        sign = 1.0 if label else -1.0
        states = rng.normal(0, 1, (8, 1, n_embd))
        states[:, 0, 0] += sign * 2.0
        states[:2, 0, 0] = np.where(rng.uniform() < 0.5, -sign, sign) * 6.0  # a loud opening, right or wrong
        documents.append(states)
        labels.append(label)
    return write_store(directory, documents, labels, [4] * 8 * n)


def test_head_scales_learn_that_early_prefixes_are_too_sure(tmp_path):
    """Documents whose first sentences point the wrong way half of the time: a head reading the running mean is as
    sure after one sentence as after eight. Its fitted scale shrinks the early reads (β grows with the sentences
    read), and on fresh documents, where the head is sure of a coin toss, the calibrated probability says so."""
    rng = np.random.default_rng(1)
    weight = np.array([[-1.5, 0.0], [1.5, 0.0]], dtype=np.float32)
    heads = {Pooling.PREFIX: ExitHeads(Pooling.PREFIX, LABELS, {0: ExitHead(
        0, "linear", np.zeros(2, np.float32), np.ones(2, np.float32), ((weight, np.zeros(2, np.float32)),))})}
    scales = fit_scales(HeldOut([Fold(misleading_openings(tmp_path / "fit", 400, rng).select(), heads, None)]))
    log_beta = scales.exits[Pooling.PREFIX][0].alone
    assert log_beta[0] < log_beta[4] - 1, log_beta  # one sentence read is worth far less than six
    fresh = HeldOut([Fold(misleading_openings(tmp_path / "fresh", 400, rng).select(), heads, None)])
    log_p, y, _, read = fresh.examples(Pooling.PREFIX, 0)
    p_raw = np.exp(log_p)
    x = fresh.folds[0].documents.examples(Pooling.PREFIX, 0)[0]
    p = fresh.calibrated(scales).folds[0].heads[Pooling.PREFIX].proba(0, x, read)
    early = read <= 2
    raw_error = expected_calibration_error(p_raw[early].max(1), p_raw[early].argmax(1) == y[early])
    error = expected_calibration_error(p[early].max(1), p[early].argmax(1) == y[early])
    assert raw_error > 0.45 and error < 0.1, (raw_error, error)  # a coin toss shown as a certainty, then as a coin toss


def test_a_calibrated_stop_rule_reads_past_a_misleading_opening():
    """The head says 0.97 for the wrong class after the first sentence; its scale for one sentence read says what
    that is worth, so the stop rule reads on and the text's real evidence answers."""
    m = np.zeros((6, 3))
    m[:, 1] = [-0.94, 0.9, 0.9, 0.9, 0.9, 0.9]  # sentence 0: "negative 0.97"; then plainly positive
    raw, _ = run("prefix-mean", grid(*m), [5] * 6, layer=1, threshold=0.9)
    assert raw.exit_sentence == 0 and raw.label_index == 0  # the raw softmax stops on the opening, wrong
    log_p = np.log(grid(*m)).astype(np.float32)
    heads = {p: ExitHeads(p, LABELS, {l: ExitHead(l, "linear", np.zeros(2, np.float32), np.ones(2, np.float32),
                                                   ((np.eye(2, dtype=np.float32), np.zeros(2, np.float32)),))
                                      for l in range(3)}) for p in Pooling.ALL}
    # a fifth of the log-odds after one sentence, the whole of them from two on
    scales = {l: ExitScale((np.log(0.2), 0, 0, 0, 0, 0)) for l in range(3)}
    calibrated = {p: CalibratedHeads(h, scales) for p, h in heads.items()}
    from edge2dexit.document import replay
    from edge2dexit.policies import make_policy

    policy = make_policy("prefix-mean", calibrated, 3, {"layer": 1, "threshold": 0.9})
    decision, _ = replay(lambda doc: policy.read(doc, [range(5)] * 6), log_p, [5] * 6)
    assert decision.exit_sentence > 0 and decision.label_index == 1


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_evidence_adds_up_to_the_calibrated_log_odds(kind):
    """For a linear head, each sentence's share of the log-odds is exact; for an MLP, exact for its linear map where
    it read (its ReLUs held as they were there), which is what it computes at that point: both add up."""
    rng = np.random.default_rng(2)
    n_embd = 6
    sizes = (n_embd, 5, 2) if kind == "mlp" else (n_embd, 2)
    head = ExitHead(3, kind, rng.normal(size=n_embd).astype(np.float32), rng.uniform(1, 3, n_embd).astype(np.float32),
                    tuple((rng.normal(size=(o, i)).astype(np.float32), rng.normal(size=o).astype(np.float32))
                          for i, o in zip(sizes, sizes[1:])))
    heads = CalibratedHeads(ExitHeads(Pooling.PREFIX, LABELS, {3: head}),
                            {3: ExitScale((0.3, -0.2, 0, 0, 0.1, 0), (0.1, 0.2, 0.5, -0.3, 0.7, 0.1, 0.4, 0.7))})
    states = [rng.normal(size=n_embd).astype(np.float32) * 3 for _ in range(4)]
    x = np.mean(states, axis=0)
    for words in (None, np.array([0.3, 0.7])):
        p = heads.proba(3, x, 4, words)
        basis = heads.basis(3, 4, words, range(4), states)
        label, against = int(p.argmax()), int(p.argmin())
        parts = basis.explain(label, against)
        assert parts.total == pytest.approx(float(np.log(p[label]) - np.log(p[against])), abs=1e-4)
        assert set(parts.sentences) == {0, 1, 2, 3}
        assert (parts.words == 0) == (words is None)
        np.testing.assert_allclose(basis.raw(), head.proba(x), atol=1e-6)


def test_the_words_explain_their_answer_exactly():
    texts, labels = lexical_corpus(300)
    head = fit_lexical(texts, labels, 2)
    text = "A wonderful, superb film. Boring at times."
    p = head.proba(text)
    label, against = int(p.argmax()), int(p.argmin())
    ngrams, bias = head.explain(text, label, against, top=1000)
    log_odds = float(np.log(p[label]) - np.log(p[against]))
    shares = [share for _, share in ngrams]
    # every n-gram that pushes towards the label is listed; those against it are not, so their sum falls short
    columns, values = head._features(text)
    everything = float(((head.weight[label, columns] - head.weight[against, columns]) * values).sum())
    assert everything + bias == pytest.approx(log_odds, abs=1e-4)
    assert sum(shares) >= everything and all(s > 0 for s in shares) and shares == sorted(shares, reverse=True)
    assert {"wonderful", "superb"} & {ngram for ngram, _ in ngrams}


def test_scales_round_trip_and_refuse_nonsense():
    heads = {Pooling.PREFIX: linear_prefix_heads(2, 3, np.random.default_rng(0))}
    scales = Scales.identity(heads, lexical=True)
    assert Scales.from_json(scales.to_json()) == scales
    with pytest.raises(Exception, match="finite"):
        ExitScale((0.0, float("nan"), 0, 0, 0, 0))
    with pytest.raises(Exception, match="positive"):
        WordsScale(0.0)


def test_reliability_and_ece():
    confidence = np.array([0.95, 0.95, 0.65, 0.65, 0.65, 0.65])
    correct = np.array([1, 1, 1, 1, 0, 0], dtype=bool)
    rows = reliability(confidence, correct)
    assert rows == [(0.6, 0.65, 4, 0.5), (0.9, 0.95, 2, 1.0)]
    assert expected_calibration_error(confidence, correct) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.05)
