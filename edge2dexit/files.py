"""Files written so that a reader never sees half of one: everything edge2dexit writes for later (bundles, cached
models, sha256 stamps, feature stores, training checkpoints) is written beside its place and renamed onto it."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temporary path in `path`'s directory to write to; renamed onto `path` when the block ends, removed
    when it raises (Ctrl-C included). Each call gets its own temporary name, so concurrent writers never mix."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """`path` holds `text` (UTF-8), all of it or none of it."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
