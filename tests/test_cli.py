"""The `classify` command over many inputs with the default bundle on the real SmolLM2: directories, tables with bad
rows, JSON records, --output with --resume, error records that do not stop the batch, and the exit codes. Usage
errors and internal errors are one message and an exit code, never a traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edge2dexit.cli import app

GOOD = "A wonderful film. The acting was superb and the story moving. I loved every minute of it."
BAD = "What a waste of time. The plot made no sense. The acting was wooden. I wanted my money back."
OTHER = "Great fun from start to end. The music was lovely."
N_CTX = ["--n-ctx", "512"]


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def is_error_record(record: dict) -> bool:
    return set(record) == {"input", "error", "exit_code"}


def is_result_record(record: dict) -> bool:
    return "error" not in record and record["label"] in ("negative", "positive") and record["policy"] == "prefix-mean"


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "reviews"
    (root / "more").mkdir(parents=True)
    (root / "a.txt").write_text(GOOD)
    (root / "b.txt").write_text(BAD)
    (root / "more" / "c.txt").write_text(OTHER)
    (root / "notes.md").write_text("not a review")  # only *.txt files are read
    return root


# --- usage errors and internal errors: no model is loaded ------------------------------------------------------


def assert_one_message(result, *words):
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if words[0] in line]
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


@pytest.mark.parametrize("args, words", [
    (["classify", "x.txt", "--policy", "fastest"], ("Invalid value for '--policy'", "'fastest' is not one of")),
    (["classify", "x.txt", "--width", "0"], ("Invalid value for '--width'",)),
    (["classify", "x.txt", "--resume"], ("--resume needs --output",)),
    (["eval", "--split", "dev"], ("Invalid value for '--split'", "'dev' is not one of")),
    (["eval", "--policies", "full,ours"], ("Invalid value", "ours")),
    (["convert", "-m", "m", "-d", "d", "-o", "o", "--head", "conv"], ("Invalid value for '--head'", "'conv'")),
    (["convert", "-m", "m", "-d", "d", "-o", "o", "--quant", "q3"], ("Invalid value for '--quant'", "'q3'")),
    (["convert", "-m", "m", "-d", "d", "-o", "o", "--split", "0.8,0.2"], ("Invalid value for '--split'", "'0.8,0.2'")),
])
def test_usage_errors_exit_2_with_one_message(args, words):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert_one_message(result, *words)


def test_an_internal_error_is_one_line_and_exit_code_1(monkeypatch, tmp_path):
    import edge2dexit.cli.classify as command

    def broken(*args, **kwargs):
        raise ValueError("something the code did not expect")

    monkeypatch.delenv("EDGE2DEXIT_DEBUG", raising=False)
    monkeypatch.setattr(command, "iter_items", broken)
    review = tmp_path / "r.txt"
    review.write_text(GOOD)
    result = invoke("classify", str(review))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert "internal error (ValueError: something the code did not expect)" in result.stderr
    assert "EDGE2DEXIT_DEBUG=1" in result.stderr


# --- batches on the real model -------------------------------------------------------------------------------


@pytest.mark.llama
def test_a_directory_of_texts_as_json_records(folder):
    result = invoke("classify", str(folder), "--json", *N_CTX)
    assert result.exit_code == 0, result.output
    rows = records(result.stdout)
    expected = sorted(str(p) for p in folder.rglob("*.txt"))
    assert sorted(r["input"] for r in rows) == expected
    for row in rows:
        assert is_result_record(row), row
        assert abs(sum(row["scores"].values()) - 1) < 1e-6
        assert {"exit_sentence", "exit_layer", "sentences_read", "sentences_total", "token_layers", "tokens",
                "seconds", "truncated", "early", "operations", "layers_run"} <= set(row)
    by_input = {r["input"]: r for r in rows}
    assert by_input[str(folder / "a.txt")]["label"] == "positive"
    assert by_input[str(folder / "b.txt")]["label"] == "negative"


@pytest.mark.llama
def test_plain_output_is_one_line_per_text(folder):
    result = invoke("classify", str(folder / "a.txt"), str(folder / "b.txt"), *N_CTX)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{folder / 'a.txt'}: positive") or lines[1].startswith(f"{folder / 'a.txt'}: positive")
    assert all("[prefix-mean]" in line and "token-layers" in line for line in lines)


@pytest.mark.llama
def test_a_csv_with_bad_rows_reports_them_and_classifies_the_rest(tmp_path):
    table = tmp_path / "reviews.csv"
    table.write_text(
        "id,text\n"
        f'r1,"{GOOD}"\n'
        "r2,\n"  # an empty text
        "r3\n"  # no text column at all in this row
        f'r4,"{BAD}"\n'
    )
    result = invoke("classify", str(table), "--json", "--ordered", *N_CTX)
    assert result.exit_code == 3, result.output
    rows = records(result.stdout)
    assert [r["input"] for r in rows] == [f"{table}:{n}" for n in (2, 3, 4, 5)]
    assert is_result_record(rows[0]) and rows[0]["label"] == "positive"
    assert is_error_record(rows[1]) and rows[1]["exit_code"] == 3 and "empty" in rows[1]["error"]
    assert is_error_record(rows[2]) and rows[2]["exit_code"] == 3 and "'text' holds nothing" in rows[2]["error"]
    assert is_result_record(rows[3]) and rows[3]["label"] == "negative"
    assert f"{table}:3" in result.stderr and f"{table}:4" in result.stderr and "Traceback" not in result.output

    by_id = invoke("classify", str(table), "--json", "--id-column", "id", *N_CTX)
    assert by_id.exit_code == 3
    assert sorted(r["input"] for r in records(by_id.stdout)) == ["r1", "r2", "r3", "r4"]


@pytest.mark.llama
def test_a_jsonl_with_invalid_lines_and_a_table_without_the_column(tmp_path):
    table = tmp_path / "reviews.jsonl"
    table.write_text("\n".join([
        json.dumps({"body": GOOD}),
        '{"body": "unterminated',
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"body": BAD}),
        json.dumps({"body": 42}),
    ]) + "\n")
    result = invoke("classify", str(table), "--text-column", "body", "--json", "--ordered", *N_CTX)
    assert result.exit_code == 3, result.output
    rows = records(result.stdout)
    assert [r["input"] for r in rows] == [f"{table}:{n}" for n in (1, 2, 3, 5, 6)]
    assert [is_error_record(r) for r in rows] == [False, True, True, False, True]
    assert "not valid JSON" in rows[1]["error"] and "not a JSON object" in rows[2]["error"]
    assert "holds int, not text" in rows[4]["error"]
    assert rows[0]["label"] == "positive" and rows[3]["label"] == "negative"

    wrong = invoke("classify", str(tmp_path / "reviews.jsonl"), "--json", *N_CTX)  # no "text" key in any row
    assert wrong.exit_code == 3 and all(is_error_record(r) for r in records(wrong.stdout))
    csv = tmp_path / "other.csv"
    csv.write_text(f'review\n"{GOOD}"\n')
    missing = invoke("classify", str(csv), "--json", *N_CTX)
    assert missing.exit_code == 3
    (row,) = records(missing.stdout)
    assert is_error_record(row) and "has no column 'text'" in row["error"] and "'review'" in row["error"]


@pytest.mark.llama
def test_output_appends_records_and_resume_skips_the_texts_done(folder, tmp_path):
    out = tmp_path / "results.jsonl"
    missing = str(tmp_path / "missing.txt")
    first = invoke("classify", str(folder), missing, "--output", str(out), *N_CTX)
    assert first.exit_code == 3 and first.stdout == ""  # records go to the file only
    rows = records(out.read_text())
    assert len(rows) == 4 and sum(map(is_error_record, rows)) == 1
    assert next(r for r in rows if is_error_record(r))["input"] == missing

    (folder / "d.txt").write_text(BAD + " Truly dreadful.")
    again = invoke("classify", str(folder), missing, "--output", str(out), "--resume", *N_CTX)
    assert again.exit_code == 3
    rows = records(out.read_text())
    new = rows[4:]
    # only the new text and the one that failed (error records are retried) were read again
    assert sorted(r["input"] for r in new) == sorted([str(folder / "d.txt"), missing])
    assert next(r for r in new if r["input"] == str(folder / "d.txt"))["label"] == "negative"

    nothing_new = invoke("classify", str(folder), "--output", str(out), "--resume", *N_CTX)
    assert nothing_new.exit_code == 0 and len(records(out.read_text())) == 6


@pytest.mark.llama
def test_resume_after_a_line_cut_by_a_crash_keeps_the_records_readable(folder, tmp_path):
    """A line cut by a crash is not a record: its text is read again, and the record written after it must be a
    line of its own, not glued to the cut one."""
    out = tmp_path / "results.jsonl"
    assert invoke("classify", str(folder), "--output", str(out), *N_CTX).exit_code == 0
    victim = str(folder / "a.txt")
    lines = out.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["input"] != victim]
    cut = next(line for line in lines if json.loads(line)["input"] == victim)[:20]
    out.write_text("\n".join(kept) + "\n" + cut)
    resumed = invoke("classify", str(folder), "--output", str(out), "--resume", *N_CTX)
    assert resumed.exit_code == 0
    tail = out.read_text().splitlines()[len(kept):]
    assert tail[0] == cut
    assert [json.loads(line)["input"] for line in tail[1:]] == [victim]


@pytest.mark.llama
def test_ordered_batches_report_in_input_order(folder, tmp_path):
    inputs = [str(folder / "b.txt"), str(tmp_path / "nowhere.txt"), str(folder / "more" / "c.txt"),
              str(folder / "a.txt")]
    result = invoke("classify", *inputs, "--json", "--ordered", "--width", "4", *N_CTX)
    assert result.exit_code == 3, result.output
    rows = records(result.stdout)
    assert [r["input"] for r in rows] == inputs
    assert is_error_record(rows[1]) and "no such file" in rows[1]["error"]
    single = records(invoke("classify", *inputs[2:], "--json", "--ordered", *N_CTX).stdout)
    for batched, alone in zip(rows[2:], single):
        assert (batched["label"], batched["exit_layer"], batched["sentences_read"]) == (
            alone["label"], alone["exit_layer"], alone["sentences_read"])


@pytest.mark.llama
def test_standard_input_whole_and_by_line():
    whole = invoke("classify", "-", "--json", *N_CTX, input=GOOD)
    assert whole.exit_code == 0 and records(whole.stdout)[0]["input"] == "-"
    # blank lines are no texts, as in a JSONL table; a line that is not UTF-8 is an error record
    lines = invoke("classify", "-", "--lines", "--json", "--ordered", *N_CTX,
                   input=f"{GOOD}\n\n  \n{BAD}\n".encode() + b"caf\xe9\n")
    assert lines.exit_code == 3
    rows = records(lines.stdout)
    assert [r["input"] for r in rows] == ["stdin:1", "stdin:4", "stdin:5"]
    assert [is_error_record(r) for r in rows] == [False, False, True]
    assert rows[0]["label"] == "positive" and rows[1]["label"] == "negative" and "not UTF-8" in rows[2]["error"]


@pytest.mark.llama
def test_a_bundle_error_is_the_exit_code_of_the_run(tmp_path, folder):
    result = invoke("classify", str(folder), "--bundle", str(tmp_path / "nowhere"))
    assert result.exit_code == 5 and "bundle not found" in result.stderr and "Traceback" not in result.output
