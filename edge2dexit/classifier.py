"""The public API: a bundle + an engine + a policy → a `Result`.

    with Classifier() as clf:                       # the default bundle and its base model
        result = clf.classify(open("review.txt").read())
        print(result.label, result.scores)
        clf("Great film.")                          # [{"label": "positive", "score": 0.97}]
        for key, outcome in clf.classify_many(enumerate(texts)):   # many documents in one batch, as they finish
            ...                                     # outcome: a Result, or the Edge2DExitError of that text

    with Classifier() as clf, clf.stream() as stream:   # sentences as they arrive
        for piece in transcript:
            if (result := stream.feed(piece)) is not None:
                break                               # decided early
        else:
            result = stream.finish()

Texts are split and tokenized lazily, sentence by sentence, as the policy asks for them: a policy that decides
after three sentences never pays for splitting or tokenizing the rest.
"""

from __future__ import annotations

import threading
import os
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Sequence

from .bundle import Bundle, load_bundle
from .cache import sha256_file
from .document import Document, Reading
from .engine import Engine, EngineSettings
from .errors import ContextOverflowError, Edge2DExitError, InputError
from .models.registry import resolve_model
from .policies import Decision, Policy, PolicyStream, make_policy
from .texts import check_characters, check_text

DEFAULT_BUNDLE = Path(__file__).parent / "models" / "default"


def base_model_path(bundle: Bundle, model: str | os.PathLike[str] | None = None) -> Path:
    """The model file a bundle is read with: `model` if given, else the one shipped in the bundle, else its base
    model by registry name (pulled into the cache if missing)."""
    return resolve_model(model or bundle.model_file or bundle.base.name)


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
    truncated: bool = False  # the text did not fit the context and its tail was not read

    def as_pipeline(self) -> list[dict[str, Any]]:
        """`[{"label": …, "score": …}]`, best first, as common text-classification pipelines return."""
        return [{"label": k, "score": v} for k, v in sorted(self.scores.items(), key=lambda kv: -kv[1])]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Sentences:
    """A text's sentences as token lists, split and tokenized only as far as they are pulled, within the room of
    the context: past it, either the text is refused (ContextOverflowError) or, with `truncate`, it ends there."""

    def __init__(self, classifier: "Classifier", text: str, room: int):
        self._pieces = classifier.bundle.splitter.sentences(text)
        self._tokenize = classifier.engine.tokenize
        self._truncate, self._room = classifier.truncate, room
        self.pulled = 0  # sentences handed out
        self.used = 0  # their tokens
        self.truncated = False
        self.ended = False  # the text (or its part that fits) has no sentence left

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if self.ended:
            raise StopIteration
        piece = next(self._pieces, None)
        if piece is None:
            self.ended = True
            raise StopIteration
        tokens = self._tokenize(piece)
        if self.used + len(tokens) > self._room:
            if not self._truncate or self.pulled == 0:
                raise ContextOverflowError.for_text(self.used + len(tokens), self._room)
            self.truncated = self.ended = True
            raise StopIteration
        self.pulled += 1
        self.used += len(tokens)
        return tokens

    def total(self) -> int | None:
        """Sentences in the text if reading reached its end, or if a peek shows no sentence is left; else None."""
        if self.ended or next(self._pieces, None) is None:
            return self.pulled
        return None


class Classifier:
    """Loads a bundle and its base model once; classifies any number of texts. Close it (or use `with`).

    One classification (or stream) runs at a time on one classifier; `classify_many` reads up to
    `settings.width` documents at once in shared decodes.

    Thread-safe: `classify`, `classify_many` (while it is iterated) and a stream (until it is closed) each hold the
    classifier's lock while they use its llama.cpp context, so threads sharing a classifier take turns and never mix
    their documents' KV cache. For parallel work give each thread a Classifier of its own, or use `classify_many`.
    Reading twice at once in one thread (a classify inside a classify_many loop) raises RuntimeError.
    """

    def __init__(
        self,
        bundle: str | Path | Bundle | None = None,
        model: str | Path | None = None,
        policy: str | None = None,
        settings: EngineSettings = EngineSettings(),
        truncate: bool = False,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle or DEFAULT_BUNDLE)
        self.model_path = base_model_path(self.bundle, model)
        self.truncate = truncate
        self._lock = threading.Lock()
        self._reader: int | None = None  # the thread holding the lock
        self.closed = False
        self.engine = Engine.load(self.model_path, settings, prompt=self.bundle.task_prompt,
                                  lora=self.bundle.lora_file())
        try:
            self.bundle.check_base(
                sha256_file(self.model_path), self.engine.architecture, self.engine.n_layer, self.engine.n_embd
            )
            self.policy_name = policy or self.bundle.default_policy
            self.policy = self.make_policy(self.policy_name)
        except BaseException:
            self.engine.close()
            raise

    def make_policy(self, name: str) -> Policy:
        return make_policy(name, self.bundle.heads, self.engine.n_layer, self.bundle.policy_params(name))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.bundle.labels)

    def classify(self, text: str, policy: str | None = None) -> Result:
        name = policy or self.policy_name
        with self._engine_turn():
            started = time.perf_counter()
            doc = self.engine.document()
            return self._finish(self.engine.run(self._reading(doc, text, name)), name, doc, started)

    def classify_many(
        self, texts: Iterable[str] | Iterable[tuple[Hashable, str]], policy: str | None = None
    ) -> Iterator[tuple[Hashable, Result | Edge2DExitError]]:
        """Classify many texts with up to `settings.width` of them in flight in shared llama.cpp decodes,
        yielding (key, Result) as each finishes — not in input order — or (key, error) for a text that could not
        be classified (empty, too long, ...): the others go on. Plain strings are keyed by their index."""
        name = policy or self.policy_name
        self._policy(name)  # a bad policy name fails here, once, not once per text
        jobs = ((key, self._job(text, name)) for key, text in _keyed(texts))
        with self._engine_turn():
            for done in self.engine.run_many(jobs):
                if done.error is not None:
                    if not isinstance(done.error, Edge2DExitError):
                        raise done.error
                    yield done.key, done.error
                else:
                    outcome, started = done.result
                    yield done.key, self._finish(outcome, name, done.doc, started)

    def __call__(self, texts: str | Sequence[str]) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        if isinstance(texts, str):
            return self.classify(texts).as_pipeline()
        return [self.classify(t).as_pipeline() for t in texts]

    def stream(self, policy: str | None = None) -> "Stream":
        """Feed text piece by piece; see `Stream`. Only one stream or classification runs at a time."""
        name = policy or self.policy_name
        return Stream(self, name, self._policy(name))

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

    def _policy(self, name: str) -> Policy:
        """The bundle's default policy is built once; others when asked for."""
        return self.policy if name == self.policy_name else self.make_policy(name)

    def _job(self, text: str, name: str):
        started = time.perf_counter()

        def reading(doc: Document) -> Reading[tuple[tuple[Decision, _Sentences], float]]:
            return (yield from self._reading(doc, text, name)), started

        return reading

    def _reading(self, doc: Document, text: str, name: str) -> Reading[tuple[Decision, _Sentences]]:
        sentences = _Sentences(self, check_text(text), doc.room)
        decision = yield from self._policy(name).read(doc, sentences)
        return decision, sentences

    def _finish(self, outcome: tuple[Decision, _Sentences], name: str, doc: Document, started: float) -> Result:
        decision, sentences = outcome
        return self._result(name, decision, doc, sentences.total(), started, sentences.truncated)

    def _result(
        self, name: str, decision: Decision, doc: Document, total: int | None, started: float, truncated: bool
    ) -> Result:
        scores = {label: float(p) for label, p in zip(self.bundle.labels, decision.probabilities)}
        return Result(
            label=self.bundle.labels[decision.label_index],
            scores=scores,
            policy=name,
            exit_sentence=decision.exit_sentence,
            exit_layer=decision.exit_layer,
            early=decision.fired and (decision.sentences_read != total or decision.exit_layer < self.engine.n_layer - 1),
            sentences_read=decision.sentences_read,
            sentences_total=total,
            layers_run=max(doc.valid_depths + (0,)),
            operations=doc.operations,
            token_layers=doc.token_layers,
            tokens=doc.n_tokens,
            seconds=time.perf_counter() - started,
            truncated=truncated,
        )

    def close(self) -> None:
        """Free llama.cpp's model and context, once a reading in another thread has ended (this thread's own open
        stream ends here)."""
        with nullcontext() if self._reader == threading.get_ident() else self._lock:
            self.closed = True
            self.engine.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _keyed(texts: Iterable[str] | Iterable[tuple[Hashable, str]]) -> Iterator[tuple[Hashable, str]]:
    for i, item in enumerate(texts):
        yield (i, item) if isinstance(item, str) else item


class Stream:
    """Text as it arrives (a live chat, a transcript): `feed` returns a Result as soon as the policy is confident,
    else None; `finish` decides on what was read. `prefix-mean` and `sentence-vote` decide while reading; `paper2d`
    needs the sentence count up front (its Δ = L/m), so like `full` and `layer` it decides at `finish`. Each piece
    fed is split into sentences first, and its sentences share decodes as a whole text's do (never waiting for the
    next piece: docs/llama-cpp.md §9). An open stream holds its classifier (see `Classifier`); closing it (or
    leaving `with`) frees its document's sequence and the classifier."""

    def __init__(self, classifier: Classifier, name: str, policy: Policy):
        self.classifier, self.name = classifier, name
        self._turn = ExitStack()
        self._turn.enter_context(classifier._engine_turn())
        try:
            self.doc = classifier.engine.document()
            self._policy_stream: PolicyStream = policy.stream(self.doc)
        except BaseException:
            self._turn.close()
            raise
        self._fed = 0
        self._started = time.perf_counter()
        self.truncated = False
        self.result: Result | None = None

    def feed(self, text: str) -> Result | None:
        if self.result is not None:
            return self.result
        clf = self.classifier
        check_characters(text, "the streamed text")
        sentences = list(clf.bundle.splitter.sentences(text))
        for i, sentence in enumerate(sentences):
            tokens = clf.engine.tokenize(sentence)
            if self.truncated or self._fed + len(tokens) > self.doc.capacity:
                if not clf.truncate:
                    raise ContextOverflowError.for_text(self._fed + len(tokens), self.doc.capacity)
                self.truncated = True
                return None
            self._fed += len(tokens)
            decision = clf.engine.run(self._policy_stream.feed(tokens, more=i + 1 < len(sentences)))
            if decision is not None:
                self.result = clf._result(self.name, decision, self.doc, None, self._started, False)
                return self.result
        return None

    def finish(self) -> Result:
        if self.result is None:
            if self._fed == 0:
                raise InputError("the stream ended before any sentence arrived")
            decision = self.classifier.engine.run(self._policy_stream.finish())
            n = decision.sentences_read
            self.result = self.classifier._result(self.name, decision, self.doc, n, self._started, self.truncated)
        return self.result

    def close(self) -> None:
        """Forget what the stream read (the next document on this sequence would do it anyway) and let others read."""
        try:
            if not self.classifier.closed:
                self.classifier.engine.release(self.doc)
        finally:
            self._turn.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
