"""What a user would run instead of the early-exit policies: the rows `eval` prints beside them, on the same documents.

- `tfidf-logreg`: TF-IDF over word 1–2-grams + logistic regression (scikit-learn, the `eval` extra), trained on
  the bundle's own training split. It reads no LLM layer and costs well under a millisecond a document, so it is
  the figure an LLM has to beat to earn its cost.
- Truncation, which long-document work (e.g. Park et al. 2022) finds hard to beat: read only the start of a text in
  one decode to the bundle's best layer (the best whole-text head on the calibration split) and let that layer's
  head answer. Two starts: the first `TRUNCATE_SENTENCES` sentences (fixed, so that the row does not depend on
  which policies are evaluated), and the whole sentences within the first `TRUNCATE_TOKENS` tokens (the input
  limit of BERT-style classifiers; a sentence is never cut, since heads read sentence means).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .errors import InputError

TFIDF_SETTINGS: dict[str, Any] = {"ngram_range": (1, 2), "sublinear_tf": True}
LOGREG_SETTINGS: dict[str, Any] = {"max_iter": 1000}  # lbfgs, deterministic; enough iterations for 10^5 features
TFIDF_NAME = "tfidf-logreg"
# what the row is, for tables and model cards
TFIDF_DESCRIPTION = "TF-IDF over word {}–{}-grams + logistic regression".format(*TFIDF_SETTINGS["ngram_range"])
TRUNCATE_SENTENCES = 3
TRUNCATE_TOKENS = 512

Sentences = Sequence[Sequence[int]]  # a text's sentences as token lists


def tfidf_logreg():
    """An unfitted TF-IDF + logistic regression pipeline (scikit-learn's `fit`, then `predict`). scikit-learn is
    imported here only, so that the runtime and `eval` without this row never need it."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
    except ImportError:
        raise InputError("the TF-IDF baseline needs scikit-learn: pip install 'edge2dexit[eval]'") from None
    return make_pipeline(TfidfVectorizer(**TFIDF_SETTINGS), LogisticRegression(**LOGREG_SETTINGS))


def fitted(sentences: Sentences, room: int) -> Sentences:
    """The leading whole sentences within `room` tokens, at least one: what `classify --truncate` reads."""
    ends = np.cumsum([len(s) for s in sentences])
    return sentences[: max(1, int(np.searchsorted(ends, room, side="right")))]


class Truncation(NamedTuple):
    what: str  # which start of a text it reads, in words
    keep: Callable[[Sentences], Sentences]


TRUNCATIONS: dict[str, Truncation] = {
    f"first-{TRUNCATE_SENTENCES}-sents": Truncation(
        f"the first {TRUNCATE_SENTENCES} sentences", lambda sentences: sentences[:TRUNCATE_SENTENCES]),
    f"first-{TRUNCATE_TOKENS}-tok": Truncation(
        f"the whole sentences within the first {TRUNCATE_TOKENS} tokens",
        lambda sentences: fitted(sentences, TRUNCATE_TOKENS)),
}
