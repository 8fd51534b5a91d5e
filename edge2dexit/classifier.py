"""The public API: a bundle + an engine + a policy → a `Result`.

    with Classifier() as clf:                       # the default bundle and its base model
        result = clf.classify(open("review.txt").read())
        print(result.label, result.scores, result.evidence.deciding())
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
after three sentences never pays for splitting or tokenizing the rest. How each text is read and answered is the
`reader.Reader`'s; the classifier owns the engine and lets one reading at a time use it.

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
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Sequence

from .bundle import Bundle, load_bundle
from .cache import sha256_file
from .engine import Engine
from .errors import Edge2DExitError
from .lifetime import Owner
from .models.registry import resolve_model
from .reader import LEXICAL_EXIT, Evidence, Reader, Result, SentenceWeight, Stream  # noqa: F401  (re-exported)
from .settings import EngineSettings

DEFAULT_BUNDLE = Path(__file__).parent / "models" / "default"


def base_model_path(bundle: Bundle, model: str | os.PathLike[str] | None = None, pull_missing: bool = False) -> Path:
    """The model file a bundle is read with: `model` if given, else the one shipped in the bundle, else its base
    model by registry name, from the cache (downloaded only with `pull_missing`; `edge2dexit models pull NAME`)."""
    return resolve_model(model or bundle.model_file or bundle.base.name, pull_missing=pull_missing)


class Classifier(Owner):
    """Loads a bundle and its base model once; classifies any number of texts. Close it (or use `with`).

    One classification (or stream) runs at a time on one classifier; `classify_many` reads up to
    `settings.width` documents at once in shared decodes.

    Thread-safe: `classify`, `classify_many` (while it is iterated) and a stream (until it is closed) each hold the
    classifier's lock while they use its llama.cpp context, so threads sharing a classifier take turns and never mix
    their documents' KV cache. For parallel work give each thread a Classifier of its own, or use `classify_many`.
    Reading twice at once in one thread (a classify inside a classify_many loop) raises RuntimeError. A closed
    classifier refuses every reading, the words' included.

    `lexical`: let the bundle's lexical exit answer where the words alone decide, and weigh their evidence into the
    LLM's answer elsewhere (the default, where the bundle has one). `max_error`: abstain (`Result.abstained`) where
    the answer is not sure enough for the error among the answered documents to stay within it (SettingsError, exit
    code 2, where the bundle cannot promise that); `coverage`: give each result the prediction set that holds the
    true label that often (both as calibrated for the bundle's default policy: see trust.py). Each is a default
    that a call may change.
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
        # a promise the bundle cannot keep is refused before the model loads
        self.bundle.promise(policy or self.bundle.default_policy, lexical and self.bundle.lexical is not None,
                            max_error, coverage)
        self.model_path = base_model_path(self.bundle, model)
        self._lock = threading.Lock()
        self._reader_thread: int | None = None  # the thread holding the lock
        self.engine = self._resources.enter_context(
            Engine.load(self.model_path, settings, prompt=self.bundle.task_prompt, lora=self.bundle.lora_file()))
        self.bundle.check_base(sha256_file(self.model_path), self.engine.architecture, self.engine.n_layer,
                               self.engine.n_embd)
        self.reader = Reader(self.bundle, self.engine, policy, lexical, truncate, max_error, coverage)

    @property
    def policy_name(self) -> str:
        return self.reader.policy_name

    @property
    def lexical(self) -> bool:
        return self.reader.lexical

    @property
    def truncate(self) -> bool:
        return self.reader.truncate

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.bundle.labels)

    def classify(self, text: str, policy: str | None = None, lexical: bool | None = None,
                 max_error: float | None = None, coverage: float | None = None) -> Result:
        """Classify one text; each option defaults to the classifier's (`lexical`: the words answer where they are
        sure, and weigh in elsewhere)."""
        self._check_open()
        answering = self.reader.answering(policy, lexical, max_error, coverage)
        started = time.perf_counter()
        words, answered = self.reader.lexical_answer(text, answering, started)
        if answered is not None:
            return answered
        with self._engine_turn():
            return self.engine.run(self.reader.llm_reading(text, answering, started, words)(self.engine.document()))

    def classify_many(
        self, texts: Iterable[str] | Iterable[tuple[Hashable, str]], policy: str | None = None,
        lexical: bool | None = None, max_error: float | None = None, coverage: float | None = None,
    ) -> Iterator[tuple[Hashable, Result | Edge2DExitError]]:
        """Classify many texts with up to `settings.width` of them in flight in shared llama.cpp decodes,
        yielding (key, Result) as each finishes — not in input order — or (key, error) for a text that could not
        be classified (empty, too long, not a string: NaN or None from a table...): the others go on. Plain
        strings, and anything that is not a (key, text) pair, are keyed by their index. A text the words alone
        decide never takes a place among those in flight."""
        self._check_open()
        answering = self.reader.answering(policy, lexical, max_error, coverage)  # once, not once per text
        answered: deque[tuple[Hashable, Result]] = deque()  # by the words alone, waiting for the next yield

        def jobs():
            for key, text in _keyed(texts):
                started = time.perf_counter()
                words, result = self.reader.lexical_answer(text, answering, started)
                if result is not None:
                    answered.append((key, result))
                else:
                    yield key, self.reader.llm_reading(text, answering, started, words)

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

    def stream(self, policy: str | None = None, max_error: float | None = None,
               coverage: float | None = None) -> Stream:
        """Feed text piece by piece; see `reader.Stream`. Only one stream or classification runs at a time: the
        stream holds the classifier until it is closed."""
        self._check_open()
        return self.reader.stream_on(1, policy, max_error, coverage, hold=self._engine_turn())

    @contextmanager
    def _engine_turn(self) -> Iterator[None]:
        """Hold the engine for one reader; other threads wait. The same thread cannot wait for itself: its second
        reading would take the first one's sequence."""
        if self._reader_thread == threading.get_ident():
            raise RuntimeError("this thread is already reading with this classifier (in classify_many or an open "
                               "stream): finish or close that first, or use a second Classifier")
        with self._lock:
            self._check_open()
            self._reader_thread = threading.get_ident()
            try:
                yield
            finally:
                self._reader_thread = None

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Classifier is closed")

    def close(self) -> None:
        """Free llama.cpp's model and context, once a reading in another thread has ended (this thread's own open
        stream ends here)."""
        with nullcontext() if self._reader_thread == threading.get_ident() else self._lock:
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
