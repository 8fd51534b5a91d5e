"""The `edge2dexit` command: a small typer app over the library (`app` holds the apps and the error rule;
each command lives in the module named after it)."""

from __future__ import annotations

from . import bench, classify, convert, evaluate, models, ray  # noqa: F401  (each registers its commands on `app`)
from .app import app


def main() -> None:
    app()
