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
from .data import DEFAULT_FRACTIONS, DataSettings, labelled, make_splits
from .settings import ConvertSettings, LoraSettings, TrainSettings

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
except ImportError:  # pragma: no cover - the train extra brings scikit-learn
    BaseEstimator, ClassifierMixin = object, object


class EarlyExitClassifier(ClassifierMixin, BaseEstimator):
    """A scikit-learn classifier over raw texts: `fit` trains a bundle (`train`) in a directory of its own, and the
    fitted estimator classifies through a `Classifier` on it. Parameters are those of `train` and `Classifier`;
    `features` lets the fits of a cross-validation share what they read. Unpicklable once fitted (it holds a
    llama.cpp context): scikit-learn's cloning copies the parameters only, as cross_val_score does."""

    def __init__(self, model: str = "smollm2-135m@q8_0", policy: str | None = None, prompt: str | None = None,
                 lexical: bool = True, max_error: float | None = None, n_ctx: int = 2048, width: int | None = None,
                 threads: int | None = None, seed: int = 0, tolerance: float = 0.02, head: str = TrainSettings.kind,
                 epochs: int = TrainSettings.epochs, features: str | None = None):
        self.model, self.policy, self.prompt, self.lexical, self.max_error = model, policy, prompt, lexical, max_error
        self.n_ctx, self.width, self.threads, self.seed, self.tolerance = n_ctx, width, threads, seed, tolerance
        self.head, self.epochs, self.features = head, epochs, features

    def fit(self, X: Sequence[str], y: Sequence[Any]) -> "EarlyExitClassifier":
        texts = _texts(X)
        self.directory_ = Path(tempfile.mkdtemp(prefix="edge2dexit-estimator-"))
        weakref.finalize(self, shutil.rmtree, self.directory_, ignore_errors=True)  # `save` keeps a copy
        train(texts, list(y), self.model, self.directory_, prompt=self.prompt, seed=self.seed,
              head=TrainSettings(kind=self.head, epochs=self.epochs, seed=self.seed), tolerance=self.tolerance,
              lexical=self.lexical, engine=self._settings(), features=self.features)
        self.classes_ = np.array(sorted(set(y)))
        return self._open(self.directory_)

    def predict_proba(self, X: Sequence[str]) -> np.ndarray:
        texts = _texts(X)
        rows = np.zeros((len(texts), len(self.classes_)))
        for i, outcome in self.classifier_.classify_many(enumerate(texts)):
            if isinstance(outcome, Exception):
                raise outcome
            rows[i] = [outcome.scores[label] for label in self.classifier_.labels]
        return rows

    def predict(self, X: Sequence[str]) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def save(self, directory: str | Path) -> Path:
        """Copy the fitted bundle to `directory` (which `edge2dexit classify --bundle` and `load` read)."""
        shutil.copytree(self.directory_, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns("features"))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, **params) -> "EarlyExitClassifier":
        """A fitted estimator on a saved bundle; its classes are the bundle's label names (strings)."""
        estimator = cls(**params)
        estimator.classes_ = np.array(load_bundle(directory).labels)
        estimator.directory_ = Path(directory)
        return estimator._open(directory)

    def _open(self, directory: Path) -> "EarlyExitClassifier":
        from ..classifier import Classifier

        self.classifier_ = Classifier(directory, policy=self.policy, settings=self._settings(), truncate=True,
                                      lexical=self.lexical, max_error=self.max_error)
        return self

    def _settings(self) -> EngineSettings:
        return EngineSettings(n_ctx=self.n_ctx, width=self.width, n_threads=self.threads)


def _texts(X: Any) -> list[str]:
    """Raw texts from what scikit-learn hands over: a list, an array or a one-column frame of strings."""
    values = np.asarray(X, dtype=object)
    return [str(text) for text in (values[:, 0] if values.ndim == 2 else values)]
