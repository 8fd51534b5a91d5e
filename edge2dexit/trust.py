"""When to answer "unsure", and which labels cannot be ruled out: what `convert` calibrated for a bundle's default
policy (convert/calibrate.py `calibrate_trust`), as the runtime reads it from the bundle (key edge2dexit.trust).

- Abstention: for each calibrated target error rate α, the margin (p_top1 − p_top2) below which the classifier
  abstains; among the documents it answers, the error rate is then at most α with the recorded confidence over the
  calibration split (a Clopper–Pearson bound inside Learn then Test). A policy that stops on a margin reads on while
  its margin is below the abstention margin.
- Prediction sets (split conformal prediction): for each calibrated coverage, a threshold on 1 − p(label); the set of
  labels within it holds the true label for at least that share of documents like the calibration ones.

Both promises are about documents like those of the calibration split, read by the policy the trust was calibrated
for; for another policy the bundle makes none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import BundleError, SettingsError


@dataclass(frozen=True)
class Trust:
    policy: str  # the policy these were calibrated for (the bundle's default)
    margins: dict[float, float | None]  # α → abstention margin (None: no margin keeps the promise: always unsure)
    conformal: dict[float, float]  # coverage → largest 1 − p(label) of a label in the set (inf: every label)

    def margin_for(self, max_error: float) -> float:
        """The abstention margin that keeps the error of the answered documents ≤ `max_error`: that of the largest
        calibrated α not above it; infinity (abstain on everything) when there is none."""
        kept = [alpha for alpha in self.margins if alpha <= max_error + 1e-12]
        if not kept:
            raise SettingsError(f"no error rate at or below {max_error} was calibrated for this bundle; choose one "
                                f"of {', '.join(f'{a:g}' for a in sorted(self.margins))} or more")
        margin = self.margins[max(kept)]
        return math.inf if margin is None else margin

    def threshold_for(self, coverage: float) -> float:
        """The conformal threshold of the smallest calibrated coverage at least `coverage`."""
        kept = [c for c in self.conformal if c >= coverage - 1e-12]
        if not kept:
            raise SettingsError(f"no coverage at or above {coverage} was calibrated for this bundle; choose one of "
                                f"{', '.join(f'{c:g}' for c in sorted(self.conformal))} or less")
        return self.conformal[min(kept)]

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "margins": {str(a): m for a, m in self.margins.items()},
                "conformal": {str(c): (None if math.isinf(q) else q) for c, q in self.conformal.items()}}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "Trust":
        """The trust a bundle records, checked: probabilities where probabilities belong."""
        try:
            margins = {_probability(a): None if m is None else _probability(m) for a, m in record["margins"].items()}
            conformal = {_probability(c): math.inf if q is None else float(q)
                         for c, q in record["conformal"].items()}
            policy = record["policy"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"its trust record cannot be read ({type(exc).__name__}: {exc})") from None
        if not isinstance(policy, str) or any(not 0 <= q or math.isnan(q) for q in conformal.values()):
            raise BundleError("its trust record names no policy or holds a negative conformal threshold")
        return cls(policy, margins, conformal)


def _probability(value: Any) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise ValueError(f"{value!r} is not a probability")
    return number


def abstains(probabilities: np.ndarray, margin: float) -> bool:
    top2 = np.sort(probabilities)[-2:]
    return float(top2[1] - top2[0]) < margin


def prediction_set(probabilities: np.ndarray, threshold: float) -> list[int]:
    """The labels (indices, most probable first) whose 1 − p is at most `threshold`; a set that would be empty holds
    the most probable label (which can only add coverage)."""
    order = np.argsort(-probabilities)
    kept = [int(i) for i in order if 1 - probabilities[i] <= threshold]
    return kept or [int(order[0])]
