"""`edge2dexit bench ...`: benchmarks that print ratios measured in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..measure.soak import CYCLES, DOCS
from ..measure.serve import CLIENTS as SERVE_CLIENTS, DOCS as SERVE_DOCS, ROUNDS as SERVE_ROUNDS
from ..models import SAMPLE_REVIEW
from ..models.registry import DEFAULT_MODEL
from ..settings import EngineSettings
from .app import bench_app, friendly
from .inputs import text_of
from .options import BUNDLE, MODEL, N_CTX, THREADS, WIDTH


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
    data: Optional[Path] = typer.Option(None, "--data", help="Read these labelled texts instead (a CSV, TSV or "
                                                             "JSONL table with text and label columns)."),
    widths: str = typer.Option("1,2,4,8,16", "--widths", help="Comma-separated documents in flight."),
    extraction_docs: int = typer.Option(40, "--extraction-docs", min=1, help="Documents for the feature-extraction timing."),
    threads: Optional[int] = THREADS,
) -> None:
    """Docs/s and accuracy of `full` and the default policy: baseline one at a time vs the bundle at each width."""
    from ..bundle import load_bundle
    from ..convert.data import bundle_splits
    from ..measure.throughput import throughput_benchmark

    try:
        sizes = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise typer.BadParameter(f"{widths!r} is not a comma-separated list of numbers", param_hint="--widths") from None

    # The bundle's test split (or the data named), less anything the baseline bundle was trained or calibrated on.
    test, seen = _texts_to_read(bundle, data), set()
    if baseline is not None and baseline != bundle:
        base = bundle_splits(load_bundle(baseline))
        seen = set(base.train.texts) | set(base.calibration.texts)
    kept = [(t, test.label_names[y]) for t, y in zip(test.texts, test.labels) if t not in seen][:docs]
    texts, labels = [t for t, _ in kept], [y for _, y in kept]
    result = throughput_benchmark(baseline or bundle, bundle, texts, labels, sizes, extraction_docs=extraction_docs,
                                  n_threads=threads)
    typer.echo(result.table())


@bench_app.command("overhead")
@friendly
def bench_overhead(
    bundle: Optional[Path] = BUNDLE,
    data: Optional[Path] = typer.Option(None, "--data", help="Texts to read: a CSV, TSV or JSONL table with a text "
                                                             "column (default: the bundle's test split)."),
    docs: int = typer.Option(100, "--docs", min=1, help="Documents to read."),
    sentences: int = typer.Option(1, "--sentences", min=1, help="The policy stops after this many sentences."),
    threads: Optional[int] = THREADS,
) -> None:
    """The fixed cost of a document: where a classification's time goes when the policy exits after a sentence or
    two (inside llama_decode, splitting, tokenizing, the rest), for each eval-callback tap."""
    from ..measure.overhead import overhead_benchmark

    texts = _texts_to_read(bundle, data).texts[:docs]
    typer.echo(overhead_benchmark(texts, bundle, sentences, threads).table())


def _texts_to_read(bundle: Optional[Path], data: Optional[Path]):
    """The labelled texts a benchmark reads: the table `data` names (labels as the bundle's), else the bundle's own
    test split."""
    from ..bundle import load_bundle
    from ..classifier import DEFAULT_BUNDLE
    from ..convert.data import bundle_splits, load_file

    read = load_bundle(bundle or DEFAULT_BUNDLE)
    return load_file(data, label_names=read.labels) if data else bundle_splits(read).test


@bench_app.command("soak")
@friendly
def bench_soak(
    bundle: Optional[Path] = BUNDLE,
    model: Optional[str] = MODEL,
    docs: int = typer.Option(DOCS, "--docs", min=3, help="Documents classified by one Classifier."),
    cycles: int = typer.Option(CYCLES, "--cycles", min=3, help="Classifiers opened, used for one text and closed."),
    width: int = WIDTH,
    threads: Optional[int] = THREADS,
) -> None:
    """Resident memory and open file descriptors over a long run and over open/close cycles (Linux: /proc)."""
    from ..measure.soak import soak

    typer.echo(soak(docs, cycles, bundle, model, EngineSettings(width=width, n_threads=threads)).table())


@bench_app.command("serve")
@friendly
def bench_serve(
    bundle: Optional[Path] = BUNDLE,
    texts: Optional[Path] = typer.Option(None, "--texts", help="A file of texts, one per line (default: the sample "
                                                               "review's sentences, rotated and cut)."),
    docs: int = typer.Option(SERVE_DOCS, "--docs", min=1, help="Texts per round."),
    rounds: int = typer.Option(SERVE_ROUNDS, "--rounds", min=1, help="Interleaved rounds of both sides."),
    clients: str = typer.Option(",".join(map(str, SERVE_CLIENTS)), "--clients",
                                help="Comma-separated numbers of concurrent clients (each also the width)."),
    n_ctx: int = N_CTX,
    threads: Optional[int] = THREADS,
) -> None:
    """N concurrent clients of `edge2dexit serve --width N` against `classify_many` at width N: docs/s, p50/p99
    latency, errors, in interleaved rounds. Loopback only; each side reads the texts once a round."""
    from ..measure.serve import sample_texts, serve_benchmark

    try:
        counts = tuple(int(n) for n in clients.split(","))
    except ValueError:
        raise typer.BadParameter(f"{clients!r} is not a comma-separated list of numbers", param_hint="--clients") from None
    if texts is None:
        chosen = sample_texts(docs)
    else:
        lines = [line for line in text_of(str(texts)).splitlines() if line.strip()]
        chosen = [lines[k % len(lines)] for k in range(docs)]
    typer.echo(serve_benchmark(chosen, counts, rounds, bundle, n_ctx, threads).table())
