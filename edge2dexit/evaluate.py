"""`edge2dexit eval`: every policy, live on llama.cpp, same process, same threads, same documents.

For each policy: accuracy (macro-F1 too), the paper's operations, real token-layers, and wall-clock, all
as speed-ups against the `full` policy measured in the same run; a plain llama.cpp full-depth decode of
each whole text in one call after the same cached task prompt (no eval callback, no output layer: a lower
bound for a prompt-based classifier) gives the documents-per-second baseline. The layer table follows the paper's Table 2 (first static exit layer within
T = 2% and 4% of the best layer, against the calibrated 2D policies). The oracle is the cheapest exact read
that would have answered each document correctly: over every prefix of sentences and every depth, the
cheapest (tokens × layers) cell whose sentence or prefix head gives the true label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .classifier import Classifier, Result
from .document import sentence_by_sentence
from .engine import PlainReader
from .heads import Pooling, running_means
from .policies import POLICIES


@dataclass
class PolicyScore:
    policy: str
    accuracy: float
    macro_f1: float
    token_layers: float  # mean per document
    operations: float
    seconds: float  # total wall time
    predictions: list[int] = field(repr=False)
    costs: list[int] = field(repr=False)  # token-layers per document
    exits: list[tuple[int, int, int]] = field(repr=False)  # (exit sentence, exit layer, sentences) per document


@dataclass
class Evaluation:
    n_docs: int
    n_layer: int
    labels: tuple[str, ...]
    scores: dict[str, PolicyScore]
    plain_seconds: float
    layer_accuracy: dict[str, list[float]]  # per head set, whole text at each layer (one pass per layer)
    oracle_accuracy: float
    oracle_token_layers: float
    full_token_layers: float
    prefix_grid: np.ndarray  # [sentences read, layer]: accuracy of the prefix head (documents that long)
    prefix_grid_docs: np.ndarray  # [sentences read]: how many documents have that many sentences

    def table(self) -> str:
        full = self.scores["full"]
        lines = [
            f"{self.n_docs} documents, {self.n_layer} layers; speed-ups against the full policy in this run",
            f"{'policy':13} {'acc':>6} {'F1':>6} {'token-layers':>13} {'operations':>11} {'wall-clock':>11} {'docs/s':>7}",
        ]
        for name, s in self.scores.items():
            lines.append(
                f"{name:13} {s.accuracy:6.3f} {s.macro_f1:6.3f} {full.token_layers / s.token_layers:12.2f}× "
                f"{full.operations / s.operations:10.2f}× {full.seconds / s.seconds:10.2f}× {self.n_docs / s.seconds:7.2f}"
            )
        lines.append(
            f"{'oracle':13} {self.oracle_accuracy:6.3f} {'':6} {self.full_token_layers / self.oracle_token_layers:12.2f}×"
        )
        lines.append(f"plain llama.cpp full-depth decode of each text: {self.n_docs / self.plain_seconds:.2f} docs/s "
                     f"(full policy {self.n_docs / full.seconds:.2f}, best policy "
                     f"{max(self.n_docs / s.seconds for s in self.scores.values()):.2f})")
        best = max(max(v) for v in self.layer_accuracy.values())
        for t in (0.02, 0.04):
            first = min(
                (layer for v in self.layer_accuracy.values() for layer, a in enumerate(v) if a >= best - t),
                default=self.n_layer - 1,
            )
            lines.append(f"Table 2, T = {t:.0%}: best layer accuracy {best:.3f}; first static exit layer within T: "
                         f"{first} → layer-wise speed-up L/(Le+1) = {self.n_layer / (first + 1):.2f}×")
        return "\n".join(lines)


def macro_f1(truth: Sequence[int], predicted: Sequence[int], n_classes: int) -> float:
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    scores = []
    for c in range(n_classes):
        tp = np.sum((predicted == c) & (truth == c))
        denominator = np.sum(predicted == c) + np.sum(truth == c)
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


def evaluate(clf: Classifier, texts: Sequence[str], labels: Sequence[int], policies: Sequence[str] = POLICIES) -> Evaluation:
    """Every policy (and `full` always) classifies every text through `clf`, interleaved text by text."""
    engine, bundle = clf.engine, clf.bundle
    n_layer, truth = engine.n_layer, np.asarray(labels)
    names = list(dict.fromkeys(["full", *policies]))
    for name in names:
        clf.make_policy(name)  # a bad name or a policy the bundle lacks fails before any reading
    results: dict[str, list[Result]] = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    layer_hits = {pooling: np.zeros(n_layer) for pooling in bundle.heads}
    documents = [_fitted([engine.tokenize(s) for s in bundle.splitter.split(t)], engine.capacity) for t in texts]
    longest = max(len(d) for d in documents)
    grid_hits, grid_docs = np.zeros((longest, n_layer)), np.zeros(longest)
    oracle_hits, oracle_costs = 0, []
    plain_seconds = 0.0
    with PlainReader(engine) as plain:
        for text, tokens, label in zip(texts, documents, truth):
            start = time.perf_counter()
            plain.read(engine.tokenize(text)[: engine.capacity])
            plain_seconds += time.perf_counter() - start
            for name in names:  # interleaved: machine noise hits every policy alike
                result = clf.classify(text, policy=name)
                results[name].append(result)
                seconds[name] += result.seconds
            hit, cost = _layers_and_oracle(clf, tokens, int(label), layer_hits, grid_hits)
            grid_docs[: len(tokens)] += 1
            oracle_hits += hit
            oracle_costs.append(cost)
    scores = {}
    for name, rows in results.items():
        predicted = [bundle.labels.index(r.label) for r in rows]
        scores[name] = PolicyScore(
            name, float(np.mean(np.array(predicted) == truth)), macro_f1(truth, predicted, len(bundle.labels)),
            float(np.mean([r.token_layers for r in rows])), float(np.mean([r.operations for r in rows])),
            seconds[name], predicted, [r.token_layers for r in rows],
            [(r.exit_sentence, r.exit_layer, len(d)) for r, d in zip(rows, documents)],
        )
    n_tokens = [sum(map(len, d)) for d in documents]
    return Evaluation(
        len(texts), n_layer, tuple(bundle.labels), scores, plain_seconds,
        {k: (v / len(texts)).round(4).tolist() for k, v in layer_hits.items()},
        oracle_hits / len(texts), float(np.mean(oracle_costs)), float(np.mean(n_tokens)) * n_layer,
        grid_hits / grid_docs[:, None], grid_docs,
    )


def _fitted(tokens: list[list[int]], room: int) -> list[list[int]]:
    """The sentences that fit `room` tokens, as `classify` with truncation reads them."""
    ends = np.cumsum([len(t) for t in tokens])
    return tokens[: max(1, int(np.searchsorted(ends, room, side="right")))]


def _layers_and_oracle(
    clf: Classifier, tokens: list[list[int]], label: int, layer_hits: dict, grid_hits: np.ndarray
) -> tuple[int, int]:
    """One full-depth read, sentence by sentence, every layer: per-layer whole-text accuracy, the prefix head's
    hits per (sentences read, layer), and the oracle's cheapest correct cell (tokens × depth) for this document."""
    engine, heads = clf.engine, clf.bundle.heads
    states = engine.run(sentence_by_sentence(engine.document(), tokens, engine.n_layer))
    read = np.cumsum([len(t) for t in tokens])
    best = None
    for pooling in heads:
        for layer in heads[pooling].layers:
            inputs = states[:, layer] if pooling == Pooling.SENTENCE else running_means(states[:, layer])
            answers = heads[pooling].proba(layer, inputs).argmax(-1)
            layer_hits[pooling][layer] += answers[-1] == label
            if pooling == Pooling.PREFIX:
                grid_hits[: len(tokens), layer] += answers == label
            for k in np.flatnonzero(answers == label):
                cost = int(read[k]) * (layer + 1)
                best = cost if best is None else min(best, cost)
    return (1, best) if best is not None else (0, int(read[0]))
