"""Per-sentence, per-layer features read through the runtime engine itself, so training sees exactly the
states inference reads: each document is fed sentence by sentence (one decode each) at full depth, and the
mean state of every sentence at every layer is stored as fp16 in a memory-mapped array.

A store is a directory: `states.f16` ([total sentences, n_layer, n_embd]), `tokens.npy` (tokens per
sentence), and `meta.json` (document offsets, labels, how many documents are done). Extraction writes
`meta.json` after every few documents, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..engine import Engine
from ..errors import InputError
from ..sentences import SentenceSplitter

_META, _STATES, _TOKENS = "meta.json", "states.f16", "tokens.npy"


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

    def sentence_counts(self) -> np.ndarray:
        return np.diff(self.offsets)


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
        np.load(directory / _TOKENS),
    )


def extract(
    engine: Engine,
    texts: Sequence[str],
    labels: Sequence[int],
    splitter: SentenceSplitter,
    directory: str | Path,
    max_sentences: int | None = None,
    progress: bool = True,
) -> FeatureStore:
    """Read every text through `engine` at full depth and store its sentence means; resumes a partial store
    of the same texts."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sentences = [splitter.split(t)[:max_sentences] for t in texts]
    if any(not s for s in sentences):
        raise InputError(f"text {next(i for i, s in enumerate(sentences) if not s)} has no sentences")
    tokens = [engine.tokenize_sentences(s) for s in sentences]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sentences])])
    meta = {
        "offsets": offsets.tolist(),
        "labels": [int(x) for x in labels],
        "n_layer": engine.n_layer,
        "n_embd": engine.n_embd,
        "done": 0,
    }
    meta_path = directory / _META
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        if {k: previous[k] for k in meta if k != "done"} == {k: meta[k] for k in meta if k != "done"}:
            meta["done"] = previous["done"]
    np.save(directory / _TOKENS, np.array([len(t) for doc in tokens for t in doc], dtype=np.int32))
    shape = (int(offsets[-1]), engine.n_layer, engine.n_embd)
    mode = "r+" if meta["done"] and (directory / _STATES).exists() else "w+"
    states = np.memmap(directory / _STATES, dtype=np.float16, mode=mode, shape=shape)
    started, first = time.perf_counter(), meta["done"]
    for i in range(first, len(texts)):
        doc = engine.document()
        for j, sentence in enumerate(tokens[i]):
            (read,) = doc.append([sentence], engine.n_layer)
            states[offsets[i] + j] = read.mean
        if (i + 1) % 8 == 0 or i + 1 == len(texts):
            states.flush()
            meta["done"] = i + 1
            meta_path.write_text(json.dumps(meta))
            if progress:
                _report(i + 1 - first, len(texts) - first, time.perf_counter() - started, directory.name)
    states.flush()
    meta["done"] = len(texts)
    meta_path.write_text(json.dumps(meta))
    return open_store(directory)


def _report(done: int, total: int, seconds: float, name: str) -> None:
    rate = done / seconds
    left = (total - done) / rate if rate else float("inf")
    print(
        f"\rfeatures {name}: {done}/{total} documents, {rate:.2f} docs/s, {left / 60:.1f} min left",
        end="\n" if done == total else "",
        file=sys.stderr,
        flush=True,
    )
