"""The reading state of one document, kept apart from whatever computes it.

A `Document` records which sentences were read, at which positions, how deep their KV is valid, and what it all
cost. It computes nothing itself: its reads are generators (`Reading`) that yield requests — `Decode` (compute these
consecutive sentences to a depth, reading some layers, maybe stopping early) and `Forget` (drop cached positions) —
and receive the answers. Whoever runs a reading answers them: `engine.Engine` with llama.cpp (one document at a
time, or many in one batch), `Replay` with stored states (calibration, tests), or a test fake. Policies compose
readings with `yield from` and never see what answers them.

Exactness: after a decode stopped at depth D, the KV cache of those positions is valid for layers < D only (deeper
layers hold zeros or stale data, docs/llama-cpp.md §2). The document keeps, per sentence, the depth up to which its
KV is valid. Valid depths never increase along the document (a sentence is decoded only after everything before it
is valid to its depth), so making the text valid to a depth D means forgetting everything from the first sentence
valid below D and decoding it again, one sentence per decode, at D. No decode ever reads junk KV.

Cost accounting: `token_layers` counts what was really computed (tokens × layers of every decode, re-decodes
included); `operations` counts (sentence, layer) cells computed at least once, as the paper does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, NamedTuple, Sequence, TypeVar

import numpy as np

from .errors import ContextOverflowError

T = TypeVar("T")
Tokens = Sequence[int]


# stop(layer, means): called as each read layer of a decode is computed, with the mean state of each sentence of that
# decode at that layer ([n_sentences, n_embd]); returning True ends the decode after that layer.
StopRule = Callable[[int, np.ndarray], bool]


@dataclass(frozen=True, eq=False)
class Decode:
    """Compute `sentences` (consecutive, the first at index `first_index` and position `start`) in one decode,
    layers 0..depth-1, returning the mean states of `layers`; `stop` may end it earlier."""

    doc: "Document"
    first_index: int
    start: int
    sentences: tuple[Tokens, ...]
    depth: int
    layers: tuple[int, ...]
    stop: StopRule | None


@dataclass(frozen=True, eq=False)
class Forget:
    """Drop every cached position of the document from `position` on."""

    doc: "Document"
    position: int


Request = Decode | Forget


class Computed(NamedTuple):
    """The answer to a `Decode`."""

    depth: int  # layers the reader saw: where its stop rule fired + 1, else the depth asked for
    valid: int  # layers computed, ≥ depth (a decode shared with other documents may have gone deeper)
    means: np.ndarray  # [n_sentences, n_read, n_embd] float32: the layers asked for, below `depth`


Reading = Generator[Request, "Computed | None", T]


def drive(reading: Reading[T], execute: Callable[[Request], Computed | None]) -> T:
    """Run a reading to its end, answering each request with `execute`; its result."""
    try:
        request = next(reading)
        while True:
            request = reading.send(execute(request))
    except StopIteration as done:
        return done.value


@dataclass(frozen=True)
class SentenceMeans:
    """What one decode gives for one sentence: per layer read, the mean of its tokens' states."""

    index: int
    n_tokens: int
    depth: int
    layers: tuple[int, ...]
    means: np.ndarray  # [len(layers), n_embd] float32

    def at(self, layer: int) -> np.ndarray:
        """Mean state of the sentence's tokens at `layer` (the output of that layer)."""
        return self.means[self.layers.index(layer)]


@dataclass
class _Span:
    """A sentence read into the document: its tokens, where they sit, and how deep their KV is."""

    tokens: Tokens
    start: int
    valid_depth: int = 0  # KV of layers below this is exact
    max_depth: int = 0  # deepest pass ever computed (the paper's operation count)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class Document:
    """The reading state of one document placed after a prompt of `first_position` tokens, with room for
    `capacity` tokens of text. `seq` is the sequence that holds it, for whoever executes its requests.
    `min_decode_tokens`: below this many tokens a decode costs more per token (whoever executes says how many), so
    sentence-by-sentence readers read ahead that far; 1 reads every sentence as soon as it is asked for."""

    def __init__(self, first_position: int, capacity: int, seq: int = 0, min_decode_tokens: int = 1):
        self.first_position, self.capacity, self.seq = first_position, capacity, seq
        self.min_decode_tokens = min_decode_tokens
        self._spans: list[_Span] = []
        self._cached_end = first_position  # positions below this are in the cache
        self.token_layers = 0
        self.decode_calls = 0

    @property
    def n_sentences(self) -> int:
        return len(self._spans)

    @property
    def n_tokens(self) -> int:
        return sum(len(s.tokens) for s in self._spans)

    @property
    def room(self) -> int:
        """Tokens of text that still fit."""
        return self.capacity - self.n_tokens

    @property
    def operations(self) -> int:
        return sum(s.max_depth for s in self._spans)

    @property
    def valid_depths(self) -> tuple[int, ...]:
        return tuple(s.valid_depth for s in self._spans)

    def append(
        self,
        sentences: Sequence[Tokens],
        depth: int,
        layers: Sequence[int] | None = None,
        stop: StopRule | None = None,
    ) -> Reading[list[SentenceMeans]]:
        """Read tokenized sentences after the text so far, in one decode, computing layers 0..depth-1.

        Text already read that is valid below `depth` only is first re-decoded (and its cost counted). `layers`
        are the layers whose states are returned (default: all below `depth`). `stop(layer, means)`, given the
        new sentences' mean states at each layer read, may end the decode after that layer.
        """
        needed = sum(len(t) for t in sentences)
        if needed > self.room:
            raise ContextOverflowError.for_text(self.n_tokens + needed, self.capacity)
        yield from self.deepen(depth, layers=())
        first = len(self._spans)
        start = self.first_position + self.n_tokens
        for tokens in sentences:
            self._spans.append(_Span(tokens, start))
            start += len(tokens)
        return (yield from self._decode(first, len(sentences), depth, layers, stop))

    def first_below(self, depth: int) -> int | None:
        """The first sentence whose KV is valid below `depth`: the one `deepen_next` re-decodes (None: none is)."""
        return next((i for i, s in enumerate(self._spans) if s.valid_depth < depth), None)

    def deepen_next(
        self, depth: int, layers: Sequence[int] | None = None, stop: StopRule | None = None
    ) -> Reading[SentenceMeans | None]:
        """Re-decode the first sentence valid below `depth` (forgetting it and everything after it from the cache
        first), alone, at `depth`; its states, or None when the whole text is valid to `depth`.

        Called repeatedly it deepens the text sentence by sentence; a reader may stop at any time (sentences not
        yet re-decoded are then out of the cache and are re-decoded when needed).
        """
        stale = self.first_below(depth)
        if stale is None:
            return None
        span = self._spans[stale]
        if span.start < self._cached_end:
            yield Forget(self, span.start)
            self._cached_end = span.start
            for later in self._spans[stale:]:
                later.valid_depth = 0
        (states,) = yield from self._decode(stale, 1, depth, layers, stop)
        return states

    def deepen(self, depth: int, layers: Sequence[int] | None = None) -> Reading[list[SentenceMeans]]:
        """Make the whole text valid to `depth`: the states of every re-decoded sentence (none if all were)."""
        deepened = []
        while (states := (yield from self.deepen_next(depth, layers))) is not None:
            deepened.append(states)
        return deepened

    def _decode(
        self, first: int, count: int, depth: int, layers: Sequence[int] | None, stop: StopRule | None
    ) -> Reading[list[SentenceMeans]]:
        spans = self._spans[first : first + count]
        layers = tuple(range(depth)) if layers is None else tuple(layers)
        request = Decode(self, first, spans[0].start, tuple(s.tokens for s in spans), depth, layers, stop)
        computed = yield request
        self.token_layers += sum(len(s.tokens) for s in spans) * computed.valid
        self.decode_calls += 1
        for s in spans:
            s.valid_depth = computed.valid
            s.max_depth = max(s.max_depth, computed.valid)
        self._cached_end = spans[-1].end
        read = tuple(layer for layer in layers if layer < computed.depth)
        return [
            SentenceMeans(first + i, len(s.tokens), computed.depth, read, computed.means[i])
            for i, s in enumerate(spans)
        ]


def sentence_by_sentence(
    doc: Document, sentences: Sequence[Tokens], depth: int, layers: Sequence[int] | None = None
) -> Reading[np.ndarray]:
    """Read `sentences` one decode each at `depth`: their mean states at `layers` (default: every layer below
    `depth`), [n_sentences, n_layers, n_embd]. The reference read of the engine tests."""
    means = []
    for sentence in sentences:
        (read,) = yield from doc.append([sentence], depth, layers)
        means.append(read.means)
    return np.stack(means)


def whole_text(
    doc: Document, sentences: Sequence[Tokens], depth: int, layers: Sequence[int] | None = None
) -> Reading[np.ndarray]:
    """Read `sentences` in one decode at `depth`, stacked as `sentence_by_sentence` stacks them. This is the plain
    full decode of the token stream that exactness is defined against; it differs from a read one sentence per
    decode by llama.cpp's batching noise only (docs/llama-cpp.md §5), and one graph of the whole text costs less
    than a graph per sentence (docs/llama-cpp.md §4, §9). How `convert` reads features and `eval` its oracle."""
    read = yield from doc.append(sentences, depth, layers)
    return np.stack([sentence.means for sentence in read])


class Replay:
    """Answers a document's requests from stored sentence means instead of llama.cpp: `states[k]` is sentence k's
    mean state at every layer ([n_sentences, n_layer, n_embd]). Calibration replays thousands of parameter settings
    over stored features this way, with the very policy code the runtime runs. Stored states come from one decode
    of the whole text (`whole_text`), so a replayed read differs from a live one only by llama.cpp's batching noise
    (docs/llama-cpp.md §5)."""

    def __init__(self, states: np.ndarray):
        self.states = states

    def __call__(self, request: Request) -> Computed | None:
        if isinstance(request, Forget):
            return None
        block = self.states[request.first_index : request.first_index + len(request.sentences)]
        reached = request.depth
        if request.stop is not None:
            reached = next((layer + 1 for layer in request.layers
                            if request.stop(layer, np.asarray(block[:, layer], dtype=np.float32))), reached)
        read = [layer for layer in request.layers if layer < reached]
        return Computed(reached, reached, np.asarray(block[:, read], dtype=np.float32))


def replay(
    reading: Callable[[Document], Reading[T]], states: np.ndarray, tokens: Sequence[int], min_decode_tokens: int = 1
) -> tuple[T, Document]:
    """Run `reading(doc)` over stored states of sentences of `tokens[k]` tokens each; its result and the document."""
    doc = Document(0, int(np.sum(tokens)), min_decode_tokens=min_decode_tokens)
    return drive(reading(doc), Replay(states)), doc
