"""The checks every text passes before it is read: bytes become text only if they are UTF-8 and not binary,
and an empty text is refused. One message per problem, naming what was refused."""

from __future__ import annotations

import unicodedata

from .errors import InputError
from .sentences import normalise

_BOM = "\ufeff"
# Byte-order marks of the Unicode encodings that are not UTF-8 (UTF-32 first: its little-endian mark starts with
# UTF-16's): such a file is text, but in an encoding this project does not read.
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
               (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def check_text(text: object, source: str = "the text") -> str:
    """`text` without a leading BOM, or InputError when it is not a string, binary (NUL characters), not Unicode
    (lone surrogates, which no tokenizer can encode) or empty: nothing but white space, HTML line breaks and BOMs, so
    that every text that passes has at least one sentence."""
    check_characters(text, source)
    if not normalise(text).replace(_BOM, "").strip():
        raise InputError(f"{source} is empty")
    return text.removeprefix(_BOM)


def check_characters(text: object, source: str = "the text") -> None:
    """InputError when `text` is not a string, binary (NUL characters) or not Unicode (lone surrogates, which no
    tokenizer can encode); a piece of a stream may be empty, a whole text may not (`check_text`)."""
    if not isinstance(text, str):
        found = "nothing (None)" if text is None else f"a {type(text).__name__} ({text!r:.40})"
        raise InputError(f"{source} is {found}, not a string")
    if "\x00" in text:
        raise InputError(f"{source} looks binary (it contains NUL bytes), not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{source} is not valid Unicode text (a lone surrogate at character {exc.start})") from None


def decode_text(raw: bytes, source: str = "the text") -> str:
    """UTF-8 bytes (a leading BOM dropped) as checked text."""
    encoding = next((name for bom, name in _OTHER_BOMS if raw.startswith(bom)), None)
    if encoding is not None:
        raise InputError(f"{source} is {encoding} (it starts with a {encoding} byte-order mark): convert it to UTF-8")
    if b"\x00" in raw:
        raise InputError(f"{source} looks binary (it contains NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source} is not UTF-8 text (byte {exc.start})") from None
    return check_text(text, source)


def label_problem(label: str) -> str | None:
    """Why `label` cannot name a class, or None: blank (nothing but white space), or holding control characters,
    which a terminal obeys when the label is printed."""
    if not label.strip():
        return "is blank"
    if any(unicodedata.category(c) == "Cc" for c in label):
        return "holds control characters (which a terminal obeys)"
    return None
