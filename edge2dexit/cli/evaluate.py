"""`edge2dexit eval`: every policy live on llama.cpp over one split of the bundle's own data, beside the baselines
(TF-IDF + logistic regression trained on the bundle's training split, truncation at the best layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, friendly
from .options import BUNDLE, MODEL, N_CTX, THREADS, check_policies, engine_settings

SPLITS = ("train", "calibration", "test")


def _check_split(value: str) -> str:
    if value not in SPLITS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(SPLITS)}")
    return value


@app.command("eval")
@friendly
def evaluate_command(
    bundle: Optional[Path] = BUNDLE,
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data set (default: the one the bundle was built from)."),
    split: str = typer.Option("test", "--split", callback=_check_split, help="train, calibration or test (the bundle's own splits)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N documents of the split."),
    policies: Optional[str] = typer.Option(None, "--policies", callback=check_policies,
                                           help="Comma-separated policies (default: all)."),
    model: Optional[str] = MODEL,
    figures: Optional[Path] = typer.Option(None, "--figures", help="Write PNG figures into this directory."),
    n_ctx: int = N_CTX,
    threads: Optional[int] = THREADS,
) -> None:
    """Every policy live on llama.cpp over one split, beside TF-IDF and truncation baselines: accuracy with a 95%
    interval, operations, token-layers, wall-clock, oracle."""
    from ..classifier import Classifier
    from ..convert.data import bundle_splits
    from ..measure.evaluate import evaluate

    with Classifier(bundle, model=model, settings=engine_settings(n_ctx, threads=threads), truncate=True) as clf:
        splits = bundle_splits(clf.bundle, data)  # the training split too, for TF-IDF
        part = getattr(splits, split)
        result = evaluate(clf, part.texts[:limit], part.labels[:limit], policies, train=splits.train)
        typer.echo(result.table())
        if figures:
            from ..measure.figures import write_figures

            for path in write_figures(result, clf.bundle.calibration, figures):
                typer.echo(f"figure: {path}")
