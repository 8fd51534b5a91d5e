"""What `classify` reads: text files, directories of them, tables (CSV, TSV, JSONL: one text per row) and
standard input. Each input becomes one or more `Item`s; an input that cannot be read becomes an Item that carries
its error, so that a batch goes on past it and reports it in its place.

An item's error never repeats the item's id: the record carries the id, and the one line on stderr puts the two
together. Blank lines are no texts, in standard input read by line as in JSONL tables; a table row with an empty
text is an error, since the row is there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

from .. import tables
from ..errors import Edge2DExitError, InputError
from ..texts import decode_text

TEXT_SUFFIX = ".txt"  # in a directory, files whose name ends so, in any case (.txt, .TXT)


class Item(NamedTuple):
    id: str  # the file, or file:line for a table row
    text: str | None
    error: Edge2DExitError | None = None


def read_text(source: str) -> str:
    """The text of a file, a pipe or a device (`<(cmd)`, /dev/stdin), or of standard input for "-"; InputError
    for what is missing, a directory or not text. Messages name no source: the caller puts its name in front."""
    if source == "-":
        return decode_text(_read_until_binary(sys.stdin.buffer))
    path = Path(source)
    if path.is_dir():
        raise InputError("is a directory (classify reads the *.txt files below it only when named as an input)")
    try:
        with open(path, "rb") as f:
            raw = _read_until_binary(f)
    except FileNotFoundError:
        raise InputError("no such file" + (" (a broken symbolic link)" if path.is_symlink() else "")) from None
    except OSError as exc:
        raise InputError(f"cannot read it ({exc.strerror or exc})") from None
    return decode_text(raw)


_CHUNK = 1 << 20
_LONGEST_LINE = 16 << 20  # bytes of one text in standard input read by line


def _read_until_binary(stream: BinaryIO) -> bytes:
    """Everything `stream` holds, or what it held up to the first chunk with a NUL byte, which `decode_text` then
    refuses as binary (or as UTF-16 or UTF-32, by its byte-order mark): a device that never ends (/dev/zero,
    /dev/urandom) is refused at once instead of being read until memory runs out."""
    chunks = []
    while chunk := stream.read(_CHUNK):
        chunks.append(chunk)
        if b"\x00" in chunk:
            break
    return b"".join(chunks)


def text_of(source: str) -> str:
    """`read_text`, with the source named in the error."""
    item = _read(source)
    if item.error is not None:
        raise type(item.error)(f"{source}: {item.error}")
    return item.text


def iter_items(sources: list[str], text_column: str, id_column: str | None = None, lines: bool = False) -> Iterator[Item]:
    """Every text of `sources`, in order. `lines`: standard input holds one text per line."""
    for source in sources:
        path = Path(source)
        if source == "-" and lines:
            yield from _stdin_lines()
        elif source != "-" and path.is_dir():
            yield from _directory(source)
        elif tables.is_table(path) and path.is_file():
            yield from _table_rows(path, text_column, id_column)
        else:
            yield _read(source)


def _read(source: str) -> Item:
    try:
        return Item(source, read_text(source))
    except Edge2DExitError as exc:
        return Item(source, None, exc)


def _directory(source: str) -> Iterator[Item]:
    """Every *.txt file below `source`, in name order, following symbolic links to directories (each directory
    once); a broken link whose name ends in .txt is an error item, not a silent skip, and so is a pipe or a device
    (named on the command line, one is read; found in a directory, it is no text file)."""
    found = []
    seen = set()
    for top, directories, files in os.walk(source, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree, or two links to one directory
            directories.clear()
            continue
        seen.add(real)
        directories.sort()
        found += [os.path.join(top, name) for name in files if name.lower().endswith(TEXT_SUFFIX)]
    if not found:
        yield Item(source, None, InputError(f"a directory with no *{TEXT_SUFFIX} files below it"))
    for file in sorted(found):
        if os.path.exists(file) and not os.path.isfile(file):  # opening a pipe nobody writes to would wait forever
            yield Item(file, None, InputError("is not a regular file (a pipe, socket or device): name it as an "
                                              "input of its own to read it"))
        else:
            yield _read(file)


def _stdin_lines() -> Iterator[Item]:
    """One item per line of standard input, each line read at most `_LONGEST_LINE` bytes at a time: a longer line
    is an error item and is skipped to its end without being held, and NUL bytes end the input with an error item,
    since a binary stream (/dev/zero) has no lines to read and may never end."""
    stdin = sys.stdin.buffer
    number = 0
    while raw := stdin.readline(_LONGEST_LINE):
        number += 1
        item_id = f"stdin:{number}"
        if b"\x00" in raw:
            yield Item(item_id, None, InputError("binary (NUL bytes): standard input is not lines of text; "
                                                 "reading stopped here"))
            return
        if not raw.endswith(b"\n") and len(raw) == _LONGEST_LINE:
            while (rest := stdin.readline(_LONGEST_LINE)) and not rest.endswith(b"\n"):
                pass
            yield Item(item_id, None, InputError(f"a line longer than {_LONGEST_LINE >> 20} MiB: give such a text "
                                                 "as a file of its own"))
            continue
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            yield Item(item_id, decode_text(line))
        except Edge2DExitError as exc:
            yield Item(item_id, None, exc)


def _table_rows(path: Path, column: str, id_column: str | None) -> Iterator[Item]:
    header = tables.columns(path)
    missing = [c for c in (column, id_column) if c is not None and header is not None and c not in header]
    if missing:
        have = ", ".join(map(repr, header)) or "none"
        yield Item(str(path), None, InputError(f"has no column {missing[0]!r}; its columns: {have}"))
        return
    for row in tables.rows(path):
        item_id = str(path) if row.line is None else f"{path}:{row.line}"
        if row.error is not None:
            yield Item(item_id, None, row.error)
            continue
        if id_column is not None and row.record.get(id_column) not in (None, ""):
            item_id = str(row.record[id_column])
        value = row.record.get(column)
        if not isinstance(value, str):
            found = "nothing" if value is None else type(value).__name__
            yield Item(item_id, None, InputError(f"{column!r} holds {found}, not text"))
            continue
        yield Item(item_id, value)

