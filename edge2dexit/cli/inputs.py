"""What `classify` reads: text files, directories of them, tables (CSV, TSV, JSONL: one text per row) and
standard input. Each input becomes one or more `Item`s; an input that cannot be read becomes an Item that carries
its error, so that a batch goes on past it and reports it in its place."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

from ..errors import Edge2DExitError, InputError
from ..texts import decode_text
from .app import read_text

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
TEXT_GLOB = "*.txt"


class Item(NamedTuple):
    id: str  # the file, or file:line for a table row
    text: str | None
    error: Edge2DExitError | None = None


def _safe_read(source: str) -> Item:
    try:
        return Item(source, read_text(source))
    except Edge2DExitError as exc:
        return Item(source, None, exc)


def iter_items(sources: list[str], text_column: str, id_column: str | None = None, lines: bool = False) -> Iterator[Item]:
    """Every text of `sources`, in order. `lines`: standard input holds one text per line."""
    for source in sources:
        path = Path(source)
        if source == "-" and lines:
            yield from _stdin_lines()
        elif source != "-" and path.is_dir():
            files = sorted(p for p in path.rglob(TEXT_GLOB) if p.is_file())
            if not files:
                yield Item(source, None, InputError(f"{source}: a directory with no {TEXT_GLOB} files"))
            for file in files:
                yield _safe_read(str(file))
        elif path.suffix.lower() in TABLE_SUFFIXES and path.is_file():
            yield from _table_rows(path, text_column, id_column)
        else:
            yield _safe_read(source)


def _stdin_lines() -> Iterator[Item]:
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        item_id = f"stdin:{number}"
        try:
            yield Item(item_id, decode_text(raw.rstrip(b"\r\n"), item_id))
        except Edge2DExitError as exc:
            yield Item(item_id, None, exc)


def _table_rows(path: Path, column: str, id_column: str | None) -> Iterator[Item]:
    delimiter = TABLE_SUFFIXES[path.suffix.lower()]
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            if delimiter is not None:
                csv.field_size_limit(sys.maxsize)  # reviews can exceed the 128 KiB default
                reader = csv.DictReader(f, delimiter=delimiter)
                missing = [c for c in (column, id_column) if c is not None and c not in (reader.fieldnames or [])]
                if missing:
                    have = ", ".join(map(repr, reader.fieldnames or [])) or "none"
                    yield Item(str(path), None, InputError(f"{path} has no column {missing[0]!r}; its columns: {have}"))
                    return
                for row in reader:
                    yield _row_item(f"{path}:{reader.line_num}", row, column, id_column)
            else:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        yield _json_row(f"{path}:{number}", line, column, id_column)
    except UnicodeDecodeError as exc:
        yield Item(str(path), None, InputError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"))
    except (OSError, csv.Error) as exc:
        yield Item(str(path), None, InputError(f"{path}: cannot read it ({exc})"))


def _json_row(item_id: str, line: str, column: str, id_column: str | None) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return Item(item_id, None, InputError(f"{item_id}: not valid JSON ({exc.msg})"))
    if not isinstance(record, dict):
        return Item(item_id, None, InputError(f"{item_id}: not a JSON object"))
    return _row_item(item_id, record, column, id_column)


def _row_item(item_id: str, record: dict, column: str, id_column: str | None) -> Item:
    """A row's text, under its own id (`id_column`) or else file:line."""
    if id_column is not None and record.get(id_column) not in (None, ""):
        item_id = str(record[id_column])
    value = record.get(column)
    if not isinstance(value, str):
        found = "nothing" if value is None else type(value).__name__
        return Item(item_id, None, InputError(f"{item_id}: {column!r} holds {found}, not text"))
    return Item(item_id, value)
