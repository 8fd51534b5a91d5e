"""Exit policies: what to read, how deep, and when to stop. Pure decisions over states: a policy composes the
readings of a `document.Document` and never sees what computes them (llama.cpp, stored states, a fake).

Every policy returns a `Decision`; the document counts what was really computed (token-layers, and the paper's
operations), so costs are never estimated here. Layers are 0-based everywhere: a policy that exits at `layer`
computes layers 0..layer, i.e. a depth of layer + 1.

- `full`: the whole text in one decode at full depth; the last layer's sentence head on the last sentence.
- `layer`: the whole text in one decode to a fixed calibrated layer; the sentence head on the last sentence (the
  paper's layer-wise baseline) or the prefix head on the mean of all sentences (`pooling="prefix"`).
- `sentence-vote`: sentence by sentence at full depth, the paper's accumulation of votes on the last layer's head.
- `paper2d`: Algorithm 1 of arXiv 2604.18592 exactly (Δ = max(1, ⌊L/m⌋), τ_ignore, τ_acc, accumulation in the
  paper's cell order, fallback to the last sentence at the last layer). Deepening earlier sentences means
  re-decoding them (the only exact way on one KV cache), and that cost is paid and counted. Each cell is classified
  as its layer is computed, so a decode stops inside the graph at the cell that fires.
- `prefix-mean`: extend the text at one fixed layer, never deepen what was read. The KV cache makes reading the next
  sentence cost only that sentence's tokens × (layer + 1), while deepening costs the whole prefix again (the paper's
  schedule, 3.5× in its own operations, was 0.92× in real token-layers: docs/measurements.md). Evidence is
  accumulated in embedding space, not as summed votes: the running mean of the sentences' mean states at that layer
  is what the prefix head reads, and reading stops as soon as its margin clears τ after at least `min_sentences`.
  If the text ends first, the prefix head answers on the whole text. It needs no sentence count up front, so it
  streams: what arrives is read at once, and a decision comes out as soon as it is confident. On a one-sentence text
  it costs one decode at its layer.

Each policy is one class that declares its name, the heads it reads and its calibration grid, and registers itself
(`register`): the policy names, `make_policy`, calibration and the CLI's choices all come from the registry.

Every decision also says how close it came to going another way (`Decision.boundary_gap`): the smallest distance
between a quantity it compared and the threshold it compared it with, a tie between the top two classes included.
A read whose numbers move less than that (batched differently, another backend: docs/llama-cpp.md §5) decides the
same; only a decision with a small gap may come out otherwise.

`sentence-vote` and `prefix-mean` weigh sentences one by one but read ahead, through the sentences already at hand,
until one decode holds `Document.min_decode_tokens` tokens: on llama.cpp's CPU backend a decode of fewer than 64
tokens costs 1.7–2.8× more per token (docs/llama-cpp.md §9). Their decisions are those of a sentence-by-sentence
read; the sentences a decode carried past the one that decided are paid for and counted. Reading a whole text, every
sentence is at hand; a live stream never waits for text that has not arrived, but reads ahead within what arrived.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np

from .calibrated import Basis, CalibratedHeads
from .document import Document, Reading, SentenceMeans, Tokens
from .errors import BundleError
from .heads import Pooling, margin, whole_text_input



@dataclass(frozen=True)
class Decision:
    probabilities: np.ndarray  # [n_classes], calibrated (calibrated.py)
    exit_sentence: int  # index of the last sentence whose evidence decided
    exit_layer: int  # layer of the head that decided
    sentences_read: int
    fired: bool  # an exit rule fired (False: the text ran out and the fallback answered)
    boundary_gap: float  # the closest a compared quantity came to its threshold (see the module docstring)
    basis: Basis | None = None  # what the deciding head read (None: no head of the LLM answered)

    @property
    def label_index(self) -> int:
        return int(np.argmax(self.probabilities))


def _tie_gap(p: np.ndarray) -> float:
    """How far the answer `p` is from a tie between its top two classes."""
    return float(margin(p))


class Accumulator:
    """The paper's rule: a cell whose margin exceeds τ_ignore adds that margin to its predicted class;
    the first class whose total exceeds τ_acc wins. Ties in a cell go to the lower class index (argmax).
    `gap` is the closest any cell's margin came to τ_ignore, or a counted total to τ_acc. The answer is the cell
    that made its class win (its calibrated probabilities, whose top class is the winner)."""

    def __init__(self, n_classes: int, tau_ignore: float, tau_acc: float):
        self.totals = np.zeros(n_classes)
        self.tau_ignore, self.tau_acc = tau_ignore, tau_acc
        self.winner: int | None = None
        self.gap = float("inf")

    def add(self, probabilities: np.ndarray) -> bool:
        """Count one cell; True once a class has won."""
        confidence = float(margin(probabilities))
        self.gap = min(self.gap, abs(confidence - self.tau_ignore))
        if confidence > self.tau_ignore:
            label = int(np.argmax(probabilities))
            self.totals[label] += confidence
            self.gap = min(self.gap, abs(self.totals[label] - self.tau_acc))
            if self.winner is None and self.totals[label] > self.tau_acc:
                self.winner = label
        return self.winner is not None

    def decision(self, cell: np.ndarray, sentence: int, layer: int, read: int, basis: Basis) -> Decision:
        """The decision of the winning cell `cell` (its probabilities)."""
        return Decision(cell, sentence, layer, read, fired=True, boundary_gap=self.gap, basis=basis)

    def fallback(self, cell: np.ndarray, sentence: int, layer: int, read: int, basis: Basis) -> Decision:
        """No class won before the text ended: the last cell `cell` answers."""
        gap = min(self.gap, _tie_gap(cell))
        return Decision(cell, sentence, layer, read, fired=False, boundary_gap=gap, basis=basis)


@dataclass(frozen=True)
class Step:
    """Step s of Algorithm 1: sentence s runs layers 0..depth-1, earlier ones layers earlier_from..depth-1."""

    sentence: int
    depth: int
    earlier_from: int


def paper2d_steps(n_sentences: int, n_layer: int) -> list[Step]:
    delta = max(1, n_layer // n_sentences)
    return [Step(s, min((s + 1) * delta, n_layer), delta * s) for s in range(n_sentences)]


# --- the registry --------------------------------------------------------------------------------------------

Grid = list[dict[str, Any]]
_REGISTRY: dict[str, type["Policy"]] = {}


def register(policy: type["Policy"]) -> type["Policy"]:
    """Make a policy class known by its `name`: to `make_policy`, calibration and the CLI."""
    _REGISTRY[policy.name] = policy
    return policy


def policy_names() -> tuple[str, ...]:
    """Every registered policy, in the order registered."""
    return tuple(_REGISTRY)


def policy_class(name: str) -> type["Policy"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BundleError(f"unknown policy {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def make_policy(name: str, heads: Mapping[str, CalibratedHeads], n_layer: int, params: Mapping[str, Any]) -> "Policy":
    """The policy `name` with its calibrated parameters (from the bundle, or given by the user)."""
    policy = policy_class(name)
    missing = [pooling for pooling in policy.reads(params) if pooling not in heads]
    if missing:
        raise BundleError(f"the {name} policy needs {missing[0]} exit heads, which this bundle does not have")
    try:
        return policy(heads, n_layer, **params)
    except TypeError as exc:
        raise BundleError(f"bad parameters for the {name} policy {dict(params)}: {exc}") from None


def calibration_grid(name: str, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
    """The parameter settings calibration replays for policy `name`, given the layers each pooling has heads at."""
    return policy_class(name).grid(n_layer, layers)


# --- the policies ---------------------------------------------------------------------------------------------


class Policy:
    """Reads a tokenized document through `doc` and decides. A subclass sets `name` and `pooling` (the heads it
    reads), takes (heads by pooling, n_layer, **parameters) and says which parameter settings calibration tries.

    `words`: the lexical head's calibrated probabilities of the whole text, where the text is read behind the words
    (the heads then read it with their fused scale, calibrated.py); None where it is read alone."""

    name: ClassVar[str]
    pooling: ClassVar[str] = Pooling.SENTENCE
    # the parameter that keeps the policy from stopping below a margin, if it stops on one (abstention reads on)
    margin_floor: ClassVar[str | None] = None
    # the policy is a reference every speed-up is measured against: the LLM reads every text, never the words first
    reads_alone: ClassVar[bool] = False

    @classmethod
    def reads(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The poolings whose heads the policy reads with these parameters."""
        return (cls.pooling,)

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        """Parameter settings to replay in calibration; `layers`: the layers each pooling has heads at."""
        raise NotImplementedError

    def read(self, doc: Document, sentences: Iterable[Tokens], words: np.ndarray | None = None) -> Reading[Decision]:
        """Read `sentences` (pulled only as far as needed) and decide."""
        raise NotImplementedError

    def stream(self, doc: Document) -> "PolicyStream":
        """Sentences fed one at a time, read alone (a stream's words are not known before its end). Policies that
        need the whole text decide at `finish()`."""
        return _BufferedStream(self, doc)


class PolicyStream:
    def feed(self, sentence: Tokens, more: bool = False) -> Reading[Decision | None]:
        """Take the next sentence; a decision if the policy is confident. `more`: the caller holds the sentences
        after it (the rest of a text, or of a piece of a stream), so its read may wait to share their decode."""
        raise NotImplementedError

    def finish(self) -> Reading[Decision]:
        raise NotImplementedError


class _BufferedStream(PolicyStream):
    def __init__(self, policy: Policy, doc: Document):
        self.policy, self.doc, self.sentences = policy, doc, []

    def feed(self, sentence: Tokens, more: bool = False) -> Reading[None]:
        yield from ()  # asks for nothing: the policy reads at finish()
        self.sentences.append(sentence)

    def finish(self) -> Reading[Decision]:
        return (yield from self.policy.read(self.doc, self.sentences))


class _IncrementalPolicy(Policy):
    """A policy that reads sentence by sentence, at one layer, never deepening what it read."""

    layer: int
    min_sentences: int = 1  # no decision before this many sentences

    def read(self, doc: Document, sentences: Iterable[Tokens], words: np.ndarray | None = None) -> Reading[Decision]:
        stream = self._stream(doc, words)
        for sentence in sentences:  # the whole text is at hand (pulled lazily: a tail never read is never split)
            decision = yield from stream.feed(sentence, more=True)
            if decision is not None:
                return decision
        return (yield from stream.finish())

    def stream(self, doc: Document) -> "_SentenceStream":
        return self._stream(doc, None)

    def _stream(self, doc: Document, words: np.ndarray | None) -> "_SentenceStream":
        raise NotImplementedError


class _SentenceStream(PolicyStream):
    """Sentences read at the policy's layer and weighed one by one, in order. They wait to be read until a
    decision is possible (`min_sentences`) and, while more are at hand, until one decode holds at least
    `doc.min_decode_tokens` of them: a decision may then come at a sentence whose decode also carried later ones,
    which were paid for and count as read."""

    def __init__(self, policy: _IncrementalPolicy, doc: Document, words: np.ndarray | None):
        self.policy, self.doc, self.words = policy, doc, words
        self.pending: list[Tokens] = []

    def feed(self, sentence: Tokens, more: bool = False) -> Reading[Decision | None]:
        self.pending.append(sentence)
        if (self.doc.n_sentences + len(self.pending) < self.policy.min_sentences
                or more and sum(map(len, self.pending)) < self.doc.min_decode_tokens):
            return None
        return (yield from self._read())

    def finish(self) -> Reading[Decision]:
        if self.pending:
            decision = yield from self._read()
            if decision is not None:
                return decision
        return self.fallback()

    def _read(self) -> Reading[Decision | None]:
        layer = self.policy.layer
        states = yield from self.doc.append(self.pending, layer + 1, layers=[layer])
        self.pending = []
        for sentence in states:
            if (decision := self.weigh(sentence)) is not None:
                return decision
        return None

    def weigh(self, sentence: SentenceMeans) -> Decision | None:
        """Take one more sentence's states into account; a decision if the policy's exit rule fires."""
        raise NotImplementedError

    def fallback(self) -> Decision:
        """The decision when the text ended before the exit rule fired."""
        raise NotImplementedError


@register
class Full(Policy):
    name = "full"
    reads_alone = True

    def __init__(self, heads: Mapping[str, CalibratedHeads], n_layer: int):
        self.heads, self.layer = heads[self.pooling], n_layer - 1
        self.heads.head(self.layer)  # fail at construction if the bundle has no head there

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        return [{}]

    def read(self, doc: Document, sentences: Iterable[Tokens], words: np.ndarray | None = None) -> Reading[Decision]:
        sentences = list(sentences)
        states = yield from doc.append(sentences, self.layer + 1, layers=[self.layer])
        last, n = states[-1].at(self.layer), len(sentences)
        p = self.heads.proba(self.layer, last, n, words)
        return Decision(p, n - 1, self.layer, n, fired=False, boundary_gap=_tie_gap(p),
                        basis=self.heads.basis(self.layer, n, words, [n - 1], [last]))


@register
class Layer(Policy):
    name = "layer"

    def __init__(self, heads: Mapping[str, CalibratedHeads], n_layer: int, layer: int,
                 pooling: str = Pooling.SENTENCE):
        self.heads, self.layer, self.pooling = heads[pooling], layer, pooling
        self.heads.head(layer)

    @classmethod
    def reads(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        return (params.get("pooling", Pooling.SENTENCE),)

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        return [{"layer": layer, "pooling": pooling} for pooling in Pooling.ALL for layer in layers.get(pooling, ())]

    def read(self, doc: Document, sentences: Iterable[Tokens], words: np.ndarray | None = None) -> Reading[Decision]:
        sentences = list(sentences)
        states = yield from doc.append(sentences, self.layer + 1, layers=[self.layer])
        means, n = [s.at(self.layer) for s in states], len(sentences)
        p = self.heads.proba(self.layer, whole_text_input(self.pooling, np.stack(means)), n, words)
        read = range(n) if self.pooling == Pooling.PREFIX else [n - 1]
        return Decision(p, n - 1, self.layer, n, fired=True, boundary_gap=_tie_gap(p),
                        basis=self.heads.basis(self.layer, n, words, read, [means[i] for i in read]))


# The paper's accumulation rule, as sentence-vote and paper2d calibrate it.
VOTE_GRID: Grid = [{"tau_ignore": ti, "tau_acc": ta}
                   for ti in (0.0, 0.2, 0.4, 0.6, 0.8) for ta in (0.5, 1.0, 2.0, 3.0, 5.0)]


@register
class SentenceVote(_IncrementalPolicy):
    name = "sentence-vote"

    def __init__(self, heads: Mapping[str, CalibratedHeads], n_layer: int, tau_ignore: float, tau_acc: float):
        self.heads, self.layer, self.tau_ignore, self.tau_acc = heads[self.pooling], n_layer - 1, tau_ignore, tau_acc
        self.heads.head(self.layer)

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        return VOTE_GRID

    def _stream(self, doc: Document, words: np.ndarray | None) -> _SentenceStream:
        return _SentenceVoteStream(self, doc, words)


class _SentenceVoteStream(_SentenceStream):
    def __init__(self, policy: SentenceVote, doc: Document, words: np.ndarray | None):
        super().__init__(policy, doc, words)
        self.votes = Accumulator(policy.heads.n_classes, policy.tau_ignore, policy.tau_acc)
        self.last: tuple[np.ndarray, Basis] | None = None  # the last cell: its probabilities and its basis

    def weigh(self, sentence: SentenceMeans) -> Decision | None:
        layer, read = self.policy.layer, sentence.index + 1
        state = sentence.at(layer)
        self.last = (self.policy.heads.proba(layer, state, read, self.words),
                     self.policy.heads.basis(layer, read, self.words, [sentence.index], [state]))
        p, basis = self.last
        if self.votes.add(p):
            return self.votes.decision(p, sentence.index, layer, self.doc.n_sentences, basis)
        return None

    def fallback(self) -> Decision:
        n = self.doc.n_sentences
        p, basis = self.last
        return self.votes.fallback(p, n - 1, self.policy.layer, n, basis)


@register
class Paper2D(Policy):
    name = "paper2d"

    def __init__(self, heads: Mapping[str, CalibratedHeads], n_layer: int, tau_ignore: float, tau_acc: float):
        self.heads, self.n_layer = heads[self.pooling], n_layer
        self.tau_ignore, self.tau_acc = tau_ignore, tau_acc
        self.heads.head(n_layer - 1)

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        return VOTE_GRID

    def read(self, doc: Document, sentences: Iterable[Tokens], words: np.ndarray | None = None) -> Reading[Decision]:
        sentences = list(sentences)
        votes = Accumulator(self.heads.n_classes, self.tau_ignore, self.tau_acc)
        fired: list[tuple[int, np.ndarray, Basis]] = []  # the cell that won: its decode stops right there
        cell = [0]  # the sentence whose decode the next stop-rule calls belong to (one sentence per decode)

        def classify(layer: int, means: np.ndarray) -> bool:
            if layer in self.heads.layers:
                read = cell[0] + 1
                p = self.heads.proba(layer, means[0], read, words)
                if votes.add(p):
                    fired.append((layer, p, self.heads.basis(layer, read, words, [cell[0]], [means[0]])))
            return bool(fired)

        def decided(sentence: int) -> Decision:
            layer, p, basis = fired[0]
            return votes.decision(p, sentence, layer, doc.n_sentences, basis)

        last: SentenceMeans | None = None
        for step in paper2d_steps(len(sentences), self.n_layer):
            earlier = range(step.earlier_from, step.depth)
            if step.sentence and len(earlier):
                while (stale := doc.first_below(step.depth)) is not None:
                    cell[0] = stale
                    states = yield from doc.deepen_next(step.depth, earlier, classify)
                    if fired:
                        return decided(states.index)
            cell[0] = step.sentence
            (last,) = yield from doc.append([sentences[step.sentence]], step.depth, stop=classify)
            if fired:
                return decided(step.sentence)
        top, n = self.n_layer - 1, len(sentences)
        if last.depth < self.n_layer:  # the fallback needs the last sentence at the last layer
            last = (yield from doc.deepen(self.n_layer, layers=[top]))[-1]
        state = last.at(top)
        return votes.fallback(self.heads.proba(top, state, n, words), n - 1, top, n,
                              self.heads.basis(top, n, words, [n - 1], [state]))


PREFIX_MEAN_THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
PREFIX_MEAN_MIN_SENTENCES = (1, 2, 3, 5)


@register
class PrefixMean(_IncrementalPolicy):
    name = "prefix-mean"
    pooling = Pooling.PREFIX
    margin_floor = "min_margin"

    def __init__(self, heads: Mapping[str, CalibratedHeads], n_layer: int, layer: int, threshold: float,
                 min_sentences: int = 1, min_margin: float = 0.0):
        """`min_margin`: never stop on a margin below it (an abstention margin: reading on may make the answer
        sure enough), whatever `threshold` says."""
        if not 0 <= layer < n_layer:
            raise BundleError(f"the prefix-mean policy's layer {layer} is outside 0..{n_layer - 1}")
        self.heads, self.layer, self.min_sentences = heads[self.pooling], layer, min_sentences
        self.threshold = max(threshold, min_margin)
        self.heads.head(layer)

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        return [{"layer": layer, "threshold": t, "min_sentences": k}
                for layer in layers.get(cls.pooling, ()) for t in PREFIX_MEAN_THRESHOLDS
                for k in PREFIX_MEAN_MIN_SENTENCES]

    def _stream(self, doc: Document, words: np.ndarray | None) -> _SentenceStream:
        return _PrefixMeanStream(self, doc, words)


class _PrefixMeanStream(_SentenceStream):
    def __init__(self, policy: PrefixMean, doc: Document, words: np.ndarray | None):
        super().__init__(policy, doc, words)
        self.total = np.zeros(policy.heads.n_embd, dtype=np.float64)
        self.states: list[np.ndarray] = []  # each sentence's mean state at the layer, for the answer's basis
        self.p: np.ndarray | None = None
        self.gap = float("inf")

    def weigh(self, sentence: SentenceMeans) -> Decision | None:
        policy = self.policy
        state = sentence.at(policy.layer)
        self.states.append(state)
        self.total += state  # one sentence at a time, as `heads.running_means` sums them
        n = sentence.index + 1
        self.p = policy.heads.proba(policy.layer, (self.total / n).astype(np.float32), n, self.words)
        if n < policy.min_sentences:
            return None
        confidence = float(margin(self.p))
        self.gap = min(self.gap, abs(confidence - policy.threshold))
        if confidence >= policy.threshold:
            return Decision(self.p, sentence.index, policy.layer, self.doc.n_sentences, fired=True,
                            boundary_gap=min(self.gap, confidence), basis=self._basis())
        return None

    def fallback(self) -> Decision:
        n = self.doc.n_sentences
        return Decision(self.p, n - 1, self.policy.layer, n, fired=False,
                        boundary_gap=min(self.gap, _tie_gap(self.p)), basis=self._basis())

    def _basis(self) -> Basis:
        n = len(self.states)
        return self.policy.heads.basis(self.policy.layer, n, self.words, range(n), self.states)
