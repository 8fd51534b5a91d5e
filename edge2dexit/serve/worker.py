"""The engine thread: one classifier, read by one thread, for every client of the service.

A llama.cpp context is used by one thread, and documents read together share decodes (`Engine.run_many`,
continuous batching). So the service has one thread that owns the classifier, and a mailbox that every request
goes through:

- texts to classify (`classify`) wait in a bounded queue and join `run_many` as its sequences free up, up to
  `width` in flight: N clients sending one text each are read as `classify_many` reads N texts at width N. Past
  `queue` texts accepted and not yet answered, a request is refused at once (`Overloaded`, HTTP 503), never left
  hanging;
- engine calls (`call`): the streams' work (`streams.Session`), each stream on a sequence of its own
  (width+1 … width+streams, `reserve_stream`), which the batch never takes (`run_many` reads on 1 … width only).
  `run_many` asks for its next job between its decodes, and that is where the calls run, so a stream waits at
  most one decode round, however full the batch is.

A text whose client went away is dropped before it starts, or ends after its current decode (`Cancelled`), which
frees its sequence. `refuse_waiting` (on SIGTERM) answers every text not yet started, and every new one, with
`ShuttingDown`; those in flight finish. Every future is answered: with a Result, the text's Edge2DExitError,
ShuttingDown, or (a bug) the exception that ended it.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ..classifier import Classifier, Result
from ..reader import Answering
from ..document import Document, Reading
from ..engine import Finished
from ..errors import Edge2DExitError, Unavailable


class Overloaded(Unavailable):
    """The queue is full, or every stream is taken: come back later (HTTP 503 with Retry-After)."""


class ShuttingDown(Unavailable):
    """The service is stopping: what has not started is refused (HTTP 503)."""


class Cancelled(Exception):
    """The client went away: its text stops after the decode under way."""


@dataclass(eq=False)
class _Text:
    text: str
    answering: Answering
    future: Future = field(default_factory=Future)  # cancelled by the client's side when it goes away


class Worker:
    """Runs every reading of `classifier` on one thread: texts batched `width` at a time, at most `queue` accepted
    and not yet answered, and streams on the engine's sequences above `width`."""

    def __init__(self, classifier: Classifier, width: int, queue: int):
        self.classifier, self.width, self.queue = classifier, width, queue
        self._free_streams = list(range(classifier.engine.settings.width, width, -1))
        self.streams = len(self._free_streams)
        self._mailbox = threading.Condition()
        self._waiting: deque[_Text] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._reading_now: set[_Text] = set()
        self.refusing = False  # SIGTERM: texts not yet started, and new ones, are refused
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="edge2dexit-engine", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return len(self._reading_now)

    @property
    def streams_open(self) -> int:
        return self.streams - len(self._free_streams)

    def start(self) -> None:
        self._thread.start()

    def classify(self, texts: Sequence[str], answering: Answering) -> list[Future]:
        """Queue `texts`; one future each, answered with its Result or its Edge2DExitError."""
        with self._mailbox:
            if self.refusing:
                raise ShuttingDown("the service is shutting down")
            if self.in_flight + len(self._waiting) + len(texts) > self.queue:  # less those whose client left?
                self._waiting = deque(job for job in self._waiting if not job.future.cancelled())
            if self.in_flight + len(self._waiting) + len(texts) > self.queue:
                raise Overloaded(f"the service is busy ({self.in_flight + len(self._waiting)} texts in hand, at "
                                 f"most {self.queue})")
            jobs = [_Text(text, answering) for text in texts]
            self._waiting.extend(jobs)
            self._mailbox.notify()
        return [job.future for job in jobs]

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the engine thread, between two decodes; its result or exception comes in the future."""
        future: Future = Future()
        with self._mailbox:
            if self._stopped:
                raise ShuttingDown("the service is shutting down")
            self._calls.append((fn, future))
            self._mailbox.notify()
        return future

    def reserve_stream(self) -> int:
        """A sequence for a new stream; give it back with `release_stream` once the stream is closed."""
        with self._mailbox:
            if self.refusing:
                raise ShuttingDown("the service is shutting down")
            if not self._free_streams:
                raise Overloaded(f"all {self.streams} streams are open")
            return self._free_streams.pop()

    def release_stream(self, seq: int) -> None:
        with self._mailbox:
            self._free_streams.append(seq)

    def refuse_waiting(self) -> None:
        """Refuse every text not yet started and every new text or stream; texts in flight and open streams go on."""
        with self._mailbox:
            self.refusing = True
            refused, self._waiting = self._waiting, deque()
        for job in refused:  # each text's outcome: a refusal in its place
            _settle(job.future, result=ShuttingDown("the service is shutting down"))

    def stop(self) -> None:
        """Refuse what waits, let what is in flight finish, run the calls already made, and end the thread."""
        self.refuse_waiting()
        with self._mailbox:
            self._stopped = True
            self._mailbox.notify()
        if self._thread.is_alive():
            self._thread.join()

    # --- the engine thread -----------------------------------------------------------------------------------

    def _serve(self) -> None:
        engine = self.classifier.engine
        while True:
            with self._mailbox:
                self._mailbox.wait_for(lambda: self._waiting or self._calls or self._stopped)
                if self._stopped and not self._calls:
                    return
            try:
                for done in engine.run_many(self._jobs(), sequences=range(1, self.width + 1)):
                    self._finished(done)
            except Exception as exc:  # noqa: BLE001 - a bug: the texts it ended get it, the thread goes on
                with self._mailbox:
                    ended, self._reading_now = self._reading_now, set()
                for job in ended:
                    _settle(job.future, exception=exc)

    def _jobs(self) -> Iterator[tuple[_Text, Callable[[Document], Reading[Result]]] | None]:
        """What `run_many` reads between its decodes: the engine calls made since, then the next text while fewer
        than `width` are in flight, or None for none now (`run_many` returns once nothing is in flight)."""
        while True:
            self._run_calls()
            yield self._next_text()

    def _run_calls(self) -> None:
        while True:
            with self._mailbox:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - the caller gets it
                _settle(future, exception=exc)
            else:
                _settle(future, result=result)

    def _next_text(self) -> tuple[_Text, Callable[[Document], Reading[Result]]] | None:
        with self._mailbox:
            while self.in_flight < self.width and self._waiting:
                job = self._waiting.popleft()
                if not job.future.cancelled():
                    self._reading_now.add(job)
                    return job, self._reading(job)
        return None

    def _reading(self, job: _Text) -> Callable[[Document], Reading[Result]]:
        read = self.classifier.reader.job(job.text, job.answering)

        def reading(doc: Document) -> Reading[Result]:
            return (yield from _until_cancelled(read(doc), job.future))

        return reading

    def _finished(self, done: Finished) -> None:
        with self._mailbox:
            self._reading_now.discard(done.key)
        error = done.error
        if error is None or isinstance(error, Edge2DExitError):
            _settle(done.key.future, result=done.result if error is None else error)
        elif not isinstance(error, Cancelled):
            _settle(done.key.future, exception=error)


def _until_cancelled(reading: Reading[Result], future: Future) -> Reading[Result]:
    """`reading`, ended at its next request (Cancelled) once `future` is cancelled: its client went away."""
    try:
        request = next(reading)
        while True:
            if future.cancelled():
                reading.close()
                raise Cancelled
            request = reading.send((yield request))
    except StopIteration as done:
        return done.value


def _settle(future: Future, result: Any = None, exception: BaseException | None = None) -> None:
    """Answer `future`, unless its client cancelled it meanwhile."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
