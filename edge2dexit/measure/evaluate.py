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

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..baselines import TFIDF_DESCRIPTION, TFIDF_NAME, TRUNCATIONS, Sentences, fitted, tfidf_logreg
from ..convert.calibrate import LEXICAL_THRESHOLDS
from ..classifier import Classifier, Result
from ..document import whole_text
from .plain import PlainReader
from ..heads import ExitHeads, Pooling, running_means, whole_text_input
from ..errors import SettingsError
from ..policies import policy_names
from ..stats import expected_calibration_error, wilson_interval
from ..trust import REPORTED_ERRORS

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
    ece: float  # expected calibration error of its answers (10 bins)
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
    abstention: list[AbstentionRow] = field(default_factory=list)  # the default policy at each calibrated α
    cascade: list[CascadePoint] = field(default_factory=list)  # the default policy behind each lexical threshold

    @property
    def full_read(self) -> PolicyScore:
        """What every speed-up is against: the LLM reading every token through every layer. Behind the lexical exit
        the `full` policy may be answered by the words alone (calibration lets them answer everything where full
        depth cannot meet the target), so its LLM-only row is the reference there."""
        return self.scores.get(f"full {LLM_ONLY}", self.scores["full"])

    def table(self) -> str:
        full = self.full_read
        rows = [(s.policy, s.accuracy, s.macro_f1, s.ece, s.token_layers, s.operations, s.seconds)
                for s in self.scores.values()]
        rows.append(("oracle", self.oracle_accuracy, None, None, self.oracle_token_layers, None, None))
        rows += [(b.name, b.accuracy, b.macro_f1, None, b.token_layers, b.operations, b.seconds)
                 for b in self.baselines.values()]
        lines = [
            f"{self.n_docs} documents, {self.n_layer} layers; speed-ups against {full.policy} (the LLM reads every "
            "token through every layer) in this run; "
            "95% CI: Wilson score interval; ECE: expected calibration error of the answers' probabilities (10 bins)",
            f"{'policy':24} {'acc':>6} {'95% CI':>11} {'F1':>6} {'ECE':>6} {'token-layers':>13} {'operations':>11} "
            f"{'wall-clock':>11} {'docs/s':>9}",
        ]
        for name, accuracy, f1, ece, token_layers, operations, seconds in rows:
            low, high = wilson_interval(round(accuracy * self.n_docs), self.n_docs)
            lines.append(
                f"{name:24} {accuracy:6.3f} {f'{low:.3f}–{high:.3f}':>11} {_cell(f1, '6.3f')} {_cell(ece, '6.3f')} "
                f"{_cell(_per(full.token_layers, token_layers), '12.2f', '×')} "
                f"{_cell(_per(full.operations, operations), '10.2f', '×')} "
                f"{_cell(_per(full.seconds, seconds), '10.2f', '×')} {_cell(_per(self.n_docs, seconds), '9.2f')}"
            )
        lines += [f"{name}: {b.about}" for name, b in self.baselines.items()]
        lines += self.notes
        lines.append(f"plain llama.cpp full-depth decode of each text: {self.n_docs / self.plain_seconds:.2f} docs/s "
                     f"({full.policy} {self.n_docs / full.seconds:.2f}, best policy "
                     f"{max(self.n_docs / s.seconds for s in self.scores.values()):.2f})")
        best = max(max(v) for v in self.layer_accuracy.values())
        for t in (0.02, 0.04):
            first = min(
                (layer for v in self.layer_accuracy.values() for layer, a in enumerate(v) if a >= best - t),
                default=self.n_layer - 1,
            )
            lines.append(f"Table 2, T = {t:.0%}: best layer accuracy {best:.3f}; first static exit layer within T: "
                         f"{first} → layer-wise speed-up L/(Le+1) = {self.n_layer / (first + 1):.2f}×")
        if self.cascade:
            lines += ["", f"the lexical exit before {self.cascade[0].policy} at each threshold, from these runs "
                          "(words answer where their top probability reaches it; the rest as the LLM-only row read "
                          "them):",
                      f"{'words at':>9} {'acc':>6} {'95% CI':>11} {'token-layers':>13} {'answered by the words':>22}"]
            for c in self.cascade:
                low, high = wilson_interval(round(c.accuracy * self.n_docs), self.n_docs)
                lines.append(f"{'never' if c.threshold is None else f'{c.threshold:g}':>9} {c.accuracy:6.3f} "
                             f"{f'{low:.3f}–{high:.3f}':>11} {_cell(_per(full.token_layers, c.token_layers), '12.2f', '×')} "
                             f"{c.lexical_share:22.1%}")
        if self.abstention:
            lines += ["", f"{self.abstention[0].policy} with --max-error α, live: coverage (answered / all) and the error "
                          "among the answered documents (95% Wilson interval)",
                      f"{'α':>5} {'margin':>7} {'coverage':>9} {'error':>7} {'95% CI':>11} {'wall-clock':>11}"]
            for a in self.abstention:
                interval = "—" if a.answered == 0 else "{:.3f}–{:.3f}".format(*wilson_interval(a.errors, a.answered))
                lines.append(f"{a.error_rate:5.0%} {_cell(a.margin, '7.2f')} {a.answered / self.n_docs:9.3f} "
                             f"{_cell(a.errors / a.answered if a.answered else None, '7.3f')} {interval:>11} "
                             f"{_cell(_per(full.seconds, a.seconds), '10.2f', '×')}")
        return "\n".join(lines)


@dataclass(frozen=True)
class AbstentionRow:
    policy: str
    error_rate: float  # α asked for
    margin: float | None  # the calibrated abstention margin (None: the bundle cannot promise α)
    answered: int
    errors: int  # among the answered
    seconds: float


@dataclass(frozen=True)
class CascadePoint:
    policy: str
    threshold: float | None  # None: the words never answer
    accuracy: float
    token_layers: float  # mean per document
    lexical_share: float


def _per(numerator: float, value: float | None) -> float | None:
    """numerator / value: a speed-up or a rate (infinite where nothing was spent), or None for a row without that
    cost."""
    if value is None:
        return None
    return numerator / value if value else math.inf


def _cell(value: float | None, spec: str, unit: str = "") -> str:
    """A table cell: the number formatted, ∞ for a speed-up over a row that spent nothing (the words answered every
    text), or a dash as wide when the row has no such figure."""
    width = len(f"{0:{spec}}{unit}")
    if value is None:
        return "—".rjust(width)
    return "∞".rjust(width) if math.isinf(value) else f"{value:{spec}}{unit}"


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
        clf.reader.answering(name)  # a bad name or a policy the bundle lacks fails before any reading
    # a policy behind the lexical exit is also read without it, as the LLM alone reads (at its parameters for that)
    llm_only = {f"{name} {LLM_ONLY}": name for name in names if clf.lexical and bundle.lexical_threshold(name) is not None}
    baselines = {} if train is None else {TFIDF_NAME: _tfidf_row(train, texts, truth, n_classes)}
    best = _best_layer(bundle.calibration)
    notes = [] if best else ["no truncation rows: the bundle records no best layer (its calibration record is empty)"]
    truncations = TRUNCATIONS if best else {}
    truncated: dict[str, list[tuple[int, int, int]]] = {name: [] for name in truncations}
    results: dict[str, list[Result]] = {name: [] for name in (*names, *llm_only)}
    seconds = dict.fromkeys(results, 0.0)
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
            for row in results:  # interleaved: machine noise hits every policy alike
                result = clf.classify(text, policy=llm_only.get(row, row), lexical=False if row in llm_only else None)
                results[row].append(result)
                seconds[row] += result.seconds
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
        confidence = [max(r.scores.values()) for r in rows]
        scores[name] = PolicyScore(
            name, _accuracy(truth, predicted), macro_f1(truth, predicted, n_classes),
            float(np.mean([r.token_layers for r in rows])), float(np.mean([r.operations for r in rows])),
            seconds[name], expected_calibration_error(confidence, np.asarray(predicted) == truth), predicted, [r.token_layers for r in rows],
            [(r.exit_sentence, r.exit_layer, len(d)) for r, d in zip(rows, documents)],
        )
    for name, reads in truncated.items():
        baselines[name] = _truncation_row(name, reads, best, truth, n_classes)
    n_tokens = [sum(map(len, d)) for d in documents]
    default = clf.policy_name
    llm_default = next((row for row, name in llm_only.items() if name == default), None)
    cascade = [] if llm_default is None else _cascade(default, results[llm_default], texts, truth, bundle)
    abstention = _abstention(clf, default, texts, truth) if default in names and bundle.trust else []
    return Evaluation(
        len(texts), n_layer, tuple(bundle.labels), scores, plain_seconds,
        {k: (v / len(texts)).round(4).tolist() for k, v in layer_hits.items()},
        oracle_hits / len(texts), float(np.mean(oracle_costs)), float(np.mean(n_tokens)) * n_layer,
        grid_hits / grid_docs[:, None], grid_docs, baselines, notes, abstention, cascade,
    )


LLM_ONLY = "(LLM only)"


def _cascade(policy: str, llm: list[Result], texts: Sequence[str], truth: np.ndarray, bundle) -> list[CascadePoint]:
    """The lexical exit before `policy` at each threshold calibration tries, from the LLM-only live results and the
    lexical head's probabilities of the same texts."""
    words = np.stack([bundle.words(text) for text in texts])
    llm_predicted = np.array([bundle.labels.index(r.label) for r in llm])
    llm_cost = np.array([r.token_layers for r in llm], dtype=np.float64)
    points = []
    for threshold in LEXICAL_THRESHOLDS:
        answered = words.max(1) >= threshold if threshold is not None else np.zeros(len(texts), dtype=bool)
        predicted = np.where(answered, words.argmax(1), llm_predicted)
        points.append(CascadePoint(policy, threshold, _accuracy(truth, predicted),
                                   float(np.where(answered, 0.0, llm_cost).mean()), float(answered.mean())))
    return points


def _abstention(clf: Classifier, policy: str, texts: Sequence[str], truth: np.ndarray) -> list[AbstentionRow]:
    """The policy read live with --max-error α, for each α of REPORTED_ERRORS the bundle can promise (below the
    margin it reads on)."""
    rows = []
    for alpha in REPORTED_ERRORS:
        try:
            margin = clf.reader.answering(policy, max_error=alpha).abstention.margin
        except SettingsError:
            rows.append(AbstentionRow(policy, alpha, None, 0, 0, 0.0))
            continue
        results = [clf.classify(text, policy=policy, max_error=alpha) for text in texts]
        answered = [(r, y) for r, y in zip(results, truth) if not r.abstained]
        errors = sum(clf.bundle.labels.index(r.label) != y for r, y in answered)
        rows.append(AbstentionRow(policy, alpha, margin, len(answered), errors, sum(r.seconds for r in results)))
    return rows


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
