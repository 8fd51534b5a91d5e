"""Classify a corpus on a Ray cluster with Ray Data: one `Classifier` per Ray actor, batches of rows in, the same
rows out with the result columns added.

    import ray
    from edge2dexit.ray_data import classify_dataset

    ds = ray.data.read_parquet("s3://bucket/reviews/")             # or read_csv, read_json, from_pandas, ...
    classify_dataset(ds, model="/shared/models/smollm2.gguf", concurrency=8, num_cpus=4,
                     text_column="review", id_column="review_id").write_parquet("s3://bucket/labels/")

or, by hand, `ds.map_batches(ClassifyBatch, compute=ray.data.ActorPoolStrategy(size=8), num_cpus=4, batch_size=64,
batch_format="pyarrow", fn_constructor_kwargs={"model": "/shared/models/smollm2.gguf", ...})` (`concurrency=8` in
place of `compute` does the same, deprecated since Ray 2.51).

Bundle and model files reach the workers by path, on storage every node sees (NFS, a shared volume, the same
image), not through Ray's object store: a base model is a file of a hundred MB to many GB that llama.cpp can only
load from a file path, and memory-maps, so the actors of a node share its pages. Shipped as an object, it would be
copied into every node's object store memory and then written back to a local file for llama.cpp anyway. The
bundle (a few MB) is small enough to ship, but it too is read from a path, and one rule for both is simpler.
`classify_dataset` resolves the paths on the driver (a registry name becomes the cached file, pulled there once if
missing), so that workers never download anything and a missing file fails before the job starts.

Importing this module does not import Ray (only `classify_dataset`, handed a Ray dataset, does): Ray imports it in
its workers, and the package stays usable without Ray. It does import pyarrow, a dependency of Ray Data, which
imports numpy: llama.cpp is loaded before it (`native`), since a Ray worker has not loaded numpy when it imports
this module, and on a CUDA build numpy first crashes the model load (docs/llama-cpp.md §10).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import native  # noqa: F401  (first: llama.cpp loaded before pyarrow's numpy)

import pyarrow as pa  # noqa: E402

from .bundle import load_bundle
from .classifier import DEFAULT_BUNDLE, Classifier, Result, base_model_path
from .settings import EngineSettings
from .errors import Edge2DExitError, InputError
from .texts import decode_text

if TYPE_CHECKING:
    import ray.data

WIDTH = 8  # documents in flight per actor, in shared llama.cpp decodes
BATCH_SIZE = 64  # rows per batch: several times the width, so that few sequences idle while a batch drains
# The columns of a Result a row gets, besides its label and scores (see `Result`).
RESULT_TYPES = {
    "exit_sentence": pa.int64(),
    "exit_layer": pa.int64(),
    "early": pa.bool_(),
    "sentences_read": pa.int64(),
    "layers_run": pa.int64(),
    "token_layers": pa.int64(),
    "tokens": pa.int64(),
    "seconds": pa.float64(),
    "boundary_gap": pa.float64(),
    "truncated": pa.bool_(),
}


class ClassifyBatch:
    """A Ray Data callable class: Ray builds one per actor of `map_batches(ClassifyBatch, ...)`, which loads one
    classifier; every call classifies a batch of rows with up to `width` documents in flight.

    A batch is a pyarrow Table, a pandas DataFrame or a dict of numpy arrays with a `text_column`. It comes back
    with these columns added (a pandas batch as a DataFrame, the others as a pyarrow Table):
      label, score_<label> (one float column per label of the bundle: typed columns parquet stores as they are),
      exit_sentence, exit_layer, early, sentences_read, layers_run, token_layers, tokens, seconds, truncated
      (as in `Result`), and error: null, or why the row could not be classified (no text, empty, binary, longer
      than the context without `truncate`); the other columns of an error row are null. A bad row never fails
      its batch.
    With `id_column`, only that column is kept beside the results: the text, the bulk of a corpus, does not travel
    back through Ray's object store and into the output, and the id joins the results back to it.

    `bundle` and `model` are paths every worker can read (see the module docstring; `classify_dataset` resolves
    them on the driver). `threads`: llama.cpp threads, by default the CPUs Ray reserved for this actor (its
    `num_cpus`) — Ray does not pin actors to cores, so llama.cpp's own default (every core) would have each actor
    on a node fight the others for all of them.
    """

    def __init__(
        self,
        *,
        bundle: str | None = None,
        model: str | None = None,
        policy: str | None = None,
        text_column: str = "text",
        id_column: str | None = None,
        threads: int | None = None,
        width: int = WIDTH,
        n_ctx: int = EngineSettings.n_ctx,
        truncate: bool = False,
    ):
        self.text_column, self.id_column = text_column, id_column
        settings = EngineSettings(n_ctx=n_ctx, width=width, n_threads=threads or _actor_cpus())
        self.classifier = Classifier(bundle, model=model, policy=policy, settings=settings, truncate=truncate)
        self.schema = pa.schema([
            ("label", pa.string()),
            *((f"score_{label}", pa.float64()) for label in self.classifier.labels),
            *RESULT_TYPES.items(),
            ("error", pa.string()),
        ])

    def __call__(self, batch: Any) -> Any:
        kept = _select(batch, self.id_column) if self.id_column is not None else batch
        clashes = [name for name in self.schema.names if name in _names(kept)]
        if clashes:
            raise InputError(f"the batch already has a column {clashes[0]!r}, which the results would overwrite: "
                             "rename it (Dataset.rename_columns) or pass id_column to keep only the ids")
        results = self._results(_column(batch, self.text_column))
        if isinstance(batch, dict):  # numpy has no null integers: typed Arrow columns say what an error row lacks
            kept = pa.table(kept)
        if isinstance(kept, pa.Table):
            for name in results.column_names:
                kept = kept.append_column(name, results[name])
            return kept
        import pandas as pd  # loaded already: the batch is a DataFrame

        added = results.to_pandas(types_mapper=pd.ArrowDtype)
        added.index = kept.index
        return pd.concat([kept, added], axis=1)

    def _results(self, texts: list[Any]) -> pa.Table:
        """One row per text, in order: the classifier finishes them in any order, keyed by their row."""
        outcomes: list[Result | Edge2DExitError | None] = [None] * len(texts)
        readable = []
        for row, value in enumerate(texts):
            try:
                readable.append((row, _as_text(value)))
            except InputError as exc:
                outcomes[row] = exc
        for row, outcome in self.classifier.classify_many(readable):
            outcomes[row] = outcome
        return pa.Table.from_pylist([_record(outcome) for outcome in outcomes], schema=self.schema)


def classify_dataset(
    dataset: "ray.data.Dataset",
    *,
    bundle: str | Path | None = None,
    model: str | Path | None = None,
    policy: str | None = None,
    concurrency: int = 1,
    num_cpus: float = 1,
    batch_size: int = BATCH_SIZE,
    text_column: str = "text",
    id_column: str | None = None,
    width: int = WIDTH,
    n_ctx: int = EngineSettings.n_ctx,
    truncate: bool = False,
) -> "ray.data.Dataset":
    """`dataset` with the result columns of `ClassifyBatch`, read by a pool of `concurrency` actors of `num_cpus`
    CPUs each (llama.cpp runs that many threads in each). Lazy, as Ray datasets are: write or iterate it to run it.

    The bundle is read here once, and the model resolved here to an absolute path, so that a wrong bundle, policy
    or model fails now, and the workers load files by path and download nothing. Without `bundle`, each worker
    uses the default bundle of its own edge2dexit installation."""
    import ray.data

    loaded = load_bundle(bundle or DEFAULT_BUNDLE)
    if policy is not None:
        loaded.policy_params(policy)
    model_path = base_model_path(loaded, model, pull_missing=True).resolve()
    return dataset.map_batches(
        ClassifyBatch,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "bundle": None if bundle is None else str(Path(bundle).resolve()),
            "model": str(model_path),
            "policy": policy,
            "text_column": text_column,
            "id_column": id_column,
            "width": width,
            "n_ctx": n_ctx,
            "truncate": truncate,
        },
    )


def _actor_cpus() -> int | None:
    """The CPUs Ray reserved for the actor this runs in, or None outside a Ray actor (llama.cpp then takes every
    core). Ray is looked up, not imported: an actor's process has imported it already."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # the driver, or a task
        return None
    cpus = context.get_assigned_resources().get("CPU")
    return max(1, round(cpus)) if cpus else None


def _as_text(value: Any) -> str:
    """A cell as checked text: str or UTF-8 bytes; anything else (null, NaN, a number) is a row without text."""
    if isinstance(value, bytes):
        return decode_text(value)
    if not isinstance(value, str):
        raise InputError(f"the row has no text ({value!r})")
    return value


def _record(outcome: Result | Edge2DExitError) -> dict[str, Any]:
    if isinstance(outcome, Edge2DExitError):
        return {"error": str(outcome)}
    return {
        "label": outcome.label,
        **{f"score_{label}": score for label, score in outcome.scores.items()},
        **{name: getattr(outcome, name) for name in RESULT_TYPES},
    }


def _names(batch: Any) -> list[str]:
    return list(batch.column_names if isinstance(batch, pa.Table) else batch.keys())


def _check_column(batch: Any, name: str) -> None:
    if name not in _names(batch):
        raise InputError(f"the batch has no column {name!r}; its columns: {', '.join(map(repr, _names(batch)))}")


def _column(batch: Any, name: str) -> list[Any]:
    _check_column(batch, name)
    return batch.column(name).to_pylist() if isinstance(batch, pa.Table) else list(batch[name])


def _select(batch: Any, name: str) -> Any:
    """`batch` with only its column `name`, in the batch's own format."""
    _check_column(batch, name)
    if isinstance(batch, pa.Table):
        return batch.select([name])
    if isinstance(batch, dict):
        return {name: batch[name]}
    return batch[[name]]
