"""How sure an accuracy is: intervals for figures measured on a finite split. Used by `eval` (every row gets an
interval) and by calibration (an operating point must beat its target with confidence, not by luck)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

Z95 = NormalDist().inv_cdf(0.975)  # 1.96: a two-sided 95% interval


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion hits / n. Unlike p ± z·sqrt(p(1 − p)/n) it stays inside [0, 1]
    and keeps a width at 0 or n hits, which small test splits and good classifiers reach."""
    p, z2 = hits / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_lower_bound(correct: np.ndarray, reference: np.ndarray, confidence: float) -> float:
    """One-sided lower confidence bound on accuracy(correct) − accuracy(reference), both scored on the same
    documents (normal approximation to the mean of the paired differences, each −1, 0 or 1).

    Pairing is what makes a small split usable: two exits that are right and wrong on the same documents differ by
    nothing however few documents there are, while each accuracy alone is uncertain by several points. With
    `confidence` 0 the bound is the plain difference."""
    diff = np.asarray(correct, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    n = len(diff)
    if confidence <= 0 or n < 2:
        return float(diff.mean())
    z = NormalDist().inv_cdf(confidence)
    return float(diff.mean() - z * diff.std(ddof=1) / math.sqrt(n))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), summed in log space (n in the thousands is fine)."""
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(errors: int, n: int, confidence: float) -> float:
    """The Clopper–Pearson one-sided upper confidence bound of an error rate seen as `errors` in `n`: the rate u at
    which seeing at most `errors` has probability 1 − confidence. Exact (it inverts the binomial test), so a bound
    ≤ α is the same as rejecting "the error rate exceeds α" at level 1 − confidence. 1 when nothing was seen."""
    if n == 0 or errors >= n:
        return 1.0
    low, high = errors / n, 1.0
    for _ in range(60):  # bisection on the monotone CDF: 2^-60 is far below any figure reported
        middle = (low + high) / 2
        if binomial_cdf(errors, n, middle) > 1 - confidence:
            low = middle
        else:
            high = middle
    return high


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """Split conformal prediction's threshold: the ⌈(n + 1)·coverage⌉-th smallest calibration score (infinity when
    that rank exceeds n). A new example's set — every label whose score is at most it — then holds the true label
    with probability at least `coverage`, for examples exchangeable with the calibration ones."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(ordered) + 1) * coverage)
    return float(ordered[rank - 1]) if rank <= len(ordered) else math.inf
