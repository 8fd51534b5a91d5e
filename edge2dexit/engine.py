"""Sentence-incremental, depth-limited reading of a document through llama.cpp.

One `Engine` owns one model and one context with a single sequence. The constant task prompt is decoded
once, at full depth, when the engine starts; every document is read after it (`Engine.document()` drops
the previous document's positions and keeps the prompt's).

A `Document` feeds sentences to llama.cpp, each decode computing layers 0..depth-1 only, and returns per
sentence the mean of its token states (and its last token's state) for the layers asked for. It knows
nothing of labels or exit rules; policies decide what to read.

Exactness: after a decode stopped at depth D, the KV cache of those positions is valid for layers < D
only (deeper layers hold zeros or stale data, NOTES.md §2). The document keeps, per sentence, the depth up
to which its KV is valid. Valid depths never increase along the document (a sentence is decoded only after
everything before it is valid to its depth), so making the text valid to a depth D means removing
everything from the first sentence valid below D and decoding it again, one sentence per decode, at D.
No decode ever reads junk KV, and every state returned equals the state a plain decode of the same token
stream in the same decode calls gives, bit for bit.

Cost accounting, per document: `token_layers` counts what llama.cpp really computed (tokens × layers of
every decode, re-decodes included); `operations` counts (sentence, layer) cells computed at least once,
as the paper does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import ContextOverflowError
from .llama import Context, ContextSettings, Model


@dataclass(frozen=True)
class EngineSettings:
    n_ctx: int = 2048
    n_threads: int | None = None  # None: every core this process may use
    n_gpu_layers: int = 0  # layers offloaded to a GPU build of llama.cpp (0 on CPU)
    n_batch: int = 512  # longest single decode; longer inputs are decoded in chunks of this size


# stop(layer, means): called as each read layer of a decode is computed, with the mean state of each sentence
# of that decode at that layer ([n_sentences, n_embd]); returning True ends the decode after that layer.
StopRule = Callable[[int, np.ndarray], bool]


@dataclass(frozen=True)
class SentenceStates:
    """What one decode yields for one sentence: per layer read, the mean and the last token's state."""

    index: int
    n_tokens: int
    depth: int
    layers: tuple[int, ...]
    mean: np.ndarray  # [len(layers), n_embd] float32
    last: np.ndarray  # [len(layers), n_embd] float32

    def at(self, layer: int) -> np.ndarray:
        """Mean state of the sentence's tokens at `layer` (the output of that layer)."""
        return self.mean[self.layers.index(layer)]


@dataclass
class _Sentence:
    tokens: list[int]
    start: int  # position of its first token
    valid_depth: int  # KV of layers below this is exact
    max_depth: int  # deepest pass ever computed (for the paper's operation count)


class Engine:
    """A model and a context, with the task prompt decoded once. Close it (or use `with`)."""

    def __init__(self, model_path: str | Path, settings: EngineSettings = EngineSettings(), prompt: str = ""):
        self.settings = settings
        self.model = Model(model_path, n_gpu_layers=settings.n_gpu_layers)
        try:
            threads = settings.n_threads or len(os.sched_getaffinity(0))
            self.context = Context(self.model, ContextSettings(settings.n_ctx, threads, settings.n_batch))
        except BaseException:
            self.model.close()
            raise
        self.n_layer = self.model.n_layer
        self.n_embd = self.model.n_embd
        self.architecture = self.model.architecture
        self.prompt = prompt
        self.prompt_tokens = self.model.tokenize(prompt, add_bos=True)
        if len(self.prompt_tokens) >= self.context.n_ctx:
            raise ContextOverflowError(
                f"the task prompt takes {len(self.prompt_tokens)} tokens, more than the context of {self.context.n_ctx}"
            )
        self.context.decode(self.prompt_tokens, 0, self.n_layer, ())  # valid at every depth, once
        self._current: _EngineDocument | None = None

    def tokenize_sentences(self, sentences: Sequence[str]) -> list[list[int]]:
        """The token rule of sentences.py: each sentence on its own, as " " + sentence, without BOS."""
        return [self.model.tokenize(" " + s, add_bos=False) for s in sentences]

    @property
    def capacity(self) -> int:
        """Tokens of document text that fit after the prompt."""
        return self.context.n_ctx - len(self.prompt_tokens)

    def document(self) -> "Document":
        """Start reading a new document (the previous one's positions are dropped; the prompt is kept)."""
        if self._current is not None:
            self._current.closed = True
        self.context.remove(len(self.prompt_tokens))
        self._current = _EngineDocument(self)
        return self._current

    def close(self) -> None:
        self.context.close()
        self.model.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Document:
    """The reading state of one document: which sentences were read, where, how deep their KV is valid,
    and what it all cost. Subclasses supply the computation (`_compute`) and cache removal (`_forget`):
    the engine's documents run llama.cpp, `replay.ReplayDocument` serves stored states."""

    def __init__(self, n_embd: int, first_position: int, capacity: int):
        self.n_embd, self._first_position, self.capacity = n_embd, first_position, capacity
        self._sentences: list[_Sentence] = []
        self.token_layers = 0
        self.decode_calls = 0

    @property
    def n_sentences(self) -> int:
        return len(self._sentences)

    @property
    def n_tokens(self) -> int:
        return sum(len(s.tokens) for s in self._sentences)

    @property
    def operations(self) -> int:
        return sum(s.max_depth for s in self._sentences)

    @property
    def valid_depths(self) -> tuple[int, ...]:
        return tuple(s.valid_depth for s in self._sentences)

    def fits(self, sentences: Sequence[Sequence[int]]) -> bool:
        """Whether these tokenized sentences still fit in the context after what was read."""
        return self.n_tokens + sum(len(t) for t in sentences) <= self.capacity

    def append(
        self,
        sentences: Sequence[Sequence[int]],
        depth: int,
        layers: Sequence[int] | None = None,
        stop: StopRule | None = None,
    ) -> list[SentenceStates]:
        """Read tokenized sentences after the text so far, in one decode, computing layers 0..depth-1.

        Text already read that is valid below `depth` only is first re-decoded (and its cost counted).
        `layers` are the layers whose states are returned (default: all below `depth`). `stop(layer, means)`,
        given the new sentences' mean states at each layer read, may end the decode after that layer.
        """
        if not self.fits(sentences):
            needed = self.n_tokens + sum(len(t) for t in sentences)
            raise ContextOverflowError(
                f"the text needs {needed} tokens after the task prompt but the context leaves room for "
                f"{self.capacity}: raise the context size (n_ctx) or allow truncation"
            )
        self.deepen(depth, layers=())
        start = self._first_position + self.n_tokens
        new = []
        for tokens in sentences:
            new.append(_Sentence(list(tokens), start, 0, 0))
            start += len(tokens)
        first_index = len(self._sentences)
        self._sentences.extend(new)
        return self._decode(new, first_index, depth, layers, stop)

    def deepening(
        self, depth: int, layers: Sequence[int] | None = None, stop: StopRule | None = None
    ) -> Iterator[SentenceStates]:
        """Make the text read so far valid to `depth`: everything from the first sentence valid below it is
        removed from the cache and decoded again, one sentence per decode, yielding each one's states.

        A consumer may stop iterating at any time (the sentences not yet re-decoded are then out of the
        cache and will be re-decoded when needed); a `stop` that fires also ends the iteration.
        """
        stale = next((i for i, s in enumerate(self._sentences) if s.valid_depth < depth), None)
        if stale is None:
            return
        self._forget(self._sentences[stale].start)
        for sentence in self._sentences[stale:]:
            sentence.valid_depth = 0
        for index in range(stale, len(self._sentences)):
            (states,) = self._decode([self._sentences[index]], index, depth, layers, stop)
            yield states
            if states.depth < depth:
                return

    def deepen(self, depth: int, layers: Sequence[int] | None = None) -> list[SentenceStates]:
        """`deepening` run to the end: the states of every re-decoded sentence (none if all were valid)."""
        return list(self.deepening(depth, layers))

    def _decode(
        self,
        sentences: list[_Sentence],
        first_index: int,
        depth: int,
        layers: Sequence[int] | None,
        stop: StopRule | None,
    ) -> list[SentenceStates]:
        layers = tuple(range(depth)) if layers is None else tuple(layers)
        reached, means, lasts = self._compute(sentences, first_index, depth, layers, stop)
        self.token_layers += sum(len(s.tokens) for s in sentences) * reached
        self.decode_calls += 1
        for s in sentences:
            s.valid_depth = reached
            s.max_depth = max(s.max_depth, reached)
        read = tuple(layer for layer in layers if layer < reached)
        return [
            SentenceStates(first_index + i, len(s.tokens), reached, read, means[i], lasts[i])
            for i, s in enumerate(sentences)
        ]

    def _compute(
        self,
        sentences: list[_Sentence],
        first_index: int,
        depth: int,
        layers: tuple[int, ...],
        stop: StopRule | None,
    ) -> tuple[int, np.ndarray, np.ndarray]:
        """Compute `sentences` (in one decode) to `depth`, or less where `stop` fires. Returns the depth
        reached and, for the layers read below it, the means and last-token states [n, n_read, n_embd]."""
        raise NotImplementedError

    def _forget(self, position: int) -> None:
        """Drop every cached position from `position` on."""
        raise NotImplementedError


class _EngineDocument(Document):
    def __init__(self, engine: Engine):
        super().__init__(engine.n_embd, len(engine.prompt_tokens), engine.capacity)
        self.engine = engine
        self.closed = False

    def _forget(self, position: int) -> None:
        self._check_open()
        self.engine.context.remove(position)

    def _compute(self, sentences, first_index, depth, layers, stop):
        self._check_open()
        tokens = [tok for s in sentences for tok in s.tokens]
        lengths = np.array([len(s.tokens) for s in sentences])
        ends = np.cumsum(lengths)
        starts = ends - lengths
        counts = lengths[:, None].astype(np.float32)

        def segment_means(rows: np.ndarray) -> np.ndarray:
            return np.add.reduceat(rows, starts, axis=0) / counts

        on_layer = None if stop is None else (lambda layer, rows: stop(layer, segment_means(rows)))
        decoded = self.engine.context.decode(tokens, sentences[0].start, depth, layers, on_layer)
        read = [layer for layer in layers if layer < decoded.depth]
        means = np.empty((len(sentences), len(read), self.n_embd), dtype=np.float32)
        lasts = np.empty_like(means)
        for k, layer in enumerate(read):
            means[:, k] = segment_means(decoded.rows[layer])
            lasts[:, k] = decoded.rows[layer][ends - 1]
        return decoded.depth, means, lasts

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this document was replaced by a newer Engine.document(); read from that one")
