"""The public API: a bundle + an engine + a policy → a `Result`.

    with Classifier() as clf:                       # the default bundle and its base model
        result = clf.classify(open("review.txt").read())
        print(result.label, result.scores)
        clf("Great film.")                          # [{"label": "positive", "score": 0.97}]
        for key, outcome in clf.classify_many(enumerate(texts)):   # many documents in one batch, as they finish
            ...                                     # outcome: a Result, or the Edge2DExitError of that text

    with Classifier() as clf, clf.stream() as stream:   # text as it arrives, in pieces of any size
        for piece in transcript:
            if (result := stream.feed(piece)) is not None:
                break                               # decided early
        else:
            result = stream.finish()

Texts are split and tokenized lazily, sentence by sentence, as the policy asks for them: a policy that decides
after three sentences never pays for splitting or tokenizing the rest.

The classifier never downloads: the base model comes from the bundle directory, a path, or the cache, where
`edge2dexit models pull` puts it.
"""

from __future__ import annotations

from . import native  # noqa: F401  (first: llama.cpp loaded before numpy, docs/llama-cpp.md §10)

import os
import threading
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

from .bundle import Bundle, load_bundle
from .cache import sha256_file
from .document import Document, Reading, Tokens
from .engine import Engine
from .errors import ContextOverflowError, Edge2DExitError, InputError
from .lifetime import Owner
from .models.registry import resolve_model
from .heads import margin
from .policies import Decision, Policy, PolicyStream, make_policy, policy_class
from .settings import EngineSettings
from .texts import check_characters, check_text
from .trust import prediction_set

DEFAULT_BUNDLE = Path(__file__).parent / "models" / "default"
LEXICAL_EXIT = -1  # the exit layer (and sentence) of an answer from the words alone


def base_model_path(bundle: Bundle, model: str | os.PathLike[str] | None = None, pull_missing: bool = False) -> Path:
    """The model file a bundle is read with: `model` if given, else the one shipped in the bundle, else its base
    model by registry name, from the cache (downloaded only with `pull_missing`; `edge2dexit models pull NAME`)."""
    return resolve_model(model or bundle.model_file or bundle.base.name, pull_missing=pull_missing)


@dataclass(frozen=True)
class Result:
    label: str
    scores: dict[str, float]
    policy: str
    exit_sentence: int  # 0-based index of the sentence whose evidence decided
    exit_layer: int  # 0-based layer of the head that decided
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

    @property
    def lexical(self) -> bool:
        """The words alone decided (the lexical exit, before any layer): exit_layer is LEXICAL_EXIT."""
        return self.exit_layer == LEXICAL_EXIT

    def as_pipeline(self) -> list[dict[str, Any]]:
        """`[{"label": …, "score": …}]`, best first, as common text-classification pipelines return."""
        return [{"label": k, "score": v} for k, v in sorted(self.scores.items(), key=lambda kv: -kv[1])]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    the context."""

    def __init__(self, classifier: "Classifier", text: str, capacity: int):
        self._pieces = classifier.bundle.splitter.sentences(text)
        self._tokenize = classifier.engine.tokenize
        self.room = _Room(capacity, classifier.truncate)
        self.ended = False  # the text (or its part that fits) has no sentence left

    def __iter__(self) -> Iterator[Tokens]:
        return self

    def __next__(self) -> Tokens:
        piece = None if self.ended else next(self._pieces, None)
        tokens = None if piece is None else self.room.take(self._tokenize(piece))
        if tokens is None:
            self.ended = True
            raise StopIteration
        return tokens

    def total(self) -> int | None:
        """Sentences in the text if reading reached its end, or if a peek shows no sentence is left; else None."""
        if self.ended or self.room.full or next(self._pieces, None) is None:
            return self.room.sentences
        return None


class Classifier(Owner):
    """Loads a bundle and its base model once; classifies any number of texts. Close it (or use `with`).

    One classification (or stream) runs at a time on one classifier; `classify_many` reads up to
    `settings.width` documents at once in shared decodes.

    Thread-safe: `classify`, `classify_many` (while it is iterated) and a stream (until it is closed) each hold the
    classifier's lock while they use its llama.cpp context, so threads sharing a classifier take turns and never mix
    their documents' KV cache. For parallel work give each thread a Classifier of its own, or use `classify_many`.
    Reading twice at once in one thread (a classify inside a classify_many loop) raises RuntimeError.

    `lexical`: let the bundle's lexical exit answer where the words alone decide (the default, where the bundle has
    one). `max_error`: abstain (`Result.abstained`) where the answer is not sure enough for the error among the
    answered documents to stay within it; `coverage`: give each result the prediction set that holds the true label
    that often (both as calibrated for the bundle's default policy: see trust.py).
    """

    def __init__(
        self,
        bundle: str | Path | Bundle | None = None,
        model: str | Path | None = None,
        policy: str | None = None,
        settings: EngineSettings = EngineSettings(),
        truncate: bool = False,
        lexical: bool = True,
        max_error: float | None = None,
        coverage: float | None = None,
    ):
        super().__init__()
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle or DEFAULT_BUNDLE)
        self.policy_name = policy or self.bundle.default_policy
        self.lexical = lexical and self.bundle.lexical is not None
        trust = (self.bundle.trust_for(self.policy_name, self.lexical)
                 if max_error is not None or coverage is not None else None)
        self.abstain_below = trust.margin_for(max_error) if max_error is not None else None
        self.set_threshold = trust.threshold_for(coverage) if coverage is not None else None
        self.model_path = base_model_path(self.bundle, model)
        self.truncate = truncate
        self._lock = threading.Lock()
        self._reader: int | None = None  # the thread holding the lock
        self.closed = False
        self.engine = self._resources.enter_context(
            Engine.load(self.model_path, settings, prompt=self.bundle.task_prompt, lora=self.bundle.lora_file()))
        self.bundle.check_base(sha256_file(self.model_path), self.engine.architecture, self.engine.n_layer,
                               self.engine.n_embd)
        self._policies: dict[tuple[str, bool], Policy] = {}  # built once each: policies keep no document state
        self.policy = self._policy(self.policy_name, self.lexical)

    def make_policy(self, name: str, behind_words: bool) -> Policy:
        """Policy `name` with its parameters calibrated behind the lexical exit or for reading without it; the
        default one reads on below the abstention margin."""
        params = self.bundle.policy_params(name, behind_words)
        floor = policy_class(name).margin_floor
        if name == self.policy_name and self.abstain_below is not None and floor is not None:
            params = {**params, floor: self.abstain_below}
        return make_policy(name, self.bundle.heads, self.engine.n_layer, params)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.bundle.labels)

    def classify(self, text: str, policy: str | None = None, lexical: bool | None = None) -> Result:
        """Classify one text; `lexical` (default: the classifier's) lets the words alone answer where they decide."""
        name, words = policy or self.policy_name, self._asks_words(lexical)
        started = time.perf_counter()
        if words and (decision := self._lexical_decision(text, name)) is not None:
            return self._result(name, decision, None, None, started, False)
        with self._engine_turn():
            doc = self.engine.document()
            return self.engine.run(self._reading(text, name, words, started)(doc))

    def classify_many(
        self, texts: Iterable[str] | Iterable[tuple[Hashable, str]], policy: str | None = None,
        lexical: bool | None = None,
    ) -> Iterator[tuple[Hashable, Result | Edge2DExitError]]:
        """Classify many texts with up to `settings.width` of them in flight in shared llama.cpp decodes,
        yielding (key, Result) as each finishes — not in input order — or (key, error) for a text that could not
        be classified (empty, too long, not a string: NaN or None from a table...): the others go on. Plain
        strings, and anything that is not a (key, text) pair, are keyed by their index. A text the words alone
        decide never takes a place among those in flight."""
        name, words = policy or self.policy_name, self._asks_words(lexical)
        self._policy(name, words)  # a bad policy name fails here, once, not once per text
        answered: deque[tuple[Hashable, Result]] = deque()  # by the words alone, waiting for the next yield

        def jobs() -> Iterator[tuple[Hashable, Callable[[Document], Reading[Result]]]]:
            for key, text in _keyed(texts):
                started = time.perf_counter()
                if words and (decision := self._lexical_decision(text, name)) is not None:
                    answered.append((key, self._result(name, decision, None, None, started, False)))
                else:
                    yield key, self._reading(text, name, words, started)

        with self._engine_turn():
            for done in self.engine.run_many(jobs()):
                yield from _drain(answered)
                if done.error is not None and not isinstance(done.error, Edge2DExitError):
                    raise done.error
                yield done.key, done.result if done.error is None else done.error
            yield from _drain(answered)

    def __call__(self, texts: str | Sequence[str]) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        if isinstance(texts, str):
            return self.classify(texts).as_pipeline()
        return [self.classify(t).as_pipeline() for t in texts]

    def stream(self, policy: str | None = None) -> "Stream":
        """Feed text piece by piece; see `Stream`. Only one stream or classification runs at a time."""
        name = policy or self.policy_name
        return Stream(self, name, self._policy(name, self.lexical))

    # For a caller that drives the engine itself: one thread that owns this classifier does all of its reading
    # (`Engine.run_many`, `Engine.run`), as the HTTP service's engine thread does. These take no turn (see
    # `_engine_turn`): nothing else may read with this classifier meanwhile.

    def job(self, text: str, policy: str | None = None, lexical: bool | None = None,
            started: float | None = None) -> Callable[[Document], Reading[Result]]:
        """The classification of `text` as a job for `Engine.run_many` (or `Engine.run` on one document): it reads
        on the document it is given and ends with the Result, or raises the text's Edge2DExitError. Where the
        words alone decide it reads nothing."""
        name, words = policy or self.policy_name, self._asks_words(lexical)
        started = time.perf_counter() if started is None else started
        read = self._reading(text, name, words, started)

        def reading(doc: Document) -> Reading[Result]:
            if words and (decision := self._lexical_decision(text, name)) is not None:
                return self._result(name, decision, None, None, started, False)
            return (yield from read(doc))

        return reading

    def _reading(self, text: str, name: str, behind_words: bool,
                 started: float) -> Callable[[Document], Reading[Result]]:
        """The LLM's reading of `text` with policy `name` (its parameters for behind the words, or without)."""

        def reading(doc: Document) -> Reading[Result]:
            sentences = _Sentences(self, check_text(text), doc.room)
            decision = yield from self._policy(name, behind_words).read(doc, sentences)
            return self._result(name, decision, doc, sentences.total(), started, sentences.room.full)

        return reading

    def stream_on(self, seq: int, policy: str | None = None) -> "Stream":
        """A stream (see `Stream`) on sequence `seq` of the engine, which the caller keeps apart from every other
        document it reads."""
        name = policy or self.policy_name
        return Stream(self, name, self._policy(name, self.lexical), seq)

    @contextmanager
    def _engine_turn(self) -> Iterator[None]:
        """Hold the engine for one reader; other threads wait. The same thread cannot wait for itself: its second
        reading would take the first one's sequence."""
        if self._reader == threading.get_ident():
            raise RuntimeError("this thread is already reading with this classifier (in classify_many or an open "
                               "stream): finish or close that first, or use a second Classifier")
        with self._lock:
            if self.closed:
                raise RuntimeError("this classifier is closed")
            self._reader = threading.get_ident()
            try:
                yield
            finally:
                self._reader = None

    def _policy(self, name: str, behind_words: bool) -> Policy:
        """Policy `name` at its parameters behind the words or without them, built the first time it is asked for
        (not once per text)."""
        if (name, behind_words) not in self._policies:
            self._policies[name, behind_words] = self.make_policy(name, behind_words)
        return self._policies[name, behind_words]

    def _asks_words(self, lexical: bool | None) -> bool:
        """Whether the lexical exit is asked first: `lexical` (default: the classifier's), where the bundle has one.
        Abstention and prediction sets calibrated behind the words promise nothing for a reading without them."""
        words = self.lexical if lexical is None else lexical and self.bundle.lexical is not None
        if self.lexical and not words and (self.abstain_below is not None or self.set_threshold is not None):
            self.bundle.trust_for(self.policy_name, behind_words=False)  # raises where they were calibrated so
        return words

    def _lexical_decision(self, text: str, name: str) -> Decision | None:
        """The words' answer, where the bundle has a threshold for policy `name` and the text's top lexical
        probability reaches it; else None (a text that is not one is left to the reading, which refuses it)."""
        threshold = self.bundle.lexical_threshold(name)
        if threshold is None:
            return None
        try:
            p = self.bundle.lexical.proba(check_text(text))
        except Edge2DExitError:
            return None
        top = float(p.max())
        if top < threshold:
            return None
        gap = min(top - threshold, float(margin(p)))
        return Decision(p, LEXICAL_EXIT, LEXICAL_EXIT, 0, fired=True, boundary_gap=gap)

    def _result(
        self, name: str, decision: Decision, doc: Document | None, total: int | None, started: float, truncated: bool
    ) -> Result:
        """The Result of `decision` on `doc` (None: nothing was read, the words alone decided)."""
        labels, p = self.bundle.labels, decision.probabilities
        gap, abstained, kept = decision.boundary_gap, False, None
        if name == self.policy_name and self.abstain_below is not None:
            confidence = float(margin(p))
            abstained = confidence < self.abstain_below
            gap = min(gap, abs(confidence - self.abstain_below))
        if name == self.policy_name and self.set_threshold is not None:
            kept = [labels[i] for i in prediction_set(p, self.set_threshold)]
        return Result(
            label=labels[decision.label_index],
            scores={label: float(x) for label, x in zip(labels, p)},
            policy=name,
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
        )

    def close(self) -> None:
        """Free llama.cpp's model and context, once a reading in another thread has ended (this thread's own open
        stream ends here)."""
        with nullcontext() if self._reader == threading.get_ident() else self._lock:
            self.closed = True
            super().close()


def _drain(queue: deque) -> Iterator:
    while queue:
        yield queue.popleft()


def _keyed(texts: Iterable[Any]) -> Iterator[tuple[Hashable, Any]]:
    """(key, text) for every item: a (key, text) pair as it is, anything else keyed by its index (a text that is
    not a string is refused when its reading starts, as one error of its own)."""
    for i, item in enumerate(texts):
        yield item if isinstance(item, tuple) and len(item) == 2 else (i, item)


class Stream(Owner):
    """Text as it arrives (a live chat, a transcript, typing): `feed` takes a piece of any size and returns a
    Result as soon as the policy is confident, else None; `finish` decides on what was read.

    A sentence is read only once it is complete (`sentences.Pieces`): however the text is cut into pieces, the
    stream reads the sentences the whole text has, and decides at the same sentence as `classify` (its scores may
    differ in the last digits where decodes are grouped otherwise, docs/llama-cpp.md §5). The last sentence is
    read at `finish`. The complete sentences of one piece share decodes as a whole text's do, but a stream never
    waits for text that has not arrived (docs/llama-cpp.md §9). `prefix-mean` and `sentence-vote` decide while
    reading; `paper2d` needs the sentence count up front (its Δ = L/m), so like `full` and `layer` it decides at
    `finish`. An open stream holds its classifier (see `Classifier`); closing it (or leaving `with`) frees its
    document's sequence and the classifier. A stream made with `Classifier.stream_on(seq)` reads on that sequence
    and holds no turn: its caller runs it on the one thread that reads with the classifier.

    The lexical exit is calibrated on whole texts, where a prefix that looks decisive is not covered: a stream asks
    the words only at `finish`, of the whole text, before the policy's own last decision (a stream that decided early
    kept the policy's answer)."""

    def __init__(self, classifier: Classifier, name: str, policy: Policy, seq: int | None = None):
        super().__init__()
        self.classifier, self.name = classifier, name
        if seq is None:
            self._resources.enter_context(classifier._engine_turn())
        self.doc = classifier.engine.document(seq or 1)
        self._resources.callback(self._forget)  # before the turn is given back
        self._policy_stream: PolicyStream = policy.stream(self.doc)
        self._pieces = classifier.bundle.splitter.pieces()
        self._room = _Room(self.doc.capacity, classifier.truncate)
        self._text: list[str] = []  # every piece fed, for the lexical exit at finish
        self._started = time.perf_counter()
        self.result: Result | None = None

    def feed(self, text: str) -> Result | None:
        if self.result is None:
            check_characters(text, "the streamed text")
            self._text.append(text)
            self._read(self._pieces.feed(text))
        return self.result

    def finish(self) -> Result:
        if self.result is None and self.classifier.lexical and (
                words := self.classifier._lexical_decision("".join(self._text), self.name)) is not None:
            self._decided(words, total=None)
        if self.result is None:
            self._read(self._pieces.close())
        if self.result is None:
            if self._room.sentences == 0:
                raise InputError("the stream ended before any sentence arrived")
            decision = self.classifier.engine.run(self._policy_stream.finish())
            self._decided(decision, total=self._room.sentences)
        return self.result

    def _read(self, sentences: list[str]) -> None:
        """Give the policy these complete sentences, as far as they fit; decide if it is confident."""
        engine = self.classifier.engine
        for i, sentence in enumerate(sentences):
            tokens = self._room.take(engine.tokenize(sentence))
            if tokens is None:
                return
            decision = engine.run(self._policy_stream.feed(tokens, more=i + 1 < len(sentences)))
            if decision is not None:
                self._decided(decision, total=None)
                return

    def _decided(self, decision: Decision, total: int | None) -> None:
        self.result = self.classifier._result(self.name, decision, self.doc, total, self._started, self._room.full)

    def _forget(self) -> None:
        """Forget what the stream read (the next document on this sequence would do it anyway)."""
        if not self.classifier.closed:
            self.classifier.engine.release(self.doc)
