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

from .document import Document, Reading, SentenceMeans, Tokens
from .errors import BundleError
from .heads import ExitHeads, Pooling, margin, whole_text_input



@dataclass(frozen=True)
class Decision:
    probabilities: np.ndarray  # [n_classes]
    exit_sentence: int  # index of the last sentence whose evidence decided
    exit_layer: int  # layer of the head that decided
    sentences_read: int
    fired: bool  # an exit rule fired (False: the text ran out and the fallback answered)
    boundary_gap: float  # the closest a compared quantity came to its threshold (see the module docstring)

    @property
    def label_index(self) -> int:
        return int(np.argmax(self.probabilities))


def _tie_gap(p: np.ndarray) -> float:
    """How far the answer `p` is from a tie between its top two classes."""
    return float(margin(p))


class Accumulator:
    """The paper's rule: a cell whose margin exceeds τ_ignore adds that margin to its predicted class;
    the first class whose total exceeds τ_acc wins. Ties in a cell go to the lower class index (argmax).
    `gap` is the closest any cell's margin came to τ_ignore, or a counted total to τ_acc."""

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
            if self.totals[label] > self.tau_acc:
                self.winner = label
        return self.winner is not None

    def decision(self, sentence: int, layer: int, read: int) -> Decision:
        """The winning class gets its share of the accumulated confidence."""
        total = self.totals.sum()
        scores = self.totals / total if total > 0 else np.eye(len(self.totals))[self.winner]
        return Decision(scores, sentence, layer, read, fired=True, boundary_gap=self.gap)

    def fallback(self, probabilities: np.ndarray, sentence: int, layer: int, read: int) -> Decision:
        """No class won before the text ended: `probabilities` (the last cell's) answer."""
        gap = min(self.gap, _tie_gap(probabilities))
        return Decision(probabilities, sentence, layer, read, fired=False, boundary_gap=gap)


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


def make_policy(name: str, heads: Mapping[str, ExitHeads], n_layer: int, params: Mapping[str, Any]) -> "Policy":
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
    reads), takes (heads by pooling, n_layer, **parameters) and says which parameter settings calibration tries."""

    name: ClassVar[str]
    pooling: ClassVar[str] = Pooling.SENTENCE
    # the parameter that keeps the policy from stopping below a margin, if it stops on one (abstention reads on)
    margin_floor: ClassVar[str | None] = None

    @classmethod
    def reads(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The poolings whose heads the policy reads with these parameters."""
        return (cls.pooling,)

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        """Parameter settings to replay in calibration; `layers`: the layers each pooling has heads at."""
        raise NotImplementedError

    def read(self, doc: Document, sentences: Iterable[Tokens]) -> Reading[Decision]:
        """Read `sentences` (pulled only as far as needed) and decide."""
        raise NotImplementedError

    def stream(self, doc: Document) -> "PolicyStream":
        """Sentences fed one at a time. Policies that need the whole text decide at `finish()`."""
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

    def read(self, doc: Document, sentences: Iterable[Tokens]) -> Reading[Decision]:
        stream = self.stream(doc)
        for sentence in sentences:  # the whole text is at hand (pulled lazily: a tail never read is never split)
            decision = yield from stream.feed(sentence, more=True)
            if decision is not None:
                return decision
        return (yield from stream.finish())

    def stream(self, doc: Document) -> "_SentenceStream":
        raise NotImplementedError


class _SentenceStream(PolicyStream):
    """Sentences read at the policy's layer and weighed one by one, in order. They wait to be read until a
    decision is possible (`min_sentences`) and, while more are at hand, until one decode holds at least
    `doc.min_decode_tokens` of them: a decision may then come at a sentence whose decode also carried later ones,
    which were paid for and count as read."""

    def __init__(self, policy: _IncrementalPolicy, doc: Document):
        self.policy, self.doc = policy, doc
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

    def __init__(self, heads: Mapping[str, ExitHeads], n_layer: int):
        self.heads, self.layer = heads[self.pooling], n_layer - 1
        self.heads.head(self.layer)  # fail at construction if the bundle has no head there

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        return [{}]

    def read(self, doc: Document, sentences: Iterable[Tokens]) -> Reading[Decision]:
        sentences = list(sentences)
        states = yield from doc.append(sentences, self.layer + 1, layers=[self.layer])
        p = self.heads.proba(self.layer, states[-1].at(self.layer))
        return Decision(p, len(sentences) - 1, self.layer, len(sentences), fired=False, boundary_gap=_tie_gap(p))


@register
class Layer(Policy):
    name = "layer"

    def __init__(self, heads: Mapping[str, ExitHeads], n_layer: int, layer: int, pooling: str = Pooling.SENTENCE):
        self.heads, self.layer, self.pooling = heads[pooling], layer, pooling
        self.heads.head(layer)

    @classmethod
    def reads(cls, params: Mapping[str, Any]) -> tuple[str, ...]:
        return (params.get("pooling", Pooling.SENTENCE),)

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        return [{"layer": layer, "pooling": pooling} for pooling in Pooling.ALL for layer in layers.get(pooling, ())]

    def read(self, doc: Document, sentences: Iterable[Tokens]) -> Reading[Decision]:
        sentences = list(sentences)
        states = yield from doc.append(sentences, self.layer + 1, layers=[self.layer])
        text = whole_text_input(self.pooling, np.stack([s.at(self.layer) for s in states]))
        p = self.heads.proba(self.layer, text)
        return Decision(p, len(sentences) - 1, self.layer, len(sentences), fired=True, boundary_gap=_tie_gap(p))


# The paper's accumulation rule, as sentence-vote and paper2d calibrate it.
VOTE_GRID: Grid = [{"tau_ignore": ti, "tau_acc": ta}
                   for ti in (0.0, 0.2, 0.4, 0.6, 0.8) for ta in (0.5, 1.0, 2.0, 3.0, 5.0)]


@register
class SentenceVote(_IncrementalPolicy):
    name = "sentence-vote"

    def __init__(self, heads: Mapping[str, ExitHeads], n_layer: int, tau_ignore: float, tau_acc: float):
        self.heads, self.layer, self.tau_ignore, self.tau_acc = heads[self.pooling], n_layer - 1, tau_ignore, tau_acc
        self.heads.head(self.layer)

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        return VOTE_GRID

    def stream(self, doc: Document) -> _SentenceStream:
        return _SentenceVoteStream(self, doc)


class _SentenceVoteStream(_SentenceStream):
    def __init__(self, policy: SentenceVote, doc: Document):
        super().__init__(policy, doc)
        self.votes = Accumulator(policy.heads.n_classes, policy.tau_ignore, policy.tau_acc)
        self.last: np.ndarray | None = None

    def weigh(self, sentence: SentenceMeans) -> Decision | None:
        layer = self.policy.layer
        self.last = self.policy.heads.proba(layer, sentence.at(layer))
        if self.votes.add(self.last):
            return self.votes.decision(sentence.index, layer, self.doc.n_sentences)
        return None

    def fallback(self) -> Decision:
        n = self.doc.n_sentences
        return self.votes.fallback(self.last, n - 1, self.policy.layer, n)


@register
class Paper2D(Policy):
    name = "paper2d"

    def __init__(self, heads: Mapping[str, ExitHeads], n_layer: int, tau_ignore: float, tau_acc: float):
        self.heads, self.n_layer = heads[self.pooling], n_layer
        self.tau_ignore, self.tau_acc = tau_ignore, tau_acc
        self.heads.head(n_layer - 1)

    @classmethod
    def grid(cls, n_layer: int, layers: Mapping[str, Sequence[int]]) -> Grid:
        return VOTE_GRID

    def read(self, doc: Document, sentences: Iterable[Tokens]) -> Reading[Decision]:
        sentences = list(sentences)
        votes = Accumulator(self.heads.n_classes, self.tau_ignore, self.tau_acc)
        fired: list[int] = []  # the layer of the cell that won; its decode stops right there

        def classify(layer: int, means: np.ndarray) -> bool:
            if layer in self.heads.layers and votes.add(self.heads.proba(layer, means[0])):
                fired.append(layer)
            return bool(fired)

        last: SentenceMeans | None = None
        for step in paper2d_steps(len(sentences), self.n_layer):
            earlier = range(step.earlier_from, step.depth)
            if step.sentence and len(earlier):
                while (states := (yield from doc.deepen_next(step.depth, earlier, classify))) is not None:
                    if fired:
                        return votes.decision(states.index, fired[0], doc.n_sentences)
            (last,) = yield from doc.append([sentences[step.sentence]], step.depth, stop=classify)
            if fired:
                return votes.decision(step.sentence, fired[0], doc.n_sentences)
        top = self.n_layer - 1
        if last.depth < self.n_layer:  # the fallback needs the last sentence at the last layer
            last = (yield from doc.deepen(self.n_layer, layers=[top]))[-1]
        return votes.fallback(self.heads.proba(top, last.at(top)), len(sentences) - 1, top, len(sentences))


PREFIX_MEAN_THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
PREFIX_MEAN_MIN_SENTENCES = (1, 2, 3, 5)


@register
class PrefixMean(_IncrementalPolicy):
    name = "prefix-mean"
    pooling = Pooling.PREFIX
    margin_floor = "min_margin"

    def __init__(self, heads: Mapping[str, ExitHeads], n_layer: int, layer: int, threshold: float,
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

    def stream(self, doc: Document) -> _SentenceStream:
        return _PrefixMeanStream(self, doc)


class _PrefixMeanStream(_SentenceStream):
    def __init__(self, policy: PrefixMean, doc: Document):
        super().__init__(policy, doc)
        self.total = np.zeros(policy.heads.n_embd, dtype=np.float64)
        self.p: np.ndarray | None = None
        self.gap = float("inf")

    def weigh(self, sentence: SentenceMeans) -> Decision | None:
        policy = self.policy
        self.total += sentence.at(policy.layer)  # one sentence at a time, as `heads.running_means` sums them
        n = sentence.index + 1
        self.p = policy.heads.proba(policy.layer, (self.total / n).astype(np.float32))
        if n < policy.min_sentences:
            return None
        confidence = float(margin(self.p))
        self.gap = min(self.gap, abs(confidence - policy.threshold))
        if confidence >= policy.threshold:
            return Decision(self.p, sentence.index, policy.layer, self.doc.n_sentences, fired=True,
                            boundary_gap=min(self.gap, confidence))
        return None

    def fallback(self) -> Decision:
        n = self.doc.n_sentences
        return Decision(self.p, n - 1, self.policy.layer, n, fired=False,
                        boundary_gap=min(self.gap, _tie_gap(self.p)))
