"""The soak benchmark on the real SmolLM2 with small counts: the report has its three samples per run, and open file
descriptors do not grow. Memory figures are only checked to be read; whether they stay flat over 10,000 documents
is what `edge2dexit bench soak` measures (the figures go in the notes)."""

from __future__ import annotations

import mmap
import os
import resource

import numpy as np
import pytest
from typer.testing import CliRunner

from edge2dexit.cli import app
from edge2dexit.engine import EngineSettings
from edge2dexit.measure.soak import Phase, sample, soak, soak_texts

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def report():
    return soak(docs=30, cycles=5, settings=EngineSettings(n_ctx=512, width=2))


@pytest.mark.parametrize("run, count", [("documents", 30), ("cycles", 5)])
def test_each_run_samples_start_middle_and_end(report, run, count):
    """Three samples at the marks, each a figure of this process in MiB: never above the peak the kernel counted
    for it (getrusage), and above what an interpreter with llama.cpp and a model loaded can take up (a figure
    read in KiB or bytes and mislabelled would fail one bound or the other)."""
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    phase = getattr(report, run)
    assert isinstance(phase, Phase) and phase.name == run
    assert [phase.start.done, phase.middle.done, phase.end.done] == [1, (count + 1) // 2, count]
    for s in (phase.start, phase.middle, phase.end):
        assert 50 < s.rss_mib <= peak_mib and s.fds >= 3


def test_a_sample_sees_memory_and_descriptors_that_grow():
    """What a leak looks like to the soak: 64 MiB held and 8 files left open between two samples show up as such."""
    before = sample(0)
    # Fresh pages from the kernel, written so that they are resident: memory from the allocator may be pages an
    # earlier test freed but the heap kept, already counted.
    held = mmap.mmap(-1, 64 << 20)
    np.frombuffer(held, dtype=np.uint8)[:] = 1
    files = [open(os.devnull) for _ in range(8)]
    try:
        after = sample(1)
    finally:
        for f in files:
            f.close()
    assert after.fds - before.fds == 8
    assert 60 <= after.rss_mib - before.rss_mib <= 70, (before, after)
    held.close()


@pytest.mark.parametrize("run", ["documents", "cycles"])
def test_open_file_descriptors_do_not_grow(report, run):
    phase = getattr(report, run)
    assert phase.end.fds == phase.middle.fds
    assert phase.drift("fds", "middle") == 0 and phase.flat("fds")


def test_the_table_shows_every_sample_and_the_drifts(report):
    table = report.table()
    assert "one Classifier over 30 documents (width 2), then 5 Classifiers" in table
    for run in ("documents", "cycles"):
        rows = [line.split() for line in table.splitlines() if line.startswith(run)]
        assert [r[1] for r in rows] == ["start", "middle", "end", "drift", "2nd"]
    assert "flat: RSS" in table and "fds yes" in table


def test_the_texts_vary():
    texts = soak_texts()
    assert len(set(texts)) == len(texts) > 100
    assert len({len(t) for t in texts}) > 10


def test_the_command_prints_the_table():
    result = CliRunner().invoke(app, ["bench", "soak", "--docs", "3", "--cycles", "3", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert "one Classifier over 3 documents (width 1), then 3 Classifiers" in result.stdout


def test_too_few_documents_or_cycles_are_refused():
    with pytest.raises(ValueError, match="at least 3"):
        soak(docs=2, cycles=5)
    usage = CliRunner().invoke(app, ["bench", "soak", "--cycles", "2"])
    assert usage.exit_code == 2 and "Invalid value for '--cycles'" in usage.stderr


@pytest.mark.llama
@pytest.mark.parametrize("tap", ["c", "python"])
def test_classifiers_and_their_readings_leave_nothing_for_the_garbage_collector(tap):
    """What a long run must not leave behind: reference cycles only the garbage collector frees, made per Classifier
    (the eval callback's closures) or per sentence (ctypes array types made anew, pysbd's rules class)."""
    import gc

    from edge2dexit import Classifier

    texts = soak_texts()[:12]
    with Classifier(settings=EngineSettings(n_ctx=512, tap=tap)) as clf:  # what is made once per process
        list(clf.classify_many(texts))
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            with Classifier(settings=EngineSettings(n_ctx=512, tap=tap)) as clf:
                list(clf.classify_many(texts))
                clf.classify(texts[-1], policy="paper2d")
            del clf
        assert gc.collect() == 0
    finally:
        gc.enable()
