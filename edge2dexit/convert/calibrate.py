"""Calibration on a held-out split (never the test split): for every policy, replay a grid of parameters
over stored features and keep the accuracy/cost frontier; choose, per policy, the cheapest point whose
accuracy is at least the best single-layer accuracy minus T.

Cost is measured in token-layers — what llama.cpp really computes, re-decodes included — relative to
reading every token through every layer. Replays use the very policy code the runtime runs
(`document.replay` under `policies.make_policy`).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from ..document import replay as replay_document
from ..heads import ExitHeads, Pooling, whole_text_input
from ..policies import POLICIES, make_policy
from .features import FeatureStore

VOTE_GRID = [{"tau_ignore": ti, "tau_acc": ta} for ti in (0.0, 0.2, 0.4, 0.6, 0.8) for ta in (0.5, 1.0, 2.0, 3.0, 5.0)]
PREFIX_MEAN_THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
PREFIX_MEAN_MIN_SENTENCES = (1, 2, 3, 5)


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
    chosen: dict[str, Point]  # per policy
    frontier: dict[str, list[Point]]  # per policy, Pareto points only

    @property
    def target(self) -> float:
        return self.best_layer_accuracy - self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {
            "best_layer_accuracy": self.best_layer_accuracy,
            "best_layer": self.best_layer,
            "tolerance": self.tolerance,
            "target": self.target,
            "chosen": {k: asdict(v) for k, v in self.chosen.items()},
            "frontier": {k: [asdict(p) for p in v] for k, v in self.frontier.items()},
        }


def layer_accuracies(store: FeatureStore, heads: Mapping[str, ExitHeads]) -> dict[str, np.ndarray]:
    """Accuracy of each layer's head reading the whole text: the sentence head on the last sentence (the
    paper's layer-wise baseline) and the prefix head on the mean of all sentences."""
    out = {}
    for pooling, head_set in heads.items():
        acc = np.zeros(store.n_layer)
        for layer in head_set.layers:
            x = np.stack([whole_text_input(pooling, store.layer_means(i, layer)) for i in range(store.n_docs)])
            acc[layer] = float(np.mean(head_set.proba(layer, x).argmax(-1) == store.labels))
        out[pooling] = acc
    return out


def replay(store: FeatureStore, heads: Mapping[str, ExitHeads], policy: str, params: Mapping[str, Any]) -> Point:
    """Run `policy` with `params` over every document of the store; accuracy and relative costs."""
    runner = make_policy(policy, heads, store.n_layer, params)
    correct, token_layers, tokens, operations, sentences = 0, 0, 0, 0, 0
    for i in range(store.n_docs):
        states, counts = store.document(i)
        stand_ins = [range(n) for n in counts]  # sentences of the right length: a replay reads no token
        decision, doc = replay_document(lambda d: runner.read(d, stand_ins), states, counts)
        correct += decision.label_index == store.labels[i]
        token_layers += doc.token_layers
        operations += doc.operations
        tokens += int(counts.sum())
        sentences += len(counts)
    n_layer = store.n_layer
    return Point(
        policy, dict(params), correct / store.n_docs, token_layers / (tokens * n_layer), operations / (sentences * n_layer)
    )


def grid(policy: str, n_layer: int, layers_by_pooling: Mapping[str, Iterable[int]]) -> list[dict[str, Any]]:
    if policy == "full":
        return [{}]
    if policy == "layer":
        return [{"layer": layer, "pooling": pooling} for pooling in Pooling.ALL for layer in layers_by_pooling[pooling]]
    if policy == "prefix-mean":
        return [
            {"layer": layer, "threshold": t, "min_sentences": k}
            for layer, t, k in itertools.product(layers_by_pooling[Pooling.PREFIX], PREFIX_MEAN_THRESHOLDS,
                                                 PREFIX_MEAN_MIN_SENTENCES)
        ]
    return VOTE_GRID  # sentence-vote, paper2d


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
    policies: Iterable[str] = POLICIES,
    tolerance: float = 0.02,
) -> Calibration:
    """The frontier of every policy on the calibration store, and the cheapest point meeting the target."""
    accuracies = layer_accuracies(store, heads)
    pooling = max(accuracies, key=lambda k: accuracies[k].max())
    best_layer = int(accuracies[pooling].argmax())
    best = float(accuracies[pooling][best_layer])
    layers = {k: list(v.layers) for k, v in heads.items()}
    chosen, frontier = {}, {}
    for policy in policies:
        points = [replay(store, heads, policy, params) for params in grid(policy, store.n_layer, layers)]
        frontier[policy] = pareto(points)
        meeting = [p for p in frontier[policy] if p.accuracy >= best - tolerance]
        chosen[policy] = meeting[0] if meeting else max(points, key=lambda p: (p.accuracy, -p.cost))
    return Calibration(best, {"pooling": pooling, "layer": best_layer}, tolerance, chosen, frontier)
