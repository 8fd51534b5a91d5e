"""The typer apps and the one rule every command follows: an error a user can act on is one line on stderr and
its documented exit code (errors.py); anything else is a bug, reported as one line with exit code 1 (and the
traceback only with EDGE2DEXIT_DEBUG=1). Never a traceback by default: not on Ctrl-C (130), and not when the reader
of standard output goes away (`| head`: 141, quietly, as `cat` ends)."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable

import typer

from ..errors import Edge2DExitError

INTERNAL_ERROR, INTERRUPTED, BROKEN_PIPE = 1, 130, 141

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
        except BrokenPipeError:
            # Nobody reads standard output any more: end quietly, and point it at /dev/null so that the
            # interpreter's last flush of what is buffered cannot fail again on the way out.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(BROKEN_PIPE) from None
        except Exception as exc:  # noqa: BLE001 - a bug: say so in one line, not a traceback
            if os.environ.get("EDGE2DEXIT_DEBUG"):
                traceback.print_exc()
            typer.echo(f"edge2dexit: internal error ({type(exc).__name__}: {exc}); please report it "
                       "(EDGE2DEXIT_DEBUG=1 shows the traceback)", err=True)
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper
