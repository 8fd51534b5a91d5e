"""Labelled data: reading user files, every input error, and the cleaning / balancing / splitting steps."""

import json
import time

import pytest

from edge2dexit.convert.data import (
    BUILTIN_SETS,
    DEFAULT_FRACTIONS,
    DataSettings,
    LabelledSet,
    check_labels_seen,
    load_builtin,
    labelled,
    load_file,
    make_splits,
    prepare,
    split,
    subsample,
)
from edge2dexit.errors import InputError
from edge2dexit.sentences import Splitter


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def _balanced(n_per_class: int, names=("neg", "pos", "neu")) -> LabelledSet:
    texts = [f"text {c} {i}." for c in range(len(names)) for i in range(n_per_class)]
    labels = [c for c in range(len(names)) for _ in range(n_per_class)]
    return LabelledSet(texts, labels, tuple(names), "synthetic")


# --- load_file -----------------------------------------------------------------------------------------------


def test_load_csv_with_quoted_multiline_text(tmp_path):
    path = _write(tmp_path, "d.csv", 'text,label\n"Good, really.\nYes.",pos\nBad.,neg\nFine.,pos\n')
    ds = load_file(path)
    assert ds.texts == ["Good, really.\nYes.", "Bad.", "Fine."]
    assert ds.label_names == ("neg", "pos") and ds.labels == [1, 0, 1]
    assert ds.class_counts() == {"neg": 1, "pos": 2} and ds.source == str(path)


def test_load_tsv_with_other_columns(tmp_path):
    path = _write(tmp_path, "d.tsv", "id\treview\tstars\n1\tGreat.\t5\n2\tAwful.\t1\n")
    ds = load_file(path, text_column="review", label_column="stars")
    assert ds.texts == ["Great.", "Awful."] and ds.label_names == ("1", "5") and ds.labels == [1, 0]


def test_load_jsonl_with_int_labels_and_given_names(tmp_path):
    rows = [{"text": "a.", "label": 2}, {"text": "b.", "label": 0}, {"text": "c.", "label": 2}]
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_file(path, label_names=["2", "1", "0"])
    assert ds.label_names == ("2", "1", "0") and ds.labels == [0, 2, 0]
    assert ds.class_counts() == {"2": 2, "1": 0, "0": 1}


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        ("d.txt", "x", {}, r"cannot read '\.txt'; use \.csv, \.tsv or \.jsonl"),
        ("d.csv", "", {}, "has no rows"),
        ("d.csv", "text,label\n", {}, "has no rows"),
        ("d.csv", "review,sentiment\nok,pos\n", {}, "has no column 'text'.*'review', 'sentiment'"),
        ("d.csv", "text,sentiment\nok,pos\n", {}, "has no column 'label'.*'text', 'sentiment'"),
        ("d.csv", "text,label\nok,pos\n  ,neg\n", {}, "line 3 has an empty 'text'"),
        ("d.csv", "text,label\nok,pos\nfine,\n", {}, "line 3 has an empty 'label'"),
        ("d.csv", "text,label\nok,pos\nfine,pos\n", {}, "every row has label 'pos'"),
        ("d.csv", "text,label\nok,pos\nbad,meh\n", {"label_names": ["neg", "pos"]}, "line 3 has label 'meh'"),
        ("d.csv", "text,label\nok,pos\nbad,pos\n", {"label_names": ["neg", "pos"]}, "at least two classes"),
        ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "lab', {}, "line 2 is not valid JSON"),
        ("d.jsonl", '["a", 1]\n', {}, "line 1 is not a JSON object"),
        ("d.jsonl", '{"text": "a", "label": 1}\n{"body": "b", "label": 0}\n', {}, r"no column 'text' \(line 2\).*'body'"),
        ("d.jsonl", '{"text": "a", "label": 1}\n{"text": null, "label": 0}\n', {}, "line 2 has an empty 'text'"),
    ],
)
def test_load_file_errors(tmp_path, name, content, kwargs, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(InputError, match=message) as info:
        load_file(path, **kwargs)
    assert str(path) in str(info.value)


def test_load_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_file(tmp_path / "absent.csv")
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,a\nb,b\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        load_file(path)


# --- prepare, subsample --------------------------------------------------------------------------------------


def test_prepare_dedupes_and_filters_by_sentence_count():
    ds = LabelledSet(
        ["One. Two. Three.", "Only one.", "One. Two. Three.", "A. B.<br />C? D!"], [0, 1, 0, 1], ("a", "b"), "s"
    )
    regex = Splitter("regex")
    assert prepare(ds, regex).texts == ["One. Two. Three.", "Only one.", "A. B.<br />C? D!"]
    assert prepare(ds, regex, min_sentences=3).texts == ["One. Two. Three.", "A. B.<br />C? D!"]
    assert prepare(ds, regex, min_sentences=3, dedupe=False).labels == [0, 0, 1]
    assert prepare(ds, regex).label_names == ("a", "b")


def test_subsample_is_balanced_and_deterministic():
    ds = LabelledSet([f"t{i}" for i in range(100)], [0] * 70 + [1] * 30, ("a", "b"), "s")
    sub = subsample(ds, per_class=20, seed=3)
    assert sub.class_counts() == {"a": 20, "b": 20} and len(set(sub.texts)) == 40
    assert sub.texts == subsample(ds, per_class=20, seed=3).texts
    assert sub.texts != subsample(ds, per_class=20, seed=4).texts
    assert all(ds.labels[int(t[1:])] == label for t, label in zip(sub.texts, sub.labels))
    with pytest.raises(InputError, match="at most 30"):
        subsample(ds, per_class=31, seed=0)


# --- split ---------------------------------------------------------------------------------------------------


def test_split_is_stratified_disjoint_and_deterministic():
    ds = LabelledSet([f"t{i}" for i in range(200)], [0] * 150 + [1] * 50, ("a", "b"), "s")
    parts = split(ds, fractions=(0.6, 0.2, 0.2), seed=7)
    assert parts.train.class_counts() == {"a": 90, "b": 30}
    assert parts.calibration.class_counts() == {"a": 30, "b": 10}
    assert parts.test.class_counts() == {"a": 30, "b": 10}
    all_texts = parts.train.texts + parts.calibration.texts + parts.test.texts
    assert sorted(all_texts) == sorted(ds.texts)
    assert all(ds.labels[int(t[1:])] == label for t, label in zip(parts.train.texts, parts.train.labels))
    again = split(ds, fractions=(0.6, 0.2, 0.2), seed=7)
    assert again.train.texts == parts.train.texts and again.test.texts == parts.test.texts
    assert split(ds, fractions=(0.6, 0.2, 0.2), seed=8).train.texts != parts.train.texts
    halves = split(ds, seed=7)  # the default: half to train, a quarter each to calibration and test
    assert halves.train.class_counts() == {"a": 74, "b": 26} and halves.test.class_counts() == {"a": 38, "b": 12}
    assert parts.train.labels != sorted(parts.train.labels)  # classes are mixed, not in blocks
    description = parts.describe()
    assert "train" in description and "120" in description and "a 30 (75%)" in description


def test_split_errors():
    few_neutral = LabelledSet([f"t{i}" for i in range(42)], [0] * 20 + [1] * 20 + [2] * 2, ("neg", "pos", "neu"), "s")
    with pytest.raises(InputError, match="class 'neu' has 2 example"):
        split(few_neutral)
    with pytest.raises(InputError, match="add up to 1"):
        split(_balanced(10), fractions=(0.5, 0.2, 0.2))
    with pytest.raises(InputError, match="training fraction positive"):
        split(_balanced(10), fractions=(0.0, 0.8, 0.2))
    no_test = split(_balanced(10), fractions=(0.8, 0.2, 0.0))  # allowed: the figures are then cross-validated
    assert len(no_test.test) == 0 and len(no_test.train) + len(no_test.calibration) == 30
    assert "test" in no_test.describe()
    assert DEFAULT_FRACTIONS == (0.5, 0.25, 0.25)
    other = split(_balanced(20), fractions=(0.6, 0.2, 0.2), seed=1)
    assert (len(other.train), len(other.calibration), len(other.test)) == (36, 12, 12)


def test_rows_left_out_are_counted_aloud():
    twenty = labelled(["Great"] * 20 + [f"Bad film {i}." for i in range(20)], ["pos"] * 20 + ["neg"] * 20)
    with pytest.raises(InputError, match=r"class 'pos' has 1 example\(s\).*19 row\(s\) left out: the same text as an "
                                         r"earlier row"):
        split(prepare(twenty, Splitter("regex")))
    kept = split(prepare(labelled(["Great"] * 5 + [f"Film {i}." for i in range(40)], ["pos"] * 25 + ["neg"] * 20),
                         Splitter("regex")))
    assert "left out before splitting: 4 row(s): the same text as an earlier row" in kept.describe()


@pytest.mark.parametrize("label", ["pos\x07", "  ", "\x1b[31mred", "ne\ng"])
def test_labels_a_terminal_would_obey_or_that_are_blank_are_refused_at_load(tmp_path, label):
    """At load, before anything is read or trained: in a file (convert, exit 3) and from Python lists (train)."""
    with pytest.raises(InputError, match="a label must name its class"):
        labelled(["Good.", "Bad."], [label, "other"])
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"Text {i}.", "label": label if i % 2 else "other"}) + "\n"
                            for i in range(20)))
    with pytest.raises(InputError, match="label"):  # a blank cell: "an empty 'label'", as before
        load_file(data)
    from typer.testing import CliRunner

    from edge2dexit.cli import app

    started = time.perf_counter()
    done = CliRunner().invoke(app, ["convert", "--model", "smollm2-135m@q8_0", "--data", str(data), "--per-class",
                                    "0", "--out", str(tmp_path / "b")])
    assert done.exit_code == 3 and "label" in done.stderr, done.output
    assert time.perf_counter() - started < 30 and not (tmp_path / "b" / "features").exists()


def test_check_labels_seen():
    train = LabelledSet(["a", "b"], [0, 1], ("neg", "pos", "neu"), "train.csv")
    check_labels_seen(train, LabelledSet(["c"], [1], ("neg", "pos", "neu"), "test.csv"))
    with pytest.raises(InputError, match="test.csv has label\\(s\\) 'neu'.*train.csv"):
        check_labels_seen(train, LabelledSet(["c", "d"], [2, 0], ("neg", "pos", "neu"), "test.csv"))


def test_make_splits_follows_its_settings(tmp_path):
    rows = [f"Sentence {i} of {c}. Another one. And a third." if i % 3 else f"Only one {i} of {c}."
            for c in ("neg", "pos") for i in range(30)]
    labels = ["neg"] * 30 + ["pos"] * 30
    path = _write(tmp_path, "d.jsonl", "".join(json.dumps({"body": t, "y": y}) + "\n" for t, y in zip(rows, labels)))
    settings = DataSettings(str(path), text_column="body", label_column="y", per_class=12, min_sentences=3,
                            fractions=[0.5, 0.25, 0.25], seed=3, splitter="regex")
    assert settings.fractions == (0.5, 0.25, 0.25) and settings.make_splitter().kind == "regex"
    splits = make_splits(settings)
    for part, n in (("train", 12), ("calibration", 6), ("test", 6)):
        ds = getattr(splits, part)
        assert len(ds) == n and ds.label_names == ("neg", "pos") and ds.class_counts() == {"neg": n // 2, "pos": n // 2}
        assert all(not t.startswith("Only one") for t in ds.texts)  # min_sentences
    again = make_splits(settings)
    assert again.test.texts == splits.test.texts and again.train.texts == splits.train.texts
    assert make_splits(DataSettings(str(path), "body", "y", per_class=12, seed=4, splitter="regex")).test.texts != \
        splits.test.texts


# --- built-in sets -------------------------------------------------------------------------------------------


def test_unknown_builtin():
    with pytest.raises(InputError, match="imdb, clothing, tweets"):
        load_builtin("sst2")
    assert set(BUILTIN_SETS) == {"imdb", "clothing", "tweets"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size", "counts"),
    [
        ("imdb", 25000, {"negative": 12500, "positive": 12500}),
        ("tweets", 38158, {"negative": 16186, "neutral": 15018, "positive": 6954}),
        ("clothing", 22641, {"1": 821, "2": 1549, "3": 2823, "4": 4908, "5": 12540}),
    ],
)
def test_builtin_sets_from_pypi(name, size, counts):
    if name == "clothing":
        pytest.importorskip("pyarrow")
    ds = load_builtin(name)
    assert len(ds) == size and ds.class_counts() == counts
    assert all(text.strip() for text in ds.texts) and "<br />" not in " ".join(ds.texts[:500])
