"""Text → sentences, lazily, and the rule by which a sentence becomes the text that is tokenized.

Splitting is lazy: `Splitter.sentences(text)` yields sentences as far as the reader pulls them, so a document
that exits after two sentences never pays for splitting the rest (pysbd costs ~2 ms per 1,000 characters here,
docs/llama-cpp.md §7). pysbd runs over windows of `WINDOW` characters: every sentence of a window but the last
is final, and the next window starts where that last (possibly cut) sentence starts; a window holding less than
two sentences is widened. The result depends only on the text, never on how far it is read, so training and
inference see the same sentences, and the work stays linear in the text's length.

The token rule (training and inference both go through `Engine.tokenize`): the task prompt is tokenized once with
the model's BOS; every sentence is tokenized on its own as `token_text(sentence)` = ``" " + sentence``, without BOS
and without parsing special tokens. A document is the prompt followed by its sentences in order. Tokenizing sentence
by sentence is what lets the runtime feed one sentence per decode and know which positions belong to which sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

from .errors import InputError

SPLITTERS = ("pysbd", "regex")
WINDOW = 1000  # characters pysbd reads at a time

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) followed by white space,
# or at a line break. Crude on abbreviations; ~300× faster than pysbd.
_REGEX_BOUNDARY = re.compile(r"(?<=[.!?][\"'”’)\]])\s+|(?<=[.!?])\s+|\s*\n\s*")
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_LINE_END = re.compile(r"\r\n?")


def token_text(sentence: str) -> str:
    """What is tokenized for a sentence (see the token rule above)."""
    return " " + sentence


@dataclass(frozen=True)
class Splitter:
    """Splits text into sentences. `kind` is "pysbd" (accurate) or "regex" (fast, crude on abbreviations)."""

    kind: str = "pysbd"
    language: str = "en"

    def __post_init__(self) -> None:
        if self.kind not in SPLITTERS:
            raise InputError(f"unknown sentence splitter {self.kind!r}; choose one of {', '.join(SPLITTERS)}")

    @cached_property
    def _pysbd(self):
        import pysbd

        try:
            return pysbd.Segmenter(language=self.language, clean=False)
        except ValueError as exc:  # pysbd raises ValueError for languages it does not know
            raise InputError(f"pysbd has no sentence rules for language {self.language!r}") from exc

    def sentences(self, text: str) -> Iterator[str]:
        """The sentences of `text`, stripped, empty ones dropped, as far as they are pulled. HTML line breaks
        count as white space; CR and CRLF as line ends."""
        text = _LINE_END.sub("\n", _HTML_BREAK.sub(" ", text))
        pieces = self._pysbd_pieces(text) if self.kind == "pysbd" else _regex_pieces(text)
        return (s for s in (p.strip() for p in pieces) if s)

    def split(self, text: str) -> list[str]:
        """Every sentence of `text`."""
        return list(self.sentences(text))

    def _pysbd_pieces(self, text: str) -> Iterator[str]:
        start, window = 0, WINDOW
        while start < len(text):
            end = min(len(text), start + window)
            pieces = self._pysbd.segment(text[start:end])  # contiguous: they add up to the window (clean=False)
            if end == len(text):
                yield from pieces
                return
            if len(pieces) < 2:  # one sentence longer than the window: widen it (doubling keeps this linear)
                window *= 2
                continue
            yield from pieces[:-1]
            start += sum(map(len, pieces[:-1]))
            window = WINDOW


def _regex_pieces(text: str) -> Iterator[str]:
    start = 0
    for boundary in _REGEX_BOUNDARY.finditer(text):
        yield text[start : boundary.start()]
        start = boundary.end()
    yield text[start:]
