"""Exit policies: what to read, how deep, and when to stop. Pure decisions over states; no ctypes.

Every policy drives the same `engine.Document` and returns a `Decision`; the document counts what was
really computed (token-layers, and the paper's operations), so costs are never estimated here.

- `full`: the whole text in one decode at full depth; the last layer's sentence head on the last sentence.
- `layer`: the whole text in one decode; the sentence head on the last sentence (the paper's layer-wise
  baseline) or the prefix head on the mean of all sentences (`pooling="prefix"`), either at a fixed calibrated
  layer, or at the first layer whose margin clears a threshold (the decode stops inside the graph there).
- `sentence`: sentence by sentence at full depth, the paper's accumulation rule on the last layer's head.
- `paper2d`: Algorithm 1 of arXiv 2604.18592 exactly (Δ = max(1, ⌊L/m⌋), τ_ignore, τ_acc, accumulation in
  the paper's cell order, fallback to the last sentence at the last layer). Deepening earlier sentences means
  re-decoding them (the only exact way on one KV cache), and that cost is paid and counted. Each cell is
  classified as its layer is computed, so a decode stops inside the graph at the cell that fires.
- `ours` — *prefix*: extend the text at one fixed depth D, never deepen what was read. The KV cache makes
  reading the next sentence cost only that sentence's tokens × D layers, while deepening costs the whole
  prefix again (NOTES.md §6: the paper's schedule, 3.5× in its own operations, is 0.92× in real token-layers).
  Evidence is accumulated in embedding space, not as summed votes: the running mean of the sentences'
  mean states at layer D-1 is what the head reads (a head trained on prefix means), and the text stops as
  soon as that head's margin clears τ after at least `min_sentences`. If the text ends first, the prefix
  head answers on the whole text; optionally (`deepen_depth`, `deepen_below`) a low-margin answer pays for
  one re-read at a deeper layer. It needs no sentence count up front, so it streams: each sentence that
  arrives is one decode, and a decision comes out as soon as it is confident. On a one-sentence text it
  costs one decode at depth D; calibration picks D no deeper than the best static exit layer + 1, so it is
  never more expensive than `layer` there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .engine import Document, SentenceStates
from .errors import BundleError
from .heads import ExitHeads, margin

POLICIES = ("full", "layer", "sentence", "paper2d", "ours")
SENTENCE, PREFIX = "sentence", "prefix"  # the head sets: on one sentence's mean, on the running prefix mean

Tokens = Sequence[int]


@dataclass(frozen=True)
class Decision:
    probabilities: np.ndarray  # [n_classes]
    exit_sentence: int  # index of the last sentence whose evidence decided
    exit_layer: int  # layer of the head that decided
    sentences_read: int
    fired: bool  # an exit rule fired (False: the text ran out and the fallback answered)

    @property
    def label_index(self) -> int:
        return int(np.argmax(self.probabilities))


class Accumulator:
    """The paper's rule: a cell whose margin exceeds τ_ignore adds that margin to its predicted class;
    the first class whose total exceeds τ_acc wins. Ties in a cell go to the lower class index (argmax)."""

    def __init__(self, n_classes: int, tau_ignore: float, tau_acc: float):
        self.totals = np.zeros(n_classes)
        self.tau_ignore, self.tau_acc = tau_ignore, tau_acc
        self.winner: int | None = None

    def add(self, probabilities: np.ndarray) -> bool:
        """Count one cell; True once a class has won."""
        confidence = float(margin(probabilities))
        if confidence > self.tau_ignore:
            label = int(np.argmax(probabilities))
            self.totals[label] += confidence
            if self.totals[label] > self.tau_acc:
                self.winner = label
        return self.winner is not None


@dataclass(frozen=True)
class Step:
    """Step s of Algorithm 1: sentence s runs layers 0..depth-1, earlier ones layers earlier_from..depth-1."""

    sentence: int
    depth: int
    earlier_from: int


def paper2d_steps(n_sentences: int, n_layer: int) -> list[Step]:
    delta = max(1, n_layer // n_sentences)
    return [Step(s, min((s + 1) * delta, n_layer), delta * s) for s in range(n_sentences)]


class Policy:
    """Reads a tokenized document through `doc` and decides. Subclasses set `name`."""

    name = ""

    def run(self, doc: Document, sentences: Sequence[Tokens]) -> Decision:
        raise NotImplementedError

    def stream(self, doc: Document) -> "PolicyStream":
        """Sentences fed one at a time. Policies that need the whole text decide at `finish()`."""
        return _BufferedStream(self, doc)


class PolicyStream:
    def feed(self, sentence: Tokens) -> Decision | None:
        raise NotImplementedError

    def finish(self) -> Decision:
        raise NotImplementedError


class _BufferedStream(PolicyStream):
    def __init__(self, policy: Policy, doc: Document):
        self.policy, self.doc, self.sentences = policy, doc, []

    def feed(self, sentence: Tokens) -> None:
        self.sentences.append(sentence)

    def finish(self) -> Decision:
        return self.policy.run(self.doc, self.sentences)


class _IncrementalPolicy(Policy):
    """A policy that reads sentence by sentence runs as its own stream."""

    def run(self, doc: Document, sentences: Sequence[Tokens]) -> Decision:
        stream = self.stream(doc)
        for sentence in sentences:
            decision = stream.feed(sentence)
            if decision is not None:
                return decision
        return stream.finish()


class Full(Policy):
    name = "full"

    def __init__(self, heads: ExitHeads, n_layer: int):
        self.heads, self.layer = heads, n_layer - 1
        heads.head(self.layer)  # fail at construction if the bundle has no head there

    def run(self, doc: Document, sentences: Sequence[Tokens]) -> Decision:
        states = doc.append(sentences, self.layer + 1, layers=[self.layer])
        p = self.heads.proba(self.layer, states[-1].at(self.layer))
        return Decision(p, len(sentences) - 1, self.layer, len(sentences), fired=False)


class Layer(Policy):
    name = "layer"

    def __init__(
        self,
        heads: Mapping[str, ExitHeads],
        n_layer: int,
        layer: int | None = None,
        threshold: float | None = None,
        pooling: str = SENTENCE,
    ):
        if (layer is None) == (threshold is None):
            raise BundleError("the layer policy takes either a fixed `layer` or a margin `threshold`, not both")
        if pooling not in heads:
            raise BundleError(f"the layer policy needs {pooling} exit heads, which this bundle does not have")
        self.heads, self.n_layer, self.layer, self.threshold = heads[pooling], n_layer, layer, threshold
        self.pooling = pooling
        if layer is not None:
            self.heads.head(layer)

    def _text_input(self, means: np.ndarray) -> np.ndarray:
        """The paper's input: the last sentence's mean; or, pooled, the mean over all sentences."""
        return means[-1] if self.pooling == SENTENCE else means.mean(axis=0)

    def run(self, doc: Document, sentences: Sequence[Tokens]) -> Decision:
        last = len(sentences) - 1
        if self.layer is not None:
            states = doc.append(sentences, self.layer + 1, layers=[self.layer])
            p = self.heads.proba(self.layer, self._text_input(np.stack([s.at(self.layer) for s in states])))
            return Decision(p, last, self.layer, len(sentences), fired=True)
        seen: list[tuple[int, np.ndarray]] = []

        def confident(layer: int, means: np.ndarray) -> bool:
            seen.append((layer, self.heads.proba(layer, self._text_input(means))))
            return float(margin(seen[-1][1])) >= self.threshold

        doc.append(sentences, self.n_layer, layers=self.heads.layers, stop=confident)
        layer, p = seen[-1]
        return Decision(p, last, layer, len(sentences), fired=float(margin(p)) >= self.threshold)


class Sentence(_IncrementalPolicy):
    name = "sentence"

    def __init__(self, heads: ExitHeads, n_layer: int, tau_ignore: float, tau_acc: float):
        self.heads, self.layer, self.tau_ignore, self.tau_acc = heads, n_layer - 1, tau_ignore, tau_acc
        heads.head(self.layer)

    def stream(self, doc: Document) -> PolicyStream:
        return _SentenceStream(self, doc)


class _SentenceStream(PolicyStream):
    def __init__(self, policy: Sentence, doc: Document):
        self.policy, self.doc = policy, doc
        self.acc = Accumulator(policy.heads.n_classes, policy.tau_ignore, policy.tau_acc)
        self.last: np.ndarray | None = None

    def feed(self, sentence: Tokens) -> Decision | None:
        layer = self.policy.layer
        (states,) = self.doc.append([sentence], layer + 1, layers=[layer])
        self.last = self.policy.heads.proba(layer, states.at(layer))
        if self.acc.add(self.last):
            return _won(self.acc, states.index, layer, self.doc.n_sentences)
        return None

    def finish(self) -> Decision:
        n = self.doc.n_sentences
        return Decision(self.last, n - 1, self.policy.layer, n, fired=False)


def _won(acc: Accumulator, sentence: int, layer: int, read: int) -> Decision:
    """A decision from the accumulator: the winning class gets its share of the accumulated confidence."""
    scores = acc.totals / acc.totals.sum()
    return Decision(scores, sentence, layer, read, fired=True)


class Paper2D(Policy):
    name = "paper2d"

    def __init__(self, heads: ExitHeads, n_layer: int, tau_ignore: float, tau_acc: float):
        self.heads, self.n_layer, self.tau_ignore, self.tau_acc = heads, n_layer, tau_ignore, tau_acc
        heads.head(n_layer - 1)

    def run(self, doc: Document, sentences: Sequence[Tokens]) -> Decision:
        acc = Accumulator(self.heads.n_classes, self.tau_ignore, self.tau_acc)
        fired: list[int] = []  # the layer of the cell that won; its decode stops right there

        def classify(layer: int, means: np.ndarray) -> bool:
            if layer in self.heads.layers and acc.add(self.heads.proba(layer, means[0])):
                fired.append(layer)
            return bool(fired)

        last: SentenceStates | None = None
        for step in paper2d_steps(len(sentences), self.n_layer):
            earlier = range(step.earlier_from, step.depth)
            if step.sentence and len(earlier):
                for states in doc.deepening(step.depth, layers=earlier, stop=classify):
                    if fired:
                        return _won(acc, states.index, fired[0], doc.n_sentences)
            (last,) = doc.append([sentences[step.sentence]], step.depth, stop=classify)
            if fired:
                return _won(acc, step.sentence, fired[0], doc.n_sentences)
        top = self.n_layer - 1
        if last.depth < self.n_layer:  # the fallback needs the last sentence at the last layer
            last = doc.deepen(self.n_layer, layers=[top])[-1]
        p = self.heads.proba(top, last.at(top))
        return Decision(p, len(sentences) - 1, top, len(sentences), fired=False)


class Ours(_IncrementalPolicy):
    name = "ours"

    def __init__(
        self,
        heads: ExitHeads,
        n_layer: int,
        depth: int,
        threshold: float,
        min_sentences: int = 1,
        deepen_depth: int | None = None,
        deepen_below: float = 0.0,
    ):
        if not 1 <= depth <= n_layer:
            raise BundleError(f"the ours policy's depth {depth} is outside 1..{n_layer}")
        self.heads, self.depth, self.threshold, self.min_sentences = heads, depth, threshold, min_sentences
        self.deepen_depth, self.deepen_below = deepen_depth, deepen_below
        heads.head(depth - 1)
        if deepen_depth is not None:
            heads.head(deepen_depth - 1)

    def stream(self, doc: Document) -> PolicyStream:
        return _OursStream(self, doc)


class _OursStream(PolicyStream):
    def __init__(self, policy: Ours, doc: Document):
        self.policy, self.doc = policy, doc
        self.layer = policy.depth - 1
        self.total = np.zeros(policy.heads.n_embd, dtype=np.float64)
        self.p: np.ndarray | None = None
        self.pending: list[Tokens] = []

    def feed(self, sentence: Tokens) -> Decision | None:
        # No decision can come before min_sentences: read those in one decode (one llama.cpp call costs
        # ~10 ms on top of its compute), then one decode per sentence.
        self.pending.append(sentence)
        if self.doc.n_sentences + len(self.pending) < self.policy.min_sentences:
            return None
        return self._read()

    def _read(self) -> Decision | None:
        states = self.doc.append(self.pending, self.policy.depth, layers=[self.layer])
        self.pending = []
        self.total += np.sum([s.at(self.layer) for s in states], axis=0)
        n = self.doc.n_sentences
        self.p = self.policy.heads.proba(self.layer, (self.total / n).astype(np.float32))
        if n >= self.policy.min_sentences and float(margin(self.p)) >= self.policy.threshold:
            return Decision(self.p, n - 1, self.layer, n, fired=True)
        return None

    def finish(self) -> Decision:
        if self.pending:  # a text shorter than min_sentences
            decision = self._read()
            if decision is not None:
                return decision
        n, policy = self.doc.n_sentences, self.policy
        if policy.deepen_depth is not None and float(margin(self.p)) < policy.deepen_below:
            layer = policy.deepen_depth - 1
            states = self.doc.deepen(policy.deepen_depth, layers=[layer])
            if len(states) == n:  # every sentence was re-read at the deeper layer
                prefix = np.mean([s.at(layer) for s in states], axis=0).astype(np.float32)
                return Decision(policy.heads.proba(layer, prefix), n - 1, layer, n, fired=False)
        return Decision(self.p, n - 1, self.layer, n, fired=False)


def make_policy(name: str, heads: Mapping[str, ExitHeads], n_layer: int, params: Mapping[str, Any]) -> Policy:
    """The policy `name` with its calibrated parameters (from the bundle, or given by the user)."""
    try:
        if name == "full":
            return Full(heads[SENTENCE], n_layer)
        if name == "layer":
            return Layer(heads, n_layer, **params)
        if name == "sentence":
            return Sentence(heads[SENTENCE], n_layer, **params)
        if name == "paper2d":
            return Paper2D(heads[SENTENCE], n_layer, **params)
        if name == "ours":
            return Ours(heads[PREFIX], n_layer, **params)
    except KeyError as exc:
        raise BundleError(f"the {name} policy needs {exc.args[0]} exit heads, which this bundle does not have") from None
    except TypeError as exc:
        raise BundleError(f"bad parameters for the {name} policy {dict(params)}: {exc}") from None
    raise BundleError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
