"""`edge2dexit eval`: every policy live on llama.cpp over one split of the bundle's own data, beside the baselines
(TF-IDF + logistic regression trained on the bundle's training split, truncation at the best layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import BundleError, InputError
from ..policies import POLICIES
from .app import app, friendly
from .options import N_CTX, THREADS, engine_settings

SPLITS = ("train", "calibration", "test")


def _check_split(value: str) -> str:
    if value not in SPLITS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(SPLITS)}")
    return value


def _check_policies(value: Optional[str]) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICIES]
    if unknown or not names:
        raise typer.BadParameter(f"{', '.join(unknown) or 'nothing'}: choose among {', '.join(POLICIES)}")
    return names


@app.command("eval")
@friendly
def evaluate_command(
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Bundle (default: the built-in one)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data set (default: the one the bundle was built from)."),
    split: str = typer.Option("test", "--split", callback=_check_split, help="train, calibration or test (the bundle's own splits)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N documents of the split."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated policies (default: all)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the bundle's)."),
    figures: Optional[Path] = typer.Option(None, "--figures", help="Write PNG figures into this directory."),
    n_ctx: int = N_CTX,
    threads: Optional[int] = THREADS,
) -> None:
    """Every policy live on llama.cpp over one split, beside TF-IDF and truncation baselines: accuracy with a 95%
    interval, operations, token-layers, wall-clock, oracle."""
    from ..classifier import Classifier
    from ..convert.data import BUILTIN_SETS, DataSettings, make_splits
    from ..evaluate import evaluate

    names = _check_policies(policies) or POLICIES
    with Classifier(bundle, model=model, settings=engine_settings(n_ctx, threads=threads), truncate=True) as clf:
        recorded = dict(clf.bundle.calibration.get("data", {}))
        if data:
            recorded["data"] = data
        elif "data" not in recorded:
            raise InputError("this bundle does not say which data it was built from: pass --data")
        elif recorded["data"] not in BUILTIN_SETS:  # a bundle's strings are never paths we read
            raise InputError(f"this bundle was built from the file {recorded['data']!r}; eval reads only files you "
                             "name: pass --data FILE")
        try:
            settings = DataSettings(**recorded)
        except TypeError as exc:
            raise BundleError(f"the bundle's record of its data cannot be read ({exc}): pass --data") from None
        splits = make_splits(settings)  # the bundle's data settings rebuild its training split too, for TF-IDF
        part = getattr(splits, split)
        result = evaluate(clf, part.texts[:limit], part.labels[:limit], names, train=splits.train)
        typer.echo(result.table())
        if figures:
            from ..figures import write_figures

            for path in write_figures(result, clf.bundle.calibration, figures):
                typer.echo(f"figure: {path}")
