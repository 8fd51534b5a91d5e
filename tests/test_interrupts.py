"""Ctrl-C during `classify` and `convert` on the real SmolLM2: exit code 130 and the one line "edge2dexit:
interrupted", never a traceback; the records classify already wrote stay whole and `--resume` reads the rest; convert
run again goes on from its feature store.

Ctrl-C is sent where it lands in a real run, during a llama_decode: the signal arrives while llama.cpp computes, the
context holds it back and raises KeyboardInterrupt once llama.cpp has returned (a handler run inside the eval
callback would stop the graph half way). Classify runs read with the LLM (`--no-lexical`): the default bundle's words
would answer these texts without a decode."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edge2dexit.bundle import load_bundle
from edge2dexit.cli import app
from edge2dexit.convert.features import extract
from edge2dexit.engine import Engine, EngineSettings
from edge2dexit import llama
from edge2dexit.sentences import Splitter
from helpers import synthetic_reviews

pytestmark = pytest.mark.llama

TEXTS = [
    "A wonderful film. The acting was superb and the story moving. I loved every minute of it.",
    "What a waste of time. The plot made no sense. The acting was wooden. I wanted my money back.",
    "Great fun from start to end. The music was lovely.",
    "The film runs two hours. It was shown on a Tuesday. I hated every minute of it.",
    "A boring, pointless story. The cinema was half full, and half of us left early.",
    "The lead gives the performance of his career. I will be seeing it again this weekend.",
]


class Keyboard:
    """Counts the documents engines start, and presses Ctrl-C (a real SIGINT to this process) during the first
    llama_decode once more than `after` of them have started."""

    def __init__(self, monkeypatch):
        self.started, self.after = 0, None
        document, decode = Engine.document, llama.llama_cpp.llama_decode

        def counting(engine, seq=1):
            self.started += 1
            return document(engine, seq)

        def pressed_while_decoding(ctx, batch):
            status = decode(ctx, batch)
            if self.after is not None and self.started > self.after:
                signal.raise_signal(signal.SIGINT)  # still inside llama.cpp's call, as far as Python is concerned
            return status

        monkeypatch.setattr(Engine, "document", counting)
        monkeypatch.setattr(llama.llama_cpp, "llama_decode", pressed_while_decoding)


@pytest.fixture
def keyboard(monkeypatch):
    """Ctrl-C raises KeyboardInterrupt here, as in a terminal: a shell starts a background job (pytest run with `&`,
    under nohup, by some CI runners) with SIGINT ignored, and a raised SIGINT would then be lost."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield Keyboard(monkeypatch)
    signal.signal(signal.SIGINT, previous)


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def assert_interrupted(result) -> None:
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert result.stderr == "edge2dexit: interrupted\n"


@pytest.mark.parametrize("width", [1, 3])
def test_ctrl_c_during_classify_keeps_whole_records_and_resume_reads_the_rest(tmp_path, keyboard, width):
    folder = tmp_path / "reviews"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(text)
    out = tmp_path / "results.jsonl"
    args = ["classify", str(folder), "--output", str(out), "--width", str(width), "--n-ctx", "512", "--no-lexical"]

    keyboard.after = width  # once a document has finished and the next one takes its place
    stopped = invoke(args)
    assert_interrupted(stopped)
    assert stopped.stdout == ""
    written = out.read_text()
    assert written.endswith("\n")
    first = [json.loads(line) for line in written.splitlines()]
    assert 1 <= len(first) < len(TEXTS) and all(r["label"] in ("negative", "positive") for r in first)

    keyboard.after, keyboard.started = None, 0
    resumed = invoke(args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert keyboard.started == len(TEXTS) - len(first)  # only the texts without a record were read
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[: len(first)] == first
    assert sorted(r["input"] for r in records) == sorted(str(p) for p in folder.glob("*.txt"))


def test_ctrl_c_during_convert_then_convert_resumes_from_the_feature_store(tmp_path, keyboard, smollm2_path):
    data = tmp_path / "reviews.csv"
    synthetic_reviews(data)  # 24 documents: 12 train, 6 calibration, 6 test
    work = tmp_path / "features"
    args = ["convert", "--model", smollm2_path, "--data", str(data), "--text-column", "review",
            "--label-column", "sentiment", "--per-class", "0", "--head", "linear", "--n-ctx", "512",
            "--out", str(tmp_path / "bundle"), "--work", str(work)]

    keyboard.after = 10  # in the train split, after its first 8 documents were saved
    assert_interrupted(invoke(args))
    done = json.loads((work / "train" / "meta.json").read_text())["done"]
    assert done > 0

    keyboard.after, keyboard.started = None, 0
    finished = invoke(args)
    assert finished.exit_code == 0, finished.output
    total = sum(len(json.loads((work / part / "meta.json").read_text())["labels"])
                for part in ("train", "calibration", "test"))
    assert keyboard.started == total - done  # the saved documents were not read again
    assert load_bundle(tmp_path / "bundle").labels == ("neg", "pos")


def test_ctrl_c_while_the_feature_store_saves_its_progress_keeps_the_last_one(smollm2_engine, tmp_path, keyboard):
    """Progress is saved after every 8 documents and at the end; Ctrl-C inside the last save must leave the one
    before it readable."""
    texts = [f"I liked part {i} of the film. It was fine." for i in range(10)]
    write_text, saves = Path.write_text, []

    def cut_short(path, text, *args, **kwargs):
        if path.name.startswith(".meta.json."):  # the temporary file `files.replacing` renames onto meta.json
            saves.append(text)
            if len(saves) == 2:
                write_text(path, text[: len(text) // 2])
                raise KeyboardInterrupt
        return write_text(path, text, *args, **kwargs)

    store = tmp_path / "store"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "write_text", cut_short)
        with pytest.raises(KeyboardInterrupt):
            extract(smollm2_engine, texts, [0] * len(texts), Splitter("regex"), store)
    assert json.loads((store / "meta.json").read_text())["done"] == 8
    keyboard.started = 0
    assert extract(smollm2_engine, texts, [0] * len(texts), Splitter("regex"), store).done == len(texts)
    assert keyboard.started == 2


def test_a_store_made_with_another_prompt_is_read_again_not_resumed(smollm2_engine, smollm2_path, tmp_path):
    texts, labels, store = ["A fine film. I liked it.", "A dull film. I left early."], [1, 0], tmp_path / "store"
    before = np.array(extract(smollm2_engine, texts, labels, Splitter("regex"), store).states)
    with Engine.load(smollm2_path, EngineSettings(n_ctx=512), prompt="Topic of this text:") as other:
        again = extract(other, texts, labels, Splitter("regex"), store)
        assert json.loads((store / "meta.json").read_text())["prompt_tokens"] == list(other.prompt_tokens)
    assert again.done == 2 and not np.array_equal(np.array(again.states), before)
