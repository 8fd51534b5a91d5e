"""Tables of texts: CSV, TSV and JSONL files, read row by row. `classify` reads one text per row from them and
`convert` labelled texts; both read through `rows`, so both see the same rows, numbered by the line they start on.

A row that cannot be read (a JSONL line that is not a JSON object) comes as a `Row` with its error and the reading
goes on; a problem with the file itself (not UTF-8, a header that names a column twice, unreadable) ends the rows
with one error row for the whole file. Messages name neither the file nor the line: the caller knows both.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

from .errors import InputError

DELIMITERS = {".csv": ",", ".tsv": "\t"}
SUFFIXES = (*DELIMITERS, ".jsonl")


class Row(NamedTuple):
    line: int | None  # the line the row starts on (1-based); None for an error about the whole file
    record: dict | None  # column (or JSON key) → value; None when the row could not be read
    error: InputError | None = None


def is_table(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def rows(path: str | Path) -> Iterator[Row]:
    """Every row of a .csv, .tsv or .jsonl file, in order (blank lines are no rows)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            delimiter = DELIMITERS.get(path.suffix.lower())
            yield from (_jsonl_rows(f) if delimiter is None else _delimited_rows(f, delimiter))
    except UnicodeDecodeError as exc:
        yield Row(None, None, InputError(f"not UTF-8 text (byte {exc.start}); save it as UTF-8"))
    except (OSError, csv.Error) as exc:
        yield Row(None, None, InputError(f"cannot read it ({getattr(exc, 'strerror', None) or exc})"))


def columns(path: str | Path) -> list[str] | None:
    """The header of a .csv or .tsv file; None for JSONL, whose rows each name their own keys, and for a file
    whose header cannot be read (`rows` says why)."""
    path = Path(path)
    delimiter = DELIMITERS.get(path.suffix.lower())
    if delimiter is None:
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f, delimiter=delimiter), [])
    except (UnicodeDecodeError, OSError, csv.Error):
        return None


def _delimited_rows(f, delimiter: str) -> Iterator[Row]:
    csv.field_size_limit(sys.maxsize)  # reviews can exceed the 128 KiB default
    reader = csv.reader(f, delimiter=delimiter)
    header = next(reader, [])
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        yield Row(None, None, InputError(f"its header names the column {twice[0]!r} more than once"))
        return
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines: the row is known by its first
        values = next(reader, None)
        if values is None:
            return
        if values:  # a blank line is no row; a short one lacks its last cells (None, as csv.DictReader has them)
            yield Row(start, dict(zip(header, values + [None] * (len(header) - len(values)))))


def _jsonl_rows(f) -> Iterator[Row]:
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Row(number, None, InputError(f"not valid JSON ({exc.msg})"))
            continue
        if not isinstance(record, dict):
            yield Row(number, None, InputError("not a JSON object"))
            continue
        yield Row(number, record)
