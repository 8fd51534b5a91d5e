"""Calibration on held-out documents (never the test split), in three steps:

1. Scales (`fit_scales`): the temperature of the lexical exit and of every exit head, alone and behind the words
   (calibrated.py), each fitted by maximum likelihood, so that every probability a policy reads means what it says.
2. Operating points (`calibrate`): for every policy, replay a grid of parameters over stored features with the
   calibrated heads, each behind the lexical exit at a grid of thresholds and again read alone, and keep the
   accuracy/cost frontier; choose, per policy, the cheapest point that is, with the stated confidence, at most T
   less accurate than the reference (the better of the best single layer and the words alone: a cascade must earn
   its cost against both). The confidence is what keeps a small split honest: on 74 documents a point one error
   behind a perfect best layer reads as 0.986 and passes a plain 2-point tolerance by luck; its paired lower bound
   (stats.py) does not.
3. Trust (`calibrate_trust`): for the default policy's point, per way of reading, each abstention margin's counts on
   documents that chose nothing before (trust.py states the procedure and its guarantee).

Steps 1 and 2 and the order of step 3's margins use one half of the calibration split (`choose`); step 3's counts,
bounds and conformal thresholds use the other (`certify`), so that no document both picks a point and vouches for it.

Cost is measured in token-layers — what llama.cpp really computes, re-decodes included — relative to reading every
token through every layer; a document the lexical exit answers costs none. Replays use the very policy code the
runtime runs (`document.replay` under `policies.make_policy`), one replay per parameter setting and way of reading:
the lexical threshold only decides which documents reach the LLM, so every threshold is scored from the same replay.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
from scipy.optimize import minimize

from ..calibrated import READ_BUCKETS, CalibratedHeads, ExitScale, Scales, WordsScale, read_bucket
from ..document import replay as replay_document
from ..settings import MIN_DECODE_TOKENS
from ..heads import ExitHeads, Pooling, margin, whole_text_input
from ..policies import PrefixMean, calibration_grid, make_policy, policy_class, policy_names
from ..stats import clopper_pearson_upper, conformal_quantile, paired_lower_bound
from ..trust import MarginTest, Trust
from .features import Documents

# The lexical exit answers where its top calibrated probability is at least the threshold, up to "the words never
# answer alone" (None; behind the words they still weigh in). Never 0: a policy the words answer for on every text
# would never read (the words alone are a row of their own).
LEXICAL_THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, None)
# the abstention margins counted for trust (0: never unsure), and the coverages of the prediction sets
ABSTENTION_MARGINS = tuple(np.round(np.arange(0.0, 0.951, 0.05), 2))
COVERAGES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


# --- documents read by heads that never saw them ---------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    """Documents with the exit heads and the lexical head's answers that were trained without them."""

    documents: Documents
    heads: Mapping[str, ExitHeads | CalibratedHeads]
    words: np.ndarray | None  # the lexical head's probabilities of the documents (None: no lexical head)
    # what the prefix-mean replays of these reads share (`_PrefixAnswers`), by layer and way of reading
    answers: dict = field(default_factory=dict, compare=False, repr=False)


class HeldOut:
    """Documents, each read by heads that were not trained on it: one fold for a fixed split (the calibration or test
    split and the heads trained on the training split), K for cross-fitting (each fold of the pool and the heads
    trained on the others). Everything calibration measures, it measures on these reads."""

    def __init__(self, folds: list[Fold]):
        self.folds = [fold for fold in folds if fold.documents.n_docs]
        self.labels = np.concatenate([fold.documents.labels for fold in self.folds])
        self.n_layer = self.folds[0].documents.n_layer
        self.words = None if self.folds[0].words is None else np.concatenate([fold.words for fold in self.folds])

    @property
    def n_docs(self) -> int:
        return len(self.labels)

    @property
    def layers(self) -> dict[str, list[int]]:
        return {pooling: list(heads.layers) for pooling, heads in self.folds[0].heads.items()}

    def calibrated(self, scales: Scales) -> "HeldOut":
        """The same reads through calibrated heads and calibrated words."""
        return HeldOut([Fold(fold.documents, {p: CalibratedHeads(h, scales.exits[p]) for p, h in fold.heads.items()},
                             None if fold.words is None else scales.words(fold.words)) for fold in self.folds])

    def select(self, positions: np.ndarray) -> "HeldOut":
        """The documents at `positions` (of all folds' documents laid end to end), each with its fold's heads."""
        positions, folds, start = np.sort(np.asarray(positions)), [], 0
        for fold in self.folds:
            n = fold.documents.n_docs
            mine = positions[(positions >= start) & (positions < start + n)] - start
            folds.append(Fold(fold.documents.select(mine), fold.heads, None if fold.words is None else fold.words[mine]))
            start += n
        return HeldOut(folds)

    def examples(self, pooling: str, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every (document, sentence) example at one layer (`Documents.examples`), read by its fold's head:
        (log-probabilities [n, C], labels [n], document [n] in this selection, sentences read [n])."""
        parts, offset = [], 0
        for fold in self.folds:
            x, y, doc, read = fold.documents.examples(pooling, layer)
            parts.append((fold.heads[pooling].head(layer).log_proba(x), y, doc + offset, read))
            offset += fold.documents.n_docs
        return tuple(np.concatenate(column) for column in zip(*parts))

    def whole_text_logits(self, pooling: str, layer: int) -> np.ndarray:
        """Each document's head logits reading the whole text (see `layer_correct`)."""
        return np.concatenate([fold.heads[pooling].head(layer).logits(np.stack([
            whole_text_input(pooling, fold.documents.layer_means(i, layer)) for i in range(fold.documents.n_docs)]))
            for fold in self.folds])


# --- 1. scales -----------------------------------------------------------------------------------------------------


def _fit(features: np.ndarray, log_p: np.ndarray, labels: np.ndarray, log_q: np.ndarray | None,
         bounds: list[tuple[float, float]]) -> np.ndarray:
    """Maximum likelihood of softmax(β · log_p + γ · log_q) with β = exp(features · θ): θ (and γ last, where
    `log_q` is given), with the gradient in closed form."""
    n = len(labels)
    rows = np.arange(n)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        theta, gamma = (params[:-1], params[-1]) if log_q is not None else (params, 0.0)
        beta = np.exp(features @ theta)
        logits = beta[:, None] * log_p + (gamma * log_q if log_q is not None else 0.0)
        logits -= logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits).sum(axis=1))
        nll = float(np.mean(log_z - logits[rows, labels]))
        g = np.exp(logits - log_z[:, None])
        g[rows, labels] -= 1
        g /= n
        d_theta = features.T @ ((g * log_p).sum(axis=1) * beta)
        grad = np.append(d_theta, (g * log_q).sum()) if log_q is not None else d_theta
        return nll, grad

    start = np.zeros(len(bounds))
    return minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds).x


# How far a fit may go: each temperature between e^-4 and e^4, the words' margin moving it at most e^±6, and the
# words' weight γ in [0, 4]: wide enough for every head seen, narrow enough that a few dozen documents cannot run off.
_LOG_BETA, _WORDS_MARGIN, _GAMMA = (-4.0, 4.0), (-6.0, 6.0), (0.0, 4.0)


def fit_words(words_raw: np.ndarray, labels: np.ndarray) -> WordsScale:
    """The lexical exit's temperature, fitted on every document."""
    log_p = np.log(np.maximum(words_raw, 1e-12))
    theta = _fit(np.ones((len(labels), 1)), log_p, labels, None, [_LOG_BETA])
    return WordsScale(float(np.exp(theta[0])))


def fit_scales(held: HeldOut, fuse: bool = True) -> Scales:
    """Every scale of a bundle, fitted on the held-out reads (every sentence of every document is one example per
    head: the prefix heads after each sentence, the sentence heads on each sentence). `fuse` False holds the words'
    weight γ at 0."""
    words = fit_words(held.words, held.labels) if held.words is not None else None
    q = words(held.words) if words is not None else None
    exits = {}
    for pooling, layers in held.layers.items():
        exits[pooling] = {}
        for layer in layers:
            log_p, y, doc, read = held.examples(pooling, layer)
            buckets = np.eye(len(READ_BUCKETS))[read_bucket(read)]  # one temperature per bucket of sentences read
            alone = _fit(buckets, log_p, y, None, [_LOG_BETA] * len(READ_BUCKETS))
            fused = None
            if q is not None:
                fused = _fit(np.column_stack([buckets, margin(q[doc])]), log_p, y, np.log(np.maximum(q[doc], 1e-12)),
                             [_LOG_BETA] * len(READ_BUCKETS) + [_WORDS_MARGIN, _GAMMA if fuse else (0.0, 0.0)])
            exits[pooling][layer] = ExitScale(tuple(alone), None if fused is None else tuple(fused))
    return Scales(words, exits)


# --- 2. operating points -------------------------------------------------------------------------------------------


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
    behind_words: bool = False  # read behind the words (their evidence weighed in) or by the LLM alone


@dataclass(frozen=True)
class Replayed:
    """One policy setting replayed over every document of a selection."""

    probabilities: np.ndarray  # [n_docs, n_classes] of each decision (calibrated)
    raw: np.ndarray  # [n_docs, n_classes]: the LLM's decisions as its heads computed them, before their scales
    exit_sentences: np.ndarray  # [n_docs]: the sentence of each decision (-1: the words)
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
        return Replayed(np.where(words[:, None], lexical, self.probabilities), self.raw,
                        np.where(words, -1, self.exit_sentences), np.where(words, 0, self.token_layers),
                        np.where(words, 0, self.operations), self.tokens, self.sentences, self.n_layer)

    @classmethod
    def concat(cls, parts: list["Replayed"]) -> "Replayed":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("probabilities", "raw", "exit_sentences", "token_layers", "operations", "tokens", "sentences")),
                   parts[0].n_layer)

    @property
    def cost(self) -> float:
        return float(self.token_layers.sum() / (self.tokens.sum() * self.n_layer))

    def point(self, policy: str, params: Mapping[str, Any], labels: np.ndarray, lexical: np.ndarray | None = None,
              threshold: float | None = None) -> Point:
        answered = self.cascade(lexical, threshold)
        correct = answered.probabilities.argmax(axis=1) == labels
        words = lexical.max(axis=1) >= threshold if lexical is not None and threshold is not None else None
        return Point(policy, dict(params), float(correct.mean()), answered.cost,
                     float(answered.operations.sum() / (self.sentences.sum() * self.n_layer)), threshold,
                     float(words.mean()) if words is not None else 0.0,
                     float(correct[words].mean()) if words is not None and words.any() else None,
                     lexical is not None)


def replay_documents(documents: Documents, heads: Mapping[str, CalibratedHeads], policy: str,
                     params: Mapping[str, Any], words: np.ndarray | None = None) -> Replayed:
    """Run `policy` with `params` over every document, behind the words (`words`: their calibrated probabilities of
    each document) or alone (None), reading ahead as the runtime does (so that replayed costs are what a live read
    computes)."""
    runner = make_policy(policy, heads, documents.n_layer, params)
    n = documents.n_docs
    probabilities, raw = (np.zeros((n, len(next(iter(heads.values())).labels))) for _ in range(2))
    exits, token_layers, operations, tokens, sentences = (np.zeros(n, dtype=np.int64) for _ in range(5))
    for i in range(n):
        states, counts = documents.document(i)
        stand_ins = [range(c) for c in counts]  # sentences of the right length: a replay reads no token
        doc_words = None if words is None else words[i]
        decision, doc = replay_document(lambda d: runner.read(d, stand_ins, doc_words), states, counts,
                                        MIN_DECODE_TOKENS)
        basis = decision.basis  # a policy that keeps none answered with raw probabilities
        probabilities[i], exits[i] = decision.probabilities, decision.exit_sentence
        raw[i] = decision.probabilities if basis is None else basis.raw()
        token_layers[i], operations[i] = doc.token_layers, doc.operations
        tokens[i], sentences[i] = int(counts.sum()), len(counts)
    return Replayed(probabilities, raw, exits, token_layers, operations, tokens, sentences, documents.n_layer)


def read(held: HeldOut, policy: str, params: Mapping[str, Any], behind_words: bool) -> Replayed:
    """`policy` at `params` over every held-out document with its fold's heads, behind the words (their evidence
    weighed in, the lexical exit not applied) or alone. prefix-mean, most of every grid, is replayed from its heads'
    answers after every sentence, computed once per layer (`_PrefixAnswers`); every other policy by its own read."""
    if policy == PrefixMean.name:
        return Replayed.concat([_PrefixAnswers.of(fold, params["layer"], behind_words).replay(params)
                                for fold in held.folds])
    return Replayed.concat([replay_documents(fold.documents, fold.heads, policy, params,
                                             fold.words if behind_words else None) for fold in held.folds])


class _PrefixAnswers:
    """What prefix-mean reads at one layer, for every sentence of every document of a fold: the calibrated answer of
    the prefix head after it, and the tokens of each sentence. prefix-mean's decision is then a scan, and its cost
    the decode groups that reading ahead makes, which depend on the tokens alone: `replay` gives exactly what the
    policy's own read gives over the same states (tests/test_calibrate.py checks it), at a fraction of the cost."""

    def __init__(self, fold: Fold, layer: int, behind_words: bool):
        x, _, doc, read = fold.documents.examples(Pooling.PREFIX, layer)
        heads = fold.heads[Pooling.PREFIX]
        words = fold.words[doc] if behind_words else None
        self.layer, self.read, self.n_layer = layer, read, fold.documents.n_layer
        self.probabilities = heads.proba(layer, x, read, words)
        self.margins = margin(self.probabilities)
        self.raw = heads.head(layer).proba(x)
        self.tokens = fold.documents.sentence_tokens()
        lengths = np.bincount(doc, minlength=fold.documents.n_docs)
        self.first = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # each document's first example
        self.lengths = lengths
        self._groups: dict[int, np.ndarray] = {}

    @classmethod
    def of(cls, fold: Fold, layer: int, behind_words: bool) -> "_PrefixAnswers":
        key = (layer, behind_words)
        if key not in fold.answers:
            fold.answers[key] = cls(fold, layer, behind_words)
        return fold.answers[key]

    def group_ends(self, min_sentences: int) -> np.ndarray:
        """Per example, the last sentence of the decode that reads it: sentences wait until `min_sentences` are at
        hand and one decode holds MIN_DECODE_TOKENS tokens (`policies._SentenceStream`); the text's end reads the
        rest."""
        if min_sentences not in self._groups:
            ends = np.zeros(len(self.read), dtype=np.int64)
            for first, length in zip(self.first, self.lengths):
                start, held = first, 0
                for k in range(first, first + length):
                    held += self.tokens[k]
                    if k - first + 1 >= min_sentences and held >= MIN_DECODE_TOKENS or k == first + length - 1:
                        ends[start : k + 1] = k
                        start, held = k + 1, 0
            self._groups[min_sentences] = ends
        return self._groups[min_sentences]

    def replay(self, params: Mapping[str, Any]) -> Replayed:
        threshold = max(params["threshold"], params.get("min_margin", 0.0))
        fires = (self.read >= params.get("min_sentences", 1)) & (self.margins >= threshold)
        last = self.first + self.lengths - 1
        # the first example that fires in each document, else its last (the fallback on the whole text)
        firing = np.where(fires, np.arange(len(fires)), len(fires))
        first_fire = np.minimum.reduceat(firing, self.first)
        decided = np.where(first_fire < len(fires), first_fire, last)
        read_to = np.where(first_fire < len(fires), self.group_ends(params.get("min_sentences", 1))[decided], last)
        cumulative = np.cumsum(self.tokens)
        before = cumulative[self.first] - self.tokens[self.first]
        tokens_read = cumulative[read_to] - before
        sentences_read = read_to - self.first + 1
        depth = self.layer + 1
        return Replayed(self.probabilities[decided], self.raw[decided], decided - self.first, tokens_read * depth,
                        sentences_read * depth, cumulative[last] - before, self.lengths.copy(), self.n_layer)


def replay(held: HeldOut, point: Point) -> Replayed:
    """`point` over every held-out document, as the runtime reads it: behind the words with the lexical exit where
    it was chosen so."""
    replayed = read(held, point.policy, point.params, point.behind_words)
    return replayed.cascade(held.words, point.lexical_threshold) if point.behind_words else replayed


def rescore(held: HeldOut, point: Point) -> Point:
    """`point` measured on other documents (the test split): its accuracy and costs there."""
    lexical = held.words if point.behind_words else None
    return read(held, point.policy, point.params, point.behind_words).point(
        point.policy, point.params, held.labels, lexical, point.lexical_threshold)


@dataclass(frozen=True)
class Calibration:
    best_layer_accuracy: float
    best_layer: dict[str, Any]  # {"pooling", "layer"}
    reference: str  # what every point is held to: "layer" (the best single layer) or "lexical" (the words alone)
    reference_accuracy: float
    tolerance: float
    confidence: float  # of the one-sided bound each chosen point's accuracy loss is held to
    n_docs: int  # documents the points were chosen on
    chosen: dict[str, Point]  # per policy
    loss_bound: dict[str, float]  # per policy: upper confidence bound of (reference − chosen point) accuracy
    frontier: dict[str, list[Point]]  # per policy, Pareto points only
    lexical_accuracy: float | None = None  # the lexical head alone on these documents
    # with a lexical head, per policy: the point a bundle without one would choose (the LLM reading alone, held to
    # the best single layer), for reading with the lexical exit off; its loss bound is against that layer
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


def layer_correct(held: HeldOut) -> dict[str, np.ndarray]:
    """Per pooling, an (n_layer, n_docs) array: is each layer's head right, reading the whole text alone? The
    sentence head reads the last sentence (the paper's layer-wise baseline), the prefix head the mean of all
    sentences. (A temperature never changes a head's answer: these are the raw heads' answers too.)"""
    out = {}
    for pooling, layers in held.layers.items():
        correct = np.zeros((held.n_layer, held.n_docs), dtype=bool)
        for layer in layers:
            correct[layer] = held.whole_text_logits(pooling, layer).argmax(-1) == held.labels
        out[pooling] = correct
    return out


def layer_accuracies(held: HeldOut) -> dict[str, np.ndarray]:
    """Accuracy of each layer's head reading the whole text (see `layer_correct`)."""
    return {pooling: correct.mean(axis=1) for pooling, correct in layer_correct(held).items()}


def pareto(points: list[Point]) -> list[Point]:
    """Points no other point beats on both accuracy and cost, cheapest first."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p.cost, -p.accuracy)):
        if p.accuracy > best:
            front.append(p)
            best = p.accuracy
    return front


def calibrate(held: HeldOut, policies: Iterable[str] | None = None, tolerance: float = 0.02,
              confidence: float = 0.95) -> Calibration:
    """The frontier of every policy on the held-out reads, and per policy the cheapest point whose accuracy loss
    against the reference is at most `tolerance` with `confidence` (0: as measured); where no point is, the most
    accurate one. With a lexical head (`held.words`, calibrated), every point is tried behind the words, the lexical
    exit at each of LEXICAL_THRESHOLDS, and again read alone."""
    correct_by_layer = layer_correct(held)
    accuracies = {pooling: correct.mean(axis=1) for pooling, correct in correct_by_layer.items()}
    pooling = max(accuracies, key=lambda k: accuracies[k].max())
    best_layer = int(accuracies[pooling].argmax())
    best_layer_correct = correct_by_layer[pooling][best_layer]
    reference, reference_name = best_layer_correct, "layer"
    words, labels = held.words, held.labels
    lexical_correct = None if words is None else words.argmax(axis=1) == labels
    if lexical_correct is not None and lexical_correct.mean() > reference.mean():
        reference, reference_name = lexical_correct, "lexical"
    chosen, loss_bound, frontier, llm_only, llm_only_bound = {}, {}, {}, {}, {}
    for policy in policies or policy_names():
        points, bounds, alone, alone_bounds = [], [], [], []
        for params in calibration_grid(policy, held.n_layer, held.layers):
            by_llm = read(held, policy, params, behind_words=False)
            alone.append(by_llm.point(policy, params, labels))
            alone_bounds.append(-paired_lower_bound(by_llm.probabilities.argmax(axis=1) == labels,
                                                    best_layer_correct, confidence))
            if words is None or policy_class(policy).reads_alone:  # the points read alone are all there are
                points.append(alone[-1])
                bounds.append(alone_bounds[-1])
                continue
            behind = read(held, policy, params, behind_words=True)
            for threshold in LEXICAL_THRESHOLDS:
                answered = behind.cascade(words, threshold)
                points.append(behind.point(policy, params, labels, words, threshold))
                bounds.append(-paired_lower_bound(answered.probabilities.argmax(axis=1) == labels, reference,
                                                  confidence))
        frontier[policy] = pareto(points)
        pick = _choose(points, bounds, tolerance)
        chosen[policy], loss_bound[policy] = points[pick], bounds[pick]
        if words is not None:
            pick = _choose(alone, alone_bounds, tolerance)
            llm_only[policy], llm_only_bound[policy] = alone[pick], alone_bounds[pick]
    return Calibration(float(best_layer_correct.mean()), {"pooling": pooling, "layer": best_layer},
                       reference_name, float(reference.mean()), tolerance, confidence, held.n_docs, chosen,
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


# --- 3. trust: abstention and prediction sets for the default policy -----------------------------------------------


TRUST_PROCEDURE = (
    "the calibration documents split in two: on the first (where the operating point was chosen too) the margin "
    "with the lowest Clopper–Pearson upper bound of its error comes first, then every lower margin from the highest "
    "down, then the higher ones; on the second, each "
    "margin's error among the answered documents is bounded (Clopper–Pearson) and, for a target α, the margins are "
    "tested in that order until one's bound exceeds α (fixed-sequence testing: the order was fixed before the second "
    "half was seen, so no correction for the number of margins); of those that passed, the one answering most is "
    "used. With the stated confidence over the second half, the error among the answered documents is then at most "
    "α. Prediction sets: split conformal thresholds on the second half, read with the chosen margin")


def calibrate_trust(choose: HeldOut, certify: HeldOut, point: Point, confidence: float = 0.95) -> Trust:
    """The trust record of reading as `point` does (trust.py): each margin of ABSTENTION_MARGINS replayed as the
    floor the policy reads on below, its order fixed on `choose`, its counts, bound and conformal thresholds on
    `certify`."""
    floor = policy_class(point.policy).margin_floor
    replays: dict[float, tuple[Replayed, Replayed]] = {}  # by the floor read with (a policy without one: 0)
    tests, order_bounds = [], []
    for m in ABSTENTION_MARGINS:
        read_with = float(m) if floor is not None else 0.0
        if read_with not in replays:
            at = Point(**{**asdict(point), "params": {**point.params, floor: read_with} if read_with else point.params})
            replays[read_with] = replay(choose, at), replay(certify, at)
        chosen, certified = replays[read_with]
        answered, errors = _answered(chosen, choose.labels, m)
        order_bounds.append(clopper_pearson_upper(errors, answered, confidence))
        answered, errors = _answered(certified, certify.labels, m)
        scores = 1 - certified.probabilities[np.arange(certify.n_docs), certify.labels]
        tests.append(MarginTest(float(m), answered, errors, clopper_pearson_upper(errors, answered, confidence),
                                {c: conformal_quantile(scores, c) for c in COVERAGES}))
    # From the margin the first half bounds lowest, down through every lower one (each answers more), then the higher
    # ones: the error grows as the margin falls, so for any α the walk passes the margins that can keep it first.
    start = tests[min(range(len(tests)), key=lambda i: (order_bounds[i], tests[i].margin))].margin
    order = sorted(range(len(tests)), key=lambda i: (tests[i].margin > start, abs(tests[i].margin - start)))
    params = {**point.params, "lexical_threshold": point.lexical_threshold} if point.behind_words else point.params
    return Trust(point.policy, params, confidence, certify.n_docs, tuple(tests[i] for i in order))


def _answered(replayed: Replayed, labels: np.ndarray, min_margin: float) -> tuple[int, int]:
    """(answered, errors): the documents whose answer's margin reaches `min_margin`, and how many are wrong."""
    answered = margin(replayed.probabilities) >= min_margin
    errors = int((replayed.probabilities[answered].argmax(axis=1) != labels[answered]).sum())
    return int(answered.sum()), errors
