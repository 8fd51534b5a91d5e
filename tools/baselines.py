"""The classical baselines beside a bundle, on its own test split: the command behind BENCHMARKS' fastText figures.

    pip install fasttext-numpy2        # not a dependency of edge2dexit: only this comparison needs it
    python tools/baselines.py BUNDLE

Both baselines are trained on the documents the bundle's labels trained and calibrated on (the whole non-test pool,
as cross-fitting uses it) and scored on its test split, each with its 95% Wilson interval:
- TF-IDF + logistic regression, the settings of `edge2dexit eval` (edge2dexit/baselines.py);
- fastText supervised (word 1–2-grams, 25 epochs, learning rate 0.5, one thread so that a run repeats).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edge2dexit.baselines import tfidf_logreg
from edge2dexit.bundle import load_bundle
from edge2dexit.convert.data import bundle_splits
from edge2dexit.stats import wilson_interval

FASTTEXT_SETTINGS = {"epoch": 25, "lr": 0.5, "wordNgrams": 2, "dim": 100, "minCount": 1, "thread": 1, "seed": 0}


def fasttext_predictions(texts: list[str], labels: list[int], test_texts: list[str]) -> np.ndarray:
    import fasttext

    def line(text: str) -> str:  # fastText reads one document per line
        return " ".join(text.split())

    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.txt"
        train.write_text("".join(f"__label__{y} {line(t)}\n" for t, y in zip(texts, labels)), encoding="utf-8")
        model = fasttext.train_supervised(str(train), verbose=0, **FASTTEXT_SETTINGS)
    return np.array([int(model.predict(line(t))[0][0].removeprefix("__label__")) for t in test_texts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    args = parser.parse_args()
    splits = bundle_splits(load_bundle(args.bundle))
    pool = [part for part in (splits.train, splits.calibration) if len(part)]
    texts = [t for part in pool for t in part.texts]
    labels = [y for part in pool for y in part.labels]
    truth = np.asarray(splits.test.labels)
    print(f"trained on {len(texts)} documents (train + calibration), scored on {len(truth)} test documents")
    rows = {"tfidf-logreg": tfidf_logreg().fit(texts, labels).predict(list(splits.test.texts)),
            "fasttext": fasttext_predictions(texts, labels, list(splits.test.texts))}
    for name, predicted in rows.items():
        accuracy = float(np.mean(np.asarray(predicted) == truth))
        low, high = wilson_interval(int(round(accuracy * len(truth))), len(truth))
        print(f"{name:14s} {accuracy:.3f} ({low:.3f}–{high:.3f})")


if __name__ == "__main__":
    main()
