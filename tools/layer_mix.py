"""Does a head pay for reading a mix of the layers an exit has computed? Measured on stored features, no re-reading.

    python tools/layer_mix.py WORK [--layer L]

WORK is a convert's feature directory (`--work`, or OUT/features) with train, calibration and test stores. Each text
is its whole-text prefix mean at every layer (what the prefix head reads at the last sentence). At exit layer L,
every layer ≤ L has run, so a head there may read, besides layer L alone:
- window: the mean of layers L−3..L;
- concat: layers L−2, L−1 and L side by side (3 × n_embd inputs);
- all-mean: the mean of every layer 0..L.
Each is a standardised logistic regression (scikit-learn) trained on the training and calibration documents and
scored on the test documents. Printed: test accuracy per layer for each, and at `--layer` (default: the best single
layer on test) each mix's paired difference against layer L alone with its exact 95% interval."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edge2dexit.convert.features import open_store
from edge2dexit.stats import paired_lower_bound

MIXES = ("single", "window", "concat", "all-mean")


def whole_text_means(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """([docs, n_layer, n_embd] float32 prefix means over every sentence of each text, labels)."""
    store = open_store(directory)
    means = np.stack([np.asarray(store.document(i)[0], dtype=np.float32).mean(axis=0) for i in range(store.n_docs)])
    return means, store.labels


def mixed(x: np.ndarray, layer: int, mix: str) -> np.ndarray:
    if mix == "single":
        return x[:, layer]
    if mix == "window":
        return x[:, max(0, layer - 3): layer + 1].mean(axis=1)
    if mix == "concat":
        return x[:, [max(0, layer - 2), max(0, layer - 1), layer]].reshape(len(x), -1)
    return x[:, : layer + 1].mean(axis=1)


def fitted_predictions(train: np.ndarray, y: np.ndarray, test: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(train, y).predict(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--layer", type=int, default=None)
    args = parser.parse_args()
    parts = [whole_text_means(args.work / part) for part in ("train", "calibration")
             if (args.work / part / "meta.json").exists()]
    pool_x, pool_y = np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
    test_x, test_y = whole_text_means(args.work / "test")
    n_layer = pool_x.shape[1]
    right = {mix: [fitted_predictions(mixed(pool_x, l, mix), pool_y, mixed(test_x, l, mix)) == test_y
                   for l in range(n_layer)] for mix in MIXES}
    print(f"{len(pool_y)} training documents, {len(test_y)} test documents; test accuracy by exit layer")
    print("layer " + " ".join(f"{mix:>9s}" for mix in MIXES))
    for l in range(n_layer):
        print(f"{l:5d} " + " ".join(f"{right[mix][l].mean():9.3f}" for mix in MIXES))
    layer = args.layer if args.layer is not None else int(np.argmax([r.mean() for r in right["single"]]))
    print(f"at layer {layer}, against layer {layer} alone ({right['single'][layer].mean():.3f}), paired, 95%:")
    single = right["single"][layer]
    for mix in MIXES[1:]:
        ours = right[mix][layer]
        low, high = paired_lower_bound(ours, single, 0.975), -paired_lower_bound(single, ours, 0.975)
        print(f"  {mix:9s} {ours.mean():.3f}  {ours.mean() - single.mean():+.3f} ({low:+.3f} to {high:+.3f})")
    best = {mix: max(range(n_layer), key=lambda l: right[mix][l].mean()) for mix in MIXES}
    print("best layer of each: " + ", ".join(f"{mix} {right[mix][best[mix]].mean():.3f} at {best[mix]}"
                                            for mix in MIXES))


if __name__ == "__main__":
    main()
