"""Exit heads: the small classifiers that read one layer's hidden state, in plain numpy, and what they read.

A head standardises its input first, x' = (x - norm_mean) / norm_scale, because residual streams are huge and
grow with depth (Gemma's reaches norms of 35,000): without it one set of weights could not serve all inputs.
The runtime calls a head once per (sentence, layer) cell, so everything that can be prepared is prepared at
construction: the transposed weights are kept contiguous in float32, and a call allocates only its activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .errors import BundleError
from .keys import HEAD_LINEARS


class Pooling:
    """What a set of heads reads, per layer. Both are means of sentence means, so a head sees one vector per text
    however long it is."""

    SENTENCE = "sentence"  # one sentence's mean state (the paper's adapter input)
    PREFIX = "prefix"  # the running mean of the sentence means read so far (evidence accumulated in embedding space)
    ALL = (SENTENCE, PREFIX)


def running_means(means: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
    """Row k: the mean of rows first[k]..k of `means` [n, d] (default first = 0), summed in float64 — the input of
    the prefix heads after each sentence. `first` lets one call serve many documents laid end to end."""
    sums = np.concatenate([np.zeros((1, means.shape[1])), np.cumsum(means, axis=0, dtype=np.float64)])
    first = np.zeros(len(means), dtype=np.int64) if first is None else first
    counts = np.arange(1, len(means) + 1) - first
    return ((sums[1:] - sums[first]) / counts[:, None]).astype(np.float32)


def whole_text_input(pooling: str, means: np.ndarray) -> np.ndarray:
    """What a head of `pooling` reads for a whole text whose sentence means are `means` [m, d]: the last
    sentence's mean (the paper's layer-wise baseline), or the mean of all of them."""
    return means[-1] if pooling == Pooling.SENTENCE else running_means(means)[-1]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)  # exp never overflows: the largest term is exp(0)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def margin(p: np.ndarray) -> np.ndarray | float:
    """p_top1 − p_top2 along the last axis: the paper's confidence. 0 means a tie, 1 certainty."""
    top2 = np.sort(p, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


@dataclass(frozen=True, eq=False)
class ExitHead:
    """One layer's classifier: standardise, then `weights` as linear layers (W [out, in], b [out]) with ReLU between.

    The norm vectors are kept as float32, as the bundle stores them; `weights` keeps the arrays it was given
    (float16 when loaded from a half-precision bundle) and computation uses float32 copies.
    """

    layer: int
    kind: str
    norm_mean: np.ndarray
    norm_scale: np.ndarray
    weights: tuple[tuple[np.ndarray, np.ndarray], ...]
    _linears: tuple[tuple[np.ndarray, np.ndarray], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        where = f"exit head for layer {self.layer}"
        if self.kind not in HEAD_LINEARS:
            raise BundleError(f"{where} has unknown kind {self.kind!r}; expected one of {', '.join(HEAD_LINEARS)}")
        stems = HEAD_LINEARS[self.kind]
        if len(self.weights) != len(stems):
            raise BundleError(f"{where} is {self.kind!r} and needs {len(stems)} linear layers, got {len(self.weights)}")
        mean = np.ascontiguousarray(self.norm_mean, dtype=np.float32)
        scale = np.ascontiguousarray(self.norm_scale, dtype=np.float32)
        if mean.ndim != 1 or mean.shape != scale.shape:
            raise BundleError(f"{where}: norm_mean {list(mean.shape)} and norm_scale {list(scale.shape)} "
                              "must be vectors of the same length")
        if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise BundleError(f"{where}: norm_scale must be finite and positive and norm_mean finite")
        width = mean.shape[0]
        linears = []
        for stem, (w, b) in zip(stems, self.weights):
            w, b = np.asarray(w), np.asarray(b)
            if w.ndim != 2 or b.shape != w.shape[:1] or w.shape[1] != width:
                raise BundleError(f"{where}: {stem} has weight {list(w.shape)} and bias {list(b.shape)} "
                                  f"but must map {width} inputs, i.e. weight [out, {width}] and bias [out]")
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise BundleError(f"{where}: {stem} holds non-finite values (NaN or inf)")
            linears.append((np.ascontiguousarray(w.T, dtype=np.float32), b.astype(np.float32)))
            width = w.shape[0]
        object.__setattr__(self, "norm_mean", mean)
        object.__setattr__(self, "norm_scale", scale)
        object.__setattr__(self, "_linears", tuple(linears))

    @property
    def n_embd(self) -> int:
        return self.norm_mean.shape[0]

    @property
    def n_classes(self) -> int:
        return self._linears[-1][1].shape[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The head's logits (float32) of one state [d] or of a batch [n, d]."""
        h = np.asarray(x, dtype=np.float32)
        if h.shape[-1] != self.n_embd:
            raise BundleError(f"exit head for layer {self.layer} reads {self.n_embd}-dim states, "
                              f"got shape {list(h.shape)}")
        h = h - self.norm_mean
        h /= self.norm_scale
        for i, (wt, b) in enumerate(self._linears):
            if i:
                np.maximum(h, 0, out=h)
            h = h @ wt
            h += b
        return h

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (float64) of one state [d] or of a batch [n, d]: the raw softmax, before the scale
        that calibration fitted (calibrated.py)."""
        return softmax(self.logits(x))

    def log_proba(self, x: np.ndarray) -> np.ndarray:
        """log of `proba` (float64), computed without underflow."""
        z = self.logits(x).astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    def local_linear(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W [C, d], b [C]) with logits(x) = W · (x − norm_mean) / norm_scale + b at the state `x` [d]: the head
        itself for a linear head; for an MLP, its linear map with each ReLU held as it is at `x` (exact there)."""
        (w1t, b1), *rest = self._linears
        weight, bias = w1t.T.astype(np.float64), b1.astype(np.float64)
        h = ((np.asarray(x, dtype=np.float32) - self.norm_mean) / self.norm_scale) @ w1t + b1
        for wt, b in rest:
            active = (h > 0).astype(np.float64)
            weight, bias = wt.T @ (active[:, None] * weight), wt.T @ (active * bias) + b
            h = np.maximum(h, 0) @ wt + b
        return weight, bias


class ExitHeads:
    """The heads of one pooling (e.g. "sentence", "prefix"), one per exit layer, all over the same labels."""

    def __init__(self, pooling: str, labels: tuple[str, ...], heads: Mapping[int, ExitHead]) -> None:
        if not heads:
            raise BundleError(f"the {pooling} pooling has no exit heads")
        for layer, head in heads.items():
            if head.layer != layer:
                raise BundleError(f"the {pooling} exit head filed under layer {layer} "
                                  f"says it is for layer {head.layer}")
            if head.n_classes != len(labels):
                raise BundleError(f"bundle has {len(labels)} labels but the exit head for layer {layer} "
                                  f"outputs {head.n_classes} classes")
        widths = {layer: head.n_embd for layer, head in heads.items()}
        if len(set(widths.values())) > 1:
            raise BundleError(f"the {pooling} exit heads read states of different sizes: "
                              + ", ".join(f"layer {layer}: {d}" for layer, d in sorted(widths.items())))
        self.pooling = pooling
        self.labels = tuple(labels)
        self.heads = dict(sorted(heads.items()))
        self.layers: tuple[int, ...] = tuple(self.heads)

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    @property
    def n_embd(self) -> int:
        return self.heads[self.layers[0]].n_embd

    def head(self, layer: int) -> ExitHead:
        try:
            return self.heads[layer]
        except KeyError:
            raise BundleError(f"no {self.pooling} exit head for layer {layer}; "
                              f"this bundle has them for layers {', '.join(map(str, self.layers))}") from None

    def proba(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.head(layer).proba(x)
