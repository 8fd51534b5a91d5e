"""One lifetime pattern for everything that owns a llama.cpp handle, directly (`llama.Model`, `llama.Context`) or
through another owner (`Engine`, `Classifier`, `Stream`, the benchmarks' `PlainReader`): what it holds is
registered on an ExitStack as it is acquired, and `close()` — or leaving `with`, or garbage collection — frees it
once, last acquired first. llama-cpp-python's `_internals` frees its C handles the same way."""

from __future__ import annotations

from contextlib import ExitStack


class Owner:
    """Holds resources on `self._resources`, freed by `close()` once, in reverse order of acquisition."""

    def __init__(self) -> None:
        self._resources = ExitStack()
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self._resources.close()

    def __enter__(self):
        if self.closed:  # closed means closed: `with` on it would use what was freed
            raise RuntimeError(f"this {type(self).__name__} is closed")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        resources = getattr(self, "_resources", None)
        if resources is not None:
            resources.close()
