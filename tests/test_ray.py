"""Ray Data on a local cluster of this machine (2 CPUs, 2 actors of 1 CPU each): a corpus classified through
`map_batches` gets exactly the labels and exit points of the single-process classifier, a bad row becomes an error
row without failing its batch, and each actor runs llama.cpp on the CPUs Ray gave it. `ClassifyBatch` called in
this process checks every batch format; `classify-ray` reads a CSV and writes parquet on the same cluster."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from helpers import assert_same_decision  # noqa: E402
from edge2dexit.classifier import Classifier  # noqa: E402
from edge2dexit.cli import app  # noqa: E402
from edge2dexit.engine import EngineSettings  # noqa: E402
from edge2dexit.errors import InputError  # noqa: E402
from edge2dexit.ray_data import ClassifyBatch, _actor_cpus, classify_dataset  # noqa: E402

pytestmark = [
    pytest.mark.llama,
    # Ray Data's own: its DataContext copies itself through setters that warn about their deprecated fields
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

N_CTX = 512
OPENINGS = ["We watched it on a rainy Sunday.", "My sister chose this one.", "I saw it at the old cinema.",
            "The trailer had promised a lot."]
VERDICTS = ["The acting was superb and the story moving.", "It was a complete waste of time.",
            "I loved every minute of it.", "The plot made no sense at all.", "Great fun from start to end.",
            "Boring, and far too long.", "The music was lovely and the jokes landed.", "I fell asleep halfway through."]
CLOSINGS = ["I would gladly see it again.", "Avoid it."]
TEXTS = [" ".join(parts) for parts in itertools.product(OPENINGS, VERDICTS, CLOSINGS)]  # 64 short reviews
BAD_ROWS = {"empty": " \n ", "no text": None, "binary": "x\x00y", "long": "and then " * 300 + "the end."}


def assert_same_decisions(rows, alone) -> None:
    """Rows read by the actors, batched with other rows, decide as the single-process results one at a time
    (`helpers.assert_same_decision`: the same decision and scores within the batching tolerance, unless a
    decision lies within that tolerance of a boundary)."""
    assert len(rows) == len(alone)
    for row, single in zip(rows, alone):
        assert_same_decision(row, single, row.get("id"))
        assert (row["tokens"], row["truncated"]) == (single.tokens, single.truncated)


def test_classify_ray_without_ray_is_one_line_and_exit_code_2(tmp_path):
    """In a process of its own, where Ray cannot be imported (no Ray thread of this process is in the way)."""
    code = ("import sys; sys.modules['ray'] = None; sys.argv = ['edge2dexit', 'classify-ray', "
            f"{str(tmp_path / 'in.csv')!r}, {str(tmp_path / 'out')!r}]; from edge2dexit.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "edge2dexit: classify-ray needs Ray: pip install 'edge2dexit[ray]'"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster in this test's environment (its EDGE2DEXIT_HOME included), shut down afterwards."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def alone(smollm2_path):
    """The single-process classifier's results, one text at a time, on one thread like each actor (and because
    two llama.cpp threads on this machine's two busy cores spin-wait for each other: about 4 times slower)."""
    with Classifier(model=smollm2_path, settings=EngineSettings(n_ctx=N_CTX, n_threads=1)) as clf:
        return [clf.classify(text) for text in TEXTS]


@pytest.fixture(scope="module")
def ray_rows(cluster, smollm2_path):
    """id -> result row, for the corpus and the bad rows mixed in, through `map_batches` on two actors."""
    rows = [{"id": f"review-{i}", "text": text} for i, text in enumerate(TEXTS)]
    for n, (name, text) in enumerate(BAD_ROWS.items()):
        rows.insert(10 * n + 3, {"id": name, "text": text})
    dataset = classify_dataset(ray.data.from_items(rows), model=smollm2_path, concurrency=2, num_cpus=1,
                               batch_size=8, width=4, n_ctx=N_CTX, id_column="id")
    return {row["id"]: row for row in dataset.take_all()}


def test_a_corpus_on_two_actors_decides_as_one_process(ray_rows, alone):
    assert len(ray_rows) == len(TEXTS) + len(BAD_ROWS)
    for i, single in enumerate(alone):
        row = ray_rows[f"review-{i}"]
        assert set(row) == {"id", "label", "score_negative", "score_positive", "exit_sentence", "exit_layer",
                            "early", "sentences_read", "layers_run", "token_layers", "tokens", "seconds",
                            "boundary_gap", "truncated", "error"}  # the text stays behind: id_column
        assert row["error"] is None
        assert_same_decisions([row], [single])
    assert {single.label for single in alone} == {"negative", "positive"}


def test_a_bad_row_becomes_an_error_row(ray_rows):
    for name, words in {"empty": "empty", "no text": "no text", "binary": "binary", "long": "tokens"}.items():
        row = ray_rows[name]
        assert words in row["error"], row
        assert row["label"] is None and row["exit_layer"] is None and row["score_positive"] is None


def test_each_actor_runs_on_the_cpus_ray_gave_it(cluster):
    class Probe:  # defined here, so that Ray ships it by value: workers cannot import this test module
        def cpus(self):
            return _actor_cpus()

    assert ray.get(ray.remote(num_cpus=1)(Probe).remote().cpus.remote()) == 1
    assert _actor_cpus() is None  # the driver: llama.cpp's default, every core


# --- ClassifyBatch called here: every batch format, no Ray worker --------------------------------------------------


@pytest.fixture(scope="module")
def batcher(smollm2_path):
    return ClassifyBatch(model=smollm2_path, text_column="review", n_ctx=N_CTX, width=4, threads=1)


@pytest.mark.parametrize("fmt", ["pandas", "pyarrow", "numpy"])
def test_every_batch_format_keeps_its_rows_in_order(batcher, alone, fmt):
    texts = [TEXTS[0], "", TEXTS[1], TEXTS[2]]
    columns = {"review": texts, "stars": [0, 1, 2, 3]}
    batch = {"pandas": lambda: pd.DataFrame(columns, index=[7, 8, 9, 10]),
             "pyarrow": lambda: pa.table(columns),
             "numpy": lambda: {name: np.array(values) for name, values in columns.items()}}[fmt]()
    out = batcher(batch)
    assert isinstance(out, pd.DataFrame if fmt == "pandas" else pa.Table)
    if fmt == "pandas":
        assert list(out.index) == [7, 8, 9, 10]
        out = pa.Table.from_pandas(out, preserve_index=False)
    rows = out.to_pylist()
    assert [row["review"] for row in rows] == texts and [row["stars"] for row in rows] == [0, 1, 2, 3]
    assert_same_decisions([row for i, row in enumerate(rows) if i != 1], alone[:3])
    assert "empty" in rows[1]["error"] and rows[1]["label"] is None
    assert out.schema.field("exit_layer").type == pa.int64() and out.schema.field("error").type == pa.string()


def test_a_column_the_results_would_overwrite_or_a_missing_text_column_is_refused(batcher):
    with pytest.raises(InputError, match="already has a column 'label'"):
        batcher(pa.table({"review": [TEXTS[0]], "label": ["positive"]}))
    with pytest.raises(InputError, match="no column 'review'; its columns: 'text'"):
        batcher(pa.table({"text": [TEXTS[0]]}))


# --- the CLI shortcut ----------------------------------------------------------------------------------------------


def test_classify_ray_reads_a_csv_and_writes_parquet(cluster, alone, smollm2_path, tmp_path):
    source = tmp_path / "reviews.csv"
    pd.DataFrame({"id": range(4), "text": TEXTS[:4]}).to_csv(source, index=False)
    result = CliRunner().invoke(app, ["classify-ray", str(source), str(tmp_path / "out"), "--model", smollm2_path,
                                      "--n-ctx", str(N_CTX), "--id-column", "id"])
    assert result.exit_code == 0, result.output
    rows = sorted(pq.read_table(tmp_path / "out").to_pylist(), key=lambda row: row["id"])
    assert_same_decisions(rows, alone[:4])
