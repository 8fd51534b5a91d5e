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

from .classifier import Classifier
from .llama import Context, ContextSettings
from .policies import POLICIES, PREFIX, SENTENCE


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
            f"{'policy':10} {'acc':>6} {'F1':>6} {'token-layers':>13} {'operations':>11} {'wall-clock':>11} {'docs/s':>7}",
        ]
        for name, s in self.scores.items():
            lines.append(
                f"{name:10} {s.accuracy:6.3f} {s.macro_f1:6.3f} {full.token_layers / s.token_layers:12.2f}× "
                f"{full.operations / s.operations:10.2f}× {full.seconds / s.seconds:10.2f}× {self.n_docs / s.seconds:7.2f}"
            )
        lines.append(
            f"{'oracle':10} {self.oracle_accuracy:6.3f} {'':6} {self.full_token_layers / self.oracle_token_layers:12.2f}×"
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
    engine, bundle = clf.engine, clf.bundle
    n_layer, truth = engine.n_layer, np.asarray(labels)
    runners = {name: clf.make_policy(name) for name in policies}
    if "full" not in runners:
        runners = {"full": clf.make_policy("full"), **runners}
    records = {name: ([], [], [], [], 0.0) for name in runners}
    documents = [engine.tokenize_sentences(bundle.splitter.split(t)) for t in texts]
    plain = Context(engine.model, ContextSettings(engine.context.n_ctx, engine.context.settings.n_threads, tap=False))
    n_prompt = len(engine.prompt_tokens)
    plain.decode(engine.prompt_tokens, 0, n_layer, ())
    plain_seconds = 0.0
    layer_hits = {pooling: np.zeros(n_layer) for pooling in bundle.heads}
    longest = max(len(d) for d in documents)
    grid_hits, grid_docs = np.zeros((longest, n_layer)), np.zeros(longest)
    oracle_hits, oracle_costs = 0, []
    try:
        for i, tokens in enumerate(documents):
            start = time.perf_counter()
            plain.remove(n_prompt)
            plain.decode([t for s in tokens for t in s], n_prompt, n_layer, ())
            plain_seconds += time.perf_counter() - start
            for name, runner in runners.items():  # interleaved: machine noise hits every policy alike
                start = time.perf_counter()
                doc = engine.document()
                decision = runner.run(doc, tokens)
                elapsed = time.perf_counter() - start
                preds, costs, ops, exits, secs = records[name]
                preds.append(decision.label_index)
                costs.append(doc.token_layers)
                ops.append(doc.operations)
                exits.append((decision.exit_sentence, decision.exit_layer, len(tokens)))
                records[name] = (preds, costs, ops, exits, secs + elapsed)
            hit, cost = _layers_and_oracle(clf, tokens, int(truth[i]), layer_hits, grid_hits)
            grid_docs[: len(tokens)] += 1
            oracle_hits += hit
            oracle_costs.append(cost)
    finally:
        plain.close()
    scores = {}
    for name, (preds, costs, ops, exits, secs) in records.items():
        scores[name] = PolicyScore(
            name, float(np.mean(np.array(preds) == truth)), macro_f1(truth, preds, len(bundle.labels)),
            float(np.mean(costs)), float(np.mean(ops)), secs, preds, costs, exits,
        )
    n_tokens = [sum(map(len, d)) for d in documents]
    return Evaluation(
        len(texts), n_layer, tuple(bundle.labels), scores, plain_seconds,
        {k: (v / len(texts)).round(4).tolist() for k, v in layer_hits.items()},
        oracle_hits / len(texts), float(np.mean(oracle_costs)), float(np.mean(n_tokens)) * n_layer,
        grid_hits / grid_docs[:, None], grid_docs,
    )


def _layers_and_oracle(
    clf: Classifier, tokens: list[list[int]], label: int, layer_hits: dict, grid_hits: np.ndarray
) -> tuple[int, int]:
    """One full-depth read, sentence by sentence, every layer: per-layer whole-text accuracy, the prefix head's
    hits per (sentences read, layer), and the oracle's cheapest correct cell (tokens × depth) for this document."""
    engine, heads = clf.engine, clf.bundle.heads
    doc = engine.document()
    states = np.stack([doc.append([t], engine.n_layer)[0].mean for t in tokens])  # [m, L, d]
    prefix = np.cumsum(states, axis=0) / np.arange(1, len(tokens) + 1)[:, None, None]
    read = np.cumsum([len(t) for t in tokens])
    best = None
    for pooling, inputs in ((SENTENCE, states), (PREFIX, prefix)):
        if pooling not in heads:
            continue
        for layer in heads[pooling].layers:
            answers = heads[pooling].proba(layer, inputs[:, layer]).argmax(-1)
            layer_hits[pooling][layer] += answers[-1] == label
            if pooling == PREFIX:
                grid_hits[: len(tokens), layer] += answers == label
            for k in np.flatnonzero(answers == label):
                cost = int(read[k]) * (layer + 1)
                best = cost if best is None else min(best, cost)
    return (1, best) if best is not None else (0, int(read[0]))
