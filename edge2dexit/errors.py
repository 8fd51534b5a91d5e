"""Every error a user can act on is an `Edge2DExitError`; the CLI prints its message and exits with its code.

Exit codes (documented in the README):
  0 success, 1 internal error (a bug: please report it), 2 usage error (a bad option or setting), 3 bad input text
  or data, 4 base model problem, 5 bundle problem, 6 text longer than the context, 7 the output cannot be written,
  75 the service is busy or stopping (try again), 130 interrupted (Ctrl-C), 141 the reader of the output went away
  (`| head`).
"""


class Edge2DExitError(Exception):
    exit_code = 1


class SettingsError(Edge2DExitError, ValueError):
    """A setting that cannot work: out of range, or more than llama.cpp can allocate here."""

    exit_code = 2


class InputError(Edge2DExitError):
    """The text, file or labelled data given cannot be used as it is."""

    exit_code = 3


class ModelError(Edge2DExitError):
    """The base model is unknown, missing, truncated, or fails its sha256."""

    exit_code = 4


class BundleError(Edge2DExitError):
    """A bundle (exits.gguf and its base model) is malformed or does not fit the model it is used with."""

    exit_code = 5


class ContextOverflowError(InputError):
    """The text does not fit the llama.cpp context and truncation was not asked for."""

    exit_code = 6

    @classmethod
    def for_text(cls, needed: int, capacity: int) -> "ContextOverflowError":
        """`needed`: the tokens counted so far, which reading stops counting at the first sentence past the room."""
        return cls(f"the text needs at least {needed} tokens but the context leaves room for {capacity} after the "
                   "task prompt: raise the context size (--n-ctx) or read only what fits (--truncate)")


class OutputError(Edge2DExitError):
    """Results cannot be written where they were asked for: no such directory, no permission, disk full."""

    exit_code = 7


class Unavailable(Edge2DExitError):
    """The service is busy or stopping: come back later (HTTP 503 with Retry-After). sysexits' EX_TEMPFAIL."""

    exit_code = 75


class LlamaError(Edge2DExitError):
    """llama.cpp refused an operation (context creation, decode)."""
