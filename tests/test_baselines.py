"""The baselines `eval` prints beside the policies — TF-IDF + logistic regression trained on the bundle's training
split, and truncation at the best layer — and the 95% interval on every accuracy, on the session's tiny bundle."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from edge2dexit import Classifier
from edge2dexit.baselines import LOGREG_SETTINGS, TFIDF_SETTINGS, TRUNCATIONS, fitted
from edge2dexit.bundle import load_bundle
from edge2dexit.cli import app
from edge2dexit.convert.data import bundle_splits
from edge2dexit.document import sentence_by_sentence
from edge2dexit.engine import EngineSettings
from edge2dexit.measure.evaluate import evaluate
from edge2dexit.heads import whole_text_input

from helpers import GOOD, NEUTRAL
from edge2dexit.stats import Z95, wilson_interval


def test_wilson_interval_known_values():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx((0.0, Z95**2 / (20 + Z95**2)))  # (0, 0.161): never empty
    assert wilson_interval(20, 20) == pytest.approx((20 / (20 + Z95**2), 1.0))
    low, high = wilson_interval(7, 30)
    assert (1 - high, 1 - low) == pytest.approx(wilson_interval(23, 30))  # errors are successes seen the other way


def test_truncations_keep_whole_leading_sentences():
    sentences = [[0] * 300, [0] * 200, [0] * 100, [0] * 5, [0] * 5]
    assert {name: len(t.keep(sentences)) for name, t in TRUNCATIONS.items()} == {"first-3-sents": 3, "first-512-tok": 2}
    assert len(fitted([[0] * 600, [0] * 10], 512)) == 1  # a first sentence longer than the room is still read


def sklearn_accuracy(train, test) -> tuple[float, list[int]]:
    """TF-IDF + logistic regression built here with scikit-learn itself, as the baseline's settings say."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    vectorizer = TfidfVectorizer(**TFIDF_SETTINGS)
    model = LogisticRegression(**LOGREG_SETTINGS).fit(vectorizer.fit_transform(train.texts), train.labels)
    predicted = model.predict(vectorizer.transform(test.texts)).tolist()
    return accuracy_score(test.labels, predicted), predicted


@pytest.fixture(scope="module")
def splits(tiny_bundle):
    """The bundle's own splits, rebuilt from the data settings it records, as `eval` rebuilds them."""
    return bundle_splits(load_bundle(tiny_bundle.bundle), str(tiny_bundle.bundle.parent / "reviews.csv"))


@pytest.fixture(scope="module")
def classifier(tiny_bundle):
    with Classifier(tiny_bundle.bundle, settings=EngineSettings(n_ctx=512), truncate=True) as clf:
        yield clf


@pytest.mark.llama
def test_eval_prints_the_baseline_rows_with_intervals(tiny_bundle, splits):
    res = CliRunner().invoke(app, ["eval", "--bundle", str(tiny_bundle.bundle),
                              "--data", str(tiny_bundle.bundle.parent / "reviews.csv"), "--policies", "prefix-mean",
                                   "--n-ctx", "512"])
    assert res.exit_code == 0, res.output
    rows = {cells[0]: cells for cells in map(str.split, res.stdout.splitlines()) if cells}
    for name in ("full", "prefix-mean", "oracle", "tfidf-logreg", *TRUNCATIONS):
        accuracy, (low, high) = float(rows[name][1]), map(float, rows[name][2].split("–"))
        assert low <= accuracy <= high, rows[name]
    expected, _ = sklearn_accuracy(splits.train, splits.test)
    assert rows["tfidf-logreg"][1] == f"{expected:.3f}"
    assert "tfidf-logreg:" in res.stdout and "ms per document" in res.stdout


@pytest.mark.llama
def test_tfidf_row_is_scikit_learns_and_truncation_reuses_the_states(classifier, splits):
    test = splits.test
    ev = evaluate(classifier, test.texts, test.labels, ("layer",), train=splits.train)
    expected, predicted = sklearn_accuracy(splits.train, test)
    tfidf = ev.baselines["tfidf-logreg"]
    assert (tfidf.accuracy, tfidf.predictions) == (expected, predicted)
    assert tfidf.token_layers is None and tfidf.seconds > 0
    # every synthetic review has 3 short sentences: both truncations read it whole, at the best layer
    best = classifier.bundle.calibration["best_layer"]
    pooling, layer = best["pooling"], best["layer"]
    full = ev.scores["full"]
    for name in TRUNCATIONS:
        row = ev.baselines[name]
        assert row.accuracy == pytest.approx(ev.layer_accuracy[pooling][layer], abs=1e-4)
        assert row.token_layers == pytest.approx(full.token_layers * (layer + 1) / ev.n_layer)
        assert row.seconds is None
    table = ev.table()
    assert all(f"\n{name} " in table for name in ("tfidf-logreg", *TRUNCATIONS))


@pytest.mark.llama
def test_convert_reports_tfidf_on_the_same_documents_in_its_summary_and_card(tiny_bundle, splits):
    expected, _ = sklearn_accuracy(splits.train, splits.test)
    assert tiny_bundle.tfidf_accuracy == expected
    low, high = tiny_bundle.interval(expected)
    row = next(line for line in tiny_bundle.summary().splitlines() if line.startswith("tfidf-logreg"))
    assert row.split()[1:3] == [f"{expected:.3f}", f"{low:.3f}–{high:.3f}"]
    card = (tiny_bundle.bundle / "README.md").read_text()
    assert "| tfidf-logreg (baseline, no LLM" in card and f"| {expected:.3f} | {low:.3f}–{high:.3f} |" in card


@pytest.mark.llama
def test_truncation_answers_as_a_read_of_only_the_first_sentences(classifier):
    text = " ".join(NEUTRAL + GOOD[:2])  # 5 sentences
    ev = evaluate(classifier, [text], [1], ("layer",))
    assert "tfidf-logreg" not in ev.baselines  # no training split given
    best = classifier.bundle.calibration["best_layer"]
    pooling, layer = best["pooling"], best["layer"]
    engine = classifier.engine
    first = [engine.tokenize(s) for s in classifier.bundle.splitter.split(text)][:3]
    states = engine.run(sentence_by_sentence(engine.document(), first, layer + 1, layers=[layer]))
    p = classifier.bundle.heads[pooling].proba(layer, whole_text_input(pooling, states[:, 0]))
    row = ev.baselines["first-3-sents"]
    assert row.predictions == [int(np.argmax(p))]
    assert (row.token_layers, row.operations) == (sum(map(len, first)) * (layer + 1), 3 * (layer + 1))
