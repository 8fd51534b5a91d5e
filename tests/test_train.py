"""Training exit heads on a small synthetic feature store (no llama.cpp): accuracy on separable data, exactness
of the numpy export against torch, determinism, and the prefix examples against hand-computed running means."""

import json

import numpy as np
import pytest
import torch

from edge2dexit.convert.features import open_store
from edge2dexit.convert.settings import TrainSettings
from edge2dexit.convert.train import export_head, head_module, train_heads
from edge2dexit.errors import InputError

LABELS = ("neg", "pos", "mixed")
FAST = TrainSettings(epochs=30, hidden=32, batch=64, lr=1e-2, threads=1)


def write_store(directory, documents, labels):
    """A feature store in the layout `features.py` writes: one [m, n_layer, n_embd] array per document."""
    directory.mkdir(parents=True, exist_ok=True)
    states = np.concatenate(documents).astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in documents])])
    meta = {"offsets": offsets.tolist(), "labels": [int(x) for x in labels], "n_layer": states.shape[1],
            "n_embd": states.shape[2], "done": len(documents)}
    (directory / "meta.json").write_text(json.dumps(meta))
    states.tofile(directory / "states.f16")
    np.save(directory / "tokens.npy", np.full(len(states), 7, dtype=np.int32))
    return open_store(directory)


def separable_store(directory, n_docs=90, n_layer=3, n_embd=24, seed=0):
    """Each class shifts every sentence along its own direction; layers differ in offset and scale by orders
    of magnitude (like a residual stream) so that standardisation has to do its job."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_docs) % len(LABELS)
    directions = 3 * np.eye(n_embd)[: len(LABELS)]
    scale = np.array([1.0, 30.0, 1000.0])[:n_layer, None]
    offset = rng.normal(0, 5, size=(n_layer, n_embd)) * scale
    documents = [
        offset + scale * (directions[y] + rng.normal(0, 0.5, size=(rng.integers(2, 9), n_layer, n_embd)))
        for y in labels
    ]
    return write_store(directory, documents, labels)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return separable_store(tmp_path_factory.mktemp("features")).select()


@pytest.mark.parametrize("pooling", ["sentence", "prefix"])
@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_separable_data_is_learnt_and_exported_exactly(store, pooling, kind):
    heads, report = train_heads(store, LABELS, pooling, TrainSettings(**{**FAST.__dict__, "kind": kind}))
    assert heads.layers == (0, 1, 2) and heads.labels == LABELS and heads.pooling == pooling
    for layer, r in report.items():
        assert r["val_accuracy"] > 0.95, (layer, r)
        assert r["export_error"] < 1e-5, (layer, r)
        assert 1 <= r["best_epoch"] <= r["epochs"] <= 30
        assert np.isfinite(r["val_loss"])
        assert heads.head(layer).kind == kind


def test_export_computes_what_the_torch_module_computes():
    torch.manual_seed(3)
    module = head_module(12, 3, TrainSettings(hidden=20))
    rng = np.random.default_rng(3)
    mean, scale = rng.normal(0, 1e4, 12).astype(np.float32), rng.uniform(1e2, 1e4, 12).astype(np.float32)
    x = (mean + scale * rng.normal(size=(50, 12))).astype(np.float32)
    head = export_head(module, 4, "mlp", mean, scale)
    with torch.no_grad():
        expected = torch.softmax(module(torch.from_numpy((x - mean) / scale)), dim=1).numpy()
    assert np.abs(head.proba(x) - expected).max() < 1e-5
    assert head.weights[0][0].shape == (20, 12) and head.weights[1][0].shape == (3, 20)


def test_same_seed_gives_identical_heads_and_layers_are_independent(store):
    a, report_a = train_heads(store, LABELS, "prefix", FAST)
    b, report_b = train_heads(store, LABELS, "prefix", FAST)
    only, _ = train_heads(store, LABELS, "prefix", TrainSettings(**{**FAST.__dict__, "layers": (1,)}))
    assert report_a == report_b and only.layers == (1,)
    for layer in a.layers:
        for (wa, ba), (wb, bb) in zip(a.head(layer).weights, b.head(layer).weights):
            assert np.array_equal(wa, wb) and np.array_equal(ba, bb)
        np.testing.assert_array_equal(a.head(layer).norm_mean, b.head(layer).norm_mean)
    for (wa, _), (wo, _) in zip(a.head(1).weights, only.head(1).weights):
        assert np.array_equal(wa, wo)
    other, _ = train_heads(store, LABELS, "prefix", TrainSettings(**{**FAST.__dict__, "seed": 1, "layers": (1,)}))
    assert not np.array_equal(other.head(1).weights[0][0], only.head(1).weights[0][0])


def test_examples_are_sentence_means_and_running_prefix_means(tmp_path):
    rng = np.random.default_rng(0)
    documents = [rng.normal(size=(m, 2, 3)) for m in (3, 1, 4)]
    store = write_store(tmp_path, documents, [0, 1, 0])
    docs = [2, 0, 1]  # any order: examples follow it
    stored = [np.asarray(d, dtype=np.float16).astype(np.float32) for d in documents]

    x, y, doc, read = store.select(docs).examples("sentence", 1)
    np.testing.assert_array_equal(x, np.concatenate([stored[i][:, 1] for i in docs]))
    assert x.dtype == np.float32
    assert doc.tolist() == [0, 0, 0, 0, 1, 1, 1, 2] and y.tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    assert read.tolist() == [1, 2, 3, 4, 1, 2, 3, 1]

    x, y, doc, read = store.select(docs).examples("prefix", 1)
    expected = [stored[i][: k + 1, 1].mean(axis=0) for i in docs for k in range(len(stored[i]))]
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    assert doc.tolist() == [0, 0, 0, 0, 1, 1, 1, 2] and y.tolist() == [0, 0, 0, 0, 0, 0, 0, 1]

    # a selection of a selection, and two joined, read the same documents in the same order
    twice = store.select([0, 1, 2]).select([2, 0]) + store.select([1])
    np.testing.assert_array_equal(twice.examples("prefix", 1)[0], x)

    with pytest.raises(InputError, match="pooling"):
        store.select(docs).examples("tokens", 1)

    np.testing.assert_array_equal(store.layer_means(2, 1), stored[2][:, 1])
    states, counts = store.document(2)
    np.testing.assert_array_equal(states, stored[2])
    np.testing.assert_array_equal(counts, [7] * 4)


def test_train_settings_defaults_and_checks():
    defaults = TrainSettings()
    assert (defaults.kind, defaults.hidden, defaults.lr) == ("mlp", 64, 3e-4)
    for bad in ({"kind": "conv"}, {"validation_fraction": 1.0}, {"hidden": 0}):
        with pytest.raises(ValueError):
            TrainSettings(**bad)


def test_unusable_labels_are_refused(tmp_path):
    documents = [np.ones((2, 2, 3)) * i for i in range(6)]
    single = write_store(tmp_path / "single", documents, [1] * 6).select()
    with pytest.raises(InputError, match="two classes"):
        train_heads(single, LABELS, "sentence", FAST)
    outside = write_store(tmp_path / "outside", documents, [0, 1, 3, 0, 1, 3]).select()
    with pytest.raises(InputError, match="class indices"):
        train_heads(outside, LABELS, "sentence", FAST)


def test_partial_store_is_refused(tmp_path):
    store = separable_store(tmp_path, n_docs=12)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "done": 8}))
    with pytest.raises(InputError, match="8 of 12"):
        train_heads(open_store(tmp_path).select(), LABELS, "sentence", FAST)
    assert store.done == 12
