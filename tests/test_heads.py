import numpy as np
import pytest

from edge2dexit.errors import BundleError
from edge2dexit.heads import ExitHead, ExitHeads, Pooling, margin, running_means, whole_text_input


def random_head(rng, layer=0, kind="mlp", d=16, hidden=8, n_classes=3):
    sizes = [d, hidden, n_classes] if kind == "mlp" else [d, n_classes]
    weights = tuple((rng.normal(size=(o, i)).astype(np.float32), rng.normal(size=o).astype(np.float32))
                    for i, o in zip(sizes, sizes[1:]))
    return ExitHead(layer, kind, rng.normal(size=d).astype(np.float32), rng.uniform(0.5, 2, size=d).astype(np.float32),
                    weights)


def reference_proba(head, x):
    """The same maths written out in float64 with an explicit loop over layers."""
    h = (np.asarray(x, np.float64) - head.norm_mean) / head.norm_scale
    for i, (w, b) in enumerate(head.weights):
        h = np.maximum(h, 0) if i else h
        h = h @ np.asarray(w, np.float64).T + b
    e = np.exp(h - h.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_mlp_matches_hand_computation():
    # x' = ([3, 6] - [1, 2]) / [2, 4] = [1, 1]
    # fc1: [1 - 2 + 0, 2 + 1 - 1] = [-1, 2] → ReLU [0, 2];  fc2: [0 + 0, 2 + 0.5] = [0, 2.5]
    head = ExitHead(
        layer=4, kind="mlp",
        norm_mean=np.array([1.0, 2.0]), norm_scale=np.array([2.0, 4.0]),
        weights=((np.array([[1.0, -2.0], [2.0, 1.0]]), np.array([0.0, -1.0])),
                 (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0.0, 0.5]))),
    )
    p = head.proba(np.array([3.0, 6.0]))
    assert p.dtype == np.float64 and p.shape == (2,)
    np.testing.assert_allclose(p, [1 / (1 + np.exp(2.5)), np.exp(2.5) / (1 + np.exp(2.5))], rtol=1e-6)
    assert (head.n_embd, head.n_classes) == (2, 2)


def test_linear_matches_hand_computation():
    # x' = [2, -1]; logits = [2 - 1, 0 + 1 + 1] = [1, 2]
    fc = (np.array([[1.0, 1.0], [0.0, -1.0]]), np.array([0.0, 1.0]))
    head = ExitHead(0, "linear", np.zeros(2), np.ones(2), (fc,))
    np.testing.assert_allclose(head.proba(np.array([2.0, -1.0])), [1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_proba_single_and_batch_agree_with_reference(kind, dtype):
    rng = np.random.default_rng(1)
    head = random_head(rng, kind=kind)
    x = rng.normal(size=(5, 16)).astype(dtype)
    batch = head.proba(x)
    assert batch.shape == (5, 3) and batch.dtype == np.float64
    np.testing.assert_allclose(batch.sum(axis=1), 1, rtol=1e-12)
    np.testing.assert_allclose(batch, reference_proba(head, x), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head.proba(x[2]), batch[2], rtol=1e-5, atol=1e-7)


def test_proba_leaves_its_input_alone_and_is_stable_on_huge_states():
    rng = np.random.default_rng(2)
    head = random_head(rng, kind="linear")
    x = (rng.normal(size=16) * 35_000).astype(np.float32)  # Gemma-sized residual stream, logits in the thousands
    before = x.copy()
    p = head.proba(x)
    assert np.isfinite(p).all() and np.isclose(p.sum(), 1)
    np.testing.assert_array_equal(x, before)


def test_proba_refuses_wrong_state_size():
    head = random_head(np.random.default_rng(3))
    with pytest.raises(BundleError, match="reads 16-dim states"):
        head.proba(np.zeros(17, np.float32))


def test_margin():
    assert margin(np.array([0.7, 0.3])) == pytest.approx(0.4)
    assert margin(np.array([0.2, 0.5, 0.3])) == pytest.approx(0.2)
    np.testing.assert_allclose(margin(np.array([[0.1, 0.9], [0.5, 0.5], [0.6, 0.1]])), [0.8, 0.0, 0.5])


def pair(out, inp):
    return np.zeros((out, inp), np.float32), np.zeros(out, np.float32)


@pytest.mark.parametrize("kwargs, words", [
    (dict(kind="conv"), "unknown kind 'conv'"),
    (dict(weights=(pair(2, 4),)), "needs 2 linear layers, got 1"),
    (dict(norm_scale=np.ones(5)), "norm_mean [4] and norm_scale [5]"),
    (dict(norm_scale=np.array([1.0, 0.0, 1.0, 1.0])), "norm_scale must be finite and positive"),
    (dict(weights=(pair(8, 5), pair(2, 8))), "fc1 has weight [8, 5]"),
    (dict(weights=(pair(8, 4), pair(2, 7))), "fc2 has weight [2, 7]"),
    (dict(weights=((np.zeros((8, 4)), np.zeros(7)), pair(2, 8))), "bias [7]"),
    (dict(weights=((np.full((8, 4), np.nan), np.zeros(8)), pair(2, 8))), "fc1 holds non-finite values"),
])
def test_head_shape_validation(kwargs, words):
    args = dict(layer=3, kind="mlp", norm_mean=np.zeros(4), norm_scale=np.ones(4), weights=(pair(8, 4), pair(2, 8)))
    with pytest.raises(BundleError, match="exit head for layer 3") as err:
        ExitHead(**{**args, **kwargs})
    assert words in str(err.value)


def test_exit_heads_lookup():
    rng = np.random.default_rng(4)
    heads = ExitHeads("sentence", ("a", "b", "c"), {7: random_head(rng, 7), 2: random_head(rng, 2)})
    assert heads.layers == (2, 7) and heads.n_classes == 3 and heads.n_embd == 16
    x = rng.normal(size=16).astype(np.float32)
    np.testing.assert_array_equal(heads.proba(7, x), heads.head(7).proba(x))
    with pytest.raises(BundleError, match="no sentence exit head for layer 5; this bundle has them for layers 2, 7"):
        heads.head(5)


def test_exit_heads_must_agree():
    rng = np.random.default_rng(5)
    with pytest.raises(BundleError, match="bundle has 3 labels but the exit head for layer 7 outputs 2 classes"):
        ExitHeads("sentence", ("a", "b", "c"), {7: random_head(rng, 7, n_classes=2)})
    with pytest.raises(BundleError, match="different sizes: layer 1: 16, layer 2: 8"):
        ExitHeads("prefix", ("a", "b", "c"), {1: random_head(rng, 1), 2: random_head(rng, 2, d=8)})
    with pytest.raises(BundleError, match="filed under layer 1 says it is for layer 2"):
        ExitHeads("prefix", ("a", "b", "c"), {1: random_head(rng, 2)})
    with pytest.raises(BundleError, match="no exit heads"):
        ExitHeads("prefix", ("a", "b", "c"), {})


def test_running_means_and_whole_text_input():
    means = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0], [7.0, 0.0]], np.float32)
    np.testing.assert_allclose(running_means(means), [[1, 2], [2, 3], [3, 5], [4, 3.75]])
    # two documents laid end to end: rows 0-1 and 2-3
    np.testing.assert_allclose(running_means(means, np.array([0, 0, 2, 2])), [[1, 2], [2, 3], [5, 9], [6, 4.5]])
    assert running_means(means).dtype == np.float32
    np.testing.assert_array_equal(whole_text_input(Pooling.SENTENCE, means), [7, 0])
    np.testing.assert_allclose(whole_text_input(Pooling.PREFIX, means), [4, 3.75])
    assert Pooling.ALL == (Pooling.SENTENCE, Pooling.PREFIX) == ("sentence", "prefix")
