"""README's Reliability promises, kept where a user meets them: the installed `edge2dexit` entry point run in a
subprocess, with real signals, pipes, devices and files (the default bundle on the real SmolLM2).

Every failure a user can act on is its documented exit code and one line on stderr, never a traceback: Ctrl-C while
llama.cpp decodes (130), everyday mistakes with options and output files (2, 6, 7), a reader that goes away (141).
Texts that used to be refused or mis-reported (emoji and CJK with --truncate, a text far past the context), inputs
that are no regular files (pipes, /dev/stdin), odd files in directories and tables, and --deterministic are checked
here too, and `classify_many` over items that are no strings.

Every run here reads with the LLM (`--no-lexical`, `lexical=False`): the default bundle's words answer most texts
before llama.cpp is called, and what these tests keep is the read (the words' own exit: test_lexical.py)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge2dexit import Classifier, EngineSettings
from edge2dexit.bundle import load_bundle
from edge2dexit.classifier import DEFAULT_BUNDLE, Result
from edge2dexit.errors import Edge2DExitError, InputError
from helpers import (CLI, REVIEWS, assert_exit, bash, cli, documented_exit_codes, json_records, mixed_reviews)

pytestmark = pytest.mark.llama

GOOD = "A wonderful film. The acting was superb and the story moving. I loved every minute of it."
BAD = "What a waste of time. The plot made no sense. The acting was wooden. I wanted my money back."
LLM_READ = ("--no-lexical", "--n-ctx", "512")
# What must agree between two reads of one text that promise the same numbers: everything but the wall time.
DECIDED = ("label", "scores", "exit_sentence", "exit_layer", "sentences_read", "sentences_total", "early",
           "token_layers", "boundary_gap")


def decided(record: dict) -> dict:
    return {k: record[k] for k in DECIDED}


@pytest.fixture
def review(tmp_path) -> Path:
    path = tmp_path / "review.txt"
    path.write_text(GOOD)
    return path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# --- Ctrl-C while llama.cpp decodes -----------------------------------------------------------------------------


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def interrupt(args: list[str], out: Path, delay: float) -> subprocess.CompletedProcess:
    """Start `edge2dexit ARGS`, wait until it has added a record to `out` (it is then classifying: most of its time
    is in llama_decode), wait `delay` seconds more and press Ctrl-C (SIGINT to the process, as a terminal sends it)."""
    before = lines_in(out)
    # As from a terminal: Ctrl-C's default action. (A shell starts a background job, pytest included, with SIGINT
    # ignored, and a child inherits that: Python then installs no KeyboardInterrupt handler and the signal is lost.)
    process = subprocess.Popen([str(CLI), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while lines_in(out) <= before and process.poll() is None:
        assert time.monotonic() < deadline, "no record written in 300 s"
        time.sleep(0.005)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


@pytest.mark.parametrize("width, tries", [(1, 6), (4, 6), pytest.param(1, 25, marks=pytest.mark.slow),
                                          pytest.param(4, 25, marks=pytest.mark.slow)])
def test_ctrl_c_while_decoding_is_exit_130_and_one_line_and_resume_finishes(tmp_path, width, tries):
    """Ctrl-C at random moments of a run that mostly decodes: each time exit 130 and exactly the line
    `edge2dexit: interrupted`, the file holds only whole records, and each --resume goes on where the last run
    stopped until the last one finishes: every row once, earlier records untouched. Each try gives the signal a
    chance to arrive inside llama_decode's eval callback, where it used to stop the graph half way (a KeyError and
    exit 1); `pytest -m slow` tries more often."""
    texts = mixed_reviews(20 * tries, seed=width + tries)
    rows, out = write_jsonl(tmp_path / "rows.jsonl", texts), tmp_path / "out.jsonl"
    args = ["classify", str(rows), "-o", str(out), "--width", str(width), *LLM_READ]
    rng = random.Random(width + tries)
    interrupted = 0
    for attempt in range(tries):
        before = out.read_bytes() if out.exists() else b""
        stopped = interrupt(args + ["--resume"] * (attempt > 0), out, rng.uniform(0, 0.3))
        if stopped.returncode == 0:  # every row was done before the signal came
            break
        interrupted += 1
        assert stopped.returncode == 130, stopped.stderr
        assert stopped.stderr == "edge2dexit: interrupted\n" and stopped.stdout == ""
        written = out.read_bytes()
        assert written.startswith(before) and written.endswith(b"\n")  # appended whole records only
        assert all(r["label"] in ("negative", "positive") for r in json_records(written.decode()))
    assert interrupted >= min(tries, 3)
    finished = cli(*args, "--resume")
    assert finished.returncode == 0, finished.stderr
    records = json_records(out.read_text())
    assert sorted(r["input"] for r in records) == sorted(f"{rows}:{n}" for n in range(1, len(texts) + 1))


# --- everyday mistakes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_ctx", ["0", "-5", "10"])
def test_a_context_size_below_the_least_is_a_usage_error(review, n_ctx):
    assert_exit(cli("classify", review, "--no-lexical", "--n-ctx", n_ctx), 2, "--n-ctx", one_line=False)


def test_a_context_llama_cpp_cannot_allocate_is_a_settings_error_in_one_line(review):
    assert_exit(cli("classify", review, "--no-lexical", "--n-ctx", "100000000"), 2, "could not create a context",
                "--n-ctx")


def test_a_context_the_task_prompt_fills_leaves_no_room(review):
    """The message says what is wrong (no room for text), not "16 tokens, more than the context of 16"; and
    since --truncate cannot help there, it does not suggest it, with or without it."""
    for truncate in ([], ["--truncate"]):
        done = cli("classify", review, "--no-lexical", "--n-ctx", "16", *truncate)
        assert_exit(done, 6, "leaves no room", "--n-ctx")
        assert "--truncate" not in done.stderr and "more than" not in done.stderr


@pytest.mark.parametrize("where", ["missing directory", "a directory", "/dev/full"])
def test_output_that_cannot_be_written_is_exit_7(review, tmp_path, where):
    """No such directory and a directory are found before any text is read; a full disk (/dev/full: ENOSPC) at
    the first record. Either way one line naming the place."""
    out = {"missing directory": tmp_path / "nowhere" / "x.jsonl", "a directory": tmp_path,
           "/dev/full": Path("/dev/full")}[where]
    assert_exit(cli("classify", review, "-o", out, *LLM_READ), 7, f"cannot write to {out}")


def test_output_to_a_full_standard_output_is_exit_7(review):
    done = bash(f'"$E" classify {review} --json --no-lexical --n-ctx 512 > /dev/full')
    assert_exit(done, 7, "cannot write to standard output")


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path):
    """`… | head -1`: head reads one record and leaves; the next write finds the pipe closed. The run ends with 141
    (or 0 had it already written everything), and says nothing: no traceback, no "Exception ignored"."""
    rows = write_jsonl(tmp_path / "rows.jsonl", mixed_reviews(60))
    status = tmp_path / "status"
    done = bash(f'set -o pipefail\n"$E" classify {rows} --json --no-lexical --n-ctx 512 | head -1\n'
                f'echo "${{PIPESTATUS[0]}}" > {status}')
    assert int(status.read_text()) in (0, 141) and done.returncode in (0, 141)
    assert done.stderr == ""
    (record,) = json_records(done.stdout)
    assert record["input"] == f"{rows}:1"


def test_resume_into_a_file_that_is_not_utf8_is_exit_7(review, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes("not records".encode("utf-16"))
    assert_exit(cli("classify", review, "-o", out, "--resume", *LLM_READ), 7, "is not UTF-8", str(out))


# --- --truncate and text that does not fit -------------------------------------------------------------------


@pytest.mark.parametrize("text", ["😀" * 1000, "好" * 2000], ids=["emoji", "cjk"])
def test_truncate_cuts_a_sentence_longer_than_the_room(tmp_path, text):
    """Emoji and CJK without spaces are one "sentence" longer than the whole context: --truncate reads what fits
    of it; without --truncate the text is refused (exit 6) with a message that suggests --truncate."""
    path = tmp_path / "long.txt"
    path.write_text(text + "\n")
    done = cli("classify", path, "--truncate", "--json", "--no-lexical", "--n-ctx", "128")
    assert done.returncode == 0, done.stderr
    (record,) = json_records(done.stdout)
    assert record["truncated"] is True and record["sentences_read"] == 1 and 100 < record["tokens"] <= 128
    assert_exit(cli("classify", path, "--no-lexical", "--n-ctx", "128"), 6, "needs at least", "--truncate")


# --- how many tokens a text needs ----------------------------------------------------------------------------

NEEDS = re.compile(r"the text needs at least (\d+) tokens but the context leaves room for (\d+) after")


def test_a_text_far_past_the_context_reports_a_lower_bound_of_its_tokens(tmp_path, smollm2_engine):
    """Reading stops counting at the first sentence past the room, so the count is a lower bound, and the message
    says so ("at least"): here it is checked against the text's true count, every sentence tokenized by the
    model with the token rule."""
    text = "a" * 200_000
    path = tmp_path / "long.txt"
    path.write_text(text)
    splitter = load_bundle(DEFAULT_BUNDLE).splitter
    true_count = sum(len(smollm2_engine.tokenize(s)) for s in splitter.sentences(text))
    for n_ctx in (512, 3100):
        done = cli("classify", path, "--no-lexical", "--n-ctx", n_ctx)
        assert_exit(done, 6, "needs at least")
        needed, room = map(int, NEEDS.search(done.stderr).groups())
        assert room < needed <= true_count, (room, needed, true_count)


# --- classify_many over items that are no strings -------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    with Classifier(lexical=False, settings=EngineSettings(n_ctx=256, width=2)) as clf:
        yield clf


def test_classify_many_gives_each_item_a_result_or_one_error(classifier):
    """A table column with gaps (NaN, None) or numbers: every item gives a Result or one Edge2DExitError in its
    place, and the strings beside them are classified as they are alone."""
    pd = pytest.importorskip("pandas")
    items = ["Great film.", float("nan"), "Bad.", None, 42, b"bytes", REVIEWS[0]]
    outcomes = list(classifier.classify_many(items))
    assert sorted(key for key, _ in outcomes) == list(range(len(items)))
    by_key = dict(outcomes)
    for key, item in enumerate(items):
        if isinstance(item, str):
            assert isinstance(by_key[key], Result)
            assert by_key[key].label == classifier.classify(item).label
        else:
            assert isinstance(by_key[key], InputError) and "not a string" in str(by_key[key]), by_key[key]
    column = pd.Series(["A wonderful film.", math.nan, "An awful film."], index=["a", "b", "c"])
    from_column = dict(classifier.classify_many(column.items()))
    assert set(from_column) == {"a", "b", "c"}
    assert isinstance(from_column["b"], Edge2DExitError) and "nan" in str(from_column["b"])
    assert from_column["a"].label == "positive" and from_column["c"].label == "negative"


# --- --deterministic ----------------------------------------------------------------------------------------------


def test_deterministic_gives_what_each_text_gets_alone(tmp_path):
    """--deterministic reads a table's texts one at a time: each record equals that of the text's own file
    classified alone, bit for bit (label, scores, exit point, costs)."""
    texts = mixed_reviews(5, seed=6) + REVIEWS
    rows = write_jsonl(tmp_path / "rows.jsonl", texts)
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i:02}.txt")
        files[-1].write_text(text)
    together = cli("classify", rows, "--deterministic", "--json", "--ordered", *LLM_READ)
    alone = [cli("classify", path, "--json", *LLM_READ) for path in (files[0], files[-1])]
    alone_in_one_run = cli("classify", *files, "--json", "--ordered", "--width", "1", *LLM_READ)
    assert together.returncode == 0 and alone_in_one_run.returncode == 0, together.stderr
    got = [decided(r) for r in json_records(together.stdout)]
    assert got == [decided(r) for r in json_records(alone_in_one_run.stdout)]
    assert [got[0], got[-1]] == [decided(r) for done in alone for r in json_records(done.stdout)]
    assert_exit(cli("classify", rows, "--deterministic", "--width", "4"), 2, "--deterministic", one_line=False)


def test_deterministic_reads_one_text_at_a_time_where_the_backend_would_batch(tmp_path):
    """On a GPU build the default width is 32. Run as if on one (llama.gpu_offload answering yes, on this CPU
    build), plain classify shares decodes and --deterministic does not: its records equal each text read alone."""
    texts = mixed_reviews(12, seed=7)
    rows = write_jsonl(tmp_path / "rows.jsonl", texts)
    as_if_gpu = ("import sys, edge2dexit.engine as engine; engine.gpu_offload = lambda: True; "
                 "from edge2dexit.cli import main; sys.argv[0] = 'edge2dexit'; main()")

    def records(*args: str) -> list[dict]:
        done = subprocess.run([sys.executable, "-c", as_if_gpu, "classify", str(rows), "--json",
                               "--ordered", "--gpu-layers", "0", *LLM_READ, *args],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return [decided(r) for r in json_records(done.stdout)]

    deterministic, shared = records("--deterministic"), records()
    with Classifier(lexical=False, settings=EngineSettings(n_ctx=512, width=1, n_gpu_layers=0)) as clf:
        alone = [decided({**clf.classify(text).to_dict()}) for text in texts]
    assert deterministic == alone
    assert shared != alone  # shared decodes move the last digits: what --deterministic is for


# --- inputs that are no regular files ------------------------------------------------------------------------------


def test_a_device_that_never_ends_is_refused_at_once():
    """Named inputs are read whatever they are, but not to the end of what never ends: /dev/zero and /dev/urandom
    are binary within their first chunk (before, /dev/zero was read until memory ran out)."""
    for device in ("/dev/zero", "/dev/urandom"):
        assert_exit(cli("classify", device, *LLM_READ, timeout=120), 3, f"{device}: ", "binary")


def test_standard_input_by_line_ends_at_binary_and_skips_a_line_too_long():
    """Read by line, /dev/zero is one error record and the end of the input, not a line read until memory runs out;
    a line over 16 MiB is an error record, skipped without being held, and the lines after it are read."""
    zero = bash('"$E" classify - --lines --json --no-lexical --n-ctx 512 < /dev/zero', timeout=120)
    assert zero.returncode == 3 and "Traceback" not in zero.stderr, zero.stderr
    assert [(r["input"], "binary" in r["error"]) for r in json_records(zero.stdout)] == [("stdin:1", True)]
    long = cli("classify", "-", "--lines", "--json", "--ordered", *LLM_READ,
               input=f"{GOOD}\n{'x' * (17 << 20)}\n{BAD}\n")
    records = json_records(long.stdout)
    assert long.returncode == 3 and [r["input"] for r in records] == ["stdin:1", "stdin:2", "stdin:3"], long.stderr
    assert "label" in records[0] and "16 MiB" in records[1]["error"] and "label" in records[2]


def test_a_pipe_and_dev_stdin_are_inputs(review):
    direct = cli("classify", review, "--json", *LLM_READ)
    assert direct.returncode == 0, direct.stderr
    (want,) = json_records(direct.stdout)
    for script in (f'"$E" classify <(cat {review}) --json --no-lexical --n-ctx 512',
                   f'cat {review} | "$E" classify /dev/stdin --json --no-lexical --n-ctx 512'):
        done = bash(script)
        assert done.returncode == 0, (script, done.stderr)
        (got,) = json_records(done.stdout)
        assert decided(got) == decided(want), script


# --- files, tables and directories ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_a_file_in_another_unicode_encoding_says_to_convert_it(tmp_path, encoding, name):
    path = tmp_path / "review.txt"
    path.write_bytes(GOOD.encode(encoding))  # Python writes the byte-order mark first
    assert_exit(cli("classify", path, *LLM_READ), 3, f"is {name}", "convert it to UTF-8")


def test_tables_and_standard_input_number_their_rows_by_first_line(tmp_path):
    """A CSV row whose quoted cell spans lines is known by the line it starts on; blank lines of standard input read
    by line (white space only, CRLF) are no texts, as blank JSONL lines are not."""
    table = tmp_path / "reviews.csv"
    table.write_text(f'text\n"{GOOD}\nIt spans two lines."\n"{BAD}"\n', newline="")
    done = cli("classify", table, "--json", "--ordered", *LLM_READ)
    assert done.returncode == 0, done.stderr
    assert [r["input"] for r in json_records(done.stdout)] == [f"{table}:2", f"{table}:4"]
    lines = cli("classify", "-", "--lines", "--json", "--ordered", *LLM_READ, input=f"{GOOD}\r\n\r\n \t \n\n{BAD}\n")
    assert lines.returncode == 0, lines.stderr
    assert [r["input"] for r in json_records(lines.stdout)] == ["stdin:1", "stdin:5"]


def test_error_records_never_repeat_their_id(tmp_path):
    """Every kind of error record: its "error" says what is wrong and never the input's id (the record's "input" has
    it), and its stderr line is `edge2dexit: <id>: <error>`."""
    def write(name: str, content: str | bytes) -> str:
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "gone.txt").symlink_to(tmp_path / "nothing-here.txt")
    (tmp_path / "no-texts").mkdir()
    inputs = [
        str(tmp_path / "missing.txt"), str(folder), str(tmp_path / "no-texts"),
        write("empty.txt", " \n"), write("binary.txt", b"\x00\x01 binary"), write("latin.txt", b"caf\xe9"),
        write("utf16.txt", GOOD.encode("utf-16")), write("long.txt", " ".join([GOOD] * 20)),
        write("rows.jsonl", '{"text": "unterminated\n["a list"]\n{"text": 42}\n{"body": "no text key"}\n'),
        write("rows.csv", "id,text\nr1,\n"), write("other.csv", f"review\n{GOOD}\n"),
        write("twice.csv", f"text,text\n{GOOD},{BAD}\n"), write("latin.csv", b"text\ncaf\xe9\n"),
        write("latin.tsv", b"caf\xe9\tx\n"),
    ]
    done = cli("classify", *inputs, "--json", "--no-lexical", "--n-ctx", "64")
    assert done.returncode == 3, done.stderr
    records = json_records(done.stdout)
    assert len(records) == len(inputs) + 3 and all(set(r) == {"input", "error", "exit_code"} for r in records)
    assert {r["exit_code"] for r in records} == {3, 6}
    stderr_lines = done.stderr.splitlines()
    for record in records:
        assert record["input"] not in record["error"], record
        assert os.path.basename(record["input"].split(":")[0]) not in record["error"], record
        assert f"edge2dexit: {record['input']}: {record['error']}" in stderr_lines, record
    assert len(stderr_lines) == len(records)


def test_a_directory_reads_every_text_below_it_through_links(tmp_path):
    """*.TXT counts as *.txt; a symbolic link to a directory is followed (and a directory holding only such a link
    works); a dangling *.txt link and a pipe named *.txt are error records; a link loop neither hangs nor reads
    anything twice."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "linked.txt").write_text(BAD)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "UPPER.TXT").write_text(GOOD)
    (root / "sub" / "a.txt").write_text(BAD)
    (root / "to-other").symlink_to(other)
    (root / "sub" / "loop").symlink_to(root)  # a link back up the tree
    (root / "self").symlink_to(root / "self")  # a link to itself
    (root / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    os.mkfifo(root / "pipe.txt")  # nobody writes to it: opened, it would wait forever
    only_a_link = tmp_path / "only-a-link"
    only_a_link.mkdir()
    (only_a_link / "there").symlink_to(other)

    done = cli("classify", root, only_a_link, "--json", *LLM_READ, timeout=120)
    assert done.returncode == 3, done.stderr
    by_input = {r["input"]: r for r in json_records(done.stdout)}
    assert set(by_input) == {str(root / "UPPER.TXT"), str(root / "sub" / "a.txt"), str(root / "dangling.txt"),
                             str(root / "to-other" / "linked.txt"), str(root / "pipe.txt"),
                             str(only_a_link / "there" / "linked.txt")}
    assert by_input[str(root / "dangling.txt")]["error"] == "no such file (a broken symbolic link)"
    assert by_input[str(root / "pipe.txt")]["error"].startswith("is not a regular file")
    assert by_input[str(root / "UPPER.TXT")]["label"] == "positive"
    assert by_input[str(only_a_link / "there" / "linked.txt")]["label"] == "negative"


# --- random options -------------------------------------------------------------------------------------------


def expected_exit(n_ctx: int, width: int, output: str) -> int:
    """What README's table says these options give for one short review."""
    if n_ctx < 16 or not 1 <= width <= 255:
        return 2  # refused while the options are parsed
    if output in ("missing directory", "a directory"):
        return 7  # refused before a text is read
    if n_ctx == 16:
        return 6  # the task prompt leaves no room
    if output == "/dev/full":
        return 7  # at the first record, a result or an error
    return 0 if n_ctx >= 64 else 6  # the review needs 20 tokens after the prompt's 16: 17 and 24 are too small


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_ctx=st.sampled_from([-5, 0, 10, 16, 17, 24, 64, 512, 2048]), width=st.sampled_from([0, 1, 3, 256]),
       output=st.sampled_from(["stdout", "file", "missing directory", "a directory", "/dev/full"]))
@example(n_ctx=512, width=3, output="/dev/full")  # a result, then a write that fails
@example(n_ctx=24, width=1, output="file")  # an error record for a text too long
@example(n_ctx=64, width=3, output="stdout")  # success
@example(n_ctx=16, width=1, output="stdout")  # the prompt leaves no room
@example(n_ctx=17, width=1, output="/dev/full")  # an error record that cannot be written: two lines, exit 7
def test_random_options_give_a_documented_exit_code_and_no_traceback(tmp_path, n_ctx, width, output):
    """Any mix of good and bad option values: the exit code README's table gives them (an oracle of the order in which
    the CLI checks things), no traceback, and one line on stderr for every failure that is no usage error."""
    review = tmp_path / "review.txt"
    review.write_text(GOOD)
    where = {"stdout": [], "file": ["-o", tmp_path / "out.jsonl"],
             "missing directory": ["-o", tmp_path / "nowhere" / "out.jsonl"], "a directory": ["-o", tmp_path],
             "/dev/full": ["-o", "/dev/full"]}[output]
    done = cli("classify", review, "--no-lexical", f"--n-ctx={n_ctx}", f"--width={width}", *where)
    code = expected_exit(n_ctx, width, output)
    assert done.returncode == code and code in documented_exit_codes(), (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    if code == 0:
        assert done.stderr == ""
    elif code != 2:  # a line for the review if it failed, and one for a failure that ended the run
        lines = done.stderr.splitlines()
        assert lines and all(line.startswith("edge2dexit: ") for line in lines), done.stderr
        assert len([line for line in lines if not line.startswith(f"edge2dexit: {review}: ")]) <= 1, done.stderr


def test_the_readme_documents_every_exit_code_errors_py_names():
    """errors.py is where the codes are decided; README's table must list each of them."""
    from edge2dexit import errors
    from edge2dexit.cli.app import BROKEN_PIPE, INTERNAL_ERROR, INTERRUPTED

    codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, Exception)
             and hasattr(cls, "exit_code")}
    assert codes | {0, INTERNAL_ERROR, INTERRUPTED, BROKEN_PIPE} <= set(documented_exit_codes())
    assert {7, 141} <= set(documented_exit_codes())
