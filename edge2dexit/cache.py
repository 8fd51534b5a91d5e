"""Where edge2dexit keeps the files it creates, and the sha256 stamps that make re-checking them free.

One cache directory, overridable for tests and users: $EDGE2DEXIT_HOME, else $XDG_CACHE_HOME/edge2dexit, else
~/.cache/edge2dexit. It holds pulled models (`models/`), built-in data sets (`data/`) and `sha256.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .files import write_text

HOME_ENV = "EDGE2DEXIT_HOME"
_STAMP_FILE = "sha256.json"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The user cache directory (created on first use)."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        path = Path(explicit)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge2dexit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stamp_key(path: Path) -> tuple[str, int, int]:
    resolved = path.resolve()
    st = resolved.stat()
    return str(resolved), st.st_size, st.st_mtime_ns


def _load_stamps() -> dict[str, dict]:
    try:
        stamps = json.loads((cache_dir() / _STAMP_FILE).read_text())
    except (OSError, ValueError):  # missing or damaged: the stamps are only an optimisation
        return {}
    return stamps if isinstance(stamps, dict) else {}


def remember_sha256(path: Path, digest: str) -> None:
    """Record `digest` for `path` as it is now (size, mtime), so the next `sha256_file` call is free."""
    key, size, mtime_ns = _stamp_key(path)
    stamps = _load_stamps()
    stamps[key] = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
    write_text(cache_dir() / _STAMP_FILE, json.dumps(stamps, indent=1))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file. Stamped by resolved path, size and mtime, so re-checking a 250 MB model is free."""
    path = Path(path)
    key, size, mtime_ns = _stamp_key(path)
    stamp = _load_stamps().get(key)
    if isinstance(stamp, dict) and stamp.get("size") == size and stamp.get("mtime_ns") == mtime_ns:
        return stamp["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    remember_sha256(path, digest.hexdigest())
    return digest.hexdigest()
