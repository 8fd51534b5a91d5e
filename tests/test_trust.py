"""Answers a user can trust: the abstention margins keep the error of the answered documents within α on fresh data
(checked over repeated draws where the error rate is known), conformal prediction sets hold the true label as often
as promised, a policy reads on below its abstention margin, and the CLI and library say "unsure"."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from edge2dexit.bundle import load_bundle
from edge2dexit.classifier import Classifier
from edge2dexit.cli import app
from edge2dexit.convert.calibrate import ERROR_RATES, calibrate_trust
from edge2dexit.errors import SettingsError
from edge2dexit.heads import margin
from edge2dexit.settings import EngineSettings
from edge2dexit.stats import clopper_pearson_upper, conformal_quantile
from edge2dexit.trust import Trust, prediction_set

from helpers import all_heads, grid, run, write_store


def draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n documents of a classifier whose error rate is known at every margin: the margin m is uniform on [0, 1] and
    the answer is right with probability (1 + m) / 2 — so the error among answers of margin ≥ t is (1 − t) / 4.
    Returns (probabilities [n, 2] of the answers, true labels)."""
    m = rng.uniform(0, 1, n)
    answer = rng.integers(0, 2, n)
    right = rng.uniform(0, 1, n) < (1 + m) / 2
    labels = np.where(right, answer, 1 - answer)
    p_answer = (1 + m) / 2
    probabilities = np.where(answer[:, None] == 1, np.stack([1 - p_answer, p_answer], 1),
                             np.stack([p_answer, 1 - p_answer], 1))
    return probabilities, labels


def calibrated_on(tmp_path, probabilities: np.ndarray, labels: np.ndarray):
    """calibrate_trust for the `layer` policy over one-sentence, one-layer documents whose head reads back
    `probabilities` (identity heads on log-probabilities)."""
    documents = [np.log(p).reshape(1, 1, 2) for p in probabilities]
    store = write_store(tmp_path, documents, labels.tolist(), [5] * len(labels))
    return calibrate_trust(store, all_heads(1), "layer", {"layer": 0, "pooling": "sentence"})


def test_the_answered_error_stays_within_alpha_on_fresh_data(tmp_path):
    """The guarantee, checked as it is stated: over repeated calibration draws, the error among the answered
    documents of a large fresh sample exceeds α in at most about 5% of the draws (here: at most 8 of 60, a generous
    binomial margin over 3), for every α."""
    rng = np.random.default_rng(0)
    draws, violations, coverages = 60, dict.fromkeys(ERROR_RATES, 0), {a: [] for a in ERROR_RATES}
    for k in range(draws):
        trust = calibrated_on(tmp_path / str(k), *draw(600, rng))
        fresh, truth = draw(20_000, rng)
        confidence = margin(fresh)
        for abstention in trust.abstention:
            alpha, m = abstention.error_rate, abstention.margin
            if m is None:
                continue  # abstains on everything: no error at all
            answered = confidence >= m
            error = np.mean(fresh[answered].argmax(1) != truth[answered]) if answered.any() else 0.0
            violations[alpha] += error > alpha
            coverages[alpha].append(answered.mean())
    for alpha in ERROR_RATES:
        assert violations[alpha] <= 8, (alpha, violations[alpha])
    # and it is not vacuous: at α = 10% the known error (1 − t)/4 ≤ 0.1 needs t ≥ 0.6, so at most 40% can be
    # answered; 600 calibration documents, held to a confident bound, answer about half of that
    assert 0.1 < np.mean(coverages[0.10]) <= 0.42


def test_conformal_sets_hold_the_true_label_as_often_as_promised(tmp_path):
    rng = np.random.default_rng(1)
    held = {0.8: [], 0.9: [], 0.95: []}
    for k in range(30):
        trust = calibrated_on(tmp_path / str(k), *draw(500, rng)).trust
        fresh, truth = draw(5_000, rng)
        for coverage in held:
            threshold = trust.threshold_for(coverage)
            held[coverage].append(np.mean([y in prediction_set(p, threshold) for p, y in zip(fresh, truth)]))
    for coverage, shares in held.items():
        assert np.mean(shares) >= coverage - 0.01, (coverage, np.mean(shares))


def test_clopper_pearson_and_the_conformal_quantile():
    assert clopper_pearson_upper(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100), abs=1e-9)
    assert clopper_pearson_upper(3, 100, 0.95) == pytest.approx(0.0757108, abs=1e-6)  # scipy.stats.beta.ppf
    assert clopper_pearson_upper(0, 0, 0.95) == 1.0
    scores = np.arange(1, 10) / 10  # n = 9
    assert conformal_quantile(scores, 0.8) == 0.8  # rank ceil(10 * 0.8) = 8
    assert conformal_quantile(scores, 0.95) == math.inf  # rank 10 > 9: every label


def test_trust_picks_the_calibrated_margin_and_refuses_what_it_was_not_calibrated_for():
    trust = Trust("prefix-mean", {0.01: None, 0.05: 0.7, 0.1: 0.4}, {0.9: 0.6})
    assert trust.margin_for(0.05) == 0.7 and trust.margin_for(0.07) == 0.7 and trust.margin_for(0.5) == 0.4
    assert trust.margin_for(0.01) == math.inf  # no margin kept the promise: always unsure
    with pytest.raises(SettingsError, match="no error rate at or below 0.005"):
        trust.margin_for(0.005)
    assert trust.threshold_for(0.85) == 0.6
    with pytest.raises(SettingsError, match="no coverage at or above 0.95"):
        trust.threshold_for(0.95)
    assert Trust.from_json(json.loads(json.dumps(trust.to_json()))) == trust
    assert prediction_set(np.array([0.5, 0.3, 0.2]), 0.75) == [0, 1] and prediction_set(np.array([0.6, 0.4]), 0) == [0]


def test_prefix_mean_reads_on_below_its_abstention_margin():
    m = np.zeros((4, 4))
    m[:, 2] = [0.75, 0.75, 0.95, 0.95]
    stops, doc = run("prefix-mean", grid(*m), [2] * 4, layer=2, threshold=0.7)
    assert stops.exit_sentence == 0 and doc.n_sentences == 1
    reads_on, doc = run("prefix-mean", grid(*m), [2] * 4, layer=2, threshold=0.7, min_margin=0.8)
    assert reads_on.exit_sentence > 0 and float(margin(reads_on.probabilities)) >= 0.8


@pytest.mark.llama
def test_the_classifier_says_unsure_and_keeps_its_best_guess(tiny_bundle):
    bundle = tiny_bundle.bundle
    text = "The film runs two hours. It was shown on a Tuesday."  # no opinion at all: a coin toss for the heads
    with Classifier(bundle, settings=EngineSettings(n_ctx=512), max_error=0.01, coverage=0.8) as clf:
        result = clf.classify(text)
        assert result.abstained == (float(margin(np.array(list(result.scores.values())))) < clf.abstain_below)
        assert result.prediction_set and set(result.prediction_set) <= {"neg", "pos"}
        assert result.label in result.prediction_set
    default = load_bundle(bundle).default_policy
    with pytest.raises(SettingsError, match=f"calibrated for the {default} policy"):
        Classifier(bundle, policy="paper2d" if default != "paper2d" else "full", max_error=0.05)
    cli = CliRunner().invoke(app, ["classify", "-", "--bundle", str(bundle), "--n-ctx", "512", "--max-error",
                                   "0.01"], input=text)
    assert cli.exit_code == 0
    assert ("unsure (best guess" in cli.stdout) == result.abstained
    as_json = CliRunner().invoke(app, ["classify", "-", "--bundle", str(bundle), "--n-ctx", "512", "--max-error",
                                       "0.01", "--json"], input=text)
    record = json.loads(as_json.stdout)
    assert record["abstained"] == result.abstained and record["label"] in ("neg", "pos") and record["scores"]
