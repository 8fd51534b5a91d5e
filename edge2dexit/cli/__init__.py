"""The `edge2dexit` command: a small typer app over the library (`app` holds the apps and the error rule; each
command lives in the module named after it, which registers it on `app` when imported).

`main` loads llama.cpp's libraries before anything imports numpy when the command may read a model: on a CUDA build
of llama.cpp, a process that loaded numpy first crashes as it loads a model (docs/llama-cpp.md §10). Help and
`models list` read no model and never load llama.cpp (on a CUDA build that would start the GPU)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

COMMANDS = ("bench", "classify", "convert", "evaluate", "models", "ray", "serve")


def main() -> None:
    if _may_read_a_model(sys.argv[1:]):
        from .. import native  # noqa: F401  (llama.cpp before numpy: see the module docstring)
    _app()()


GROUPS = ("models", "bench")  # a group's name alone prints its commands


def _may_read_a_model(argv: list[str]) -> bool:
    """Whether the command line may load a model: not for help, `models list`, or a group's name alone."""
    return (bool(argv) and not {"--help", "-h"} & set(argv) and argv[:2] != ["models", "list"]
            and not (len(argv) == 1 and argv[0] in GROUPS))


def _app():
    for name in COMMANDS:
        importlib.import_module(f".{name}", __name__)
    from .app import app

    globals()["app"] = app  # importing the submodule `app` bound its name here to the module
    return app


def __getattr__(name: str) -> Any:
    if name == "app":  # `from edge2dexit.cli import app` (tests, embedding): every command registered
        return _app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
