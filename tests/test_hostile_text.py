"""Hostile text: whatever a user pastes, the text checks, the splitter and classify give a result or one clear
`Edge2DExitError`, never another exception, never a hang. Property-based (hypothesis) and explicit cases: empty,
blank, NUL bytes and binary, invalid UTF-8, lone surrogates, a BOM, HTML breaks only, a sentence longer than the
context, RTL, CJK without spaces, emoji and combining marks, CRLF and lone CR, 100,000 sentences, and the inputs that
made pysbd and the regex splitter backtrack for minutes. The `slow` soak runs ≥ 10,000 generated texts through the
splitters and ≥ 1,000 through classify and prints the counts."""

from __future__ import annotations

import math
import re
import time
from collections import Counter

import pysbd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge2dexit.errors import ContextOverflowError, Edge2DExitError, InputError
from edge2dexit.sentences import MAX_SENTENCE, SPLITTERS, Splitter, normalise
from edge2dexit.texts import check_text, decode_text

# Words of many scripts, joined by what separates sentences and lines in the wild: a strategy that, unlike plain
# st.text(), makes texts with many sentences, line ends of every kind and the characters pysbd treats specially.
WORDS = st.sampled_from([
    "Great", "film", "awful", "Mr.", "Dr.", "e.g.", "U.S.A.", "p.m.", "3.14", "[12]", "(see", "above)", "“quoted”",
    "'single'", "...", "?!", "!!!", "∯", "ȸ", "&ᓴ&", "مرحبا", "שלום", "\u200f", "这部电影非常好看", "。", "！",
    "日本語の文章です", "👍🏽", "👨‍👩‍👧", "e\u0301", "a\u0308\u0301", "\ufeff", "\u200b", "Ａ", "x" * 50, "\x00",
])
SEPARATORS = st.sampled_from([" ", "  ", ". ", "! ", "? ", "\n", "\r\n", "\r", "\n\n", "\t", "<br>", "<BR />", "",
                              "\u3000", "\xa0", "\u2028"])
SENTENCE_TEXTS = st.lists(st.tuples(WORDS, SEPARATORS), max_size=40).map(lambda ps: "".join(w + s for w, s in ps))
TEXTS = st.one_of(st.text(), SENTENCE_TEXTS)
# Python strings that are not Unicode text too: lone surrogates, which no tokenizer can encode.
ANY_STR = st.one_of(TEXTS, st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=200))


def visible(text: str) -> str:
    return "".join(c for c in text if not c.isspace())


# --- the splitter -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=SPLITTERS)
def splitter(request):
    return Splitter(request.param)


def check_split(splitter: Splitter, text: str) -> list[str]:
    """Every sentence is stripped and non-empty, and together they hold every visible character of the text once,
    in order: nothing dropped, nothing read twice."""
    sentences = splitter.split(text)
    assert all(s and s == s.strip() for s in sentences)
    assert visible("".join(sentences)) == visible(normalise(text))
    return sentences


@given(text=TEXTS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_splitter_keeps_every_character_once(splitter, text):
    check_split(splitter, text)


@pytest.mark.parametrize("text, expected", [
    ("", []),
    (" \n\t\r\n ", []),
    ("<br><BR/>", []),
    ("   Leading space. Then more.", ["Leading space.", "Then more."]),
    ("One.\r\nTwo.\rThree.\nFour.", ["One.", "Two.", "Three.", "Four."]),
    ("这部电影非常好看。我很喜欢。", ["这部电影非常好看。", "我很喜欢。"]),
])
def test_splitter_explicit_cases(text, expected):
    assert check_split(Splitter("pysbd"), text) == expected


def test_a_leading_blank_does_not_repeat_text():
    """pysbd's spans skip a text's leading white space; the windows used to add up span lengths and restart too
    early, reading a piece of a sentence twice ("e." here)."""
    text = "   " + "".join(f"Sentence number {i} is here. " for i in range(60))
    assert Splitter().split(text) == [f"Sentence number {i} is here." for i in range(60)]


@pytest.mark.parametrize("kind, text", [
    ("pysbd", "..[" + " ".join(["111"] * 30) + "]"),  # pySBD issue #79: exponential NUMBERED_REFERENCE_REGEX
    ("pysbd", "See it.[" + "1, 2 - 3 " * 2000 + " The end."),
    ("pysbd", "Mr. " * 50_000),  # one "sentence" for pysbd: its abbreviation pass is quadratic in what it reads
    ("pysbd", "(" * 100_000),
    ("pysbd", "x" * 300_000),
    ("pysbd", " " * 300_000 + "a"),
    ("regex", "a" + " " * 300_000 + "b"),  # `\s*\n` used to rescan the run of spaces from each of its positions
    ("regex", "a." + " \t" * 150_000),
])
def test_splitter_does_not_backtrack(kind, text):
    started = time.perf_counter()
    check_split(Splitter(kind), text)
    assert time.perf_counter() - started < 30  # seconds, on a loaded 2-core machine; minutes to days before


@pytest.mark.parametrize("text", [
    "Mr. " * 20_000,
    "a. " * 20_000,
    "x" * 50_000,
    "".join(f"Sentence {i} was fine. " for i in range(2_000)),
    "日本語の文章です" * 5_000,
])
def test_pysbd_reads_each_character_a_bounded_number_of_times(monkeypatch, text):
    """Linear work, counted rather than timed: pysbd sees each character at most about twice (windows widen by
    doubling), and never a window wider than MAX_SENTENCE."""
    windows = []
    segment = pysbd.Segmenter.segment
    monkeypatch.setattr(pysbd.Segmenter, "segment", lambda self, t: windows.append(len(t)) or segment(self, t))
    check_split(Splitter("pysbd"), text)
    assert max(windows) <= MAX_SENTENCE
    assert sum(windows) <= 2 * len(text) + 2 * MAX_SENTENCE


def test_a_sentence_longer_than_max_sentence_is_cut_at_white_space():
    words = ["word"] * 3_000  # 15,000 characters, no full stop
    sentences = Splitter("pysbd").split(" ".join(words))
    assert len(sentences) > 1 and all(len(s) <= MAX_SENTENCE for s in sentences)
    assert [w for s in sentences for w in s.split()] == words  # no word cut in two


def test_splitting_is_lazy_on_100000_sentences():
    text = "".join(f"Sentence {i} was fine. " for i in range(100_000))
    started = time.perf_counter()
    first = [s for s, _ in zip(Splitter().sentences(text), range(50))]
    assert first == [f"Sentence {i} was fine." for i in range(50)]
    assert time.perf_counter() - started < 5  # pysbd reads ~2 windows, not 2.5 MB


def test_an_unknown_language_is_refused_when_the_splitter_is_made():
    with pytest.raises(InputError, match="no sentence rules for language 'xx'"):
        Splitter("pysbd", "xx")


# --- the text checks ------------------------------------------------------------------------------------------


@given(raw=st.binary(max_size=400) | TEXTS.map(lambda t: t.encode("utf-8")))
@settings(max_examples=300, deadline=None)
def test_decode_text_gives_checked_text_or_input_error(raw):
    try:
        text = decode_text(raw, "x.txt")
    except InputError as exc:
        assert str(exc).startswith("x.txt ")
    else:
        assert "\x00" not in text and not text.startswith("\ufeff") and Splitter("regex").split(text)


@given(text=ANY_STR)
@settings(max_examples=300, deadline=None)
def test_check_text_passes_only_text_with_a_sentence(text):
    try:
        checked = check_text(text)
    except InputError:
        return
    checked.encode("utf-8")
    assert Splitter("regex").split(checked) and Splitter("pysbd").split(checked)


@pytest.mark.parametrize("raw, words", [
    (b"", "is empty"),
    (b" \n\t\r\n", "is empty"),
    (b"\xef\xbb\xbf", "is empty"),  # a BOM and nothing else
    (b"\xef\xbb\xbf \xef\xbb\xbf", "is empty"),
    (b"<br><br />\n", "is empty"),
    (b"Great\x00film", "looks binary"),
    (bytes(range(256)), "looks binary"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(1, 200)), "is not UTF-8 text (byte 0)"),
    (b"caf\xe9", "is not UTF-8 text (byte 3)"),
    (b"\xff\xfeG\x00", "is UTF-16 (it starts with a UTF-16 byte-order mark): convert it to UTF-8"),
    (b"\xfe\xff\x00G", "is UTF-16"),
    (b"\xff\xfe\x00\x00G\x00\x00\x00", "is UTF-32"),
    (b"G\x00r\x00", "looks binary"),  # UTF-16 without its mark
])
def test_decode_text_refusals(raw, words):
    with pytest.raises(InputError, match=re.escape(words)):
        decode_text(raw, "x.txt")


def test_check_text_refuses_lone_surrogates_and_drops_a_bom():
    with pytest.raises(InputError, match="lone surrogate at character 5"):
        check_text("Great\ud800 film")
    assert check_text("\ufeffGreat film.") == "Great film."
    assert decode_text(b"\xef\xbb\xbfGreat film.", "x.txt") == "Great film."


# --- classify -------------------------------------------------------------------------------------------------

N_CTX = 256


@pytest.fixture(scope="module")
def classifier():
    from edge2dexit import Classifier, EngineSettings

    with Classifier(settings=EngineSettings(n_ctx=N_CTX)) as clf:
        yield clf


def outcome(clf, text: str, policy: str | None = None):
    """A checked Result, or the Edge2DExitError it raised; any other exception fails the test."""
    try:
        result = clf.classify(text, policy)
    except Edge2DExitError as exc:
        return exc
    assert result.label in clf.labels
    assert math.isclose(sum(result.scores.values()), 1, abs_tol=1e-4)
    assert all(math.isfinite(p) and 0 <= p <= 1 for p in result.scores.values())
    assert result.tokens <= clf.engine.capacity
    assert result.sentences_read >= 1 or (result.lexical and result.token_layers == 0)  # read, or the words decided
    return result


@given(text=ANY_STR)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_classify_gives_a_result_or_one_clear_error(classifier, text):
    outcome(classifier, text)


@pytest.mark.parametrize("text, error", [
    ("", InputError),
    ("   \n\t ", InputError),
    ("<br><br/>", InputError),  # was a TypeError: no sentence reached the policy
    ("\ufeff", InputError),
    ("Great\x00film", InputError),
    ("Great\ud800film", InputError),  # was a UnicodeEncodeError from the tokenizer
    ("word " * 3_000, ContextOverflowError),  # one sentence longer than the context
])
def test_classify_refusals(classifier, text, error):
    assert type(outcome(classifier, text)) is error


@pytest.mark.parametrize("piece", ["Great\x00film. ", "Great\ud800film. "])
def test_a_stream_refuses_a_binary_or_broken_piece_and_accepts_an_empty_one(classifier, piece):
    with classifier.stream() as stream:
        assert stream.feed("") is None
        with pytest.raises(InputError):
            stream.feed(piece)


@pytest.mark.parametrize("text", [
    "\ufeffA wonderful film. I loved it.",
    "فيلم رائع. أحببت التمثيل كثيرا.",  # RTL
    "סרט נפלא. \u200fאהבתי אותו.",
    "这部电影非常好看我很喜欢演员的表演也很出色",  # CJK without spaces or punctuation
    "Gre\u0301at fi\u0308lm 👍🏽👨‍👩‍👧!!! Lo\u0336ved it \U0001f60d.",  # emoji, ZWJ sequences, combining marks
    "A wonderful film.\r\nI loved it.\r\n",  # CRLF
    "A wonderful film.\rI loved it.\r",  # lone CR
    "x",
])
def test_classify_odd_but_valid_text(classifier, text):
    result = outcome(classifier, text)
    assert not isinstance(result, Edge2DExitError), result


def test_classify_100000_sentences_reads_only_what_fits(classifier, monkeypatch):
    """Splitting and tokenizing stop where reading stops: without truncation the text is refused as soon as it
    overflows the context, with it only the sentences that fit are read."""
    monkeypatch.setattr(classifier.reader, "lexical", False)  # the words would answer without reading a sentence
    text = "".join(f"Sentence {i} was fine. " for i in range(100_000))
    tokenized = []
    tokenize = classifier.engine.tokenize
    monkeypatch.setattr(classifier.engine, "tokenize", lambda s: tokenized.append(s) or tokenize(s))
    started = time.perf_counter()
    assert isinstance(outcome(classifier, text, "full"), ContextOverflowError)
    monkeypatch.setattr(classifier.reader, "truncate", True)
    result = outcome(classifier, text, "full")
    assert result.truncated and result.sentences_read < 100
    assert len(tokenized) < 300  # sentences tokenized, both runs together
    assert time.perf_counter() - started < 60


# --- the soak ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_10000_texts_through_the_splitters_and_1000_through_classify(classifier):
    counts = Counter()

    @given(text=TEXTS)
    @settings(max_examples=10_000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def split(text):
        for kind in SPLITTERS:
            counts[f"split {kind}"] += 1
            check_split(Splitter(kind), text)

    @given(text=ANY_STR)
    @settings(max_examples=1_000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def classify(text):
        result = outcome(classifier, text)
        counts["classify"] += 1
        counts[f"classify: {type(result).__name__}"] += 1

    split()
    classify()
    print("\nsoak:", dict(counts))
    assert min(counts["split pysbd"], counts["split regex"]) >= 10_000 and counts["classify"] >= 1_000
