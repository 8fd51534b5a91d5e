"""Calibration on a held-out split (never the test split): for every policy, replay a grid of parameters
over stored features and keep the accuracy/cost frontier; choose, per policy, the cheapest point that is, with
the stated confidence, at most T less accurate than the best single layer.

The confidence is what keeps a small calibration split honest: on 74 documents a point one error behind a perfect
best layer reads as 0.986 and passes a plain 2-point tolerance by luck; its paired lower bound (stats.py) does not.

Cost is measured in token-layers — what llama.cpp really computes, re-decodes included — relative to
reading every token through every layer. Replays use the very policy code the runtime runs
(`document.replay` under `policies.make_policy`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from ..document import MIN_DECODE_TOKENS, replay as replay_document
from ..heads import ExitHeads, whole_text_input
from ..policies import calibration_grid, make_policy, policy_names
from ..stats import paired_lower_bound
from .features import FeatureStore


@dataclass(frozen=True)
class Point:
    policy: str
    params: dict[str, Any]
    accuracy: float
    cost: float  # token-layers / (tokens × n_layer)
    operations: float  # operations / (sentences × n_layer), as the paper counts them


@dataclass(frozen=True)
class Calibration:
    best_layer_accuracy: float
    best_layer: dict[str, Any]  # {"pooling", "layer"}
    tolerance: float
    confidence: float  # of the one-sided bound each chosen point's accuracy loss is held to
    n_docs: int  # calibration documents
    chosen: dict[str, Point]  # per policy
    loss_bound: dict[str, float]  # per policy: upper confidence bound of (best layer − chosen point) accuracy
    frontier: dict[str, list[Point]]  # per policy, Pareto points only

    @property
    def target(self) -> float:
        return self.best_layer_accuracy - self.tolerance

    def meets_target(self, policy: str) -> bool:
        return self.loss_bound[policy] <= self.tolerance

    def describe_target(self) -> str:
        best = self.best_layer
        sure = f"with {self.confidence:.0%} confidence (paired bound)" if self.confidence > 0 else "as measured"
        return (f"target: at most {self.tolerance} below the best single layer, {best['pooling']}@{best['layer']} at "
                f"{self.best_layer_accuracy:.3f} on {self.n_docs} calibration documents, {sure}")

    def to_json(self) -> dict[str, Any]:
        return {
            "best_layer_accuracy": self.best_layer_accuracy,
            "best_layer": self.best_layer,
            "tolerance": self.tolerance,
            "confidence": self.confidence,
            "n_docs": self.n_docs,
            "target": self.target,
            "chosen": {k: asdict(v) for k, v in self.chosen.items()},
            "loss_bound": self.loss_bound,
            "frontier": {k: [asdict(p) for p in v] for k, v in self.frontier.items()},
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


def replay_outcomes(
    store: FeatureStore, heads: Mapping[str, ExitHeads], policy: str, params: Mapping[str, Any]
) -> tuple[Point, np.ndarray]:
    """Run `policy` with `params` over every document of the store: accuracy and relative costs, and whether
    each document was classified right."""
    runner = make_policy(policy, heads, store.n_layer, params)
    correct = np.zeros(store.n_docs, dtype=bool)
    token_layers, tokens, operations, sentences = 0, 0, 0, 0
    for i in range(store.n_docs):
        states, counts = store.document(i)
        stand_ins = [range(n) for n in counts]  # sentences of the right length: a replay reads no token
        # read ahead as the runtime does, so that replayed costs are what a live read computes
        decision, doc = replay_document(lambda d: runner.read(d, stand_ins), states, counts, MIN_DECODE_TOKENS)
        correct[i] = decision.label_index == store.labels[i]
        token_layers += doc.token_layers
        operations += doc.operations
        tokens += int(counts.sum())
        sentences += len(counts)
    n_layer = store.n_layer
    point = Point(policy, dict(params), float(correct.mean()), token_layers / (tokens * n_layer),
                  operations / (sentences * n_layer))
    return point, correct


def replay(store: FeatureStore, heads: Mapping[str, ExitHeads], policy: str, params: Mapping[str, Any]) -> Point:
    return replay_outcomes(store, heads, policy, params)[0]


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
) -> Calibration:
    """The frontier of every policy on the calibration store, and per policy the cheapest point whose accuracy loss
    against the best single layer is at most `tolerance` with `confidence` (0: as measured); where no point is,
    the most accurate one."""
    correct_by_layer = layer_correct(store, heads)
    accuracies = {pooling: correct.mean(axis=1) for pooling, correct in correct_by_layer.items()}
    pooling = max(accuracies, key=lambda k: accuracies[k].max())
    best_layer = int(accuracies[pooling].argmax())
    reference = correct_by_layer[pooling][best_layer]
    layers = {k: list(v.layers) for k, v in heads.items()}
    chosen, loss_bound, frontier = {}, {}, {}
    for policy in policies or policy_names():
        grid = calibration_grid(policy, store.n_layer, layers)
        outcomes = [replay_outcomes(store, heads, policy, params) for params in grid]
        frontier[policy] = pareto([point for point, _ in outcomes])
        bounds = [-paired_lower_bound(correct, reference, confidence) for _, correct in outcomes]
        meeting = [i for i, bound in enumerate(bounds) if bound <= tolerance]
        if meeting:
            pick = min(meeting, key=lambda i: (outcomes[i][0].cost, bounds[i]))
        else:
            pick = max(range(len(outcomes)), key=lambda i: (outcomes[i][0].accuracy, -outcomes[i][0].cost))
        chosen[policy], loss_bound[policy] = outcomes[pick][0], bounds[pick]
    return Calibration(float(reference.mean()), {"pooling": pooling, "layer": best_layer}, tolerance, confidence,
                       store.n_docs, chosen, loss_bound, frontier)
