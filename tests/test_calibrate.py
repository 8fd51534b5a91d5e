"""Calibration over a small synthetic feature store (no llama.cpp): replaying a policy over stored states gives the
accuracy and the relative costs the policy's documents report, and `calibrate` picks, per policy, the cheapest
point within the tolerance of the best single layer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import beta

from edge2dexit.calibrated import Scales
from edge2dexit.convert.calibrate import Fold, HeldOut, Point, calibrate, layer_accuracies, pareto, rescore
from edge2dexit.heads import ExitHead, ExitHeads, Pooling
from edge2dexit.policies import calibration_grid, policy_names
from edge2dexit.stats import paired_lower_bound

from helpers import write_store

N_LAYER, C = 4, 2
LABELS = ("neg", "pos")


def identity_heads(pooling: str) -> ExitHeads:
    """Heads that return softmax(state): a state of log-probabilities is read back as those probabilities."""
    eye, zeros, ones = np.eye(C, dtype=np.float32), np.zeros(C, np.float32), np.ones(C, np.float32)
    return ExitHeads(pooling, LABELS, {l: ExitHead(l, "linear", zeros, ones, ((eye, zeros),)) for l in range(N_LAYER)})


HEADS = {Pooling.SENTENCE: identity_heads(Pooling.SENTENCE), Pooling.PREFIX: identity_heads(Pooling.PREFIX)}


def held_out(store) -> HeldOut:
    """The store's documents read by the identity heads, calibrated by scales that change nothing."""
    return HeldOut([Fold(store.select(), HEADS, None)]).calibrated(Scales.identity(HEADS, lexical=False))


@pytest.fixture
def store(tmp_path):
    """Four documents whose evidence for their label grows with depth: layer l gives p(label) = 0.5 + 0.15 l."""
    documents, labels, tokens = [], [], []
    for doc, (label, n) in enumerate([(0, 2), (1, 3), (1, 1), (0, 2)]):
        p = 0.5 + 0.15 * np.arange(N_LAYER)
        probs = np.stack([1 - p, p], axis=-1) if label == 1 else np.stack([p, 1 - p], axis=-1)
        documents.append(np.repeat(np.log(probs)[None], n, axis=0))
        labels.append(label)
        tokens += [3 + doc] * n
    return write_store(tmp_path / "store", documents, labels, tokens)


def test_replay_reports_accuracy_and_relative_costs(store):
    def at(policy, **params):
        return rescore(held_out(store), Point(policy, params, 0.0, 0.0, 0.0))

    assert at("full") == Point("full", {}, 1.0, 1.0, 1.0)
    shallow = at("layer", layer=0, pooling=Pooling.SENTENCE)
    assert shallow.accuracy == 0.5  # p = 0.5 on layer 0: the tie goes to class 0, right for half the documents
    assert shallow.cost == pytest.approx(1 / N_LAYER) and shallow.operations == pytest.approx(1 / N_LAYER)
    deep = at("layer", layer=2, pooling=Pooling.PREFIX)
    assert deep.accuracy == 1.0 and deep.cost == pytest.approx(3 / N_LAYER)


def test_layer_accuracies_and_calibration(store):
    accuracies = layer_accuracies(held_out(store))
    for pooling in Pooling.ALL:
        np.testing.assert_array_equal(accuracies[pooling], [0.5, 1, 1, 1])
    result = calibrate(held_out(store), policy_names(), tolerance=0.0, confidence=0.0)
    assert result.best_layer_accuracy == 1.0 and result.best_layer["layer"] == 1 and result.target == 1.0
    assert set(result.chosen) == set(policy_names()) == set(result.frontier)
    for name, point in result.chosen.items():
        assert point.accuracy == 1.0, name
        layers = {k: range(N_LAYER) for k in Pooling.ALL}
        assert point.cost <= 1.0 and point.params in calibration_grid(name, N_LAYER, layers)
    assert result.chosen["layer"].params["layer"] == 1 and result.chosen["layer"].cost == pytest.approx(2 / N_LAYER)
    assert json.loads(json.dumps(result.to_json()))["target"] == 1.0


def test_pareto_keeps_the_points_nothing_beats():
    points = [Point("p", {"i": i}, a, c, c) for i, (a, c) in enumerate([(0.9, 0.5), (0.8, 0.2), (0.85, 0.6),
                                                                        (0.95, 1.0), (0.8, 0.3)])]
    assert [p.params["i"] for p in pareto(points)] == [1, 0, 3]


def test_a_small_split_holds_the_operating_point_to_a_confident_bound(store):
    """Layer 0 is right on half of the four documents, the best layer on all: a tolerance of 0.5 admits layer 0 as
    measured, but four documents cannot show with 95% confidence that it loses no more than that — nor even that
    the best layer itself, right on the same documents, does (four documents cannot show that two exits never
    disagree), so no point meets the target and the most accurate, cheapest one is kept."""
    as_measured = calibrate(held_out(store), ["layer"], tolerance=0.5, confidence=0.0)
    assert as_measured.chosen["layer"].params["layer"] == 0 and as_measured.loss_bound["layer"] == 0.5
    confident = calibrate(held_out(store), ["layer"], tolerance=0.5, confidence=0.95)
    assert confident.chosen["layer"].params["layer"] == 1 and not confident.meets_target("layer")
    assert confident.loss_bound["layer"] == pytest.approx(1 - 0.025 ** (1 / 4))
    assert "95% confidence" in confident.describe_target() and "4 calibration documents" in confident.describe_target()


def test_paired_lower_bound_is_exact_and_never_certain():
    """Clopper–Pearson on the gains minus Clopper–Pearson on the losses, each at 97.5%: with no discordant pair
    the bound is still below zero, by what n documents leave unseen."""
    reference = np.array([1, 1, 0, 1, 0, 1, 1, 1], dtype=bool)
    assert paired_lower_bound(reference, reference, 0.95) == pytest.approx(-(1 - 0.025 ** (1 / 8)))
    assert paired_lower_bound(reference, reference, 0.0) == 0.0
    one_more_error = reference.copy()
    one_more_error[0] = False
    assert paired_lower_bound(one_more_error, reference, 0.0) == pytest.approx(-1 / 8)
    bound = paired_lower_bound(one_more_error, reference, 0.95)
    assert bound == pytest.approx(-beta.ppf(0.975, 2, 7))
    assert paired_lower_bound(one_more_error, reference, 0.99) < bound < -1 / 8
    gained = ~reference  # right exactly where the reference is wrong: 2 gains, 6 losses
    assert paired_lower_bound(gained, reference, 0.95) == pytest.approx(beta.ppf(0.025, 2, 7) - beta.ppf(0.975, 7, 2))


def test_the_prefix_mean_replay_from_cached_answers_is_the_policy_s_own_read(tmp_path):
    """Calibration replays prefix-mean from its heads' answers after every sentence (`_PrefixAnswers`): on random
    documents, with random MLP heads and scales, behind the words and alone, at every kind of parameter, it gives
    the decisions, exit sentences and costs of the policy's own read, and its probabilities to float rounding."""
    from edge2dexit.calibrated import ExitScale, WordsScale
    from edge2dexit.convert.calibrate import read, replay_documents

    rng = np.random.default_rng(7)
    n_layer, n_embd = 3, 5
    documents, labels, tokens = [], [], []
    for i in range(60):
        m = int(rng.integers(1, 9))
        documents.append(rng.normal(0, 1, (m, n_layer, n_embd)))
        labels.append(i % 2)
        tokens += [int(t) for t in rng.integers(5, 50, m)]
    store = write_store(tmp_path / "store", documents, labels, tokens)
    sizes = (n_embd, 4, 2)
    heads = {p: ExitHeads(p, LABELS, {l: ExitHead(
        l, "mlp", rng.normal(size=n_embd).astype(np.float32), rng.uniform(0.5, 2, n_embd).astype(np.float32),
        tuple((rng.normal(size=(o, i)).astype(np.float32) * 2, rng.normal(size=o).astype(np.float32))
              for i, o in zip(sizes, sizes[1:]))) for l in range(n_layer)}) for p in Pooling.ALL}
    scales = Scales(WordsScale(), {p: {l: ExitScale(tuple(rng.normal(0, 0.3, 6)), tuple(rng.normal(0, 0.3, 8)))
                                       for l in range(n_layer)} for p in Pooling.ALL})
    words = rng.dirichlet([1, 1], len(labels))
    held = HeldOut([Fold(store.select(), heads, words)]).calibrated(scales)  # a words scale of 1 leaves them as drawn
    fold = held.folds[0]
    for params in ({"layer": 1, "threshold": 0.3, "min_sentences": 1}, {"layer": 2, "threshold": 0.8, "min_sentences": 3},
                   {"layer": 0, "threshold": 0.95, "min_sentences": 5}, {"layer": 2, "threshold": 0.2, "min_margin": 0.7}):
        for behind_words in (True, False):
            fast = read(held, "prefix-mean", params, behind_words)
            slow = replay_documents(fold.documents, fold.heads, "prefix-mean", params,
                                    words if behind_words else None)
            for name in ("exit_sentences", "token_layers", "operations", "tokens", "sentences"):
                np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=f"{params} {name}")
            np.testing.assert_allclose(fast.probabilities, slow.probabilities, atol=1e-6)
            np.testing.assert_allclose(fast.raw, slow.raw, atol=1e-6)
