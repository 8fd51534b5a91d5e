"""The typer apps and the one rule every command follows: an error a user can act on is one line on stderr and
its documented exit code (errors.py); anything else is a bug, reported as one line with exit code 1 (and the
traceback only with EDGE2DEXIT_DEBUG=1). Never a traceback by default."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

import typer

from ..errors import Edge2DExitError, InputError
from ..texts import decode_text

INTERNAL_ERROR, INTERRUPTED = 1, 130

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Two-dimensional early-exit text classification with a local GGUF LLM through llama.cpp.",
)
models_app = typer.Typer(no_args_is_help=True, help="Base models: list the registry, pull into the cache.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured in one run.")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")


def friendly(command: Callable) -> Callable:
    """Turn every exception into one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer prints usage errors and exits 2
            raise
        except Edge2DExitError as exc:
            typer.echo(f"edge2dexit: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("edge2dexit: interrupted", err=True)
            raise typer.Exit(INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - a bug: say so in one line, not a traceback
            if os.environ.get("EDGE2DEXIT_DEBUG"):
                traceback.print_exc()
            typer.echo(f"edge2dexit: internal error ({type(exc).__name__}: {exc}); please report it "
                       "(EDGE2DEXIT_DEBUG=1 shows the traceback)", err=True)
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper


def read_text(source: str) -> str:
    """The text of a file (or stdin for "-"), refusing what is not text."""
    if source == "-":
        return decode_text(sys.stdin.buffer.read(), "standard input")
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{source}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{source}: cannot read it ({exc.strerror})") from None
    return decode_text(raw, source)
