"""End to end on the real SmolLM2: a tiny convert (a few dozen documents) → a bundle that loads, round-trips,
classifies with every policy with costs that match what llama.cpp computed, streams, and refuses misuse
with one clear message and a non-zero exit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from edge2dexit import Classifier
from edge2dexit.bundle import load_bundle, write_exits
from edge2dexit.cli import app
from edge2dexit.convert.data import DataSettings, make_splits
from edge2dexit.trust import REPORTED_ERRORS
from edge2dexit.document import sentence_by_sentence
from edge2dexit.engine import EngineSettings
from edge2dexit.errors import InputError
from edge2dexit.policies import policy_names
from edge2dexit.measure.throughput import throughput_benchmark

from helpers import TEXT, tiny_convert, tiny_settings

pytestmark = pytest.mark.llama

def test_convert_writes_a_loadable_bundle(tiny_bundle):
    bundle = load_bundle(tiny_bundle.bundle)
    assert bundle.labels == ("neg", "pos")
    assert set(bundle.policies) == set(policy_names()) and bundle.default_policy in policy_names()
    assert set(bundle.heads) == {"sentence", "prefix"} and len(bundle.heads["prefix"].layers) == 30
    assert bundle.base.architecture == "llama" and bundle.base.n_layer == 30
    card = (tiny_bundle.bundle / "README.md").read_text()
    assert "Test split" in card and "paper2d" in card
    assert set(tiny_bundle.test) == set(policy_names())


def test_out_of_fold_reads_never_see_their_own_fold(tiny_bundle, monkeypatch):
    """Every document calibration measures was read by heads and a lexical exit trained without it, and every
    training or calibration document is read once: what each head set and lexical head was fitted on is recorded,
    and what each lexical head was asked to score."""
    from edge2dexit.convert import pipeline
    from edge2dexit.convert.features import stores_under

    settings = tiny_settings(tiny_bundle.bundle.parent, tiny_bundle.bundle.parent / "unused.gguf", lexical=True)
    splits = make_splits(settings.data)
    stores = {store.directory.name: store for store in stores_under([tiny_bundle.bundle / "features"])}
    fitted_on: dict[int, set] = {}  # id of a head set or a lexical head → the documents (or texts) it was fitted on
    scored: list[tuple[int, str]] = []  # (id of a lexical head, a text it scored)

    def recording_heads(documents, *args, **kwargs):
        heads, report = train_heads(documents, *args, **kwargs)
        fitted_on[id(heads)] = {(store.directory, j) for store, docs in documents.parts for j in docs}
        return heads, report

    class RecordingLexical:
        def __init__(self, texts, *args, **kwargs):
            self.head = fit_lexical(texts, *args, **kwargs)
            fitted_on[id(self)] = set(texts)

        def proba(self, text):
            scored.append((id(self), text))
            return self.head.proba(text)

    train_heads, fit_lexical = pipeline.train_heads, pipeline.fit_lexical
    monkeypatch.setattr(pipeline, "train_heads", recording_heads)
    monkeypatch.setattr(pipeline, "fit_lexical", RecordingLexical)
    exits = pipeline.fit_exits(settings, splits, stores)

    assert settings.folds > 1 and len(exits.held.folds) == settings.folds
    read = []
    for fold in exits.held.folds:
        documents = {(store.directory, j) for store, docs in fold.documents.parts for j in docs}
        for heads in fold.heads.values():
            assert documents and not documents & fitted_on[id(heads)]
        read += documents
    pool = len(splits.train) + len(splits.calibration)
    assert len(read) == len(set(read)) == pool
    assert len(scored) == pool + len(splits.test)
    assert not any(text in fitted_on[head] for head, text in scored)


def test_a_bundle_without_a_test_split_says_its_figures_are_cross_validated(tmp_path, smollm2_path):
    report = tiny_convert(tmp_path, smollm2_path, lexical=True, fractions=(0.7, 0.3, 0.0))
    assert report.cross_validated
    card = (report.bundle / "README.md").read_text()
    assert "every figure below is cross-validated" in card
    with Classifier(report.bundle) as clf:
        result = clf.classify(TEXT)
    assert result.label in ("neg", "pos") and sum(result.scores.values()) == pytest.approx(1)


def test_exits_round_trip_every_key_and_tensor(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle.bundle)
    copy = load_bundle(write_exits(bundle, tmp_path / "exits.gguf", half=False))
    assert (copy.labels, copy.task_prompt, copy.splitter, copy.policies, copy.calibration) == (
        bundle.labels, bundle.task_prompt, bundle.splitter, bundle.policies, bundle.calibration)
    for pooling, heads in bundle.heads.items():
        for layer in heads.layers:
            a, b = heads.head(layer), copy.heads[pooling].head(layer)
            for (wa, ba), (wb, bb) in zip(a.weights, b.weights):
                assert np.array_equal(wa, wb) and np.array_equal(ba, bb)


@pytest.fixture(scope="module")
def classifier(tiny_bundle):
    with Classifier(tiny_bundle.bundle, settings=EngineSettings(n_ctx=512)) as clf:
        yield clf




@pytest.mark.parametrize("policy", policy_names())
def test_every_policy_reports_what_llama_cpp_computed(classifier, policy, monkeypatch):
    computed = []
    decode = classifier.engine.context.decode

    def counting(spans, depth, read_layers, on_layer=None):
        out = decode(spans, depth, read_layers, on_layer)
        computed.append((sum(len(s.tokens) for s in spans), out.depth))
        return out

    monkeypatch.setattr(classifier.engine.context, "decode", counting)
    result = classifier.classify(TEXT, policy=policy)
    assert result.token_layers == sum(n * d for n, d in computed)
    assert result.label in ("neg", "pos") and abs(sum(result.scores.values()) - 1) < 1e-6
    # the total is known when reading reached the end of the text, None when it stopped before
    assert 1 <= result.sentences_read <= 4
    assert result.sentences_total == 4 or (result.sentences_total is None and result.sentences_read < 4)
    assert result.operations <= 4 * 30 and result.tokens > 0
    assert result.as_pipeline()[0]["label"] == result.label


def test_classify_explain_prints_the_deciding_sentences_and_the_json_adds_up(tiny_bundle):
    """`--explain` names the sentences that pushed hardest towards the answer; the JSON carries every part, and for
    the tiny bundle's linear heads the parts add up to the answer's calibrated log-odds exactly."""
    base = ["classify", "-", "--bundle", str(tiny_bundle.bundle), "--n-ctx", "512", "--policy", "prefix-mean"]
    shown = CliRunner().invoke(app, [*base, "--explain"], input=TEXT)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[1].startswith("  why ") and "log-odds" in lines[1]
    assert any(line.lstrip().split("  ", 1)[1].startswith("sentence ") for line in lines[2:])
    record = json.loads(CliRunner().invoke(app, [*base, "--json"], input=TEXT).stdout)
    evidence = record["evidence"]
    # the prefix head read the mean of every sentence up to its exit
    assert evidence["label"] == record["label"]
    assert [s["index"] for s in evidence["sentences"]] == list(range(record["exit_sentence"] + 1))
    parts = sum(s["contribution"] for s in evidence["sentences"]) + evidence["words"] + evidence["constant"]
    assert parts == pytest.approx(evidence["log_odds"], abs=1e-4)


def test_full_gives_the_same_label_sentence_by_sentence_as_in_one_pass(classifier):
    one_pass = classifier.classify(TEXT, policy="full")
    engine = classifier.engine
    tokens = [engine.tokenize(s) for s in classifier.bundle.splitter.split(TEXT)]
    states = engine.run(sentence_by_sentence(engine.document(), tokens, 30, layers=[29]))
    assert states.shape == (4, 1, 576)
    p = classifier.bundle.heads["sentence"].proba(29, states[-1, 0])
    assert classifier.labels[int(np.argmax(p))] == one_pass.label
    np.testing.assert_allclose(p, [one_pass.scores[k] for k in classifier.labels], atol=0.02)


def test_stream_decides_like_classify(classifier):
    with classifier.stream("prefix-mean") as stream:
        result = None
        for sentence in classifier.bundle.splitter.split(TEXT):
            result = stream.feed(sentence)
            if result is not None:
                break
        result = result or stream.finish()
    whole = classifier.classify(TEXT, policy="prefix-mean")
    assert result.label == whole.label
    # fed in one piece, a stream reads its complete sentences as classify reads the text, in one decode; the last
    # sentence waits for more text or for finish, so the stream reads no more than classify does
    with classifier.stream("prefix-mean") as stream:
        one_piece = stream.feed(TEXT) or stream.finish()
    assert (one_piece.scores, one_piece.exit_sentence) == (whole.scores, whole.exit_sentence)
    assert one_piece.token_layers <= whole.token_layers
    # closing the stream freed its sequence: its document can no longer read
    with pytest.raises(RuntimeError, match="newer Engine.document"):
        classifier.engine.run(stream.doc.append([classifier.engine.tokenize("More.")], 1))
    with classifier.stream() as empty, pytest.raises(InputError, match="before any sentence"):
        empty.finish()


def test_classify_many_matches_classify(classifier):
    texts = [TEXT, "The cinema was half full. The acting was dreadful.", "   "]
    outcomes = dict(classifier.classify_many((f"doc{i}", t) for i, t in enumerate(texts)))
    assert set(outcomes) == {"doc0", "doc1", "doc2"}
    assert isinstance(outcomes["doc2"], InputError) and "empty" in str(outcomes["doc2"])
    for key, text in (("doc0", TEXT), ("doc1", texts[1])):
        one = classifier.classify(text)
        assert (outcomes[key].label, outcomes[key].exit_layer, outcomes[key].sentences_read) == (
            one.label, one.exit_layer, one.sentences_read)
        assert outcomes[key].token_layers == one.token_layers


def test_cli_classify_json_and_exit_codes(tiny_bundle, tmp_path, gemma_path):
    runner = CliRunner()
    review = tmp_path / "review.txt"
    review.write_text(TEXT)
    ok = runner.invoke(app, ["classify", str(review), "--bundle", str(tiny_bundle.bundle), "--json", "--n-ctx", "512"])
    assert ok.exit_code == 0, ok.output
    row = json.loads(ok.stdout.splitlines()[0])
    assert row["label"] in ("neg", "pos") and row["input"] == str(review)

    empty, binary = tmp_path / "empty.txt", tmp_path / "blob.bin"
    empty.write_text("  \n")
    binary.write_bytes(b"\x00\x01\x02binary")
    for bad, words in ((empty, "empty"), (binary, "binary")):
        res = runner.invoke(app, ["classify", str(bad), "--bundle", str(tiny_bundle.bundle), "--n-ctx", "512"])
        assert res.exit_code == 3 and words in res.stderr and "Traceback" not in res.output

    other = runner.invoke(app, ["classify", str(review), "--bundle", str(tiny_bundle.bundle), "--model", gemma_path])
    assert other.exit_code == 5 and "bundle was built for llama" in other.stderr

    cut = tmp_path / "cut"
    shutil.copytree(tiny_bundle.bundle, cut)
    exits = cut / "exits.gguf"
    exits.write_bytes(exits.read_bytes()[:-100])
    res = runner.invoke(app, ["classify", str(review), "--bundle", str(cut)])
    assert res.exit_code == 5 and "truncated" in res.stderr

    long = tmp_path / "long.txt"
    long.write_text(" ".join(["The film runs two hours."] * 200))
    res = runner.invoke(app, ["classify", str(long), "--bundle", str(tiny_bundle.bundle), "--n-ctx", "256"])
    assert res.exit_code == 6 and "--truncate" in res.stderr
    res = runner.invoke(app, ["classify", str(long), "--bundle", str(tiny_bundle.bundle), "--n-ctx", "256",
                              "--truncate", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["truncated"] is True


def test_eval_structure_oracle_and_consistency(classifier, tmp_path):
    from edge2dexit.measure.evaluate import evaluate
    from edge2dexit.measure.figures import write_figures

    try:
        from sklearn import metrics as sklearn_metrics
    except ImportError:  # the eval extra is not installed
        sklearn_metrics = None

    texts = [TEXT, "The cinema was half full. The acting was dreadful. A boring, pointless story.",
             "It was shown on a Tuesday. A waste of time and money. I hated every minute of it."]
    labels = [1, 0, 0]
    ev = evaluate(classifier, texts, labels)
    assert set(ev.scores) == set(policy_names()) and ev.n_docs == 3
    for name, score in ev.scores.items():
        # checked against reads of its own: each text classified here, scored against the truth labels, and the
        # macro-F1 as scikit-learn computes it
        live = [classifier.classify(text, policy=name) for text in texts]
        assert score.predictions == [classifier.labels.index(r.label) for r in live], name
        assert score.accuracy == sum(r.label == classifier.labels[y] for r, y in zip(live, labels)) / 3, name
        if sklearn_metrics is not None:
            assert score.macro_f1 == pytest.approx(sklearn_metrics.f1_score(labels, score.predictions,
                                                                            average="macro", labels=[0, 1]))
        assert score.costs == [r.token_layers for r in live], name
        assert ev.oracle_token_layers <= score.token_layers
        assert len(score.costs) == 3 and score.seconds > 0
    # the oracle answers a text right if any cell does, the full read's cell among them
    assert ev.oracle_accuracy >= ev.scores["full"].accuracy
    assert ev.scores["full"].token_layers == pytest.approx(ev.full_token_layers)
    table = ev.table()
    assert "oracle" in table and "Table 2, T = 2%" in table and "docs/s" in table
    assert ev.prefix_grid.shape == (4, 30) and ((0 <= ev.prefix_grid) & (ev.prefix_grid <= 1)).all()
    assert ev.prefix_grid_docs.tolist() == [3, 3, 3, 1]
    figures = write_figures(ev, classifier.bundle.calibration, tmp_path)
    assert [f.name for f in figures] == ["accuracy_sentence_layer.png", "frontier.png", "exits.png",
                                         *(["risk_coverage.png"] if ev.abstention else [])]
    assert ev.abstention and {a.error_rate for a in ev.abstention} == set(REPORTED_ERRORS)
    for row in ev.abstention:  # what the bundle cannot promise is said, not answered "unsure" throughout
        assert (row.margin is None) == (row.answered == 0 and row.seconds == 0)
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in figures)


def test_bundle_classifies_where_torch_cannot_be_imported(tiny_bundle):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from edge2dexit import Classifier, EngineSettings\n"
        f"with Classifier({str(tiny_bundle.bundle)!r}, settings=EngineSettings(n_ctx=512)) as clf:\n"
        f"    print(clf.classify({TEXT!r}).label)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("neg", "pos")


def test_quantize_produces_a_loadable_model(smollm2_path, tmp_path):
    from edge2dexit.engine import Engine
    from edge2dexit.errors import ModelError
    from edge2dexit.llama import quantize
    from edge2dexit.models.gguf_file import check_gguf

    out = tmp_path / "q4_0.gguf"
    quantize(smollm2_path, out, "q4_0", n_threads=2)
    summary = check_gguf(out)
    assert summary.n_tensors == check_gguf(smollm2_path).n_tensors and summary.data_end <= out.stat().st_size
    with Engine.load(out, EngineSettings(n_ctx=256)) as engine:
        assert (engine.architecture, engine.n_layer, engine.n_embd) == ("llama", 30, 576)
        doc = engine.document()
        (states,) = engine.run(doc.append([engine.tokenize("A fine film.")], 30, layers=[29]))
        assert states.means.shape == (1, 576) and np.isfinite(states.means).all()
    with pytest.raises(ModelError, match="unknown quantization"):
        quantize(smollm2_path, tmp_path / "x.gguf", "q3_x")


def test_cli_eval_reads_the_bundles_own_split(tiny_bundle):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--bundle", str(tiny_bundle.bundle),
                              "--data", str(tiny_bundle.bundle.parent / "reviews.csv"), "--split", "calibration", "--limit", "3",
                              "--policies", "prefix-mean,layer", "--n-ctx", "512"])
    assert res.exit_code == 0, res.output
    table = res.stdout
    assert table.startswith("3 documents, 30 layers")
    assert [line.split()[0] for line in table.splitlines()[2:6]] == ["full", "prefix-mean", "layer", "oracle"]


def test_cli_eval_refuses_data_whose_labels_are_not_the_bundle_s(tiny_bundle, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("review,sentiment\n" + "".join(f"Review {i}. It was fine.,{'good' if i % 2 else 'bad'}\n"
                                                     for i in range(40)))
    res = CliRunner().invoke(app, ["eval", "--bundle", str(tiny_bundle.bundle), "--data", str(other), "--n-ctx", "512"])
    assert res.exit_code == 3, res.output
    assert "'bad', 'good'" in res.stderr and "'neg', 'pos'" in res.stderr and "Traceback" not in res.output


def test_cli_eval_reads_no_file_a_bundle_names(tiny_bundle):
    res = CliRunner().invoke(app, ["eval", "--bundle", str(tiny_bundle.bundle), "--n-ctx", "512"])
    assert res.exit_code == 3, res.output
    assert "name it (--data FILE)" in res.stderr and "Traceback" not in res.output


def test_throughput_benchmark_runs_every_configuration_with_agreeing_labels(tiny_bundle):
    """The benchmark's machinery on the real model (no timing asserted): every configuration and policy has a row,
    batching at W = 2 gives the labels of W = 1, and extraction is timed both ways."""
    splits = make_splits(DataSettings(**load_bundle(tiny_bundle.bundle).calibration["data"]))
    texts = splits.test.texts[:4]
    labels = [splits.test.label_names[y] for y in splits.test.labels[:4]]
    result = throughput_benchmark(tiny_bundle.bundle, tiny_bundle.bundle, texts, labels, widths=(1, 2),
                                  extraction_docs=2, n_ctx=512)
    assert {(r.config.rsplit(", ", 1)[-1], r.policy) for r in result.rows} >= {
        ("one at a time", "full"), ("W=1", "full"), ("W=2", "full")}
    by_config = {(r.config, r.policy): r.predicted for r in result.rows}
    for policy in {r.policy for r in result.rows}:
        batched = [labels for (config, p), labels in by_config.items() if p == policy and "W=" in config]
        assert batched[0] == batched[1] and len(batched[0]) == 4
    assert [k.rsplit(", ", 1)[-1] for k in result.extraction] == ["sentence by sentence", "whole text", "whole text"]
    assert "feature extraction" in result.table()
