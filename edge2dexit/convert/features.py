"""Per-sentence, per-layer features read through the runtime engine itself: each document is decoded whole, in one
graph at full depth (the plain full decode that exactness is defined against; the runtime's sentence-by-sentence
reads differ from it by batching noise only), and the mean state of every sentence at every layer is stored as
fp16 in a memory-mapped array. One graph per text instead of one per sentence is what makes extraction fast
enough for thousands of documents (docs/llama-cpp.md §4).

A store is a directory: `states.f16` ([total sentences, n_layer, n_embd]), `tokens.npy` (tokens per
sentence), and `meta.json` (document offsets, labels, what made the states, how many documents are done).
Extraction writes `meta.json` after every few documents, so an interrupted run resumes where it stopped; a store
made from other texts, another model file, LoRA adapter, prompt or way of reading starts again from nothing.

`meta.json` also names every document by the sha256 of its token ids, sentence by sentence (`document_key`): given
the same source (model file, adapter, prompt, way of reading), a document's states are a function of that key alone,
so a new store copies the documents that earlier stores already hold instead of reading them again (`reuse`). That is
what lets a convert grow its training split, or re-split the same data, at the cost of the new documents only. Copies
made from a store read at another batch width differ from a fresh read by batching noise only, as a resumed store
does (docs/llama-cpp.md §5).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tqdm import tqdm

from ..cache import sha256_file
from ..document import whole_text
from ..engine import Engine
from ..errors import ContextOverflowError, InputError
from ..heads import Pooling, running_means
from ..files import write_text
from ..sentences import Splitter

_META, _STATES, _TOKENS = "meta.json", "states.f16", "tokens.npy"
READING = "whole text, one decode"  # recorded in meta.json: a store read another way is never resumed into
# what, beside a document's tokens, its states depend on: stores agree on all of these or share nothing
SOURCE_KEYS = ("n_layer", "n_embd", "reading", "model_sha256", "prompt_tokens", "lora_sha256")


@dataclass
class FeatureStore:
    directory: Path
    offsets: np.ndarray  # [n_docs + 1]: sentences of document i are rows offsets[i]:offsets[i+1]
    labels: np.ndarray  # [n_docs]
    n_layer: int
    n_embd: int
    done: int
    states: np.ndarray  # memmap [total, n_layer, n_embd] float16
    tokens: np.ndarray  # [total] tokens per sentence
    source: dict  # the meta.json entries named in SOURCE_KEYS (None where a store lacks one)
    keys: list[str]  # document_key of every document; empty in a store written before keys were kept

    @property
    def n_docs(self) -> int:
        return len(self.labels)

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(states [m, n_layer, n_embd] as stored, float16, tokens per sentence [m]) of document i: a view, which a
        replay converts only at the layers it reads."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.states[a:b], self.tokens[a:b]

    def layer_means(self, i: int, layer: int) -> np.ndarray:
        """Sentence means [m, n_embd] float32 of document i at one layer."""
        return np.asarray(self.states[self.offsets[i] : self.offsets[i + 1], layer], dtype=np.float32)

    def select(self, docs: Sequence[int] | np.ndarray | None = None) -> "Documents":
        """The documents `docs` of this store (all of them: None), in that order."""
        return Documents([(self, np.arange(self.n_docs) if docs is None else np.asarray(docs, dtype=np.int64))])


class Documents:
    """Documents drawn from one or more feature stores, in a chosen order: what training, calibration and replays
    read. A store holds the documents of one split as they were read; a `Documents` is any part of them (a half of
    the calibration split, the folds of cross-fitting) without copying a state."""

    def __init__(self, parts: Sequence[tuple[FeatureStore, np.ndarray]]):
        self.parts = [(store, np.asarray(docs, dtype=np.int64)) for store, docs in parts]
        self._where = [(store, int(i)) for store, docs in self.parts for i in docs]
        self.labels = np.concatenate([store.labels[docs] for store, docs in self.parts])
        self.n_layer = self.parts[0][0].n_layer

    @property
    def n_docs(self) -> int:
        return len(self._where)

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        store, j = self._where[i]
        return store.document(j)

    def layer_means(self, i: int, layer: int) -> np.ndarray:
        store, j = self._where[i]
        return store.layer_means(j, layer)

    def select(self, docs: Sequence[int] | np.ndarray) -> "Documents":
        """The documents at positions `docs` of this selection, in that order."""
        docs = np.asarray(docs, dtype=np.int64)
        if not len(docs):  # none: an empty part of the first store keeps what the selection is of
            return Documents([(self.parts[0][0], docs)])
        return Documents([(store, np.array([j])) for store, j in (self._where[i] for i in docs)]).merged()

    def __add__(self, other: "Documents") -> "Documents":
        return Documents(self.parts + other.parts).merged()

    def merged(self) -> "Documents":
        """The same documents, runs from one store joined into one part (fewer, larger reads)."""
        parts: list[tuple[FeatureStore, list[int]]] = []
        for store, j in self._where:
            if parts and parts[-1][0] is store:
                parts[-1][1].append(j)
            else:
                parts.append((store, [j]))
        return Documents([(store, np.array(docs)) for store, docs in parts])

    def sentence_tokens(self) -> np.ndarray:
        """Tokens of every sentence, in document then sentence order (the order of `examples`)."""
        return np.concatenate([store.tokens[np.concatenate([np.arange(store.offsets[j], store.offsets[j + 1])
                                                            for j in docs])] for store, docs in self.parts])

    def examples(self, pooling: str, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every (document, sentence) example at one layer, in document then sentence order: (X [n, n_embd]
        float32, y [n] labels, doc [n] position of each example's document in this selection, read [n] sentences
        the example covers). Both poolings give one example per sentence: for "prefix", the example at sentence k
        of a document is the mean of its sentence means 0..k (what the runtime's running sum divided by k + 1
        gives), read = k + 1; for "sentence", that sentence's mean, read = its place in the text, k + 1."""
        if pooling not in Pooling.ALL:
            raise InputError(f"unknown pooling {pooling!r}; expected one of {', '.join(Pooling.ALL)}")
        xs, counts = [], []
        for store, docs in self.parts:
            starts, lengths = store.offsets[docs], np.diff(store.offsets)[docs]
            first = np.repeat(np.cumsum(lengths) - lengths, lengths)
            rows = np.repeat(starts, lengths) + np.arange(lengths.sum()) - first
            xs.append(np.asarray(store.states[rows, layer], dtype=np.float32))
            counts.append(lengths)
        counts = np.concatenate(counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)  # row of each example's first sentence
        read = np.arange(counts.sum()) - first + 1
        x = np.concatenate(xs)
        if pooling == Pooling.PREFIX:
            x = running_means(x, first)
        doc = np.repeat(np.arange(self.n_docs), counts)
        return x, self.labels[doc], doc, read


def open_store(directory: str | Path) -> FeatureStore:
    directory = Path(directory)
    try:
        meta = json.loads((directory / _META).read_text())
    except FileNotFoundError:
        raise InputError(f"{directory} holds no features (no {_META})") from None
    offsets = np.array(meta["offsets"], dtype=np.int64)
    shape = (int(offsets[-1]), meta["n_layer"], meta["n_embd"])
    states = np.memmap(directory / _STATES, dtype=np.float16, mode="r+", shape=shape)
    return FeatureStore(
        directory, offsets, np.array(meta["labels"]), meta["n_layer"], meta["n_embd"], meta["done"], states,
        np.load(directory / _TOKENS, allow_pickle=False), {k: meta.get(k) for k in SOURCE_KEYS},
        meta.get("documents", []),
    )


def document_key(tokens: Sequence[Sequence[int]]) -> str:
    """sha256 of a document's token ids, each sentence length-prefixed so that where sentences end counts too."""
    digest = hashlib.sha256()
    for sentence in tokens:
        digest.update(np.int32(len(sentence)).tobytes())
        digest.update(np.asarray(sentence, dtype=np.int32).tobytes())
    return digest.hexdigest()


def stores_under(paths: Sequence[str | Path]) -> list[FeatureStore]:
    """The feature stores at `paths`: each path is a store, or a directory of stores (an earlier convert's
    OUT/features, whose train, calibration and test are all taken)."""
    stores = []
    for path in map(Path, paths):
        found = [path] if (path / _META).exists() else sorted(p.parent for p in path.glob(f"*/{_META}"))
        if not found:
            raise InputError(f"{path} holds no feature stores (no {_META} in it or in a folder under it)")
        stores.extend(open_store(d) for d in found)
    return stores


def extract(
    engine: Engine,
    texts: Sequence[str],
    labels: Sequence[int],
    splitter: Splitter,
    directory: str | Path,
    max_sentences: int | None = None,
    reuse: Sequence[FeatureStore] = (),
) -> FeatureStore:
    """Read every text through `engine` at full depth, `engine.settings.width` documents at a time, and store its
    sentence means; resumes a partial store of the same texts, and copies the documents that a store in `reuse` of
    the same source holds. Progress goes to stderr."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sentences = [splitter.split(t)[:max_sentences] for t in texts]
    if any(not s for s in sentences):
        raise InputError(f"text {next(i for i, s in enumerate(sentences) if not s)} has no sentences")
    tokens = [[engine.tokenize(s) for s in doc] for doc in sentences]
    needed = max(sum(map(len, doc)) for doc in tokens)
    if needed > engine.capacity:
        raise ContextOverflowError.for_text(needed, engine.capacity)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sentences])])
    source = {
        "n_layer": engine.n_layer,
        "n_embd": engine.n_embd,
        "reading": READING,
        "model_sha256": sha256_file(engine.model.path),
        "prompt_tokens": [int(t) for t in engine.prompt_tokens],
        "lora_sha256": sha256_file(engine.context.lora.path) if engine.context.lora else None,
    }
    keys = [document_key(doc) for doc in tokens]
    meta = {"offsets": offsets.tolist(), "labels": [int(x) for x in labels], **source, "documents": keys, "done": 0}
    meta_path = directory / _META
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        if {k: previous.get(k) for k in meta if k != "done"} == {k: meta[k] for k in meta if k != "done"}:
            meta["done"] = previous["done"]
    np.save(directory / _TOKENS, np.array([len(t) for doc in tokens for t in doc], dtype=np.int32))
    shape = (int(offsets[-1]), engine.n_layer, engine.n_embd)
    mode = "r+" if meta["done"] and (directory / _STATES).exists() else "w+"
    states = np.memmap(directory / _STATES, dtype=np.float16, mode=mode, shape=shape)
    # Documents finish out of order: `done` advances over the longest run of finished documents from the start,
    # so a resumed run redoes at most the documents that were in flight.
    first = meta["done"]
    finished = np.zeros(len(texts) - first, dtype=bool)

    def save_progress(at_least: int) -> None:
        contiguous = first + int(np.argmin(finished)) if not finished.all() else len(texts)
        if contiguous - meta["done"] >= at_least:
            states.flush()
            meta["done"] = contiguous
            _save_meta(meta_path, meta)

    held = {}  # document key → (store, index) in the stores reused; never the store being written
    for store in reuse:
        if store.source == source and store.directory.resolve() != directory.resolve():
            held.update((key, (store, j)) for j, key in enumerate(store.keys[: store.done]))
    for i in range(first, len(texts)):
        if keys[i] in held:
            store, j = held[keys[i]]
            states[offsets[i] : offsets[i + 1]] = store.states[store.offsets[j] : store.offsets[j + 1]]
            finished[i - first] = True
    if reuse:
        print(f"features {directory.name}: {int(finished.sum())} of {len(texts) - first} documents copied from "
              f"earlier stores", file=sys.stderr)
    save_progress(at_least=1)

    jobs = ((i, lambda doc, i=i: whole_text(doc, tokens[i], engine.n_layer))
            for i in range(first, len(texts)) if not finished[i - first])
    with tqdm(total=len(texts), initial=first + int(finished.sum()), desc=f"features {directory.name}", unit="doc",
              file=sys.stderr, disable=None) as progress:
        for done in engine.run_many(jobs):
            if done.error is not None:
                raise done.error
            states[offsets[done.key] : offsets[done.key + 1]] = done.result
            finished[done.key - first] = True
            progress.update()
            save_progress(at_least=8)
    states.flush()
    meta["done"] = len(texts)
    _save_meta(meta_path, meta)
    return open_store(directory)


def _save_meta(path: Path, meta: dict) -> None:
    """Whole or not at all: a Ctrl-C in the middle leaves the previous progress, and the next run resumes from it
    instead of failing on half a JSON file."""
    write_text(path, json.dumps(meta))
