"""The checks every text passes before it is read: bytes become text only if they are UTF-8 and not binary,
and an empty text is refused. One message per problem, naming the source."""

from __future__ import annotations

from .errors import InputError
from .sentences import normalise

_BOM = "\ufeff"


def check_text(text: str, source: str = "the text") -> str:
    """`text` without a leading BOM, or InputError when it is binary (NUL characters), not Unicode (lone
    surrogates, which no tokenizer can encode) or empty: nothing but white space, HTML line breaks and BOMs, so
    that every text that passes has at least one sentence."""
    check_characters(text, source)
    if not normalise(text).replace(_BOM, "").strip():
        raise InputError(f"{source} is empty")
    return text.removeprefix(_BOM)


def check_characters(text: str, source: str = "the text") -> None:
    """InputError when `text` is binary (NUL characters) or not Unicode (lone surrogates, which no tokenizer can
    encode); a piece of a stream may be empty, a whole text may not (`check_text`)."""
    if "\x00" in text:
        raise InputError(f"{source} looks binary (it contains NUL bytes), not text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{source} is not valid Unicode text (a lone surrogate at character {exc.start})") from None


def decode_text(raw: bytes, source: str) -> str:
    """UTF-8 bytes (a leading BOM dropped) as checked text."""
    if b"\x00" in raw:
        raise InputError(f"{source} looks binary (it contains NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source} is not UTF-8 text (byte {exc.start})") from None
    return check_text(text, source)
