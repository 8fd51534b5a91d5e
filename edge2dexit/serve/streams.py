"""One client's text as it arrives (`/v1/stream`), and what the page shows of it.

A `Session` holds the library's `Stream` on a sequence of its own (`Reader.stream_on`), which decides, and a
second sentence splitter over the same pieces, which the page reads: the Stream stops splitting once it has
decided, and the page still shows the sentences it did not read. Both split the same pieces the same way
(`sentences.Pieces`), so sentence k of the one is sentence k of the other.

Every method runs on the engine thread (`Worker.call`) and answers with a `report`: the Result once there is one,
every complete sentence with whether it was read and how deep, and what was computed against a full read of those
sentences. A text the library refuses (binary, too long...) ends there: the next piece starts a new one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from ..classifier import Classifier, Stream
from ..errors import Edge2DExitError, InputError
from ..texts import check_characters


class Session:
    def __init__(self, classifier: Classifier, seq: int, policy: str | None = None, max_error: float | None = None,
                 coverage: float | None = None):
        self.classifier, self.seq = classifier, seq
        self.settings = {"policy": policy, "max_error": max_error, "coverage": coverage}
        self._begin()

    def feed(self, piece: str) -> dict[str, Any]:
        if self.finished:
            raise InputError('this text is finished: send {"reset": true} to start another')
        with self._ending_on_error():
            check_characters(piece, "the streamed text")
            self.stream.feed(piece)
            self._saw(self._pieces.feed(piece))
        return self.report()

    def finish(self) -> dict[str, Any]:
        if not self.finished:
            with self._ending_on_error():
                self.stream.finish()
                self._saw(self._pieces.close())
                self.finished = True
        return self.report()

    def reset(self) -> dict[str, Any]:
        self.close()
        self._begin()
        return self.report()

    def close(self) -> None:
        """Free the sequence's positions (the engine thread must run this before the sequence is given back)."""
        self.stream.close()

    def report(self) -> dict[str, Any]:
        doc, result = self.stream.doc, self.stream.result
        depths = doc.valid_depths
        n_layer = self.classifier.engine.n_layer
        return {
            "result": None if result is None else result.to_dict(),
            "finished": self.finished,
            "sentences": [{"text": text, "read": k < len(depths), "layers": depths[k] if k < len(depths) else 0}
                          for k, text in enumerate(self._sentences)],
            "token_layers": doc.token_layers,  # computed so far, re-decodes included
            "full_token_layers": self._tokens * n_layer,  # every token of these sentences through every layer
            "n_layer": n_layer,
        }

    def _begin(self) -> None:
        self.stream: Stream = self.classifier.reader.stream_on(self.seq, **self.settings)
        self._pieces = self.classifier.bundle.splitter.pieces()
        self._sentences: list[str] = []
        self._tokens = 0
        self.finished = False

    def _saw(self, sentences: list[str]) -> None:
        self._sentences += sentences
        self._tokens += sum(len(self.classifier.engine.tokenize(s)) for s in sentences)

    @contextmanager
    def _ending_on_error(self) -> Iterator[None]:
        """An Edge2DExitError ends the text: the session starts again empty, and the error goes to the client."""
        try:
            yield
        except Edge2DExitError:
            self.reset()
            raise
