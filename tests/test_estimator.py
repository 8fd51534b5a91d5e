"""Training in one line and the scikit-learn estimator, on the real SmolLM2 with two dozen synthetic reviews: the
same pipeline as `convert`, inside cross_val_score and a Pipeline on raw text, and a saved fit that the CLI reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import edge2dexit
from edge2dexit.bundle import load_bundle
from edge2dexit.cli import app

from helpers import BAD, GOOD, NEUTRAL

pytestmark = pytest.mark.llama
sklearn = pytest.importorskip("sklearn")


def reviews(n_per_class: int = 12, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for label, pool in (("pos", GOOD), ("neg", BAD)):
        for _ in range(n_per_class):
            texts.append(" ".join([*rng.choice(NEUTRAL, 1), *rng.choice(pool, 2, replace=False)]))
            labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Feature stores every fit of this module shares: each text is read by llama.cpp once."""
    return tmp_path_factory.mktemp("features")


def estimator(smollm2_path, features, **params):
    """Small linear heads, trained briefly: these tests are about the estimator's shape, not its accuracy."""
    return edge2dexit.EarlyExitClassifier(model=smollm2_path, n_ctx=256, head="linear", epochs=15,
                                          features=str(features), **params)


def test_train_in_one_line_returns_the_bundle_it_wrote(tmp_path, smollm2_path, features):
    texts, labels = reviews()
    from edge2dexit.convert.settings import TrainSettings

    bundle = edge2dexit.train(texts, labels, model=smollm2_path, out=tmp_path / "b", split=(0.5, 0.25, 0.25),
                              head=TrainSettings(kind="linear", epochs=15), features=features,
                              engine=edge2dexit.EngineSettings(n_ctx=256))
    assert bundle.labels == ("neg", "pos") and load_bundle(tmp_path / "b").labels == bundle.labels
    assert bundle.calibration["data"]["data"] == "in-memory" and (tmp_path / "b" / "README.md").is_file()


def test_cross_val_score_and_a_pipeline_on_raw_text(smollm2_path, features):
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    texts, labels = reviews()
    scores = cross_val_score(estimator(smollm2_path, features), texts, labels, cv=3)
    assert len(scores) == 3 and all(0 <= s <= 1 for s in scores) and np.mean(scores) > 0.6
    pipeline = make_pipeline(FunctionTransformer(lambda batch: [t.strip() for t in batch]),
                             estimator(smollm2_path, features))
    pipeline.fit([f" {t} " for t in texts], labels)
    assert set(pipeline.predict(texts[:4])) <= {"neg", "pos"}
    assert pipeline.predict_proba(texts[:2]).shape == (2, 2)


def test_a_saved_fit_is_a_bundle_the_cli_reads(tmp_path, smollm2_path, features):
    texts, labels = reviews()
    fitted = estimator(smollm2_path, features).fit(texts, labels)
    assert list(fitted.classes_) == ["neg", "pos"] and fitted.score(texts, labels) > 0.6
    fitted.save(tmp_path / "saved")
    result = CliRunner().invoke(app, ["classify", "-", "--bundle", str(tmp_path / "saved"), "--json", "--n-ctx", "256"],
                                input="I loved every minute of it. The acting was superb.")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["label"] in ("neg", "pos")
    again = edge2dexit.EarlyExitClassifier.load(tmp_path / "saved", n_ctx=256)
    np.testing.assert_allclose(again.predict_proba(texts[:3]), fitted.predict_proba(texts[:3]))


def test_a_fitted_estimator_pickles_with_its_bundle_and_reopens_where_it_is_loaded(tmp_path, smollm2_path, features):
    import joblib
    from sklearn.exceptions import NotFittedError

    texts, labels = reviews()
    unfitted = estimator(smollm2_path, features)
    with pytest.raises(NotFittedError):
        unfitted.predict(texts[:1])
    fitted = estimator(smollm2_path, features).fit(texts, labels)
    expected = fitted.predict_proba(texts[:3])
    with pytest.raises(ValueError, match="string object received"):
        fitted.predict("one text, not a list of them")
    joblib.dump(fitted, tmp_path / "fitted.joblib")
    loaded = joblib.load(tmp_path / "fitted.joblib")
    assert loaded.directory_ != fitted.directory_ and (loaded.directory_ / "exits.gguf").is_file()
    assert not (loaded.directory_ / "features").exists()  # what was read stays out of the pickle
    np.testing.assert_allclose(loaded.predict_proba(texts[:3]), expected)
    first = fitted._classifier()
    fitted.fit(texts, labels)  # a refit closes the classifier of the fit before
    assert first.closed and fitted._classifier() is not first
