"""The lexical exit: TF-IDF over word 1–2-grams + logistic regression, computed in numpy from what the bundle stores,
so that a text whose words alone decide is answered before any sentence is split, tokenized or read by llama.cpp.
In the paper's terms it is an exit before layer 0, with its own head and its own calibrated threshold.

`convert` fits scikit-learn's TfidfVectorizer + LogisticRegression (`fit_lexical`, the only place scikit-learn is
used for it); the bundle keeps the vocabulary, the idf, the weights and the bias; the runtime computes the same
probabilities without scikit-learn (`LexicalHead.proba`, checked against `predict_proba` on whole test splits).

How the words are found must match scikit-learn exactly; here it is the same code, not a lookalike:
- the text is first normalised as the sentence splitters read it (`sentences.normalise`: HTML line breaks as white
  space, CR and CRLF as line ends), at training as at run time;
- then lower-cased with `str.lower` (scikit-learn's `lowercase=True` calls the same method; no accent stripping);
- tokens are `re.findall(TOKEN_PATTERN)` with scikit-learn's own default pattern (two or more word characters);
- n-grams are the tokens and every pair of neighbours joined by one space, in scikit-learn's order;
- term frequency is sublinear (1 + ln count), weighted by the stored idf, and the vector scaled to unit length;
- the weights are those of the fitted logistic regression; two classes store [0, w] so that one softmax serves all.
The analyzer is named in the bundle (ANALYZER) and a reader refuses any other: a bundle never carries a regular
expression to compile.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import BundleError, InputError
from .sentences import normalise

ANALYZER = "word-1-2-lower-sublinear-l2"  # the one analyzer this code computes; a bundle names it
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default token_pattern
NGRAM_RANGE = (1, 2)
VOCABULARY_CAP = 50_000  # most frequent n-grams kept (scikit-learn's max_features)
_TOKENS = re.compile(TOKEN_PATTERN)


def analyze(text: str) -> list[str]:
    """The n-grams of `text`, as the vectorizer that `fit_lexical` builds finds them."""
    tokens = _TOKENS.findall(_preprocess(text))
    return tokens + [f"{a} {b}" for a, b in zip(tokens, tokens[1:])]


@dataclass(frozen=True, eq=False)
class LexicalHead:
    """TF-IDF + logistic regression over a fixed vocabulary: `vocabulary[i]` has idf `idf[i]` and weights
    `weight[:, i]` (one row per class)."""

    vocabulary: tuple[str, ...]
    idf: np.ndarray  # [V] float32
    weight: np.ndarray  # [C, V] float32
    bias: np.ndarray  # [C] float32
    analyzer: str = ANALYZER
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.analyzer != ANALYZER:
            raise BundleError(f"the lexical head uses the analyzer {self.analyzer!r}; this edge2dexit computes "
                              f"{ANALYZER!r} only")
        n = len(self.vocabulary)
        if n == 0 or len(set(self.vocabulary)) != n or any(not word or "\n" in word for word in self.vocabulary):
            raise BundleError("the lexical head's vocabulary must be distinct, non-empty n-grams without line breaks")
        idf, weight, bias = (np.ascontiguousarray(a, dtype=np.float32) for a in (self.idf, self.weight, self.bias))
        if idf.shape != (n,) or weight.ndim != 2 or weight.shape[1] != n or bias.shape != weight.shape[:1]:
            raise BundleError(f"the lexical head's tensors do not fit its {n} n-grams: idf {list(idf.shape)}, "
                              f"weight {list(weight.shape)}, bias {list(bias.shape)}")
        if not (np.isfinite(idf).all() and np.isfinite(weight).all() and np.isfinite(bias).all()) or (idf <= 0).any():
            raise BundleError("the lexical head holds non-finite values or a non-positive idf")
        object.__setattr__(self, "idf", idf)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "_index", {word: i for i, word in enumerate(self.vocabulary)})

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def proba(self, text: str) -> np.ndarray:
        """Class probabilities (float64) of one text."""
        columns, values = self._features(text)
        logits = self.bias.astype(np.float64) + self.weight[:, columns].astype(np.float64) @ values
        logits -= logits.max()
        p = np.exp(logits)
        return p / p.sum()

    def explain(self, text: str, label: int, against: int, top: int = 5) -> tuple[list[tuple[str, float]], float]:
        """The `top` n-grams of `text` that weigh most towards `label` over `against`, each with its exact share of
        the log-odds (logit[label] − logit[against] is their sum over every n-gram of the text, plus the bias
        difference, returned second)."""
        columns, values = self._features(text)
        shares = (self.weight[label, columns] - self.weight[against, columns]).astype(np.float64) * values
        order = np.argsort(-shares)[:top]
        return ([(self.vocabulary[columns[i]], float(shares[i])) for i in order if shares[i] > 0],
                float(self.bias[label] - self.bias[against]))

    def _features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The text's TF-IDF vector, sparse: (vocabulary columns, values)."""
        counts = Counter(i for i in map(self._index.get, analyze(text)) if i is not None)
        columns = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        if not counts:
            return columns, np.zeros(0)
        tf = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))
        values = tf * self.idf[columns]
        return columns, values / math.sqrt(float(values @ values))


def lexical_pipeline(vocabulary_cap: int = VOCABULARY_CAP, seed: int = 0):
    """The unfitted scikit-learn pipeline a lexical head is made from (convert time only): TF-IDF with the
    baseline's settings (baselines.py) and this module's analyzer, then logistic regression."""
    from .baselines import LOGREG_SETTINGS, TFIDF_SETTINGS

    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
    except ImportError:
        raise InputError("the lexical exit is trained with scikit-learn: pip install 'edge2dexit[train]'") from None
    # a preprocessor of our own replaces scikit-learn's lower-casing (it then ignores `lowercase`)
    vectorizer = TfidfVectorizer(**{**TFIDF_SETTINGS, "ngram_range": NGRAM_RANGE}, token_pattern=TOKEN_PATTERN,
                                 preprocessor=_preprocess, max_features=vocabulary_cap, dtype=np.float64)
    return make_pipeline(vectorizer, LogisticRegression(**LOGREG_SETTINGS, random_state=seed))


def _preprocess(text: str) -> str:
    return normalise(text).lower()


def from_pipeline(pipeline, n_classes: int) -> LexicalHead:
    """The lexical head computing what a fitted `lexical_pipeline` computes."""
    vectorizer, model = pipeline[0], pipeline[-1]
    if list(model.classes_) != list(range(n_classes)):
        raise InputError(f"the lexical head needs examples of all {n_classes} classes in the training split")
    weight, bias = model.coef_, model.intercept_
    if n_classes == 2:  # one decision function: p(1) = sigmoid(w·x + b) = softmax([0, w·x + b])[1]
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.array([0.0, bias[0]])
    return LexicalHead(tuple(vectorizer.get_feature_names_out()), vectorizer.idf_, weight, bias)


def fit_lexical(texts: Sequence[str], labels: Sequence[int], n_classes: int, vocabulary_cap: int = VOCABULARY_CAP,
                seed: int = 0) -> LexicalHead:
    """Fit a lexical head on labelled texts (scikit-learn, at convert time)."""
    return from_pipeline(lexical_pipeline(vocabulary_cap, seed).fit(list(texts), list(labels)), n_classes)
