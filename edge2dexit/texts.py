"""The checks every text passes before it is read: bytes become text only if they are UTF-8 and not binary,
and an empty text is refused. One message per problem, naming the source."""

from __future__ import annotations

from .errors import InputError

_BOM = "\ufeff"


def check_text(text: str, source: str = "the text") -> str:
    """`text` unchanged, or InputError when it is empty or binary (NUL characters)."""
    if "\x00" in text:
        raise InputError(f"{source} looks binary (it contains NUL bytes), not text")
    if not text.strip():
        raise InputError(f"{source} is empty")
    return text


def decode_text(raw: bytes, source: str) -> str:
    """UTF-8 bytes (a leading BOM dropped) as checked text."""
    if b"\x00" in raw:
        raise InputError(f"{source} looks binary (it contains NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source} is not UTF-8 text (byte {exc.start})") from None
    return check_text(text.removeprefix(_BOM), source)
