"""`edge2dexit classify-ray`: a table classified on a Ray cluster and written as parquet — a thin shell over
`edge2dexit.ray_data.classify_dataset` and Ray Data's readers and writer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError
from .app import app, friendly
from .options import N_CTX, POLICY

USAGE_ERROR = 2
READERS = {"csv": "read_csv", "parquet": "read_parquet", "jsonl": "read_json", "json": "read_json"}


@app.command("classify-ray")
@friendly
def classify_ray(
    table: str = typer.Argument(..., help="A .csv, .parquet or .jsonl table (a local path or a URI Ray Data "
                                          "reads, e.g. s3://...), or a directory of them with --format."),
    output: str = typer.Argument(..., help="Directory (or URI) the parquet files are written to."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to run on (default: $RAY_ADDRESS, "
                                                                  "else a local cluster on this machine)."),
    input_format: Optional[str] = typer.Option(None, "--format", help="csv | parquet | jsonl (default: from the "
                                                                      "input's suffix)."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b", help="Bundle directory, on storage every node sees "
                                                                       "(default: the built-in sentiment bundle)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model: registry name or GGUF path, on "
                                                                    "storage every node sees (default: the bundle's)."),
    policy: Optional[str] = POLICY,
    text_column: str = typer.Option("text", "--text-column", help="Column of the text."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Write only this column beside the results "
                                                                      "(default: every input column)."),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="Ray actors, each with its own model."),
    num_cpus: float = typer.Option(1, "--num-cpus", min=0.01, help="CPUs per actor: llama.cpp threads in it."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Rows per batch (default: edge2dexit.ray_data.BATCH_SIZE)."),
    width: Optional[int] = typer.Option(None, "--width", "-w", min=1, max=255,
                                        help="Documents in flight per actor (default: edge2dexit.ray_data.WIDTH)."),
    truncate: bool = typer.Option(False, "--truncate", help="Read only the sentences that fit the context."),
    n_ctx: int = N_CTX,
) -> None:
    """Classify every row of a table on Ray. A row that cannot be classified gets its reason in the `error`
    column and the others go on (exit code 0); exit code 2 when Ray is not installed (the `ray` extra of
    edge2dexit), 3 when the input does not exist or lacks a column, 4 or 5 for a model or bundle problem."""
    try:
        import ray
    except ImportError:
        typer.echo("edge2dexit: classify-ray needs Ray: pip install 'edge2dexit[ray]'", err=True)
        raise typer.Exit(USAGE_ERROR) from None
    from ..ray_data import BATCH_SIZE, WIDTH, classify_dataset

    kind = input_format or Path(table).suffix.lstrip(".").lower()
    if kind not in READERS:
        raise typer.BadParameter(f"cannot tell the format of {table!r}; name it: {' | '.join(READERS)}",
                                 param_hint="--format")
    if "://" not in table:  # a local path: absolute, as Ray's workers do not share our working directory
        if not Path(table).exists():
            raise InputError(f"{table}: no such file or directory")
        table = str(Path(table).resolve())
    if "://" not in output:
        output = str(Path(output).resolve())
    ray.init(address=address, ignore_reinit_error=True)
    dataset = getattr(ray.data, READERS[kind])(table)
    columns = dataset.schema().names  # checked here: on a worker, a missing column would fail as a Ray error
    missing = [name for name in (text_column, id_column) if name is not None and name not in columns]
    if missing:
        raise InputError(f"{table} has no column {missing[0]!r}; its columns: {', '.join(map(repr, columns))}")
    classify_dataset(
        dataset, bundle=bundle, model=model, policy=policy, concurrency=concurrency, num_cpus=num_cpus,
        batch_size=batch_size or BATCH_SIZE, text_column=text_column, id_column=id_column, width=width or WIDTH,
        n_ctx=n_ctx, truncate=truncate,
    ).write_parquet(output)
