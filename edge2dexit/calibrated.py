"""Probabilities that mean what they say: every exit head's softmax, and the lexical exit's, rescaled as `convert`
fitted them on held-out documents, before a stop rule, an abstention margin, a prediction set or a Result reads them.

A head's raw softmax is only as honest as its training made it. The prefix heads were sure too early in a text (a
misleading opening read as a confident answer after four sentences); the words were unsure where they were right
(0.6–0.8 shown, 94% right); the LLM reading only the texts the words left was over-confident on them (0.83 shown, 74%
right). So each exit point gets a temperature, fitted by maximum likelihood on calibration documents
(convert/calibrate.py `fit_scales`):

- the lexical exit: logits = β_words · log p_words;
- the head of one (pooling, layer), after `read` sentences (the prefix heads: sentences averaged; the sentence heads:
  the sentence's place in the text), read alone (no words: `--no-lexical`, or a stream before its end):
      logits = β · log p,   β = exp(a[bucket of read])
  and read behind the words, whose calibrated probabilities q of the whole text are known:
      logits = β · log p + γ · log q,   β = exp(b[bucket of read] + c · margin(q))
  with one temperature per bucket of sentences read (READ_BUCKETS: 1, 2, 3, 4–5, 6–8, 9 and more): a head is sure
  too early by its own amount at each length.
  The texts that reach the LLM behind the words are those the words were unsure of: β depends on how unsure (b2), so
  the LLM is as sure there as it is right there, and γ weighs the words' own evidence in (where the words and the
  states disagree, the fitted weights decide; the lexical head never saw the calibration texts).

A temperature never changes the head's own answer, only how sure it is; the words' term may change it. The margin
p_top1 − p_top2 that stop rules and abstention compare is the calibrated one.

`Basis.explain` takes a calibrated answer apart: its log-odds over the runner-up is a sum over the sentences the head read
(exactly, for linear heads; for MLP heads, exactly for the head's linear map where it read, its ReLUs held as they
were), plus what the words added and a constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .errors import BundleError
from .heads import ExitHead, ExitHeads, margin, softmax

_FLOOR = 1e-12  # the smallest probability a logarithm is taken of (a head's softmax underflows far out)
READ_BUCKETS = (1, 2, 3, 4, 6, 9)  # the first number of sentences read of each bucket with a temperature of its own
_ALONE, _FUSED = len(READ_BUCKETS), len(READ_BUCKETS) + 2


def read_bucket(read: np.ndarray | int) -> np.ndarray | int:
    """The bucket of READ_BUCKETS that `read` sentences fall in."""
    return np.searchsorted(READ_BUCKETS, np.maximum(read, 1), side="right") - 1


@dataclass(frozen=True)
class ExitScale:
    """The temperature of one exit head: `alone` = a per bucket of sentences read, `fused` = b per bucket, then c
    and γ (module docstring); `fused` is None in a bundle without a lexical head. All zeros change nothing."""

    alone: tuple[float, ...] = (0.0,) * _ALONE
    fused: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        values = list(self.alone) + list(self.fused or ())
        if len(self.alone) != _ALONE or (self.fused is not None and len(self.fused) != _FUSED) \
                or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
            raise BundleError(f"an exit head's scale must be {_ALONE} finite numbers (and {_FUSED} where fused), "
                              f"got {self.alone}, {self.fused}")
        object.__setattr__(self, "alone", tuple(map(float, self.alone)))
        if self.fused is not None:
            object.__setattr__(self, "fused", tuple(map(float, self.fused)))

    def weights(self, read: np.ndarray | int, words: np.ndarray | None) -> tuple[np.ndarray, float]:
        """(β, γ) for `read` sentences (a number or one per row) and the words' calibrated probabilities (None: read
        alone)."""
        bucket = read_bucket(read)
        if words is None:
            return np.exp(np.asarray(self.alone)[bucket]), 0.0
        if self.fused is None:
            raise BundleError("this bundle has no lexical head, so its exit heads have no scale for reading behind it")
        *b, c, gamma = self.fused
        return np.exp(np.asarray(b)[bucket] + c * margin(words)), gamma


def scaled_logits(log_p: np.ndarray, beta: np.ndarray | float, gamma: float, words: np.ndarray | None) -> np.ndarray:
    """β · log p (+ γ · log q): calibrated logits from a head's log-probabilities (one row or a batch)."""
    logits = np.asarray(beta)[..., None] * log_p if np.ndim(beta) else beta * log_p
    if words is not None and gamma:
        logits = logits + gamma * np.log(np.maximum(words, _FLOOR))
    return logits


@dataclass(frozen=True)
class WordsScale:
    """The lexical exit's temperature: calibrated p = softmax(beta · log p_words)."""

    beta: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and np.isfinite(self.beta) and self.beta > 0):
            raise BundleError(f"the lexical exit's scale must be a positive number, got {self.beta!r}")

    def __call__(self, p_words: np.ndarray) -> np.ndarray:
        return softmax(self.beta * np.log(np.maximum(p_words, _FLOOR)))


class CalibratedHeads:
    """The exit heads of one pooling with their scales: what policies read. `proba(layer, x, read, words)` is the
    calibrated probability of the head at `layer` on `x` after `read` sentences, behind the words (`words`: their
    calibrated probabilities of the whole text) or alone (None)."""

    def __init__(self, heads: ExitHeads, scales: Mapping[int, ExitScale]):
        missing = [layer for layer in heads.layers if layer not in scales]
        if missing:
            raise BundleError(f"the {heads.pooling} exit head for layer {missing[0]} has no scale")
        self.raw, self.scales = heads, dict(scales)
        self.pooling, self.labels, self.layers = heads.pooling, heads.labels, heads.layers

    @property
    def n_classes(self) -> int:
        return self.raw.n_classes

    @property
    def n_embd(self) -> int:
        return self.raw.n_embd

    def head(self, layer: int) -> ExitHead:
        return self.raw.head(layer)

    def proba(self, layer: int, x: np.ndarray, read: np.ndarray | int, words: np.ndarray | None = None) -> np.ndarray:
        beta, gamma = self.scales[layer].weights(read, words)
        return softmax(scaled_logits(self.head(layer).log_proba(x), beta, gamma, words))

    def basis(self, layer: int, read: int, words: np.ndarray | None, sentences: Sequence[int],
              states: Sequence[np.ndarray]) -> "Basis":
        """What the head at `layer` read to answer: the states of `sentences` (their mean, for the prefix heads)."""
        return Basis(self, layer, read, words, tuple(sentences), tuple(states))


@dataclass(frozen=True, eq=False)
class Basis:
    """The input of a decision's head, kept with the decision so that the answer is taken apart (`explain`) once,
    after reading, not in the per-sentence loop."""

    heads: CalibratedHeads
    layer: int
    read: int
    words: np.ndarray | None
    sentences: tuple[int, ...]  # the sentences whose states the head read (their mean)
    states: tuple[np.ndarray, ...] = field(repr=False)

    def raw(self) -> np.ndarray:
        """The head's probabilities before its scale: what it answered before calibration."""
        return self.heads.head(self.layer).proba(np.mean(np.stack(self.states), axis=0))

    def explain(self, label: int, against: int) -> "Contributions":
        """The calibrated log-odds of `label` over `against`, taken apart by sentence."""
        head = self.heads.head(self.layer)
        states = np.stack(self.states).astype(np.float32)
        x = states.mean(axis=0)
        weight, bias = head.local_linear(x)
        direction = weight[label] - weight[against]
        beta, gamma = self.heads.scales[self.layer].weights(self.read, self.words)
        beta = float(beta)
        per_sentence = beta * ((states - head.norm_mean) / head.norm_scale) @ direction / len(states)
        words = 0.0
        if self.words is not None and gamma:
            q = np.log(np.maximum(self.words, _FLOOR))
            words = gamma * float(q[label] - q[against])
        return Contributions(dict(zip(self.sentences, map(float, per_sentence))), words,
                             beta * float(bias[label] - bias[against]), gamma)


@dataclass(frozen=True)
class Contributions:
    """A calibrated answer's log-odds over the runner-up, as a sum: per sentence read (by index) its contribution,
    what the words added, and a constant (the heads' bias, where the text tips neither way)."""

    sentences: dict[int, float]
    words: float
    constant: float
    words_weight: float  # γ: how much of the words' own log-odds the answer took in (0: read alone)

    @property
    def total(self) -> float:
        return sum(self.sentences.values()) + self.words + self.constant


@dataclass(frozen=True)
class Scales:
    """Every scale of a bundle: the lexical exit's (None without a lexical head) and each exit head's, by pooling and
    layer. IDENTITY everywhere leaves every probability as the heads computed it."""

    words: WordsScale | None
    exits: dict[str, dict[int, ExitScale]]

    def to_json(self) -> dict:
        return {"words": None if self.words is None else self.words.beta,
                "exits": {pooling: {str(layer): {"alone": list(s.alone), "fused": None if s.fused is None
                                                 else list(s.fused)} for layer, s in layers.items()}
                          for pooling, layers in self.exits.items()}}

    @classmethod
    def from_json(cls, record: Mapping) -> "Scales":
        try:
            words = None if record["words"] is None else WordsScale(float(record["words"]))
            exits = {str(pooling): {int(layer): ExitScale(tuple(s["alone"]), None if s["fused"] is None
                                                          else tuple(s["fused"])) for layer, s in layers.items()}
                     for pooling, layers in record["exits"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"its scales cannot be read ({type(exc).__name__}: {exc})") from None
        return cls(words, exits)

    @classmethod
    def identity(cls, heads: Mapping[str, ExitHeads], lexical: bool) -> "Scales":
        """Scales that change nothing (tests, and heads not yet calibrated)."""
        fused = (0.0,) * _FUSED if lexical else None
        return cls(WordsScale() if lexical else None,
                   {p: {layer: ExitScale(fused=fused) for layer in h.layers} for p, h in heads.items()})
