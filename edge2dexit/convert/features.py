"""Per-sentence, per-layer features read through the runtime engine itself: each document is decoded whole, in one
graph at full depth (the plain full decode that exactness is defined against; the runtime's sentence-by-sentence
reads differ from it by batching noise only), and the mean state of every sentence at every layer is stored as
fp16 in a memory-mapped array. One graph per text instead of one per sentence is what makes extraction fast
enough for thousands of documents (docs/llama-cpp.md §4).

A store is a directory: `states.f16` ([total sentences, n_layer, n_embd]), `tokens.npy` (tokens per
sentence), and `meta.json` (document offsets, labels, what made the states, how many documents are done).
Extraction writes `meta.json` after every few documents, so an interrupted run resumes where it stopped; a store
made from other texts, another model file, LoRA adapter, prompt or way of reading starts again from nothing.
"""

from __future__ import annotations

import json
import os
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
from ..sentences import Splitter

_META, _STATES, _TOKENS = "meta.json", "states.f16", "tokens.npy"
READING = "whole text, one decode"  # recorded in meta.json: a store read another way is never resumed into


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

    @property
    def n_docs(self) -> int:
        return len(self.labels)

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(states [m, n_layer, n_embd] float32, tokens per sentence [m]) of document i."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.states[a:b], dtype=np.float32), self.tokens[a:b]

    def layer_means(self, i: int, layer: int) -> np.ndarray:
        """Sentence means [m, n_embd] float32 of document i at one layer."""
        return np.asarray(self.states[self.offsets[i] : self.offsets[i + 1], layer], dtype=np.float32)


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
        np.load(directory / _TOKENS, allow_pickle=False),
    )


def extract(
    engine: Engine,
    texts: Sequence[str],
    labels: Sequence[int],
    splitter: Splitter,
    directory: str | Path,
    max_sentences: int | None = None,
) -> FeatureStore:
    """Read every text through `engine` at full depth, `engine.settings.width` documents at a time, and store its
    sentence means; resumes a partial store of the same texts. Progress goes to stderr."""
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
    meta = {
        "offsets": offsets.tolist(),
        "labels": [int(x) for x in labels],
        "n_layer": engine.n_layer,
        "n_embd": engine.n_embd,
        "reading": READING,
        # what else the states depend on: a store made with another model file, adapter or prompt is never resumed
        "model_sha256": sha256_file(engine.model.path),
        "prompt_tokens": [int(t) for t in engine.prompt_tokens],
        "lora_sha256": sha256_file(engine.context.lora.path) if engine.context.lora else None,
        "done": 0,
    }
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
    jobs = ((i, lambda doc, i=i: whole_text(doc, tokens[i], engine.n_layer)) for i in range(first, len(texts)))
    with tqdm(total=len(texts), initial=first, desc=f"features {directory.name}", unit="doc", file=sys.stderr,
              disable=None) as progress:
        for done in engine.run_many(jobs):
            if done.error is not None:
                raise done.error
            states[offsets[done.key] : offsets[done.key + 1]] = done.result
            finished[done.key - first] = True
            progress.update()
            contiguous = first + int(np.argmin(finished)) if not finished.all() else len(texts)
            if contiguous - meta["done"] >= 8:
                states.flush()
                meta["done"] = contiguous
                _save_meta(meta_path, meta)
    states.flush()
    meta["done"] = len(texts)
    _save_meta(meta_path, meta)
    return open_store(directory)


def _save_meta(path: Path, meta: dict) -> None:
    """Write, then rename: a Ctrl-C in the middle leaves the previous progress whole, and the next run resumes
    from it instead of failing on half a JSON file."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(meta))
    os.replace(part, path)
