"""`edge2dexit convert`: labelled text + a base model → a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..convert.settings import QUANTIZATIONS, ConvertSettings, DataSettings, LoraSettings, TrainSettings
from .app import app, friendly
from .options import N_CTX, THREADS, WIDTH, defaults, engine_settings

_DATA, _TRAIN, _LORA, _CONVERT = map(defaults, (DataSettings, TrainSettings, LoraSettings, ConvertSettings))
KEEP = "keep"
FINETUNE = ("none", "lora")


def _choice(allowed: tuple[str, ...]):
    def check(value: str) -> str:
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check


def _head_kind(value: str) -> str:
    from ..keys import HEAD_LINEARS  # gguf-py: only when a convert runs, not for `--help`

    return _choice(tuple(HEAD_LINEARS))(value)


def _fractions(value: str) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(part) for part in value.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3:
        raise typer.BadParameter(f"{value!r} is not three comma-separated fractions (e.g. 0.6,0.2,0.2)")
    return fractions


@app.command()
@friendly
def convert(
    model: str = typer.Option(..., "--model", "-m", help="Base model: registry name, GGUF path, or HF checkpoint directory."),
    data: str = typer.Option(..., "--data", "-d", help="imdb, clothing, tweets, or a CSV / TSV / JSONL file."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle directory to write."),
    text_column: str = typer.Option(_DATA.text_column, help="Text column of a data file."),
    label_column: str = typer.Option(_DATA.label_column, help="Label column of a data file."),
    prompt: Optional[str] = typer.Option(_CONVERT.prompt, help="Task prompt read before every text."),
    per_class: int = typer.Option(_DATA.per_class, min=0, help="Balanced subsample: documents per class (0: all)."),
    min_sentences: int = typer.Option(_DATA.min_sentences, min=0, help="Keep only texts with at least this many sentences."),
    max_sentences: int = typer.Option(_CONVERT.max_sentences, min=1, help="Sentences per document read for features."),
    split: str = typer.Option(",".join(map(str, _DATA.fractions)), "--split", callback=_fractions,
                              help="Train, calibration and test fractions of the documents, comma-separated (with "
                                   "cross-fitting the first two are pooled; a test fraction of 0 leaves the figures "
                                   "cross-validated)."),
    seed: int = typer.Option(_DATA.seed, help="Seed of the subsample, the splits and training."),
    head: str = typer.Option(_TRAIN.kind, callback=_head_kind,
                             help="Exit head kind: mlp (the paper's d→hidden→C) or linear."),
    hidden: int = typer.Option(_TRAIN.hidden, min=1, help="Hidden size of mlp heads."),
    lr: float = typer.Option(_TRAIN.lr, min=0.0, help="Learning rate of head training."),
    tolerance: float = typer.Option(_CONVERT.tolerance, "--tolerance", "-T", min=0.0,
                                    help="Accuracy a policy may lose against the best single layer."),
    confidence: float = typer.Option(_CONVERT.confidence, min=0.0, max=0.999,
                                     help="Confidence that the loss is at most T on calibration (0: as measured)."),
    quant: str = typer.Option(KEEP, callback=_choice((KEEP, *QUANTIZATIONS)),
                              help=f"Re-quantize the base model into the bundle: {', '.join((KEEP, *QUANTIZATIONS))}."),
    work: Optional[Path] = typer.Option(None, help="Feature store directory (default OUT/features); resumes."),
    reuse: Optional[list[Path]] = typer.Option(None, "--reuse", help="An earlier convert's feature stores (its "
                                               "OUT/features): documents they hold for the same model, prompt and "
                                               "adapter are copied, not read again. Repeatable."),
    finetune: str = typer.Option("none", callback=_choice(FINETUNE),
                                 help="none: heads on the frozen model; lora: also train a LoRA adapter (needs torch, "
                                      "peft; the bundle then carries lora.gguf)."),
    lora_rank: int = typer.Option(_LORA.rank, min=1, help="Rank of the LoRA adapters."),
    lora_epochs: int = typer.Option(_LORA.epochs, min=1, help="Epochs of LoRA training (the best on validation is kept)."),
    lora_lr: float = typer.Option(_LORA.lr, min=0.0, help="Learning rate of the LoRA adapters."),
    lora_docs: int = typer.Option(0, min=0, help="Train the adapters on at most this many training documents "
                                                 "(0: all; the heads always use all)."),
    lora_depth: int = typer.Option(0, min=0, help="Train the adapters through the first N layers only, the loss "
                                                  "weighted on layer N-1 (where the policies exit; N/n_layer of the "
                                                  "compute). 0: every layer, the loss on the last (the paper)."),
    lexical: bool = typer.Option(_CONVERT.lexical, "--lexical/--no-lexical",
                                 help="Train the lexical exit (TF-IDF + logistic regression on the words alone) and "
                                      "calibrate every policy behind it."),
    folds: int = typer.Option(_CONVERT.folds, "--folds", min=1, help="Cross-fitting: train the heads and the "
                              "lexical exit on this many folds of the training and calibration documents together "
                              "and calibrate on each document's out-of-fold read, so that every label both trains "
                              "and calibrates (1: the training split trains, the calibration split calibrates)."),
    fuse: bool = typer.Option(_CONVERT.fuse, "--fuse/--no-fuse", help="Behind the words, weigh their evidence into "
                              "the LLM's answers (--no-fuse: they only decide which texts the LLM reads)."),
    n_ctx: int = N_CTX,
    width: Optional[int] = WIDTH,
    threads: Optional[int] = THREADS,
) -> None:
    """Train exit heads on labelled text, calibrate every policy on held-out data, write a bundle."""
    from ..convert.pipeline import convert as run_convert

    settings = ConvertSettings(
        model=model,
        data=DataSettings(data, text_column, label_column, per_class or None, min_sentences, split,
                          seed=seed),
        out=out, prompt=prompt, max_sentences=max_sentences,
        head=TrainSettings(kind=head, hidden=hidden, lr=lr, seed=seed), tolerance=tolerance, confidence=confidence,
        quant=quant,
        engine=engine_settings(n_ctx, width, threads), work=work, reuse=tuple(reuse or ()),
        finetune=LoraSettings(rank=lora_rank, epochs=lora_epochs, lr=lora_lr, max_documents=lora_docs or None,
                              depth=lora_depth or None, seed=seed) if finetune == "lora" else None,
        lexical=lexical,
        folds=folds,
        fuse=fuse,
    )
    typer.echo(run_convert(settings).summary())
