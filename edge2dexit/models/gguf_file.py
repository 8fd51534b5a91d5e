"""The one sanity check every GGUF file passes before llama.cpp or gguf-py reads it (base models and exits files).

It walks the header without reading tensor data and refuses, with one message, a wrong path, a non-GGUF file, an
unknown GGUF version, and any file whose header does not add up: a string or array that runs past the end, nested
arrays, a tensor with more than 4 dimensions or of an unknown type, tensor data past the end of the file. Every
length is checked against the file's size before it is used, so a hostile header claiming 2^60 bytes costs nothing.
Walking the header ourselves takes ~0.1 s where GGUFReader, which builds a numpy view per vocabulary string, takes
seconds on a 250k-token vocabulary. Every layout constant comes from the gguf package.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import Edge2DExitError, ModelError
from ..keys import Keys

GGUF_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALAR_SIZES = {vtype: np.dtype(dtype).itemsize for vtype, dtype in GGUFReader.gguf_scalar_to_np.items()}


class GGUFSummary(NamedTuple):
    version: int
    n_kv: int
    n_tensors: int
    data_end: int  # byte just past the last tensor's data (0 without tensors)


class _Damaged(ValueError):
    """The header does not add up; the message says where."""


def _string_end(buf: mmap.mmap, offset: int) -> int:
    end = offset + 8 + _U64.unpack_from(buf, offset)[0]
    if end > len(buf):
        raise _Damaged(f"a string at byte {offset} runs past the end of the file")
    return end


def _value_end(buf: mmap.mmap, offset: int, vtype: int) -> tuple[int, int]:
    """Offset just past a metadata value of type `vtype` that starts at `offset`, and its number of array items."""
    if vtype in _SCALAR_SIZES:
        return offset + _SCALAR_SIZES[vtype], 0
    if vtype == GGUFValueType.STRING:
        return _string_end(buf, offset), 0
    if vtype != GGUFValueType.ARRAY:
        raise _Damaged(f"unknown metadata value type {vtype} at byte {offset}")
    item_type, count = struct.unpack_from("<IQ", buf, offset)
    offset += 12
    if item_type in _SCALAR_SIZES:
        offset += count * _SCALAR_SIZES[item_type]
    elif item_type == GGUFValueType.STRING:  # the vocabulary: the only hot loop; every item takes ≥ 8 bytes
        if offset + 8 * count > len(buf):
            raise _Damaged(f"an array of {count} strings at byte {offset} cannot fit in the file")
        unpack = _U64.unpack_from
        for _ in range(count):
            offset += 8 + unpack(buf, offset)[0]
    else:
        raise _Damaged(f"an array of type {item_type} at byte {offset} (nested arrays are not GGUF)")
    if offset > len(buf):
        raise _Damaged("a metadata array runs past the end of the file")
    return offset, count


def _walk(buf: mmap.mmap, max_items: int | None) -> GGUFSummary:
    version = _U32.unpack_from(buf, 4)[0]
    if version not in GGUF_VERSIONS:
        raise _Damaged(f"unsupported GGUF version {version} (edge2dexit reads {', '.join(map(str, GGUF_VERSIONS))})")
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    offset, alignment, n_items = 24, GGUF_DEFAULT_ALIGNMENT, n_kv + n_tensors
    for _ in range(n_kv):
        key_end = _string_end(buf, offset)
        key = buf[offset + 8 : key_end].decode("utf-8")
        vtype = _U32.unpack_from(buf, key_end)[0]
        if key == Keys.General.ALIGNMENT.name and vtype == GGUFValueType.UINT32:
            alignment = _U32.unpack_from(buf, key_end + 4)[0]
        offset, count = _value_end(buf, key_end + 4, vtype)
        n_items += count
    if max_items is not None and n_items > max_items:
        raise _Damaged(f"it declares {n_items} keys, tensors and array items, more than the {max_items} expected")
    if alignment == 0 or alignment & (alignment - 1):
        raise _Damaged(f"invalid alignment {alignment}")
    tensors = []
    for _ in range(n_tensors):
        name_end = _string_end(buf, offset)
        name = buf[offset + 8 : name_end].decode("utf-8")
        n_dims = _U32.unpack_from(buf, name_end)[0]
        if n_dims > _MAX_DIMS:
            raise _Damaged(f"tensor {name!r} claims {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, name_end + 4)
        ggml_type, relative = struct.unpack_from("<IQ", buf, name_end + 4 + 8 * n_dims)
        offset = name_end + 4 + 8 * n_dims + 12
        try:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except ValueError:
            raise _Damaged(f"tensor {name!r} has unknown type {ggml_type}") from None
        tensors.append((name, relative, math.prod(dims) * type_size // block_size))
    data_start = offset + (-offset) % alignment
    data_end = 0
    for name, relative, n_bytes in tensors:
        end = data_start + relative + n_bytes
        if end > len(buf):
            raise _Damaged(f"tensor {name!r} ends at byte {end} but the file has {len(buf)} bytes")
        data_end = max(data_end, end)
    return GGUFSummary(version, n_kv, n_tensors, data_end)


def check_gguf(
    path: str | os.PathLike[str], error: type[Edge2DExitError] = ModelError, max_items: int | None = None
) -> GGUFSummary:
    """Raise `error` unless `path` is a complete, well-formed GGUF file; its header summary otherwise. `max_items`
    bounds the keys, tensors and metadata array items, for files that gguf-py's reader will read in full: it builds
    several objects per item, so a small file declaring millions of empty strings would cost gigabytes."""
    path = Path(path)
    try:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:  # a dangling link too; other OSErrors (a loop, no permission) are said below
            raise error(f"{path} does not exist") from None
        if not stat.S_ISREG(mode):  # a directory, or a pipe that opening would wait on forever
            raise error(f"{path} is not a file; give the path of a .gguf file")
        with open(path, "rb") as f:
            if f.read(4) != _U32.pack(GGUF_MAGIC):
                raise error(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(buf, max_items)
    except OSError as exc:  # unreadable, a symlink loop, a name too long…
        raise error(f"{path} cannot be read ({exc.strerror or exc})") from None
    except struct.error:  # a read past the end of the file
        raise error(f"{path} is truncated or corrupt (its header is cut short)") from None
    except (_Damaged, UnicodeDecodeError) as exc:
        raise error(f"{path} is truncated or corrupt ({exc})") from None
