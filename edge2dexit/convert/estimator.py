"""Training from Python lists, in one line, and a scikit-learn estimator around it:

    bundle = edge2dexit.train(texts, labels, model="smollm2-135m@q8_0", out="my-bundle")

    clf = EarlyExitClassifier(model="smollm2-135m@q8_0").fit(texts, y)      # scikit-learn's shape
    clf.predict(["Great film."]), clf.predict_proba(...), clf.score(texts, y)
    cross_val_score(EarlyExitClassifier(...), texts, y, cv=3)              # also inside a Pipeline on raw text

Both run what `convert` runs (`pipeline.build`: the same engine, features, heads, lexical exit and calibration) on the
texts given, split into train / calibration / test as `convert --split` splits a file; only the step that reads a data
file is left out. Training needs the `train` extra (torch for the heads, scikit-learn for the lexical exit).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..bundle import Bundle, load_bundle
from ..settings import EngineSettings
from .data import labelled, make_splits
from .settings import DEFAULT_FRACTIONS, ConvertSettings, DataSettings, LoraSettings, TrainSettings

IN_MEMORY = "in-memory"  # what a bundle trained from lists records as its data (eval then needs --data)


def train(
    texts: Sequence[str],
    labels: Sequence[Any],
    model: str = "smollm2-135m@q8_0",
    out: str | Path = "bundle",
    *,
    prompt: str | None = None,
    split: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    head: TrainSettings | None = None,
    tolerance: float = 0.02,
    confidence: float = 0.95,
    lexical: bool = True,
    finetune: LoraSettings | None = None,
    engine: EngineSettings = EngineSettings(),
    features: str | Path | None = None,
) -> Bundle:
    """Train a bundle on `texts` and their `labels` (any labels that sort; the bundle's label names are their strings)
    and write it to `out`. `features`: a directory whose feature stores later trainings reuse (a text already read
    there with the same model, prompt and adapter is not read again)."""
    from .pipeline import _base_model, build

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = DataSettings(IN_MEMORY, per_class=None, fractions=split, seed=seed)
    work, reuse = None, ()
    if features is not None:  # one directory of stores per training set; every earlier one is reused
        work = Path(features) / _key(texts)
        work.mkdir(parents=True, exist_ok=True)
        reuse = tuple(p for p in Path(features).iterdir() if p != work and any(p.glob("*/meta.json")))
    settings = ConvertSettings(model, data, out, prompt=prompt, head=head or TrainSettings(seed=seed),
                               tolerance=tolerance, confidence=confidence, engine=engine, finetune=finetune,
                               lexical=lexical, work=work, reuse=reuse)
    model_path, registry_name = _base_model(settings, out)
    build(settings, make_splits(data, labelled(texts, labels)), model_path, registry_name)
    return load_bundle(out)


def _key(texts: Sequence[str]) -> str:
    """A name for the feature stores of one training set (distinct sets must not overwrite each other's)."""
    import hashlib

    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:16]


try:  # scikit-learn's base classes when it is installed; the estimator is one only then
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.utils.validation import check_is_fitted
except ImportError:  # pragma: no cover - the train extra brings scikit-learn
    BaseEstimator, ClassifierMixin = object, object

    def check_is_fitted(estimator: Any, attributes: str) -> None:
        if not hasattr(estimator, attributes):
            raise RuntimeError(f"this {type(estimator).__name__} is not fitted yet: call fit first")


class EarlyExitClassifier(ClassifierMixin, BaseEstimator):
    """A scikit-learn classifier over raw texts: `fit` trains a bundle (`train`) in a directory of its own, and the
    fitted estimator classifies through a `Classifier` on it, opened at its first prediction. Parameters are those of
    `train` and `Classifier`; `features` lets the fits of a cross-validation share what they read. It pickles (and so
    `joblib.dump`s) with its bundle's files inside, and reopens them wherever it is loaded. For answers that may be
    "unsure", read the bundle with `Classifier(bundle, max_error=…)`: `predict` always answers."""

    def __init__(self, model: str = "smollm2-135m@q8_0", policy: str | None = None, prompt: str | None = None,
                 lexical: bool = True, n_ctx: int = 2048, width: int | None = None, threads: int | None = None,
                 seed: int = 0, tolerance: float = 0.02, head: str = TrainSettings.kind,
                 epochs: int = TrainSettings.epochs, features: str | None = None):
        self.model, self.policy, self.prompt, self.lexical = model, policy, prompt, lexical
        self.n_ctx, self.width, self.threads, self.seed, self.tolerance = n_ctx, width, threads, seed, tolerance
        self.head, self.epochs, self.features = head, epochs, features

    def fit(self, X: Sequence[str], y: Sequence[Any]) -> "EarlyExitClassifier":
        texts = _texts(X)
        self._close()  # a refit replaces the classifier of the last fit
        directory = Path(tempfile.mkdtemp(prefix="edge2dexit-estimator-"))
        weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)  # `save` keeps a copy
        train(texts, list(y), self.model, directory, prompt=self.prompt, seed=self.seed,
              head=TrainSettings(kind=self.head, epochs=self.epochs, seed=self.seed), tolerance=self.tolerance,
              lexical=self.lexical, engine=self._settings(), features=self.features)
        self.classes_, self.directory_ = np.array(sorted(set(y))), directory
        return self

    def predict_proba(self, X: Sequence[str]) -> np.ndarray:
        check_is_fitted(self, "classes_")
        texts = _texts(X)
        classifier = self._classifier()
        rows = np.zeros((len(texts), len(self.classes_)))
        for i, outcome in classifier.classify_many(enumerate(texts)):
            if isinstance(outcome, Exception):
                raise outcome
            rows[i] = [outcome.scores[label] for label in classifier.labels]
        return rows

    def predict(self, X: Sequence[str]) -> np.ndarray:
        check_is_fitted(self, "classes_")
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def save(self, directory: str | Path) -> Path:
        """Copy the fitted bundle to `directory` (which `edge2dexit classify --bundle` and `load` read)."""
        check_is_fitted(self, "classes_")
        shutil.copytree(self.directory_, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns("features"))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, **params) -> "EarlyExitClassifier":
        """A fitted estimator on a saved bundle; its classes are the bundle's label names (strings)."""
        estimator = cls(**params)
        estimator.classes_ = np.array(load_bundle(directory).labels)
        estimator.directory_ = Path(directory)
        return estimator

    def __getstate__(self) -> dict[str, Any]:
        """The parameters and, once fitted, the bundle's files (not the llama.cpp context, nor the features)."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("directory_", "_open_classifier")}
        if hasattr(self, "directory_"):
            state["bundle_files_"] = {path.relative_to(self.directory_).as_posix(): path.read_bytes()
                                      for path in self.directory_.rglob("*")
                                      if path.is_file() and "features" not in path.relative_to(self.directory_).parts}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        files = state.pop("bundle_files_", None)
        self.__dict__.update(state)
        if files is not None:
            self.directory_ = Path(tempfile.mkdtemp(prefix="edge2dexit-estimator-"))
            weakref.finalize(self, shutil.rmtree, self.directory_, ignore_errors=True)
            for name, data in files.items():
                (self.directory_ / name).parent.mkdir(parents=True, exist_ok=True)
                (self.directory_ / name).write_bytes(data)

    def _classifier(self):
        """The classifier of the fitted bundle, opened once."""
        if getattr(self, "_open_classifier", None) is None:
            from ..classifier import Classifier

            self._open_classifier = Classifier(self.directory_, policy=self.policy, settings=self._settings(),
                                               truncate=True, lexical=self.lexical)
        return self._open_classifier

    def _close(self) -> None:
        if getattr(self, "_open_classifier", None) is not None:
            self._open_classifier.close()
            self._open_classifier = None

    def _settings(self) -> EngineSettings:
        return EngineSettings(n_ctx=self.n_ctx, width=self.width, n_threads=self.threads)


def _texts(X: Any) -> list[str]:
    """Raw texts from what scikit-learn hands over: a list, an array or a one-column frame of strings; one string
    alone is refused, as scikit-learn's text estimators refuse it (it would be read as a list of characters)."""
    if isinstance(X, str):
        raise ValueError("Iterable over raw text documents expected, string object received: wrap one text in a list")
    values = np.asarray(X, dtype=object)
    return [str(text) for text in (values[:, 0] if values.ndim == 2 else values)]
