"""A fake executor for pure document/policy logic: it answers a `document.Document`'s requests with deterministic
states, records every request, and simulates the KV cache of each document to check the document's promise that
no decode ever reads junk KV."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np

from edge2dexit.document import Computed, Decode, Document, Forget, Reading, Request, drive

T = TypeVar("T")
N_EMBD = 4


def state(sentence: int, layer: int) -> np.ndarray:
    """The mean state of sentence `sentence` at `layer`: its own index and layer, readable in assertions."""
    return np.array([sentence, layer, sentence * 100 + layer, 1.0], dtype=np.float32)


@dataclass(frozen=True)
class Call:
    """One request as the fake saw it."""

    kind: str  # "decode" or "forget"
    position: int  # first position decoded, or first position forgotten
    sentences: tuple[int, ...] = ()  # indices of the sentences decoded
    n_tokens: int = 0
    depth: int = 0  # depth asked for
    layers: tuple[int, ...] = ()


@dataclass
class FakeExecutor:
    """Answers `Decode` with `state(k, layer)` (or `states[k, layer]`) for every sentence k and layer read (honouring the stop rule as
    llama.cpp does: the decode ends after the layer whose rule fired) and `Forget` with None.

    `shared=True` acts like a decode shared with other documents that went on to the full depth asked for: the
    reader sees the layers up to its stop, but the KV is valid (and paid for) to the depth asked.

    The cache is simulated per document: position -> depth its KV is valid to (the prompt: every depth). A decode
    must start right where the cache ends, over KV valid at least to its depth; anything else is an AssertionError.
    """

    shared: bool = False
    states: np.ndarray | None = None  # [n_sentences, n_layer, n_embd] to answer with instead of `state(k, layer)`
    calls: list[Call] = field(default_factory=list)
    cache: dict[int, dict[int, float]] = field(default_factory=dict)  # id(doc) -> position -> valid depth

    def __call__(self, request: Request) -> Computed | None:
        doc = request.doc
        kv = self.cache.setdefault(id(doc), {p: float("inf") for p in range(doc.first_position)})
        if isinstance(request, Forget):
            self.calls.append(Call("forget", request.position))
            for p in [p for p in kv if p >= request.position]:
                del kv[p]
            return None
        assert isinstance(request, Decode)
        n = sum(len(t) for t in request.sentences)
        indices = tuple(range(request.first_index, request.first_index + len(request.sentences)))
        self.calls.append(Call("decode", request.start, indices, n, request.depth, request.layers))
        assert request.start == len(kv) and all(p in kv for p in range(request.start)), \
            f"decode at position {request.start} but the cache holds {len(kv)} positions"
        junk = [p for p in range(request.start) if kv[p] < request.depth]
        assert not junk, f"a decode at depth {request.depth} would read KV valid below it at positions {junk}"
        reached = request.depth
        if request.stop is not None:
            for layer in request.layers:
                if request.stop(layer, np.stack([self.mean(k, layer) for k in indices])):
                    reached = layer + 1
                    break
        valid = request.depth if self.shared else reached
        for p in range(request.start, request.start + n):
            kv[p] = valid
        read = [layer for layer in request.layers if layer < reached]
        means = np.array([[self.mean(k, layer) for layer in read] for k in indices], dtype=np.float32)
        n_embd = N_EMBD if self.states is None else self.states.shape[-1]
        return Computed(reached, valid, means.reshape(len(indices), len(read), n_embd))

    def mean(self, sentence: int, layer: int) -> np.ndarray:
        return state(sentence, layer) if self.states is None else self.states[sentence, layer]

    def run(self, reading: Reading[T]) -> T:
        return drive(reading, self)

    def decodes(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "decode"]

    def forgets(self) -> list[int]:
        return [c.position for c in self.calls if c.kind == "forget"]

    def token_layers(self) -> int:
        """What a real engine would have computed for these decodes if none stopped early."""
        return sum(c.n_tokens * c.depth for c in self.decodes())


def sentences(*lengths: int) -> list[list[int]]:
    """Stand-in token lists of the given lengths (token ids are never read by the fake)."""
    return [list(range(n)) for n in lengths]


def new_document(capacity: int = 1000, first_position: int = 5) -> Document:
    return Document(first_position, capacity, seq=1)


def read_with(executor: Callable[[Request], Computed | None], reading: Reading[T]) -> T:
    return drive(reading, executor)
