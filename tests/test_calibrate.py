"""Calibration over a small synthetic feature store (no llama.cpp): replaying a policy over stored states gives the
accuracy and the relative costs the policy's documents report, and `calibrate` picks, per policy, the cheapest
point within the tolerance of the best single layer."""

from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pytest

from edge2dexit.convert.calibrate import calibrate, layer_accuracies, pareto, replay, Point
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
    full = replay(store, HEADS, "full", {})
    assert full == Point("full", {}, 1.0, 1.0, 1.0)
    shallow = replay(store, HEADS, "layer", {"layer": 0, "pooling": Pooling.SENTENCE})
    assert shallow.accuracy == 0.5  # p = 0.5 on layer 0: the tie goes to class 0, right for half the documents
    assert shallow.cost == pytest.approx(1 / N_LAYER) and shallow.operations == pytest.approx(1 / N_LAYER)
    deep = replay(store, HEADS, "layer", {"layer": 2, "pooling": Pooling.PREFIX})
    assert deep.accuracy == 1.0 and deep.cost == pytest.approx(3 / N_LAYER)


def test_layer_accuracies_and_calibration(store):
    accuracies = layer_accuracies(store, HEADS)
    for pooling in Pooling.ALL:
        np.testing.assert_array_equal(accuracies[pooling], [0.5, 1, 1, 1])
    result = calibrate(store, HEADS, policy_names(), tolerance=0.0)
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
    measured, but four documents cannot show with 95% confidence that it loses no more than that."""
    as_measured = calibrate(store, HEADS, ["layer"], tolerance=0.5, confidence=0.0)
    assert as_measured.chosen["layer"].params["layer"] == 0 and as_measured.loss_bound["layer"] == 0.5
    confident = calibrate(store, HEADS, ["layer"], tolerance=0.5, confidence=0.95)
    assert confident.chosen["layer"].params["layer"] == 1 and confident.meets_target("layer")
    assert confident.loss_bound["layer"] == 0.0  # right on the same documents as the best layer: no doubt at all
    assert "95% confidence" in confident.describe_target() and "4 calibration documents" in confident.describe_target()


def test_paired_lower_bound():
    reference = np.array([1, 1, 0, 1, 0, 1, 1, 1], dtype=bool)
    assert paired_lower_bound(reference, reference, 0.95) == 0.0
    one_more_error = reference.copy()
    one_more_error[0] = False
    assert paired_lower_bound(one_more_error, reference, 0.0) == pytest.approx(-1 / 8)
    bound = paired_lower_bound(one_more_error, reference, 0.95)
    assert bound == pytest.approx(-1 / 8 - NormalDist().inv_cdf(0.95) * np.std([-1] + [0] * 7, ddof=1) / np.sqrt(8))
    assert paired_lower_bound(one_more_error, reference, 0.99) < bound < -1 / 8
