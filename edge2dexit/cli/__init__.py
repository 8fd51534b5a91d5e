"""The `edge2dexit` command: a small typer app over the library. Every user-facing error is one line on
stderr and a documented exit code (errors.py); never a traceback."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

import typer

from ..errors import Edge2DExitError, InputError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Two-dimensional early-exit text classification with a local GGUF LLM through llama.cpp.",
)
models_app = typer.Typer(no_args_is_help=True, help="Base models: list the registry, pull into the cache.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured in one run.")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")


def friendly(command: Callable) -> Callable:
    """Turn our exceptions into one line on stderr and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Edge2DExitError as exc:
            typer.echo(f"edge2dexit: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


def read_text(source: str) -> str:
    """The text of a file (or stdin for "-"), refusing what is not text."""
    if source == "-":
        raw = sys.stdin.buffer.read()
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{source}: no such file")
        raw = path.read_bytes()
    if b"\x00" in raw:
        raise InputError(f"{source}: looks binary (it contains NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise InputError(f"{source}: is empty")
    return text


from . import commands  # noqa: E402,F401  (registers the commands on `app`)


def main() -> None:
    app()
