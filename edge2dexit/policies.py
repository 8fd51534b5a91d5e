"""Exit policies: what to read, how deep, and when to stop. Pure decisions over states: a policy composes the
readings of a `document.Document` and never sees what computes them (llama.cpp, stored states, a fake).

Every policy returns a `Decision`; the document counts what was really computed (token-layers, and the paper's
operations), so costs are never estimated here. Layers are 0-based everywhere: a policy that exits at `layer`
computes layers 0..layer, i.e. a depth of layer + 1.

- `full`: the whole text in one decode at full depth; the last layer's sentence head on the last sentence.
- `layer`: the whole text in one decode; the sentence head on the last sentence (the paper's layer-wise baseline)
  or the prefix head on the mean of all sentences (`pooling="prefix"`), either at a fixed calibrated layer, or at
  the first layer whose margin clears a threshold (the decode stops inside the graph there).
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
  If the text ends first, the prefix head answers on the whole text; optionally (`deepen_layer`, `deepen_below`) a
  low-margin answer pays for one re-read at a deeper layer. It needs no sentence count up front, so it streams:
  what arrives is read at once, and a decision comes out as soon as it is confident. On a one-sentence
  text it costs one decode at its layer; calibration picks a layer no deeper than the best static exit layer + 1,
  so it is never more expensive than `layer` there.

`sentence-vote` and `prefix-mean` weigh sentences one by one but read ahead, through the sentences already at hand,
until one decode holds `Document.min_decode_tokens` tokens: on llama.cpp's CPU backend a decode of fewer than 64
tokens costs 1.7–2.8× more per token (docs/llama-cpp.md §9). Their decisions are those of a sentence-by-sentence
read; the sentences a decode carried past the one that decided are paid for and counted. Reading a whole text, every
sentence is at hand; a live stream never waits for text that has not arrived, but reads ahead within what arrived.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np

from .document import Document, Reading, SentenceMeans, Tokens
from .errors import BundleError
from .heads import ExitHeads, Pooling, margin, whole_text_input

POLICIES = ("full", "layer", "sentence-vote", "paper2d", "prefix-mean")


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

    def decision(self, sentence: int, layer: int, read: int) -> Decision:
        """The winning class gets its share of the accumulated confidence."""
        total = self.totals.sum()
        scores = self.totals / total if total > 0 else np.eye(len(self.totals))[self.winner]
        return Decision(scores, sentence, layer, read, fired=True)


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

    name: ClassVar[str]

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
        return (yield from self.fallback())

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

    def fallback(self) -> Reading[Decision]:
        """The decision when the text ended before the exit rule fired."""
        raise NotImplementedError


class Full(Policy):
    name = "full"

    def __init__(self, heads: ExitHeads, n_layer: int):
        self.heads, self.layer = heads, n_layer - 1
        heads.head(self.layer)  # fail at construction if the bundle has no head there

    def read(self, doc: Document, sentences: Iterable[Tokens]) -> Reading[Decision]:
        sentences = list(sentences)
        states = yield from doc.append(sentences, self.layer + 1, layers=[self.layer])
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
        pooling: str = Pooling.SENTENCE,
    ):
        if (layer is None) == (threshold is None):
            raise BundleError("the layer policy takes either a fixed `layer` or a margin `threshold`, not both")
        if pooling not in heads:
            raise BundleError(f"the layer policy needs {pooling} exit heads, which this bundle does not have")
        self.heads, self.n_layer, self.layer, self.threshold = heads[pooling], n_layer, layer, threshold
        self.pooling = pooling
        if layer is not None:
            self.heads.head(layer)

    def read(self, doc: Document, sentences: Iterable[Tokens]) -> Reading[Decision]:
        sentences = list(sentences)
        last = len(sentences) - 1
        if self.layer is not None:
            states = yield from doc.append(sentences, self.layer + 1, layers=[self.layer])
            text = whole_text_input(self.pooling, np.stack([s.at(self.layer) for s in states]))
            return Decision(self.heads.proba(self.layer, text), last, self.layer, len(sentences), fired=True)
        seen: list[tuple[int, np.ndarray]] = []

        def confident(layer: int, means: np.ndarray) -> bool:
            seen.append((layer, self.heads.proba(layer, whole_text_input(self.pooling, means))))
            return float(margin(seen[-1][1])) >= self.threshold

        yield from doc.append(sentences, self.n_layer, layers=self.heads.layers, stop=confident)
        layer, p = seen[-1]
        return Decision(p, last, layer, len(sentences), fired=float(margin(p)) >= self.threshold)


class SentenceVote(_IncrementalPolicy):
    name = "sentence-vote"

    def __init__(self, heads: ExitHeads, n_layer: int, tau_ignore: float, tau_acc: float):
        self.heads, self.layer, self.tau_ignore, self.tau_acc = heads, n_layer - 1, tau_ignore, tau_acc
        heads.head(self.layer)

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

    def fallback(self) -> Reading[Decision]:
        yield from ()
        n = self.doc.n_sentences
        return Decision(self.last, n - 1, self.policy.layer, n, fired=False)


class Paper2D(Policy):
    name = "paper2d"

    def __init__(self, heads: ExitHeads, n_layer: int, tau_ignore: float, tau_acc: float):
        self.heads, self.n_layer, self.tau_ignore, self.tau_acc = heads, n_layer, tau_ignore, tau_acc
        heads.head(n_layer - 1)

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
        p = self.heads.proba(top, last.at(top))
        return Decision(p, len(sentences) - 1, top, len(sentences), fired=False)


class PrefixMean(_IncrementalPolicy):
    name = "prefix-mean"

    def __init__(
        self,
        heads: ExitHeads,
        n_layer: int,
        layer: int,
        threshold: float,
        min_sentences: int = 1,
        deepen_layer: int | None = None,
        deepen_below: float = 0.0,
    ):
        if not 0 <= layer < n_layer:
            raise BundleError(f"the prefix-mean policy's layer {layer} is outside 0..{n_layer - 1}")
        self.heads, self.layer, self.threshold, self.min_sentences = heads, layer, threshold, min_sentences
        self.deepen_layer, self.deepen_below = deepen_layer, deepen_below
        heads.head(layer)
        if deepen_layer is not None:
            heads.head(deepen_layer)

    def stream(self, doc: Document) -> _SentenceStream:
        return _PrefixMeanStream(self, doc)


class _PrefixMeanStream(_SentenceStream):
    def __init__(self, policy: PrefixMean, doc: Document):
        super().__init__(policy, doc)
        self.total = np.zeros(policy.heads.n_embd, dtype=np.float64)
        self.p: np.ndarray | None = None

    def weigh(self, sentence: SentenceMeans) -> Decision | None:
        policy = self.policy
        self.total += sentence.at(policy.layer)  # one sentence at a time, as `heads.running_means` sums them
        n = sentence.index + 1
        self.p = policy.heads.proba(policy.layer, (self.total / n).astype(np.float32))
        if n >= policy.min_sentences and float(margin(self.p)) >= policy.threshold:
            return Decision(self.p, sentence.index, policy.layer, self.doc.n_sentences, fired=True)
        return None

    def fallback(self) -> Reading[Decision]:
        n, policy = self.doc.n_sentences, self.policy
        if policy.deepen_layer is not None and float(margin(self.p)) < policy.deepen_below:
            layer = policy.deepen_layer
            states = yield from self.doc.deepen(layer + 1, layers=[layer])
            if len(states) == n:  # every sentence was re-read at the deeper layer
                text = whole_text_input(Pooling.PREFIX, np.stack([s.at(layer) for s in states]))
                return Decision(policy.heads.proba(layer, text), n - 1, layer, n, fired=False)
        return Decision(self.p, n - 1, policy.layer, n, fired=False)


def make_policy(name: str, heads: Mapping[str, ExitHeads], n_layer: int, params: Mapping[str, Any]) -> Policy:
    """The policy `name` with its calibrated parameters (from the bundle, or given by the user)."""
    try:
        if name == "full":
            return Full(heads[Pooling.SENTENCE], n_layer)
        if name == "layer":
            return Layer(heads, n_layer, **params)
        if name == "sentence-vote":
            return SentenceVote(heads[Pooling.SENTENCE], n_layer, **params)
        if name == "paper2d":
            return Paper2D(heads[Pooling.SENTENCE], n_layer, **params)
        if name == "prefix-mean":
            return PrefixMean(heads[Pooling.PREFIX], n_layer, **params)
    except KeyError as exc:
        raise BundleError(f"the {name} policy needs {exc.args[0]} exit heads, which this bundle does not have") from None
    except TypeError as exc:
        raise BundleError(f"bad parameters for the {name} policy {dict(params)}: {exc}") from None
    raise BundleError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
