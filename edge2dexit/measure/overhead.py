"""The fixed cost of a document: where the time of a classification goes when the policy exits after a sentence or
two, so that llama.cpp's share is small and everything around it shows — splitting, tokenizing, and the Python that
drives the decodes and the heads.

Each text is classified one at a time (width 1) with the bundle's default policy set to stop as soon as it may
(`EARLY_EXIT`: its layer, after `min_sentences` sentences, at any margin), once per eval-callback tap available,
interleaved text by text. A document's time is split into: inside `llama_decode` (the context's own clock),
sentence splitting and tokenizing (timed where the classifier calls them), and the rest.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ..bundle import load_bundle
from ..classifier import DEFAULT_BUNDLE, Classifier
from ..llama import available_taps
from ..sentences import Splitter
from ..settings import EngineSettings

EARLY_EXIT = {"threshold": 0.0}  # stop as soon as `min_sentences` are read, at any margin


@dataclass
class Share:
    config: str
    docs: int = 0
    seconds: float = 0.0
    decode: float = 0.0
    split: float = 0.0
    tokenize: float = 0.0
    sentences: int = 0

    @property
    def other(self) -> float:
        return self.seconds - self.decode - self.split - self.tokenize

    def row(self) -> str:
        per = 1e3 / self.docs
        parts = [self.decode, self.split, self.tokenize, self.other]
        shares = " ".join(f"{part / self.seconds:8.1%}" for part in parts)
        return (f"{self.config:34} {self.docs / self.seconds:7.2f} {self.seconds * per:8.2f} {shares} "
                f"{1 - self.decode / self.seconds:9.1%} {self.sentences / self.docs:9.2f}")


@dataclass
class Overhead:
    rows: list[Share]
    min_sentences: int
    policy: str
    settings: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{self.rows[0].docs} documents one at a time, {self.policy} stopping after {self.min_sentences} "
                 f"sentence(s) at any margin; " + ", ".join(f"{k} {v}" for k, v in self.settings.items()),
                 f"{'configuration':34} {'docs/s':>7} {'ms/doc':>8} {'decode':>8} {'split':>8} {'tokenize':>8} "
                 f"{'other':>8} {'outside':>9} {'sentences':>9}"]
        lines += [row.row() for row in self.rows]
        lines.append("outside: the share of a document's time spent outside llama_decode")
        return "\n".join(lines)


class _TimedSplitter:
    """A splitter that adds the time its sentence generators spend to `share.split`."""

    def __init__(self, splitter: Splitter, share: Share):
        self.splitter, self.share = splitter, share

    def __getattr__(self, name: str):
        return getattr(self.splitter, name)

    def sentences(self, text: str) -> Iterator[str]:
        pieces = self.splitter.sentences(text)
        while True:
            started = time.perf_counter()
            piece = next(pieces, None)
            self.share.split += time.perf_counter() - started
            if piece is None:
                return
            yield piece


def overhead_benchmark(texts: Sequence[str], bundle: str | Path | None = None, min_sentences: int = 1,
                       n_threads: int | None = None) -> Overhead:
    """Classify `texts` one at a time with each tap, the default policy made to exit after `min_sentences`."""
    loaded = load_bundle(bundle or DEFAULT_BUNDLE)
    policy = loaded.default_policy
    params = {**loaded.policy_params(policy), **EARLY_EXIT, "min_sentences": min_sentences}
    early = dataclasses.replace(loaded, policies={**loaded.policies, policy: params}, lexical_thresholds={})
    early.directory = loaded.directory
    rows, classifiers = [], []
    try:
        for tap in available_taps():
            share = Share(f"{tap} tap")
            clf = Classifier(early, settings=EngineSettings(n_ctx=2048, width=1, n_threads=n_threads, tap=tap),
                             truncate=True, lexical=False)
            clf.bundle = dataclasses.replace(clf.bundle, splitter=_TimedSplitter(clf.bundle.splitter, share))
            clf.bundle.directory = loaded.directory
            tokenize = clf.engine.tokenize

            def timed_tokenize(sentence: str, tokenize=tokenize, share=share) -> list[int]:
                started = time.perf_counter()
                tokens = tokenize(sentence)
                share.tokenize += time.perf_counter() - started
                return tokens

            clf.engine.tokenize = timed_tokenize
            classifiers.append((clf, share))
            rows.append(share)
        for clf, _ in classifiers:  # warm-up
            clf.classify(texts[0])
        for share in rows:
            share.split = share.tokenize = 0.0
        for text in texts:
            for clf, share in classifiers:  # interleaved: machine noise hits every configuration alike
                decoded, started = clf.engine.context.decode_seconds, time.perf_counter()
                result = clf.classify(text)
                share.seconds += time.perf_counter() - started
                share.decode += clf.engine.context.decode_seconds - decoded
                share.sentences += result.sentences_read
                share.docs += 1
    finally:
        for clf, _ in classifiers:
            clf.close()
    return Overhead(rows, min_sentences, policy, {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset")})
