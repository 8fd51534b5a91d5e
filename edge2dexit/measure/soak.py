"""Soak benchmark: does a long run leak memory or file descriptors?

An application keeps one Classifier for days, or opens and closes one per job; either way the process must stay
flat. Two runs in one process: many documents through one Classifier, then many Classifiers opened, used for one
text and closed. Each reads the process's resident memory (VmRSS) and open file descriptors after its first
document or cycle — once lazy loading is behind it —, in the middle and at the end. Drift is end against start,
and also end against middle: a leak grows in both halves, a one-time step only in the first. One such step is
glibc's: the first Classifier's buffers are mmapped and unmapped, which raises glibc's mmap threshold, so the
second one's come from the heap, which glibc keeps once they are freed (some 15 MiB; malloc_trim gives it back).
So the aim — flat within AIM — is judged on the second half (end against middle), which a leak cannot pass and a
one-time step does not fail; the whole run's drift is printed beside it. (A slower creep that `gc.collect()`
removed came from reference cycles around the eval-callback tap and from ctypes array types made per sentence:
both are gone, tests/test_soak.py.) Linux only: both figures come from /proc/self.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..models import SAMPLE_REVIEW
from ..sentences import Splitter
from ..settings import EngineSettings

DOCS, CYCLES = 10_000, 100
AIM = 0.05  # the largest drift, either way, still called flat


@dataclass(frozen=True)
class Sample:
    done: int  # documents classified, or classifiers closed, so far
    rss_mib: float
    fds: int


@dataclass(frozen=True)
class Phase:
    """One run's samples: after the first document (or cycle), in the middle, at the end."""

    name: str
    start: Sample
    middle: Sample
    end: Sample
    seconds: float

    def drift(self, figure: str, since: str = "start") -> float:
        """End against `since` (start or middle), as a fraction, of `rss_mib` or `fds`."""
        first = getattr(getattr(self, since), figure)
        return (getattr(self.end, figure) - first) / first

    def flat(self, figure: str) -> bool:
        """Whether the second half stayed within AIM: a leak grows there, a one-time step does not."""
        return abs(self.drift(figure, "middle")) <= AIM


@dataclass(frozen=True)
class Soak:
    documents: Phase
    cycles: Phase
    width: int

    def table(self) -> str:
        lines = [f"one Classifier over {self.documents.end.done} documents (width {self.width}), then "
                 f"{self.cycles.end.done} Classifiers opened, used for one text and closed; aim: flat within "
                 f"{AIM:.0%}",
                 f"{'run':10} {'sample':8} {'after':>6} {'RSS MiB':>9} {'open fds':>9}"]
        for phase in (self.documents, self.cycles):
            for point in ("start", "middle", "end"):
                s = getattr(phase, point)
                lines.append(f"{phase.name:10} {point:8} {s.done:6} {s.rss_mib:9.1f} {s.fds:9}")
            lines.append(f"{phase.name:10} {'drift':8} {'':6} {phase.drift('rss_mib'):+9.1%} "
                         f"{phase.drift('fds'):+9.1%}   (end against start)   ({phase.seconds:.0f} s)")
            lines.append(f"{phase.name:10} {'2nd half':8} {'':6} {phase.drift('rss_mib', 'middle'):+9.1%} "
                         f"{phase.drift('fds', 'middle'):+9.1%}   (end against middle)   flat: RSS "
                         f"{_yes(phase.flat('rss_mib'))}, fds {_yes(phase.flat('fds'))}")
        return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def soak(
    docs: int = DOCS,
    cycles: int = CYCLES,
    bundle: str | Path | None = None,
    model: str | Path | None = None,
    settings: EngineSettings = EngineSettings(),
) -> Soak:
    """Classify `docs` texts with one Classifier (`classify_many` at `settings.width`), then open, use and close
    `cycles` Classifiers, sampling memory and descriptors along the way. A text that fails raises its error."""
    doc_marks, cycle_marks = _marks(docs), _marks(cycles)  # both checked before the long part
    documents, width = _documents(doc_marks, bundle, model, settings)
    return Soak(documents, _cycles(cycle_marks, bundle, model, settings), width)


def soak_texts() -> list[str]:
    """Varied reviews from the sample review: windows of one to all of its sentences from each of them, so that
    lengths, labels, exit points and KV use change from one document to the next."""
    sentences = Splitter("regex").split(SAMPLE_REVIEW.read_text())
    n = len(sentences)
    return [" ".join(sentences[(start + i) % n] for i in range(length))
            for start in range(n) for length in range(1, n + 1)]


def sample(done: int) -> Sample:
    """This process's resident memory and open descriptors now."""
    with open("/proc/self/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return Sample(done, rss_kib / 1024, len(os.listdir("/proc/self/fd")))


def _marks(n: int) -> tuple[int, int, int]:
    """When to sample: after the first, the middle and the last of `n`."""
    if n < 3:
        raise ValueError(f"a soak needs at least 3 documents and 3 cycles (start, middle, end), got {n}")
    return 1, (n + 1) // 2, n


def _documents(marks: tuple[int, int, int], bundle, model, settings: EngineSettings) -> tuple[Phase, int]:
    """The documents phase, and the width it read at (the backend's, where `settings` leave it open)."""
    from ..classifier import Classifier  # llama.cpp loads only when a soak runs, not for `bench soak --help`

    samples = []
    texts = itertools.islice(itertools.cycle(soak_texts()), marks[-1])
    started = time.perf_counter()
    with Classifier(bundle, model=model, settings=settings) as clf:
        for done, (_, outcome) in enumerate(clf.classify_many(texts), 1):
            if isinstance(outcome, Exception):
                raise outcome
            if done in marks:
                samples.append(sample(done))
        width = clf.engine.settings.width
    return Phase("documents", *samples, time.perf_counter() - started), width


def _cycles(marks: tuple[int, int, int], bundle, model, settings: EngineSettings) -> Phase:
    from ..classifier import Classifier

    samples = []
    text = SAMPLE_REVIEW.read_text()
    started = time.perf_counter()
    for done in range(1, marks[-1] + 1):
        with Classifier(bundle, model=model, settings=settings) as clf:
            clf.classify(text)
        if done in marks:
            samples.append(sample(done))
    return Phase("cycles", *samples, time.perf_counter() - started)
