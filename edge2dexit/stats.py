"""How sure a figure measured on a finite split is: intervals and bounds, from scipy.stats. Used by `eval` (every
row gets an interval) and by `convert` (an operating point must beat its target with confidence, not by luck; an
abstention margin must keep its error rate with confidence). Never imported by the runtime: what the runtime needs
of these (the bound of each abstention margin) is computed here at convert time and stored in the bundle."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta, norm

Z95 = float(norm.ppf(0.975))  # 1.96: a two-sided 95% interval


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion hits / n. Unlike p ± z·sqrt(p(1 − p)/n) it stays inside [0, 1]
    and keeps a width at 0 or n hits, which small test splits and good classifiers reach. Nothing seen (n = 0):
    the whole of [0, 1]."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = hits / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson_upper(events: int, n: int, confidence: float) -> float:
    """The Clopper–Pearson one-sided upper confidence bound of a rate seen as `events` in `n` (the beta quantile that
    inverts the binomial test): a bound ≤ α is the same as rejecting "the rate exceeds α" at level 1 − confidence.
    1 when nothing was seen."""
    if n == 0 or events >= n:
        return 1.0
    return float(beta.ppf(confidence, events + 1, n - events))


def clopper_pearson_lower(events: int, n: int, confidence: float) -> float:
    """The Clopper–Pearson one-sided lower confidence bound of a rate seen as `events` in `n`; 0 when none was."""
    if events <= 0 or n == 0:
        return 0.0
    return float(beta.ppf(1 - confidence, events, n - events + 1))


def paired_lower_bound(correct: np.ndarray, reference: np.ndarray, confidence: float) -> float:
    """One-sided lower confidence bound on accuracy(correct) − accuracy(reference), both scored on the same
    documents. Only the discordant pairs count: `gained` documents where `correct` alone is right, `lost` where the
    reference alone is. The difference is (gained − lost) / n; its bound is the Clopper–Pearson lower bound of the
    rate of gains minus the upper bound of the rate of losses, each at 1 − (1 − confidence) / 2, so that both hold
    together with `confidence` (exact, if conservative). Two exits with no discordant pair still get a bound below
    zero, about −ln(2 / (1 − confidence)) / n: n documents cannot show that two exits never disagree.

    Pairing is what makes a small split usable: two exits that are right and wrong on the same documents differ by
    little however few documents there are, while each accuracy alone is uncertain by several points. With
    `confidence` 0 the bound is the plain difference."""
    correct, reference = np.asarray(correct, dtype=bool), np.asarray(reference, dtype=bool)
    n = len(correct)
    gained, lost = int(np.sum(correct & ~reference)), int(np.sum(~correct & reference))
    if confidence <= 0 or n == 0:
        return (gained - lost) / n if n else 0.0
    each = 1 - (1 - confidence) / 2
    return clopper_pearson_lower(gained, n, each) - clopper_pearson_upper(lost, n, each)


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """Split conformal prediction's threshold: the ⌈(n + 1)·coverage⌉-th smallest calibration score (infinity when
    that rank exceeds n; minus infinity at coverage 0, which promises nothing). A new example's set — every label
    whose score is at most it — then holds the true label with probability at least `coverage`, for examples
    exchangeable with the calibration ones."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(ordered) + 1) * coverage)
    if rank < 1:
        return -math.inf
    return float(ordered[rank - 1]) if rank <= len(ordered) else math.inf


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[tuple[float, float, int, float]]:
    """The reliability diagram of answers given with top probability `confidence`, right where `correct`: per bin
    of equal width on [0, 1] that holds answers, (bin's lower edge, mean confidence, answers, accuracy)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    return [(b / bins, float(confidence[index == b].mean()), int((index == b).sum()), float(correct[index == b].mean()))
            for b in range(bins) if (index == b).any()]


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE: over bins of equal width (`reliability`), the gap between mean confidence and accuracy, weighted by the
    bin's share of the answers. 0 means every stated probability is the share of right answers at it."""
    rows = reliability(confidence, correct, bins)
    n = sum(count for _, _, count, _ in rows)
    return sum(count / n * abs(mean - accuracy) for _, mean, count, accuracy in rows) if n else 0.0
