"""Calibration on a held-out split (never the test split): for every policy, replay a grid of parameters over stored
features, each with the lexical exit before it at a grid of thresholds, and keep the accuracy/cost frontier; choose,
per policy, the cheapest point that is, with the stated confidence, at most T less accurate than the reference;
then, for the default policy, the margins below which it abstains at each target error rate, and its conformal
prediction-set thresholds.

The reference is the better of the best single layer and the lexical head alone: a cascade must earn its cost
against both. The confidence is what keeps a small calibration split honest: on 74 documents a point one error behind
a perfect best layer reads as 0.986 and passes a plain 2-point tolerance by luck; its paired lower bound (stats.py)
does not.

Cost is measured in token-layers — what llama.cpp really computes, re-decodes included — relative to reading every
token through every layer; a document the lexical exit answers costs none. Replays use the very policy code the
runtime runs (`document.replay` under `policies.make_policy`), one replay per parameter setting: the lexical
threshold only decides which documents reach it, so every threshold is scored from the same replay.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from ..document import MIN_DECODE_TOKENS, replay as replay_document
from ..heads import ExitHeads, margin, whole_text_input
from ..policies import calibration_grid, make_policy, policy_class, policy_names
from ..stats import clopper_pearson_upper, conformal_quantile, paired_lower_bound
from ..trust import Trust
from .features import FeatureStore

# The lexical exit answers where its top probability is at least the threshold: from "the words decide everything"
# (0) to "the lexical exit never pays" (None).
LEXICAL_THRESHOLDS = (0.0, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, None)
ERROR_RATES = (0.01, 0.02, 0.05, 0.10)  # the target error rates α abstention is calibrated for
# the abstention margins Learn then Test tries, each tested at the confidence shared out over all of them
ABSTENTION_MARGINS = tuple(np.round(np.arange(0.95, -0.001, -0.05), 2))
COVERAGES = (0.8, 0.9, 0.95)  # conformal prediction sets: the share of documents whose set holds the true label


@dataclass(frozen=True)
class Point:
    policy: str
    params: dict[str, Any]
    accuracy: float
    cost: float  # token-layers / (tokens × n_layer)
    operations: float  # operations / (sentences × n_layer), as the paper counts them
    lexical_threshold: float | None = None  # the words alone answered where their top probability reached it
    lexical_share: float = 0.0  # of the documents, answered by the words alone
    lexical_accuracy: float | None = None  # on those documents


@dataclass(frozen=True)
class Replayed:
    """One policy setting replayed over every document of a store."""

    probabilities: np.ndarray  # [n_docs, n_classes] of each decision
    token_layers: np.ndarray  # [n_docs]
    operations: np.ndarray  # [n_docs]
    tokens: np.ndarray  # [n_docs]
    sentences: np.ndarray  # [n_docs]
    n_layer: int

    def cascade(self, lexical: np.ndarray | None, threshold: float | None) -> "Replayed":
        """What the cascade gives: the lexical probabilities where their top one reaches `threshold`, at no cost."""
        if lexical is None or threshold is None:
            return self
        words = lexical.max(axis=1) >= threshold
        return Replayed(np.where(words[:, None], lexical, self.probabilities), np.where(words, 0, self.token_layers),
                        np.where(words, 0, self.operations), self.tokens, self.sentences, self.n_layer)

    def point(self, policy: str, params: Mapping[str, Any], labels: np.ndarray, lexical: np.ndarray | None = None,
              threshold: float | None = None) -> Point:
        answered = self.cascade(lexical, threshold)
        correct = answered.probabilities.argmax(axis=1) == labels
        words = lexical.max(axis=1) >= threshold if lexical is not None and threshold is not None else None
        return Point(policy, dict(params), float(correct.mean()),
                     float(answered.token_layers.sum() / (self.tokens.sum() * self.n_layer)),
                     float(answered.operations.sum() / (self.sentences.sum() * self.n_layer)), threshold,
                     float(words.mean()) if words is not None else 0.0,
                     float(correct[words].mean()) if words is not None and words.any() else None)


def replay_documents(
    store: FeatureStore, heads: Mapping[str, ExitHeads], policy: str, params: Mapping[str, Any]
) -> Replayed:
    """Run `policy` with `params` over every document of the store, reading ahead as the runtime does (so that
    replayed costs are what a live read computes)."""
    runner = make_policy(policy, heads, store.n_layer, params)
    n = store.n_docs
    probabilities = np.zeros((n, len(next(iter(heads.values())).labels)))
    token_layers, operations, tokens, sentences = (np.zeros(n, dtype=np.int64) for _ in range(4))
    for i in range(n):
        states, counts = store.document(i)
        stand_ins = [range(c) for c in counts]  # sentences of the right length: a replay reads no token
        decision, doc = replay_document(lambda d: runner.read(d, stand_ins), states, counts, MIN_DECODE_TOKENS)
        probabilities[i] = decision.probabilities
        token_layers[i], operations[i] = doc.token_layers, doc.operations
        tokens[i], sentences[i] = int(counts.sum()), len(counts)
    return Replayed(probabilities, token_layers, operations, tokens, sentences, store.n_layer)


def replay(store: FeatureStore, heads: Mapping[str, ExitHeads], policy: str, params: Mapping[str, Any],
           lexical: np.ndarray | None = None, threshold: float | None = None) -> Point:
    """Accuracy and relative costs of `policy` with `params` over the store, behind the lexical exit at `threshold`
    (`lexical`: the lexical head's probabilities of the store's documents)."""
    return replay_documents(store, heads, policy, params).point(policy, params, store.labels, lexical, threshold)


@dataclass(frozen=True)
class Calibration:
    best_layer_accuracy: float
    best_layer: dict[str, Any]  # {"pooling", "layer"}
    reference: str  # what every point is held to: "layer" (the best single layer) or "lexical" (the words alone)
    reference_accuracy: float
    tolerance: float
    confidence: float  # of the one-sided bound each chosen point's accuracy loss is held to
    n_docs: int  # calibration documents
    chosen: dict[str, Point]  # per policy
    loss_bound: dict[str, float]  # per policy: upper confidence bound of (reference − chosen point) accuracy
    frontier: dict[str, list[Point]]  # per policy, Pareto points only
    lexical_accuracy: float | None = None  # the lexical head alone on the calibration split
    # with a lexical head, per policy: the point a bundle without one would choose (among those without the words,
    # held to the best single layer), for reading with the lexical exit off (behind the words the point fits the
    # documents they leave); its loss bound is against that layer
    llm_only: dict[str, Point] = field(default_factory=dict)
    llm_only_loss_bound: dict[str, float] = field(default_factory=dict)

    @property
    def target(self) -> float:
        return self.reference_accuracy - self.tolerance

    def meets_target(self, policy: str) -> bool:
        return self.loss_bound[policy] <= self.tolerance

    def describe_target(self) -> str:
        best = self.best_layer
        sure = f"with {self.confidence:.0%} confidence (paired bound)" if self.confidence > 0 else "as measured"
        layer = f"the best single layer, {best['pooling']}@{best['layer']} at {self.best_layer_accuracy:.3f}"
        words = "" if self.lexical_accuracy is None else f", and the lexical head alone at {self.lexical_accuracy:.3f}"
        held = "the lexical head" if self.reference == "lexical" else "the best single layer"
        return (f"target: at most {self.tolerance} below the better of {layer}{words} (so {held}), on {self.n_docs} "
                f"calibration documents, {sure}")

    def to_json(self) -> dict[str, Any]:
        return {
            "best_layer_accuracy": self.best_layer_accuracy,
            "best_layer": self.best_layer,
            "reference": self.reference,
            "reference_accuracy": self.reference_accuracy,
            "lexical_accuracy": self.lexical_accuracy,
            "tolerance": self.tolerance,
            "confidence": self.confidence,
            "n_docs": self.n_docs,
            "target": self.target,
            "chosen": {k: asdict(v) for k, v in self.chosen.items()},
            "loss_bound": self.loss_bound,
            "frontier": {k: [asdict(p) for p in v] for k, v in self.frontier.items()},
            "llm_only": {k: asdict(v) for k, v in self.llm_only.items()},
            "llm_only_loss_bound": self.llm_only_loss_bound,
        }


def layer_correct(store: FeatureStore, heads: Mapping[str, ExitHeads]) -> dict[str, np.ndarray]:
    """Per pooling, an (n_layer, n_docs) array: is each layer's head right, reading the whole text? The sentence
    head reads the last sentence (the paper's layer-wise baseline), the prefix head the mean of all sentences."""
    out = {}
    for pooling, head_set in heads.items():
        correct = np.zeros((store.n_layer, store.n_docs), dtype=bool)
        for layer in head_set.layers:
            x = np.stack([whole_text_input(pooling, store.layer_means(i, layer)) for i in range(store.n_docs)])
            correct[layer] = head_set.proba(layer, x).argmax(-1) == store.labels
        out[pooling] = correct
    return out


def layer_accuracies(store: FeatureStore, heads: Mapping[str, ExitHeads]) -> dict[str, np.ndarray]:
    """Accuracy of each layer's head reading the whole text (see `layer_correct`)."""
    return {pooling: correct.mean(axis=1) for pooling, correct in layer_correct(store, heads).items()}


def pareto(points: list[Point]) -> list[Point]:
    """Points no other point beats on both accuracy and cost, cheapest first."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p.cost, -p.accuracy)):
        if p.accuracy > best:
            front.append(p)
            best = p.accuracy
    return front


def calibrate(
    store: FeatureStore,
    heads: Mapping[str, ExitHeads],
    policies: Iterable[str] | None = None,
    tolerance: float = 0.02,
    confidence: float = 0.95,
    lexical: np.ndarray | None = None,
) -> Calibration:
    """The frontier of every policy on the calibration store, and per policy the cheapest point whose accuracy loss
    against the reference is at most `tolerance` with `confidence` (0: as measured); where no point is, the most
    accurate one. `lexical`: the lexical head's probabilities of the store's documents, if the bundle has one: then
    every point is tried behind the lexical exit at each of LEXICAL_THRESHOLDS."""
    correct_by_layer = layer_correct(store, heads)
    accuracies = {pooling: correct.mean(axis=1) for pooling, correct in correct_by_layer.items()}
    pooling = max(accuracies, key=lambda k: accuracies[k].max())
    best_layer = int(accuracies[pooling].argmax())
    best_layer_correct = correct_by_layer[pooling][best_layer]
    reference, reference_name = best_layer_correct, "layer"
    lexical_correct = None if lexical is None else lexical.argmax(axis=1) == store.labels
    if lexical_correct is not None and lexical_correct.mean() > reference.mean():
        reference, reference_name = lexical_correct, "lexical"
    thresholds = LEXICAL_THRESHOLDS if lexical is not None else (None,)
    layers = {k: list(v.layers) for k, v in heads.items()}
    chosen, loss_bound, frontier, llm_only, llm_only_bound = {}, {}, {}, {}, {}
    for policy in policies or policy_names():
        points, bounds, alone, alone_bounds = [], [], [], []
        for params in calibration_grid(policy, store.n_layer, layers):
            replayed = replay_documents(store, heads, policy, params)
            for threshold in thresholds:
                answered = replayed.cascade(lexical, threshold)
                correct = answered.probabilities.argmax(axis=1) == store.labels
                points.append(replayed.point(policy, params, store.labels, lexical, threshold))
                bounds.append(-paired_lower_bound(correct, reference, confidence))
                if threshold is None:  # a point that reads every text: held to the layers, as with no words
                    alone.append(points[-1])
                    alone_bounds.append(-paired_lower_bound(correct, best_layer_correct, confidence))
        frontier[policy] = pareto(points)
        pick = _choose(points, bounds, tolerance)
        chosen[policy], loss_bound[policy] = points[pick], bounds[pick]
        if lexical is not None:
            pick = _choose(alone, alone_bounds, tolerance)
            llm_only[policy], llm_only_bound[policy] = alone[pick], alone_bounds[pick]
    return Calibration(float(best_layer_correct.mean()), {"pooling": pooling, "layer": best_layer},
                       reference_name, float(reference.mean()), tolerance, confidence, store.n_docs, chosen,
                       loss_bound, frontier, None if lexical_correct is None else float(lexical_correct.mean()),
                       llm_only, llm_only_bound)


def _choose(points: list[Point], bounds: list[float], tolerance: float) -> int:
    """The cheapest point whose loss bound is within `tolerance`; where none is, the most accurate one."""
    meeting = [i for i, bound in enumerate(bounds) if bound <= tolerance]
    if not meeting:
        return max(range(len(points)), key=lambda i: (points[i].accuracy, -points[i].cost))
    # ties go to the point whose words answer least, and to no lexical exit at all over a threshold that answered
    # nothing here (it would answer documents calibration never saw it answer)
    return min(meeting, key=lambda i: (points[i].cost, bounds[i], points[i].lexical_share,
                                       points[i].lexical_threshold is not None))


# --- trust: abstention and prediction sets for the default policy ---------------------------------------------------


@dataclass(frozen=True)
class Abstention:
    """For one target error rate α: the margin below which the policy abstains (None: no margin keeps the error of
    the answered documents ≤ α with the stated confidence on this split, so every answer is "unsure"), and what it
    gave on calibration."""

    error_rate: float  # α
    margin: float | None
    coverage: float  # answered / all, on calibration
    error: float | None  # errors / answered, on calibration
    error_bound: float | None  # its Clopper–Pearson upper bound
    cost: float  # token-layers relative to a full read (the policy reads on below the margin)


TRUST_BOUND = (f"Clopper-Pearson upper bound of the error among the answered documents, in Learn then Test with a "
               f"Bonferroni correction over the {len(ABSTENTION_MARGINS)} margins tried")


@dataclass(frozen=True)
class TrustCalibration:
    trust: Trust  # what the runtime reads from the bundle
    abstention: list[Abstention]  # per α, what calibration saw
    confidence: float
    n_docs: int

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.trust.policy, "confidence": self.confidence, "n_docs": self.n_docs,
                "bound": TRUST_BOUND, "abstention": [asdict(a) for a in self.abstention],
                "conformal": self.trust.to_json()["conformal"]}


def calibrate_trust(
    store: FeatureStore,
    heads: Mapping[str, ExitHeads],
    policy: str,
    params: Mapping[str, Any],
    lexical: np.ndarray | None = None,
    threshold: float | None = None,
    confidence: float = 0.95,
) -> TrustCalibration:
    """For each α of ERROR_RATES, Learn then Test over ABSTENTION_MARGINS: a margin passes where the Clopper–Pearson
    upper bound of the error among the documents whose answer's margin reaches it is ≤ α, each bound at the
    confidence 1 − (1 − `confidence`) / K for K margins (Bonferroni: the probability that any passing margin breaks
    its promise stays below 1 − `confidence`, whatever the error does between margins); the smallest that passes is
    kept. (A fixed sequence from the most cautious margin down would fail at once on the few documents a high margin
    answers.) A policy that stops on a margin reads on below the abstention margin, so each margin is replayed with
    that floor. Then split-conformal thresholds on the policy's own answers."""
    floor = policy_class(policy).margin_floor
    replays: dict[float, Replayed] = {}

    def answered_with(m: float) -> Replayed:
        key = m if floor is not None else 0.0
        if key not in replays:
            with_floor = {**params, floor: m} if floor is not None else params
            replays[key] = replay_documents(store, heads, policy, with_floor).cascade(lexical, threshold)
        return replays[key]

    each = 1 - (1 - confidence) / len(ABSTENTION_MARGINS)
    tested = []  # per margin: (margin, answered, errors, bound, cost)
    for m in ABSTENTION_MARGINS:
        replayed = answered_with(m)
        answered = margin(replayed.probabilities) >= m
        n = int(answered.sum())
        errors = int((replayed.probabilities[answered].argmax(axis=1) != store.labels[answered]).sum())
        cost = float(replayed.token_layers.sum() / (replayed.tokens.sum() * replayed.n_layer))
        tested.append((float(m), n, errors, clopper_pearson_upper(errors, n, each), cost))
    abstentions = []
    for alpha in ERROR_RATES:
        passing = [t for t in tested if t[3] <= alpha]
        if passing:
            m, n, errors, bound, cost = min(passing)
            abstentions.append(Abstention(alpha, m, n / store.n_docs, errors / n if n else None, bound, cost))
        else:
            abstentions.append(Abstention(alpha, None, 0.0, None, None, 0.0))
    scores = 1 - answered_with(0.0).probabilities[np.arange(store.n_docs), store.labels]
    conformal = {coverage: conformal_quantile(scores, coverage) for coverage in COVERAGES}
    trust = Trust(policy, {a.error_rate: a.margin for a in abstentions}, conformal)
    return TrustCalibration(trust, abstentions, confidence, store.n_docs)
