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
