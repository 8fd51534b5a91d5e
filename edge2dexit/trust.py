"""When to answer "unsure", and which labels cannot be ruled out: what `convert` calibrated for a bundle's default
policy (convert/calibrate.py `calibrate_trust`), as the runtime reads it from the bundle (key edge2dexit.trust).

One record per way of reading (`BEHIND_WORDS`: the lexical exit answers first; `ALONE`: the LLM reads every text),
each bound to the exact parameters it was calibrated with (a reading with others is refused: the promise would be
about another classifier).

- Abstention (`--max-error α`, any α in (0, 1)): the calibration documents were split in two. On the first half the
  margins (p_top1 − p_top2, calibrated) were put in an order: the one whose error there is bounded lowest first,
  then every lower margin from the highest down (each answers more), then the higher ones; on the
  second, each margin's answered documents and errors were counted, and the Clopper–Pearson upper bound of its error
  stored. For α, the margins are tested in that order, each at the record's confidence, until one's bound exceeds α
  (fixed-sequence testing: no correction for the number of margins, because the order was fixed before the second
  half was looked at); of those that passed, the one that answers most is used. With the recorded confidence over
  the second half, the error among the documents answered is then at most α. A policy that stops on a margin reads
  on while its margin is below the abstention margin, and every count was made reading so.
- Prediction sets (`--coverage c`): per margin (the reading depends on it) and per calibrated coverage, a split
  conformal threshold on 1 − p(label) over the second half; the set of labels within it holds the true label for at
  least that share of documents like the calibration ones (the smallest calibrated coverage at or above c is used).

Both promises are about documents like those of the calibration split, read exactly as calibrated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import BundleError, SettingsError

BEHIND_WORDS, ALONE = "behind the words", "alone"  # the two ways of reading a trust record is calibrated for
READINGS = (BEHIND_WORDS, ALONE)
REPORTED_ERRORS = (0.01, 0.02, 0.05, 0.1, 0.2)  # the α that cards and `eval` show abstention at


@dataclass(frozen=True)
class MarginTest:
    """One abstention margin as the certification half saw it."""

    margin: float  # answers whose margin is below it are "unsure" (0: never unsure)
    answered: int  # certification documents answered
    errors: int  # of those, answered wrongly
    bound: float  # Clopper–Pearson upper bound of errors / answered at the record's confidence (1 if none answered)
    conformal: dict[float, float]  # coverage → the largest 1 − p(label) of a label in the set (inf: every label)

    def to_json(self) -> dict[str, Any]:
        return {"margin": self.margin, "answered": self.answered, "errors": self.errors, "bound": self.bound,
                "conformal": {str(c): None if math.isinf(q) else q for c, q in self.conformal.items()}}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "MarginTest":
        margin, bound = _probability(record["margin"]), _probability(record["bound"])
        answered, errors = int(record["answered"]), int(record["errors"])
        if not 0 <= errors <= answered:
            raise ValueError(f"{errors} errors among {answered} answered")
        conformal = {_probability(c): math.inf if q is None else float(q) for c, q in record["conformal"].items()}
        if any(math.isnan(q) for q in conformal.values()):
            raise ValueError("a conformal threshold is NaN")
        return cls(margin, answered, errors, bound, conformal)


@dataclass(frozen=True)
class Trust:
    policy: str  # the policy these were calibrated for (the bundle's default)
    params: dict[str, Any]  # its exact parameters; behind the words with "lexical_threshold" too
    confidence: float  # of every bound
    n_docs: int  # certification documents
    tests: tuple[MarginTest, ...]  # every margin, in the testing order fixed on the first half

    def margin_for(self, max_error: float) -> MarginTest:
        """The margin that answers most among those passing fixed-sequence testing at `max_error`; SettingsError
        when none passes, saying what the bundle can promise."""
        if not 0 < max_error < 1:
            raise SettingsError(f"--max-error must lie strictly between 0 and 1, got {max_error}")
        passed = []
        for test in self.tests:
            if test.bound > max_error:
                break
            passed.append(test)
        if not passed:
            first = self.tests[0]
            raise SettingsError(
                f"this bundle cannot promise an error of at most {max_error:g} ({self.reading_name()}): the lowest "
                f"error it can promise is {first.bound:.3f}, answering {first.answered / self.n_docs:.0%} of texts "
                f"like its {self.n_docs} certification documents")
        return max(passed, key=lambda t: (t.answered, -t.margin))

    def reading_name(self) -> str:
        return "behind the words" if "lexical_threshold" in self.params else "the LLM reading alone"

    def conformal_threshold(self, margin: float, coverage: float) -> float:
        """The prediction-set threshold, read with abstention margin `margin`, of the smallest calibrated coverage
        at least `coverage`."""
        if not 0 < coverage < 1:
            raise SettingsError(f"--coverage must lie strictly between 0 and 1, got {coverage}")
        thresholds = next(t.conformal for t in self.tests if t.margin == margin)
        kept = [c for c in thresholds if c >= coverage - 1e-12]
        if not kept:
            raise SettingsError(f"no coverage at or above {coverage:g} was calibrated for this bundle; choose at "
                                f"most {max(thresholds):g}")
        return thresholds[min(kept)]

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy, "params": self.params, "confidence": self.confidence, "n_docs": self.n_docs,
                "tests": [t.to_json() for t in self.tests]}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "Trust":
        """The trust a bundle records, checked: probabilities where probabilities belong."""
        try:
            trust = cls(record["policy"], dict(record["params"]), _probability(record["confidence"]),
                        int(record["n_docs"]), tuple(MarginTest.from_json(t) for t in record["tests"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"its trust record cannot be read ({type(exc).__name__}: {exc})") from None
        if not isinstance(trust.policy, str) or not trust.tests or trust.n_docs < 1 \
                or not any(t.margin == 0 for t in trust.tests):
            raise BundleError("its trust record names no policy, no certification document or no margin 0")
        return trust


def _probability(value: Any) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise ValueError(f"{value!r} is not a probability")
    return number


def prediction_set(probabilities: np.ndarray, threshold: float) -> list[int]:
    """The labels (indices, most probable first) whose 1 − p is at most `threshold`; a set that would be empty holds
    the most probable label (which can only add coverage)."""
    order = np.argsort(-probabilities)
    kept = [int(i) for i in order if 1 - probabilities[i] <= threshold]
    return kept or [int(order[0])]
