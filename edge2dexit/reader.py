"""Reading texts with a bundle on an engine: how each text is answered (`Answering`), the readings `Engine.run_many`
runs (`Reader.job`), and text that arrives in pieces (`Stream`). A `Reader` takes no lock and holds no turn: whoever
uses one owns its engine's thread — a `Classifier` under its lock, or the service's engine thread.

Data flows one way: text → the lexical exit (calibrated words; they answer where they are sure enough for the
policy) → sentences, tokenized only as far as the policy reads → the policy over calibrated heads (behind the words,
their evidence weighed in) → a `Result` that says who answered, how sure, why (`Evidence`), and whether it is sure
enough (`--max-error`) and which labels remain (`--coverage`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Iterator

import numpy as np

from .bundle import Bundle
from .calibrated import Basis
from .document import Document, Reading, Tokens
from .engine import Engine
from .errors import ContextOverflowError, Edge2DExitError, InputError
from .heads import margin
from .lifetime import Owner
from .policies import Decision, Policy, make_policy, policy_class
from .texts import check_characters, check_text
from .trust import MarginTest, prediction_set

LEXICAL_EXIT = -1  # the exit layer (and sentence) of an answer from the words alone
WORDS, LLM, LLM_AND_WORDS = "words", "llm", "llm+words"  # who answered: Result.answered_by
N_NGRAMS = 5  # n-grams an explanation names


@dataclass(frozen=True)
class SentenceWeight:
    index: int  # 0-based sentence of the text
    text: str
    contribution: float  # to the log-odds of the label over the runner-up


@dataclass(frozen=True)
class Evidence:
    """Why the answer: its calibrated log-odds over the runner-up (`log_odds`), taken apart — each sentence the
    deciding head read, what the words added, and a constant — so that the parts add up to it (calibrated.py says
    how exact that is for each kind of head). `ngrams`: the n-grams that weighed most towards the label within the
    words' part, each with its share."""

    label: str
    against: str
    log_odds: float
    sentences: list[SentenceWeight]
    words: float
    ngrams: list[tuple[str, float]]
    constant: float

    def deciding(self, count: int = 3) -> list[SentenceWeight]:
        """The `count` sentences that pushed hardest towards the label, strongest first."""
        return sorted((s for s in self.sentences if s.contribution > 0), key=lambda s: -s.contribution)[:count]


@dataclass(frozen=True)
class Result:
    label: str
    scores: dict[str, float]  # calibrated probabilities: of the answers shown p, about p are right
    policy: str
    answered_by: str  # "words" (the lexical exit, nothing read), "llm" (the LLM alone), "llm+words" (both weighed)
    exit_sentence: int  # 0-based index of the sentence whose evidence decided (-1: the words)
    exit_layer: int  # 0-based layer of the head that decided (-1: the words)
    early: bool  # an exit rule fired before the whole text was read at full depth
    sentences_read: int
    sentences_total: int | None  # sentences in the text (after truncation); None: reading stopped before the end
    layers_run: int  # deepest pass computed
    operations: int  # (sentence, layer) cells computed, as the paper counts them
    token_layers: int  # tokens × layers llama.cpp really computed, re-decodes included
    tokens: int  # tokens of text read
    seconds: float  # wall time of the classification (splitting, tokenizing, reading, deciding)
    # How close the decision came to going another way: the smallest distance between a quantity the policy compared
    # and its threshold, a tie between the top two classes included (policies.py). A read whose numbers move by
    # less (batched with other documents, another backend) decides the same.
    boundary_gap: float
    truncated: bool = False  # the text did not fit the context and its tail was not read
    # With `max_error`: the answer's margin is below the abstention margin, so the classifier is unsure (the label
    # and scores are still its best guess). With `coverage`: the labels that cannot be ruled out, most probable first.
    abstained: bool = False
    prediction_set: list[str] | None = None
    words: dict[str, float] | None = None  # what the words thought (calibrated), where they were asked
    evidence: Evidence | None = None

    @property
    def lexical(self) -> bool:
        """The words alone decided (the lexical exit, before any layer)."""
        return self.answered_by == WORDS

    def as_pipeline(self) -> list[dict[str, Any]]:
        """`[{"label": …, "score": …}]`, best first, as common text-classification pipelines return."""
        return [{"label": k, "score": v} for k, v in sorted(self.scores.items(), key=lambda kv: -kv[1])]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Answering:
    """How a text is answered: with `policy`, behind the words (the lexical exit first, and their evidence weighed
    into the LLM's answer) or by the LLM alone; unsure below `abstention`'s margin; with prediction sets at
    `set_threshold`."""

    policy: str
    behind_words: bool
    abstention: MarginTest | None = None
    set_threshold: float | None = None
    truncate: bool = False  # a text longer than the context is read as far as it fits, instead of refused

    @property
    def floor(self) -> float:
        return 0.0 if self.abstention is None else self.abstention.margin


class _Room:
    """The tokens of text a document still has room for. Past it, a text is refused (ContextOverflowError) or, with
    `truncate`, ends there: a sentence that does not fit is left out, or, when not even the first fits, cut to
    the room (a prefix of a sentence's tokens is a valid token stream)."""

    def __init__(self, capacity: int, truncate: bool):
        self.capacity, self.truncate = capacity, truncate
        self.used = 0
        self.sentences = 0  # taken so far
        self.full = False  # a sentence was left out or cut: the text ends here

    def take(self, tokens: Tokens) -> Tokens | None:
        """`tokens` as they fit (cut if need be), or None when the text ends before them."""
        if self.full:
            return None
        if self.used + len(tokens) > self.capacity:
            if not self.truncate:
                raise ContextOverflowError.for_text(self.used + len(tokens), self.capacity)
            self.full = True
            if self.sentences:
                return None
            tokens = tokens[: self.capacity]
        self.used += len(tokens)
        self.sentences += 1
        return tokens


class _Sentences:
    """A text's sentences as token lists, split and tokenized only as far as they are pulled, within the room of
    the context; `texts` keeps the sentences taken, for the answer's evidence."""

    def __init__(self, reader: "Reader", text: str, capacity: int, truncate: bool):
        self._pieces = reader.bundle.splitter.sentences(text)
        self._tokenize = reader.engine.tokenize
        self.room = _Room(capacity, truncate)
        self.texts: list[str] = []
        self.ended = False  # the text (or its part that fits) has no sentence left

    def __iter__(self) -> Iterator[Tokens]:
        return self

    def __next__(self) -> Tokens:
        piece = None if self.ended else next(self._pieces, None)
        tokens = None if piece is None else self.room.take(self._tokenize(piece))
        if tokens is None:
            self.ended = True
            raise StopIteration
        self.texts.append(piece)
        return tokens

    def total(self) -> int | None:
        """Sentences in the text if reading reached its end, or if a peek shows no sentence is left; else None."""
        if self.ended or self.room.full or next(self._pieces, None) is None:
            return self.room.sentences
        return None


class Reader:
    """A bundle's texts read on `engine`: the readings (`job`) and streams (`stream_on`) of one thread that owns the
    engine. `policy`, `lexical`, `max_error` and `coverage` are the defaults of every `answering`."""

    def __init__(self, bundle: Bundle, engine: Engine, policy: str | None = None, lexical: bool = True,
                 truncate: bool = False, max_error: float | None = None, coverage: float | None = None):
        self.bundle, self.engine, self.truncate = bundle, engine, truncate
        self.heads = bundle.calibrated_heads
        self.policy_name = policy or bundle.default_policy
        self.lexical = lexical and bundle.lexical is not None
        self.max_error, self.coverage = max_error, coverage
        self._policies: dict[tuple[str, bool, float], Policy] = {}  # built once each: they keep no document state
        self.default = self.answering()  # a bad policy, or a promise the bundle cannot keep, fails here

    def answering(self, policy: str | None = None, lexical: bool | None = None, max_error: float | None = None,
                  coverage: float | None = None, truncate: bool | None = None) -> Answering:
        """How to answer with `policy`, behind the words or not (`lexical`), promising at most `max_error` and sets
        of `coverage`, truncating or not (each defaults to the reader's); SettingsError where the bundle cannot
        keep the promise."""
        name = policy or self.policy_name
        behind_words = (self.lexical if lexical is None else lexical and self.bundle.lexical is not None) \
            and not policy_class(name).reads_alone
        max_error = self.max_error if max_error is None else max_error
        coverage = self.coverage if coverage is None else coverage
        answering = Answering(name, behind_words, *self.bundle.promise(name, behind_words, max_error, coverage),
                              truncate=self.truncate if truncate is None else truncate)
        self.policy(answering)  # an unknown policy, or one the bundle cannot build, fails here
        return answering

    def policy(self, answering: Answering) -> Policy:
        """The policy of `answering`, at its parameters behind the words or alone; with abstention it reads on below
        the abstention margin."""
        key = (answering.policy, answering.behind_words, answering.floor)
        if key not in self._policies:
            params = self.bundle.policy_params(answering.policy, answering.behind_words)
            floor = policy_class(answering.policy).margin_floor
            if answering.floor and floor is not None:
                params = {**params, floor: answering.floor}
            self._policies[key] = make_policy(answering.policy, self.heads, self.engine.n_layer, params)
        return self._policies[key]

    def job(self, text: str, answering: Answering | None = None,
            started: float | None = None) -> Callable[[Document], Reading[Result]]:
        """The classification of `text` as a job for `Engine.run_many` (or `Engine.run` on one document): it reads
        on the document it is given and ends with the Result, or raises the text's Edge2DExitError. Where the
        words alone decide it reads nothing."""
        answering = answering or self.default
        started = time.perf_counter() if started is None else started

        def reading(doc: Document) -> Reading[Result]:
            words, answered = self.lexical_answer(text, answering, started)
            if answered is not None:
                return answered
            return (yield from self.llm_reading(text, answering, started, words)(doc))

        return reading

    def lexical_answer(self, text: str, answering: Answering,
                       started: float) -> tuple[np.ndarray | None, Result | None]:
        """Behind the words: their calibrated probabilities of `text`, and their Result where the top one reaches
        the policy's threshold (else None; a text that is not one is left to the reading, which refuses it)."""
        if not answering.behind_words:
            return None, None
        try:
            words = self.bundle.words(check_text(text))
        except Edge2DExitError:
            return None, None
        threshold = self.bundle.lexical_threshold(answering.policy)
        top = float(words.max())
        if threshold is None or top < threshold:
            return words, None
        decision = Decision(words, LEXICAL_EXIT, LEXICAL_EXIT, 0, fired=True,
                            boundary_gap=min(top - threshold, float(margin(words))))
        return words, self.result(answering, decision, None, started, text=text, words=words)

    def llm_reading(self, text: str, answering: Answering, started: float,
                    words: np.ndarray | None) -> Callable[[Document], Reading[Result]]:
        """The LLM's reading of `text` (behind the words: with their probabilities `words`)."""

        def reading(doc: Document) -> Reading[Result]:
            sentences = _Sentences(self, check_text(text), doc.room, answering.truncate)
            decision = yield from self.policy(answering).read(doc, sentences, words)
            return self.result(answering, decision, doc, started, total=sentences.total(),
                               truncated=sentences.room.full, sentences=sentences.texts, text=text, words=words)

        return reading

    def stream_on(self, seq: int, policy: str | None = None, max_error: float | None = None,
                  coverage: float | None = None, hold: ContextManager | None = None) -> "Stream":
        """A stream (see `Stream`) on sequence `seq` of the engine, which the caller keeps apart from every other
        document it reads; `hold` is entered for the stream's life (a Classifier's turn). A stream is read by the
        LLM alone (`Stream`)."""
        return Stream(self, seq, self.answering(policy, False, max_error, coverage), hold)

    def result(self, answering: Answering, decision: Decision, doc: Document | None, started: float,
               total: int | None = None, truncated: bool = False, sentences: list[str] = (),
               text: str | None = None, words: np.ndarray | None = None) -> Result:
        """The Result of `decision` on `doc` (None: nothing was read, the words alone decided)."""
        labels, p = self.bundle.labels, decision.probabilities
        gap, abstained, kept = decision.boundary_gap, False, None
        if answering.abstention is not None:
            confidence = float(margin(p))
            abstained = confidence < answering.abstention.margin
            gap = min(gap, abs(confidence - answering.abstention.margin))
        if answering.set_threshold is not None:
            kept = [labels[i] for i in prediction_set(p, answering.set_threshold)]
        weighed = decision.basis is not None and decision.basis.words is not None
        return Result(
            label=labels[decision.label_index],
            scores={label: float(x) for label, x in zip(labels, p)},
            policy=answering.policy,
            answered_by=WORDS if doc is None else LLM_AND_WORDS if weighed else LLM,
            exit_sentence=decision.exit_sentence,
            exit_layer=decision.exit_layer,
            early=decision.fired and (decision.sentences_read != total or decision.exit_layer < self.engine.n_layer - 1),
            sentences_read=decision.sentences_read,
            sentences_total=total,
            layers_run=max(doc.valid_depths + (0,)) if doc is not None else 0,
            operations=doc.operations if doc is not None else 0,
            token_layers=doc.token_layers if doc is not None else 0,
            tokens=doc.n_tokens if doc is not None else 0,
            seconds=time.perf_counter() - started,
            boundary_gap=gap,
            truncated=truncated,
            abstained=abstained,
            prediction_set=kept,
            words=None if words is None else {label: float(x) for label, x in zip(labels, words)},
            evidence=self._evidence(p, decision.basis, sentences, text),
        )

    def _evidence(self, p: np.ndarray, basis: Basis | None, sentences: list[str], text: str | None) -> Evidence:
        """The answer `p` taken apart: by the deciding head's `basis`, or (None) by the words alone."""
        labels = self.bundle.labels
        label, against = (int(i) for i in np.argsort(-p, kind="stable")[:2])
        log_odds = float(np.log(max(p[label], 1e-300)) - np.log(max(p[against], 1e-300)))
        if basis is None:  # the words answered: every part is theirs
            ngrams, constant = self._ngrams(text, label, against, 1.0)
            return Evidence(labels[label], labels[against], log_odds, [], log_odds - constant, ngrams, constant)
        parts = basis.explain(label, against)
        ngrams = self._ngrams(text, label, against, parts.words_weight)[0] if parts.words else []
        return Evidence(labels[label], labels[against], log_odds,
                        [SentenceWeight(i, sentences[i] if i < len(sentences) else "", c)
                         for i, c in parts.sentences.items()],
                        parts.words, ngrams, parts.constant)

    def _ngrams(self, text: str | None, label: int, against: int, weight: float) -> tuple[list, float]:
        """The words' top n-grams for `label` and their bias, in calibrated log-odds × `weight`."""
        if text is None or self.bundle.lexical is None:
            return [], 0.0
        beta = self.bundle.scales.words.beta * weight
        ngrams, bias = self.bundle.lexical.explain(text, label, against, N_NGRAMS)
        return [(ngram, beta * share) for ngram, share in ngrams], beta * bias


class Stream(Owner):
    """Text as it arrives (a live chat, a transcript, typing): `feed` takes a piece of any size and returns a
    Result as soon as the policy is confident, else None; `finish` decides on what was read.

    A sentence is read only once it is complete (`sentences.Pieces`): however the text is cut into pieces, the
    stream reads the sentences the whole text has. The last sentence is read at `finish`. The complete sentences of
    one piece share decodes as a whole text's do, but a stream never waits for text that has not arrived
    (docs/llama-cpp.md §9). `prefix-mean` and `sentence-vote` decide while reading; `paper2d` needs the sentence count
    up front (its Δ = L/m), so like `full` and `layer` it decides at `finish`.

    The LLM answers a stream alone, at the policy's parameters for reading without the words: the words see a text
    whole, and a stream's is not whole before its end. Where the reader asks the words, the Result of `finish` says
    what they thought of the whole text (`Result.words`) beside the LLM's answer; a stream that decided early was
    answered before the words could speak.

    A stream reads within the context: once a sentence does not fit, the text ends there and the stream decides at
    once on what it read (`Result.truncated`; later pieces change nothing). An open stream holds its engine's
    sequence, and whatever `hold` holds (a Classifier's turn); closing it (or leaving `with`) frees both."""

    def __init__(self, reader: Reader, seq: int, answering: Answering, hold: ContextManager | None = None):
        super().__init__()
        if hold is not None:
            self._resources.enter_context(hold)
        self.reader, self.answering = reader, answering
        self.doc = reader.engine.document(seq)
        self._resources.callback(self._forget)  # before the turn is given back
        self._policy_stream = reader.policy(answering).stream(self.doc)
        self._pieces = reader.bundle.splitter.pieces()
        self._room = _Room(self.doc.capacity, truncate=True)
        self._fed: list[str] = []  # every piece, for the words at finish
        self._sentences: list[str] = []  # every sentence taken, for the evidence
        self._started = time.perf_counter()
        self.result: Result | None = None

    def feed(self, text: str) -> Result | None:
        if self.result is None:
            check_characters(text, "the streamed text")
            self._fed.append(text)
            self._read(self._pieces.feed(text))
        return self.result

    def finish(self) -> Result:
        if self.result is None:
            self._read(self._pieces.close())
        if self.result is None:
            self._conclude()
        return self.result

    def _conclude(self) -> None:
        """The text ended (or filled the context): the policy decides on what was read, and the words, if asked,
        say what they think of it."""
        if self._room.sentences == 0:
            raise InputError("the stream ended before any sentence arrived")
        decision = self.reader.engine.run(self._policy_stream.finish())
        words = self.reader.bundle.words("".join(self._fed)) if self.reader.lexical else None
        self._decided(decision, total=self._room.sentences, words=words)

    def _read(self, sentences: list[str]) -> None:
        """Give the policy these complete sentences, as far as they fit; decide if it is confident, or at once on
        what fits when the context is full."""
        engine = self.reader.engine
        for i, sentence in enumerate(sentences):
            tokens = self._room.take(engine.tokenize(sentence))
            if tokens is None:
                self._conclude()
                return
            self._sentences.append(sentence)
            decision = engine.run(self._policy_stream.feed(tokens, more=i + 1 < len(sentences)))
            if decision is not None:
                self._decided(decision, total=None)
                return

    def _forget(self) -> None:
        """Forget what the stream read (the next document on this sequence would do it anyway)."""
        if not self.reader.engine.closed:
            self.reader.engine.release(self.doc)

    def _decided(self, decision: Decision, total: int | None, words: np.ndarray | None = None) -> None:
        self.result = self.reader.result(self.answering, decision, self.doc, self._started, total, self._room.full,
                                         self._sentences, "".join(self._fed), words)
