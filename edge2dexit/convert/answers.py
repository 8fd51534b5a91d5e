"""What a chosen operating point's answers are worth on documents nothing was chosen on (the test split): how often
right and at what cost, how honest their probabilities are (ECE and the reliability table, calibrated and as the heads
computed them), where stopping early flips the answer that reading to the end gives, and what `--max-error` keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SettingsError
from ..heads import margin
from ..policies import policy_class
from ..stats import expected_calibration_error, reliability, wilson_interval
from ..trust import REPORTED_ERRORS, Trust
from .calibrate import HeldOut, Point, Replayed, replay

# the exit sentences the flip table groups (-1: the words answered, before any sentence)
EXIT_GROUPS = ((-1, -1), (0, 0), (1, 1), (2, 2), (3, 3), (4, 5), (6, 9), (10, 1 << 30))


@dataclass(frozen=True)
class Flips:
    """Answers that exited at sentences `first`..`last` (1-based; 0 for the words): how many, how many of them were
    wrong where reading to the end was right, and how sure those wrong answers said they were."""

    first: int
    last: int
    exits: int
    flipped: int
    flipped_confidence: float | None  # mean top probability of the flipped answers


@dataclass(frozen=True)
class Answers:
    n_docs: int
    accuracy: float
    cost: float  # token-layers relative to a full read
    ece: float  # calibrated
    ece_raw: float  # the same answers as the heads (and words) computed them, before their scales
    reliability: list[tuple[float, float, int, float]]  # stats.reliability of the calibrated answers
    reliability_raw: list[tuple[float, float, int, float]]
    routes: dict[str, tuple[int, float, float]]  # "words" / "llm": (answers, accuracy, mean confidence)
    flips: list[Flips]
    abstention: list[dict[str, Any]]  # per α: margin, coverage, error among the answered and its interval


def measure(test: HeldOut, raw_words: np.ndarray | None, point: Point, trust: Trust | None) -> Answers:
    """`point` read over the held-out documents `test` (calibrated; `raw_words`: the words' probabilities before
    their scale), and, with `trust`, abstention at each of REPORTED_ERRORS the bundle can promise."""
    labels = test.labels
    answered = replay(test, point)
    by_words = answered.exit_sentences == -1
    raw = np.where(by_words[:, None], raw_words, answered.raw) if raw_words is not None else answered.raw
    correct = answered.probabilities.argmax(axis=1) == labels
    confidence, raw_confidence = answered.probabilities.max(axis=1), raw.max(axis=1)
    routes = {name: (int(where.sum()), float(correct[where].mean()), float(confidence[where].mean()))
              for name, where in (("words", by_words), ("llm", ~by_words)) if where.any()}
    return Answers(test.n_docs, float(correct.mean()), answered.cost,
                   expected_calibration_error(confidence, correct), expected_calibration_error(raw_confidence, correct),
                   reliability(confidence, correct), reliability(raw_confidence, correct), routes,
                   _flips(test, point, answered, correct), _abstention(test, point, trust) if trust is not None else [])


def _flips(test: HeldOut, point: Point, answered: Replayed, correct: np.ndarray) -> list[Flips]:
    """Per group of exit sentences, the answers that reading to the end would have got right and stopping got wrong.
    Reading to the end: the same policy at the same layer that never stops early (prefix-mean), else the `full`
    policy; behind the words with their evidence where the point reads so, but never answered by them alone."""
    whole = Point(point.policy, {**point.params, "threshold": 2.0, "min_margin": 0.0}, 0.0, 0.0, 0.0,
                  behind_words=point.behind_words) if point.policy == "prefix-mean" else \
        Point("full", {}, 0.0, 0.0, 0.0, behind_words=point.behind_words)
    whole_correct = replay(test, whole).probabilities.argmax(axis=1) == test.labels
    flipped = whole_correct & ~correct
    confidence = answered.probabilities.max(axis=1)
    rows = []
    for first, last in EXIT_GROUPS:
        exits = (answered.exit_sentences >= first) & (answered.exit_sentences <= last)
        if exits.any():
            here = exits & flipped
            rows.append(Flips(first + 1, last + 1, int(exits.sum()), int(here.sum()),
                              float(confidence[here].mean()) if here.any() else None))
    return rows


def _abstention(test: HeldOut, point: Point, trust: Trust) -> list[dict[str, Any]]:
    floor = policy_class(point.policy).margin_floor
    rows = []
    for alpha in REPORTED_ERRORS:
        try:
            promised = trust.margin_for(alpha)
        except SettingsError:
            rows.append({"error_rate": alpha, "margin": None})
            continue
        params = {**point.params, floor: promised.margin} if floor is not None and promised.margin else point.params
        answers = replay(test, Point(**{**point.__dict__, "params": params})).probabilities
        kept = margin(answers) >= promised.margin
        errors, n = int((answers[kept].argmax(axis=1) != test.labels[kept]).sum()), int(kept.sum())
        rows.append({"error_rate": alpha, "margin": promised.margin, "bound": promised.bound,
                     "coverage": n / test.n_docs, "error": errors / n if n else None,
                     "error_interval": list(wilson_interval(errors, n))})
    return rows
