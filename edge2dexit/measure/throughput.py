"""Throughput benchmark: documents per second of whole classifications, today's path against faster weights and
many documents in flight, in one run on the same documents.

Configurations: a baseline bundle read one document at a time (`Classifier.classify`), and a bundle read through
`Classifier.classify_many` at each width W. Every configuration runs every policy asked for, chunk by chunk of
documents, interleaved, so that a noisy shared machine moves all of them together. Reported per row: docs/s, the
ratio to the baseline's same policy, accuracy, and the share of wall time spent outside `llama_decode` (splitting,
tokenizing, Python bookkeeping, heads: the fixed cost per document). Feature extraction (every layer, full depth) is
timed for the baseline read one decode per sentence, as `convert` used to read, and for the first and the widest
configuration read whole, one decode per text, as `convert` reads now.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..baselines import fitted
from ..classifier import Classifier
from ..document import Reading, sentence_by_sentence, whole_text
from ..engine import EngineSettings

CHUNK = 40  # documents per interleaving round


@dataclass
class Row:
    config: str
    policy: str
    seconds: float = 0.0
    decode_seconds: float = 0.0
    correct: int = 0
    docs: int = 0
    predicted: list[str] = field(default_factory=list)

    @property
    def docs_per_second(self) -> float:
        return self.docs / self.seconds

    @property
    def accuracy(self) -> float:
        return self.correct / self.docs

    @property
    def overhead(self) -> float:
        return 1 - self.decode_seconds / self.seconds


@dataclass
class Throughput:
    rows: list[Row]
    extraction: dict[str, float]  # "config, reading" -> docs/s of feature extraction, the baseline's first
    n_docs: int
    baseline: str

    def table(self) -> str:
        base = {r.policy: r for r in self.rows if r.config == self.baseline}
        first = {}  # the first batched configuration's labels: what batching at other widths should agree with
        for r in self.rows:
            if r.config != self.baseline:
                first.setdefault(r.policy, r.predicted)
        lines = [f"{self.n_docs} documents; ratios against `{self.baseline}`, same policy, measured in this run; "
                 "'same' = labels equal to the first batched row of the policy",
                 f"{'configuration':34} {'policy':12} {'docs/s':>7} {'× base':>7} {'acc':>6} {'same':>6} "
                 f"{'outside decode':>15}"]
        for r in self.rows:
            same = np.mean([a == b for a, b in zip(r.predicted, first[r.policy])])
            lines.append(f"{r.config:34} {r.policy:12} {r.docs_per_second:7.2f} "
                         f"{r.docs_per_second / base[r.policy].docs_per_second:6.2f}× {r.accuracy:6.3f} "
                         f"{same:6.3f} {r.overhead:14.1%}")
        slowest = next(iter(self.extraction.values()))  # the baseline's, read as convert used to
        for config, rate in self.extraction.items():
            lines.append(f"feature extraction, {config}: {rate:.2f} docs/s ({rate / slowest:.2f}×)")
        return "\n".join(lines)


def _classify(clf: Classifier, texts: Sequence[str], policy: str, batched: bool) -> list[str]:
    if not batched:
        return [clf.classify(t, policy=policy).label for t in texts]
    labels: list[str] = [""] * len(texts)
    for i, outcome in clf.classify_many(enumerate(texts), policy=policy):
        if isinstance(outcome, Exception):
            raise outcome
        labels[i] = outcome.label
    return labels


def _extract(clf: Classifier, texts: Sequence[str], reading: Callable[..., Reading[np.ndarray]]) -> None:
    engine, splitter = clf.engine, clf.bundle.splitter
    documents = [[engine.tokenize(s) for s in splitter.split(t)] for t in texts]
    kept = [fitted(d, engine.capacity) for d in documents]  # what fits the context, as `--truncate` reads
    jobs = ((i, lambda doc, d=d: reading(doc, d, engine.n_layer)) for i, d in enumerate(kept))
    for done in engine.run_many(jobs):
        if done.error is not None:
            raise done.error


def throughput_benchmark(
    baseline_bundle: str | Path | None,
    bundle: str | Path | None,
    texts: Sequence[str],
    labels: Sequence[str],
    widths: Sequence[int] = (1, 2, 4, 8, 16),
    policies: Sequence[str] | None = None,
    extraction_docs: int = 40,
    n_ctx: int = 2048,
    n_threads: int | None = None,
) -> Throughput:
    """`policies` default: full and each bundle's own default policy (which must exist in both)."""
    configs: dict[str, tuple[Classifier, bool]] = {}
    try:
        baseline = Classifier(baseline_bundle, settings=EngineSettings(n_ctx, 1, n_threads=n_threads), truncate=True)
        base_name = f"{baseline.bundle.base.name or 'baseline'}, one at a time"
        configs[base_name] = (baseline, False)
        for width in widths:
            clf = Classifier(bundle, settings=EngineSettings(n_ctx, width, n_threads=n_threads), truncate=True)
            configs[f"{clf.bundle.base.name or 'bundle'}, W={width}"] = (clf, True)
        names = list(policies or dict.fromkeys(["full", baseline.policy_name, clf.policy_name]))
        rows = {(config, p): Row(config, p) for config in configs for p in names}
        for start in range(0, len(texts), CHUNK):
            chunk, truth = texts[start : start + CHUNK], labels[start : start + CHUNK]
            for config, (clf, batched) in configs.items():
                for policy in names:
                    row = rows[config, policy]
                    decoded, began = clf.engine.context.decode_seconds, time.perf_counter()
                    predicted = _classify(clf, chunk, policy, batched)
                    row.seconds += time.perf_counter() - began
                    row.decode_seconds += clf.engine.context.decode_seconds - decoded
                    row.correct += sum(p == t for p, t in zip(predicted, truth))
                    row.predicted += predicted
                    row.docs += len(chunk)
        extraction = {}
        new_names = list(configs)[1:]
        for config, reading in ((base_name, sentence_by_sentence), (new_names[0], whole_text),
                                (new_names[-1], whole_text)):
            clf = configs[config][0]
            began = time.perf_counter()
            _extract(clf, texts[:extraction_docs], reading)
            extraction[f"{config}, {reading.__name__.replace('_', ' ')}"] = (
                min(extraction_docs, len(texts)) / (time.perf_counter() - began))
        return Throughput(list(rows.values()), extraction, len(texts), base_name)
    finally:
        for clf, _ in configs.values():
            clf.close()
