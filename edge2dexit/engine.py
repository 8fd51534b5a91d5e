"""Documents read through llama.cpp: one model, one context, the task prompt decoded once, and up to `width`
documents in flight.

Sequence 0 holds the task prompt, decoded once at full depth when the engine starts; each document gets a sequence
of its own (1..width) that starts as a copy of it (`llama_memory_seq_cp` shares the prompt's cells, nothing is
recomputed). An engine answers the requests of `document.Document` readings:

- one at a time: `engine.run(reading)`;
- many at once (`run_many`, continuous batching): every round, each document in flight has one pending decode; the
  decodes are grouped by depth, each group is one `llama_decode` carrying the next sentence(s) of every document in
  it at its own sequence and positions; a document that finishes frees its sequence and the next one takes it.
  A decode stops inside the graph only when every document in it has a stop rule that fired: the others still need
  their depth. A document whose rule fired earlier sees only the layers up to its stop (so it decides exactly as
  alone), while its KV is valid — and paid for — to the depth the shared graph reached.

Exactness holds per sequence as in `document`: KV validity is tracked per document, and every state equals a plain
decode of the same token stream in the same decode calls. Across different batching (one document alone vs sharing
a decode) llama.cpp's numbers differ in the last digits (docs/llama-cpp.md §5).
"""

from __future__ import annotations

from . import native  # noqa: F401  (first: llama.cpp loaded before numpy, docs/llama-cpp.md §10)

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from .document import Computed, Decode, Document, Forget, Reading, Request, drive
from .errors import ContextOverflowError
from .lifetime import Owner
from .llama import Context, ContextSettings, Model, Span, gpu_offload
from .sentences import token_text
from .settings import EngineSettings

T = TypeVar("T")
K = TypeVar("K")
PROMPT_SEQ = 0


@dataclass
class Finished(Generic[K, T]):
    """A reading of `run_many` that ended: its result, or the error that ended it."""

    key: K
    doc: Document
    result: T | None = None
    error: BaseException | None = None


@dataclass
class _InFlight:
    key: object
    doc: Document
    reading: Reading
    request: Decode | None = field(default=None)


class Engine(Owner):
    """A model and a context with the task prompt decoded once. Close it (or use `with`)."""

    def __init__(self, model: Model, context: Context, prompt_tokens: list[int], settings: EngineSettings):
        """Take ownership of `model` and `context` (see `Engine.load`); decode the prompt into sequence 0.
        `settings` are those the context was made with, every choice made (`EngineSettings.for_backend`)."""
        super().__init__()
        self._resources.enter_context(model)
        self._resources.enter_context(context)  # freed first: a context lives inside its model
        self.model, self.context, self.settings = model, context, settings
        self.n_layer, self.n_embd, self.architecture = model.n_layer, model.n_embd, model.architecture
        self.prompt_tokens = prompt_tokens
        self.capacity = settings.n_ctx - len(prompt_tokens)  # tokens of text per document
        self.context.decode([Span(PROMPT_SEQ, 0, prompt_tokens)], self.n_layer, ())  # valid at every depth, once
        self._owners: dict[int, Document] = {}

    @classmethod
    def load(cls, model_path: str | Path, settings: EngineSettings = EngineSettings(), prompt: str = "",
             lora: str | Path | None = None, lora_scale: float = 1.0) -> "Engine":
        """Load a GGUF model with llama.cpp and make a context for `settings.width` documents after `prompt`,
        computing through the LoRA adapter file `lora` (times `lora_scale`) if one is given. Settings left at None
        are chosen for the backend llama.cpp was built with."""
        settings = settings.for_backend(gpu_offload())
        with ExitStack() as stack:  # frees what was made so far if a later step fails
            model = stack.enter_context(Model(model_path, n_gpu_layers=settings.n_gpu_layers))
            adapter = model.load_lora(lora, lora_scale) if lora is not None else None
            prompt_tokens = model.tokenize(prompt, add_bos=True)
            if len(prompt_tokens) >= settings.n_ctx:
                raise ContextOverflowError(f"the task prompt takes {len(prompt_tokens)} tokens, which leaves no room "
                                           f"for text in a context of {settings.n_ctx}: raise --n-ctx")
            cells = len(prompt_tokens) + settings.width * (settings.n_ctx - len(prompt_tokens))
            threads = settings.n_threads or len(os.sched_getaffinity(0))
            context = stack.enter_context(
                Context(model, ContextSettings(cells, settings.width + 1, settings.n_batch, threads, settings.tap),
                        adapter))
            engine = cls(model, context, prompt_tokens, settings)
            stack.pop_all()
            return engine

    def tokenize(self, sentence: str) -> list[int]:
        """The token rule of `sentences`: each sentence on its own, as token_text(sentence), without BOS."""
        return self.model.tokenize(token_text(sentence), add_bos=False)

    def document(self, seq: int = 1) -> Document:
        """Start a new document on sequence `seq` (1..width): its previous document's positions are dropped and it
        starts from the prompt again."""
        if not 1 <= seq <= self.settings.width:
            raise ValueError(f"sequence {seq} is outside 1..{self.settings.width}")
        self.context.remove(seq)
        self.context.copy(PROMPT_SEQ, seq)
        doc = Document(len(self.prompt_tokens), self.capacity, seq, self.settings.min_decode_tokens)
        self._owners[seq] = doc
        return doc

    def release(self, doc: Document) -> None:
        """Forget a document's positions now rather than when its sequence is next used."""
        if self._owners.get(doc.seq) is doc:
            self.context.remove(doc.seq)
            del self._owners[doc.seq]

    def run(self, reading: Reading[T]) -> T:
        """Run one document's reading to its end, one decode at a time."""
        return drive(reading, self.execute)

    def execute(self, request: Request) -> Computed | None:
        """Answer one request of a document started by this engine."""
        self._check_owner(request.doc)
        if isinstance(request, Forget):
            self.context.remove(request.doc.seq, request.position)
            return None
        return self._decode([request])[0]

    def run_many(self, jobs: Iterable[tuple[K, Callable[[Document], Reading[T]]]],
                 sequences: Sequence[int] | None = None) -> Iterator[Finished[K, T]]:
        """Continuous batching: run `reading(doc)` for every (key, reading) job with a document in flight on each of
        `sequences` (default: all of 1..width), yielding each as it finishes (not in job order). A reading that
        raises ends as an error; a failed llama.cpp decode ends every reading it carried; the others go on."""
        jobs = iter(jobs)
        free = sorted(sequences or range(1, self.settings.width + 1), reverse=True)
        in_flight: dict[int, _InFlight] = {}
        while True:
            while free and (job := next(jobs, None)) is not None:
                key, reading_of = job
                doc = self.document(free.pop())
                try:
                    entry = _InFlight(key, doc, reading_of(doc))
                except Exception as exc:  # noqa: BLE001 - the job ends as an error record
                    free.append(doc.seq)
                    yield Finished(key, doc, error=exc)
                    continue
                in_flight[doc.seq] = entry
                if (done := self._advance(entry, None)) is not None:
                    del in_flight[doc.seq]
                    free.append(doc.seq)
                    yield done
            if not in_flight:
                return
            for group in self._groups([e.request for e in in_flight.values()]):
                try:
                    answers = self._decode(group)
                except Exception as exc:  # noqa: BLE001 - every reading of this decode ends as an error
                    answers = [exc] * len(group)
                for request, answer in zip(group, answers):
                    entry = in_flight[request.doc.seq]
                    if isinstance(answer, Exception):
                        done = Finished(entry.key, entry.doc, error=answer)
                    else:
                        done = self._advance(entry, answer)
                    if done is not None:
                        del in_flight[request.doc.seq]
                        free.append(request.doc.seq)
                        yield done

    def _advance(self, entry: _InFlight, answer: Computed | None) -> Finished | None:
        """Send `answer` to a reading and run it to its next decode (forgets are done on the spot); a Finished
        when it ends instead."""
        try:
            request = entry.reading.send(answer) if entry.request is not None else next(entry.reading)
            while isinstance(request, Forget):
                self.context.remove(request.doc.seq, request.position)
                request = entry.reading.send(None)
        except StopIteration as done:
            return Finished(entry.key, entry.doc, result=done.value)
        except Exception as exc:  # noqa: BLE001 - the job ends as an error record
            return Finished(entry.key, entry.doc, error=exc)
        entry.request = request
        return None

    def _groups(self, requests: list[Decode]) -> list[list[Decode]]:
        """Decodes of one round: by depth (shallowest first), each of at most n_batch tokens so that a stop inside
        the graph sees every token of its decode at once."""
        groups: list[list[Decode]] = []
        for depth in sorted({r.depth for r in requests}):
            size = 0
            groups.append([])
            for r in (r for r in requests if r.depth == depth):
                n = sum(len(t) for t in r.sentences)
                if groups[-1] and size + n > self.context.n_batch:
                    groups.append([])
                    size = 0
                groups[-1].append(r)
                size += n
        return groups

    def _decode(self, requests: list[Decode]) -> list[Computed]:
        """One llama_decode for requests of one depth, each on its document's sequence."""
        depth = requests[0].depth
        lengths = np.array([len(t) for r in requests for t in r.sentences])
        ends = np.cumsum(lengths)
        starts, counts = ends - lengths, lengths[:, None].astype(np.float32)
        first = np.cumsum([0] + [len(r.sentences) for r in requests])  # each request's sentences in the means
        means: dict[int, np.ndarray] = {}  # layer -> [all sentences, n_embd]

        def sentence_means(layer: int, rows: np.ndarray) -> np.ndarray:
            if layer not in means:
                means[layer] = np.add.reduceat(rows, starts, axis=0) / counts
            return means[layer]

        stopping = [i for i, r in enumerate(requests) if r.stop is not None]
        fired: dict[int, int] = {}  # request -> layer where its stop rule fired

        def on_layer(layer: int, rows: np.ndarray) -> bool:
            layer_means = sentence_means(layer, rows)
            for i in stopping:
                r = requests[i]
                if i not in fired and layer in r.layers and r.stop(layer, layer_means[first[i] : first[i + 1]]):
                    fired[i] = layer
            return len(fired) == len(requests)

        spans = [Span(r.doc.seq, r.start, [tok for t in r.sentences for tok in t]) for r in requests]
        read = sorted({layer for r in requests for layer in r.layers})
        decoded = self.context.decode(spans, depth, read, on_layer if stopping else None)
        answers = []
        for i, r in enumerate(requests):
            reached = fired[i] + 1 if i in fired else decoded.depth
            layers = [layer for layer in r.layers if layer < reached]
            block = np.empty((len(r.sentences), len(layers), self.n_embd), dtype=np.float32)
            for k, layer in enumerate(layers):
                block[:, k] = sentence_means(layer, decoded.rows[layer])[first[i] : first[i + 1]]
            answers.append(Computed(reached, decoded.depth, block))
        return answers

    def _check_owner(self, doc: Document) -> None:
        if self._owners.get(doc.seq) is not doc:
            raise RuntimeError("this document's sequence was given to a newer Engine.document(); read from that one")
