"""`edge2dexit bench ...`: benchmarks that print ratios measured in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..measure.soak import CYCLES, DOCS
from ..models import SAMPLE_REVIEW
from ..models.registry import DEFAULT_MODEL
from ..settings import EngineSettings
from .app import bench_app, friendly
from .inputs import text_of
from .options import THREADS, WIDTH


@bench_app.command("engine")
@friendly
def bench_engine(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Registry name or GGUF path."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to read (default: a built-in ~190-token review)."),
    rounds: int = typer.Option(7, "--rounds", min=1, help="Interleaved rounds; medians are reported."),
    threads: Optional[int] = THREADS,
) -> None:
    """Depth-limited decode vs full depth, eval-callback overhead, and the sentence splitter's share."""
    from ..measure.bench import engine_benchmark, format_engine_benchmark
    from ..models.registry import resolve_model

    body = text_of(str(text)) if text else SAMPLE_REVIEW.read_text()
    typer.echo(format_engine_benchmark(engine_benchmark(resolve_model(model), body, rounds, threads)))


@bench_app.command("throughput")
@friendly
def bench_throughput(
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="The bundle to read batched (default: built-in)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="The bundle read one document at a time "
                                                                     "(default: the same bundle)."),
    docs: int = typer.Option(200, "--docs", min=1, help="Documents of the bundle's test split to read."),
    widths: str = typer.Option("1,2,4,8,16", "--widths", help="Comma-separated documents in flight."),
    extraction_docs: int = typer.Option(40, "--extraction-docs", min=1, help="Documents for the feature-extraction timing."),
    threads: Optional[int] = THREADS,
) -> None:
    """Docs/s and accuracy of `full` and the default policy: baseline one at a time vs the bundle at each width."""
    from ..bundle import load_bundle
    from ..classifier import DEFAULT_BUNDLE
    from ..convert.data import bundle_splits
    from ..measure.throughput import throughput_benchmark

    try:
        sizes = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise typer.BadParameter(f"{widths!r} is not a comma-separated list of numbers", param_hint="--widths") from None

    # The bundle's test split, less anything the baseline bundle was trained or calibrated on.
    test, seen = bundle_splits(load_bundle(bundle or DEFAULT_BUNDLE)).test, set()
    if baseline is not None and baseline != bundle:
        base = bundle_splits(load_bundle(baseline))
        seen = set(base.train.texts) | set(base.calibration.texts)
    kept = [(t, test.label_names[y]) for t, y in zip(test.texts, test.labels) if t not in seen][:docs]
    texts, labels = [t for t, _ in kept], [y for _, y in kept]
    result = throughput_benchmark(baseline or bundle, bundle, texts, labels, sizes, extraction_docs=extraction_docs,
                                  n_threads=threads)
    typer.echo(result.table())


@bench_app.command("soak")
@friendly
def bench_soak(
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Bundle directory or exits.gguf (default: "
                                                                       "the built-in sentiment bundle)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: registry name or GGUF path "
                                                                    "(default: the bundle's)."),
    docs: int = typer.Option(DOCS, "--docs", min=3, help="Documents classified by one Classifier."),
    cycles: int = typer.Option(CYCLES, "--cycles", min=3, help="Classifiers opened, used for one text and closed."),
    width: int = WIDTH,
    threads: Optional[int] = THREADS,
) -> None:
    """Resident memory and open file descriptors over a long run and over open/close cycles (Linux: /proc)."""
    from ..measure.soak import soak

    typer.echo(soak(docs, cycles, bundle, model, EngineSettings(width=width, n_threads=threads)).table())
