"""Text → sentences, lazily, and the rule by which a sentence becomes the text that is tokenized.

Splitting is lazy: `Splitter.sentences(text)` yields sentences as far as the reader pulls them, so a document
that exits after two sentences never pays for splitting the rest (pysbd costs ~15 ms per IMDB review of 1,200
characters here, docs/llama-cpp.md §7). The result depends only on the text, never on how far it is read, so
training and inference see the same sentences.

Text that arrives in pieces (a stream) goes through `Splitter.pieces()`: a sentence is handed out only once the
splitter knows it has ended — the next sentence has begun and holds a whole word, or the text is closed — so that
however the text is cut into pieces, the sentences are those of the whole text.

pysbd runs over windows of `WINDOW` characters, because its cost grows with the square of what it reads at once
(abbreviations, many short sentences: 4,000 characters of "Mr. " take 10× as long as 1,000). Every sentence of a
window but the last is final, and the next window starts where that last (possibly cut) sentence starts; a window
holding a single sentence is widened, up to `MAX_SENTENCE` characters, past which that sentence is cut after its
last white space (or, with none, at the limit). Pieces are cut where pysbd's spans say a sentence starts, so they
add up to the text but for white space: nothing is dropped or read twice, even where pysbd rewrites or drops a
sentence. The work stays linear in the text's length, and pysbd's one pattern known to backtrack exponentially is
replaced (`_NUMBERED_REFERENCE`).

The token rule (training and inference both go through `Engine.tokenize`): the task prompt is tokenized once with
the model's BOS; every sentence is tokenized on its own as `token_text(sentence)` = ``" " + sentence``, without BOS
and without parsing special tokens. A document is the prompt followed by its sentences in order. Tokenizing sentence
by sentence is what lets the runtime feed one sentence per decode and know which positions belong to which sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Iterator

from .errors import InputError

SPLITTERS = ("pysbd", "regex")
WINDOW = 1000  # characters pysbd reads at a time
MAX_SENTENCE = 4 * WINDOW  # characters; a longer sentence is cut (~1,000 tokens: half the default context)

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) followed by white space,
# or at a line break. Crude on abbreviations; ~300× faster than pysbd. (Leading white space of a line break is
# left to the strip of each piece: `\s*\n` would rescan every run of spaces from each of its positions.)
_REGEX_BOUNDARY = re.compile(r"(?<=[.!?][\"'”’)\]])\s+|(?<=[.!?])\s+|\n\s*")
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_LINE_END = re.compile(r"\r\n?")
_SPACE = re.compile(r"\s*")

# pysbd 0.3.4's NUMBERED_REFERENCE_REGEX ("cited.[12] The") repeats `(\d{1,3},?\s?-?\s?)*`: a run of digits splits
# into groups in exponentially many ways, so "..[111 111 111 111 111 111 111 111 111 111" never ends (pySBD
# issue #79). Here a number takes all its digits and a separator is `,? ?(- ?)?`, so each text matches one way; the
# groups pysbd substitutes (\2 and \7) keep their numbers.
_NUMBERED_REFERENCE = (r"(?<=[^\d\s])(\.|∯)((\[(\d{1,3}(?!\d),?\s?(?:-\s?)?)*\b\d{1,3}\])+|((\d{1,3}\s?)?\d{1,3}))"
                       r"(\s)(?=[A-Z])")


def token_text(sentence: str) -> str:
    """What is tokenized for a sentence (see the token rule above)."""
    return " " + sentence


def normalise(text: str) -> str:
    """The text the splitters read: HTML line breaks as white space, CR and CRLF as line ends."""
    return _LINE_END.sub("\n", _HTML_BREAK.sub(" ", text))


@dataclass(frozen=True)
class Splitter:
    """Splits text into sentences. `kind` is "pysbd" (accurate) or "regex" (fast, crude on abbreviations).
    A splitter holds no state between calls, so threads may share one."""

    kind: str = "pysbd"
    language: str = "en"

    def __post_init__(self) -> None:
        if self.kind not in SPLITTERS:
            raise InputError(f"unknown sentence splitter {self.kind!r}; choose one of {', '.join(SPLITTERS)}")
        if self.kind == "pysbd":
            _pysbd_rules(self.language)  # an unknown language fails here, not at the first text

    def sentences(self, text: str) -> Iterator[str]:
        """The sentences of `text`, stripped, empty ones dropped, as far as they are pulled. HTML line breaks
        count as white space; CR and CRLF as line ends."""
        text = normalise(text)
        return (sentence for _, sentence in self._sentences(text))

    def split(self, text: str) -> list[str]:
        """Every sentence of `text`."""
        return list(self.sentences(text))

    def pieces(self) -> "Pieces":
        """A splitter for text that arrives in pieces (see `Pieces`)."""
        return Pieces(self)

    def _sentences(self, text: str) -> Iterator[tuple[int, str]]:
        """(start, sentence) for each sentence of normalised `text`: where its piece starts, and the piece stripped."""
        cuts = self._pysbd_pieces(text) if self.kind == "pysbd" else _regex_pieces(text)
        for start, end in cuts:
            if sentence := text[start:end].strip():
                yield start, sentence

    def _pysbd_pieces(self, text: str) -> Iterator[tuple[int, int]]:
        import pysbd

        # A segmenter of its own: pysbd keeps the text it reads on the segmenter, so sharing one is not thread-safe.
        segmenter = pysbd.Segmenter(language=self.language, clean=False, char_span=True)
        segmenter.language_module = _pysbd_rules(self.language)
        start, window = 0, WINDOW
        while (start := _SPACE.match(text, start).end()) < len(text):  # white space between pieces is no sentence
            end = min(len(text), start + window)
            spans = segmenter.segment(text[start:end])
            cuts = sorted({start + span.start for span in spans if span.start > 0})  # where sentences 2, 3… start
            if end == len(text):
                cuts.append(end)  # the last window: its last sentence is final too
            elif not cuts:  # one sentence fills the window: widen it (doubling keeps this linear), or cut it
                if window < MAX_SENTENCE:
                    window *= 2
                    continue
                cuts = [_after_last_space(text, start, end)]
            for cut in cuts:
                yield start, cut
                start = cut
            window = WINDOW


@cache
def _pysbd_rules(language: str) -> type:
    """pysbd's rules for `language`, with the numbered-reference pattern that cannot backtrack (made once per
    language: a class is a reference cycle the garbage collector would collect for every splitter)."""
    from pysbd.languages import Language

    try:
        rules = Language.get_language_code(language)
    except ValueError:
        raise InputError(f"pysbd has no sentence rules for language {language!r}") from None
    return type(rules.__name__, (rules,), {"NUMBERED_REFERENCE_REGEX": _NUMBERED_REFERENCE})


def _after_last_space(text: str, start: int, end: int) -> int:
    """Where to cut text[start:end], which pysbd reads as one sentence: after its last white space, else at `end`."""
    for i in range(end - 1, start, -1):
        if text[i].isspace():
            return i + 1
    return end


def _regex_pieces(text: str) -> Iterator[tuple[int, int]]:
    start = 0
    for boundary in _REGEX_BOUNDARY.finditer(text):
        yield start, boundary.start()
        start = boundary.end()
    yield start, len(text)


# The end of a raw piece that the next piece may change the normalised meaning of: a CR (CRLF is one line end) or
# the start of an HTML line break.
_OPEN_END = re.compile(r"(?:\r|<(?:b(?:r\s*/?)?)?)?\Z", re.IGNORECASE)
_WHOLE_WORD = re.compile(r"\S\s")


class Pieces:
    """The sentences of a text fed piece by piece. `feed` returns the sentences known to be complete: every one
    but the last sentence begun, and that one's predecessor only once the last holds a whole word (the splitters
    decide where a sentence ends by what starts the next: "U.S. A" may end a sentence where "U.S. Army" does not).
    `close` returns the rest. Fed in any pieces, a text gives the sentences `Splitter.sentences` gives it whole."""

    def __init__(self, splitter: Splitter):
        self.splitter = splitter
        self._open = ""  # normalised text from the first sentence not yet handed out
        self._raw = ""  # a raw tail held back until what follows it is known (see _OPEN_END)

    def feed(self, piece: str) -> list[str]:
        raw = self._raw + piece
        cut = _OPEN_END.search(raw).start()
        self._raw = raw[cut:]
        self._open += normalise(raw[:cut])
        found = list(self.splitter._sentences(self._open))
        done = len(found) - 1 if found and _WHOLE_WORD.search(found[-1][1] + self._open[-1:]) else len(found) - 2
        if done <= 0:
            return []
        self._open = self._open[found[done][0]:]
        return [sentence for _, sentence in found[:done]]

    def close(self) -> list[str]:
        """Every sentence not handed out yet; the text has ended."""
        text, self._open, self._raw = self._open + normalise(self._raw), "", ""
        return [sentence for _, sentence in self.splitter._sentences(text)]
