"""`edge2dexit eval`: every policy, live on llama.cpp, same process, same threads, same documents.

For each policy: accuracy (macro-F1 too), the paper's operations, real token-layers, and wall-clock, all
as speed-ups against the `full` policy measured in the same run; a plain llama.cpp full-depth decode of
each whole text in one call after the same cached task prompt (no eval callback, no output layer: a lower
bound for a prompt-based classifier) gives the documents-per-second baseline. The layer table follows the paper's Table 2 (first static exit layer within
T = 2% and 4% of the best layer, against the calibrated 2D policies). The oracle is the cheapest exact read
that would have answered each document correctly: over every prefix of sentences and every depth, the
cheapest (tokens × layers) cell whose sentence or prefix head gives the true label. Beside the policies, the
baselines of `baselines` (TF-IDF + logistic regression, truncation) on the same documents. Every accuracy comes
with a 95% Wilson score interval: test splits of 100–1,000 documents leave several points of noise on each figure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..baselines import TFIDF_DESCRIPTION, TFIDF_NAME, TRUNCATIONS, Sentences, fitted, tfidf_logreg
from ..classifier import Classifier, Result
from ..document import whole_text
from .plain import PlainReader
from ..heads import ExitHeads, Pooling, running_means, whole_text_input
from ..policies import policy_names
from ..stats import wilson_interval

if TYPE_CHECKING:
    from ..convert.data import LabelledSet



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
class BaselineScore:
    """A row that is no early-exit policy (see `baselines`); a cost it does not have or that was not timed is None."""

    name: str
    accuracy: float
    macro_f1: float
    token_layers: float | None  # mean per document; None: no LLM layer read
    operations: float | None
    seconds: float | None  # total wall time; None: answered from states read for the oracle, not timed
    about: str  # how the row was made, printed under the table
    predictions: list[int] = field(repr=False)


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
    baselines: dict[str, BaselineScore]
    notes: list[str]  # why a baseline row is missing

    def table(self) -> str:
        full = self.scores["full"]
        rows = [(s.policy, s.accuracy, s.macro_f1, s.token_layers, s.operations, s.seconds)
                for s in self.scores.values()]
        rows.append(("oracle", self.oracle_accuracy, None, self.oracle_token_layers, None, None))
        rows += [(b.name, b.accuracy, b.macro_f1, b.token_layers, b.operations, b.seconds)
                 for b in self.baselines.values()]
        lines = [
            f"{self.n_docs} documents, {self.n_layer} layers; speed-ups against the full policy in this run; "
            "95% CI: Wilson score interval",
            f"{'policy':13} {'acc':>6} {'95% CI':>11} {'F1':>6} {'token-layers':>13} {'operations':>11} "
            f"{'wall-clock':>11} {'docs/s':>9}",
        ]
        for name, accuracy, f1, token_layers, operations, seconds in rows:
            low, high = wilson_interval(round(accuracy * self.n_docs), self.n_docs)
            lines.append(
                f"{name:13} {accuracy:6.3f} {f'{low:.3f}–{high:.3f}':>11} {_cell(f1, '6.3f')} "
                f"{_cell(_per(full.token_layers, token_layers), '12.2f', '×')} "
                f"{_cell(_per(full.operations, operations), '10.2f', '×')} "
                f"{_cell(_per(full.seconds, seconds), '10.2f', '×')} {_cell(_per(self.n_docs, seconds), '9.2f')}"
            )
        lines += [f"{name}: {b.about}" for name, b in self.baselines.items()]
        lines += self.notes
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


def _per(numerator: float, value: float | None) -> float | None:
    """numerator / value: a speed-up or a rate, or None for a row without that cost."""
    return None if value is None else numerator / value


def _cell(value: float | None, spec: str, unit: str = "") -> str:
    """A table cell: the number formatted, or a dash as wide when the row has no such figure."""
    return f"{value:{spec}}{unit}" if value is not None else "—".rjust(len(f"{0:{spec}}{unit}"))


def macro_f1(truth: Sequence[int], predicted: Sequence[int], n_classes: int) -> float:
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    scores = []
    for c in range(n_classes):
        tp = np.sum((predicted == c) & (truth == c))
        denominator = np.sum(predicted == c) + np.sum(truth == c)
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


def evaluate(
    clf: Classifier,
    texts: Sequence[str],
    labels: Sequence[int],
    policies: Sequence[str] | None = None,
    *,
    train: LabelledSet | None = None,
) -> Evaluation:
    """Every policy (and `full` always) classifies every text through `clf`, interleaved text by text. Beside them:
    the truncation baselines, if the bundle records its best layer, and TF-IDF + logistic regression trained on
    `train` (the bundle's training split), if given — fitted first, so that a missing scikit-learn fails at once."""
    engine, bundle = clf.engine, clf.bundle
    n_layer, n_classes, truth = engine.n_layer, len(bundle.labels), np.asarray(labels)
    names = list(dict.fromkeys(["full", *(policies or policy_names())]))
    for name in names:
        clf.make_policy(name)  # a bad name or a policy the bundle lacks fails before any reading
    baselines = {} if train is None else {TFIDF_NAME: _tfidf_row(train, texts, truth, n_classes)}
    best = _best_layer(bundle.calibration)
    notes = [] if best else ["no truncation rows: the bundle records no best layer (its calibration record is empty)"]
    truncations = TRUNCATIONS if best else {}
    truncated: dict[str, list[tuple[int, int, int]]] = {name: [] for name in truncations}
    results: dict[str, list[Result]] = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    layer_hits = {pooling: np.zeros(n_layer) for pooling in bundle.heads}
    documents = [fitted([engine.tokenize(s) for s in bundle.splitter.split(t)], engine.capacity) for t in texts]
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
            states = engine.run(whole_text(engine.document(), tokens, n_layer))  # as convert stored them
            hit, cost = _layers_and_oracle(bundle.heads, states, tokens, int(label), layer_hits, grid_hits)
            grid_docs[: len(tokens)] += 1
            oracle_hits += hit
            oracle_costs.append(cost)
            for name, truncation in truncations.items():
                truncated[name].append(_truncated_read(bundle.heads, best, states, truncation.keep(tokens)))
    scores = {}
    for name, rows in results.items():
        predicted = [bundle.labels.index(r.label) for r in rows]
        scores[name] = PolicyScore(
            name, _accuracy(truth, predicted), macro_f1(truth, predicted, n_classes),
            float(np.mean([r.token_layers for r in rows])), float(np.mean([r.operations for r in rows])),
            seconds[name], predicted, [r.token_layers for r in rows],
            [(r.exit_sentence, r.exit_layer, len(d)) for r, d in zip(rows, documents)],
        )
    for name, reads in truncated.items():
        baselines[name] = _truncation_row(name, reads, best, truth, n_classes)
    n_tokens = [sum(map(len, d)) for d in documents]
    return Evaluation(
        len(texts), n_layer, tuple(bundle.labels), scores, plain_seconds,
        {k: (v / len(texts)).round(4).tolist() for k, v in layer_hits.items()},
        oracle_hits / len(texts), float(np.mean(oracle_costs)), float(np.mean(n_tokens)) * n_layer,
        grid_hits / grid_docs[:, None], grid_docs, baselines, notes,
    )


def _accuracy(truth: np.ndarray, predicted: Sequence[int]) -> float:
    return float(np.mean(np.asarray(predicted) == truth))


def _tfidf_row(train: LabelledSet, texts: Sequence[str], truth: np.ndarray, n_classes: int) -> BaselineScore:
    """TF-IDF + logistic regression fitted on `train`, timed classifying `texts` (fitting is a one-off, like
    convert)."""
    model = tfidf_logreg()
    started = time.perf_counter()
    model.fit(list(train.texts), list(train.labels))
    fitting = time.perf_counter() - started
    started = time.perf_counter()
    predicted = model.predict(list(texts)).tolist()
    spent = time.perf_counter() - started
    return BaselineScore(
        TFIDF_NAME, _accuracy(truth, predicted), macro_f1(truth, predicted, n_classes), None, None, spent,
        f"{TFIDF_DESCRIPTION}, trained on the {len(train)} documents of the "
        f"training split in {fitting:.2f} s; {1000 * spent / len(texts):.3f} ms per document, no LLM layer read",
        predicted,
    )


def _best_layer(calibration: dict) -> tuple[str, int] | None:
    """(pooling, layer) of the best whole-text head on the calibration split, as `convert` recorded it."""
    best = calibration.get("best_layer")
    return None if best is None else (best["pooling"], int(best["layer"]))


def _truncation_row(
    name: str, reads: list[tuple[int, int, int]], best: tuple[str, int], truth: np.ndarray, n_classes: int
) -> BaselineScore:
    """The row of one truncation from its `_truncated_read` of every document."""
    predicted, token_layers, operations = (list(column) for column in zip(*reads))
    pooling, layer = best
    return BaselineScore(
        name, _accuracy(truth, predicted), macro_f1(truth, predicted, n_classes),
        float(np.mean(token_layers)), float(np.mean(operations)), None,
        f"{TRUNCATIONS[name].what} only, in one decode to depth {layer + 1}, read by the {pooling} head of layer "
        f"{layer} (the best on calibration); answered from the states read for the oracle, so not timed",
        predicted,
    )


def _truncated_read(
    heads: dict[str, ExitHeads], best: tuple[str, int], states: np.ndarray, kept: Sentences
) -> tuple[int, int, int]:
    """(answer, token-layers, operations) of reading only the sentences `kept` in one decode to the best layer and
    letting its head answer. Sentence k's state depends on sentences 0..k only, so the first rows of a whole
    document's `states` are those this shorter read would give: no decode is needed."""
    pooling, layer = best
    answer = heads[pooling].proba(layer, whole_text_input(pooling, states[: len(kept), layer])).argmax()
    return int(answer), sum(map(len, kept)) * (layer + 1), len(kept) * (layer + 1)


def _layers_and_oracle(
    heads: dict[str, ExitHeads], states: np.ndarray, tokens: Sentences, label: int, layer_hits: dict,
    grid_hits: np.ndarray,
) -> tuple[int, int]:
    """From a full-depth read of one document, sentence by sentence, every layer (`states`): per-layer whole-text
    accuracy, the prefix head's hits per (sentences read, layer), and the oracle's cheapest correct cell
    (tokens × depth) for this document."""
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
