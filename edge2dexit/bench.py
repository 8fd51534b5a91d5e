"""Engine benchmark: what a depth-limited decode really saves, and what our overheads cost, in one run.

Every figure is a ratio of medians measured in the same process, same threads, interleaved round by round,
so that a noisy shared machine moves all of them together.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .engine import Engine, EngineSettings
from .llama import Context, ContextSettings
from .sentences import SentenceSplitter

SAMPLE_TEXT = Path(__file__).parent / "models" / "sample_review.txt"


@dataclass(frozen=True)
class Timing:
    name: str
    seconds: float  # median over rounds
    ratio: float  # to the full-depth read through the engine
    ideal: float | None = None  # depth / n_layer where that is the ideal ratio


def _time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def engine_benchmark(model_path: str | Path, text: str, rounds: int = 7, n_threads: int | None = None) -> dict:
    """Time sentence-by-sentence reads of `text` stopped after L/4, L/2, 3L/4 and L layers, a plain decode
    without any eval callback, reading every layer's states, and the sentence splitters."""
    settings = EngineSettings(n_ctx=2048, n_threads=n_threads)
    with Engine(model_path, settings) as engine:
        n_layer = engine.n_layer
        splitter, regex = SentenceSplitter("pysbd"), SentenceSplitter("regex")
        sentences = splitter.split(text)
        tokens = engine.tokenize_sentences(sentences)
        plain = Context(engine.model, ContextSettings(2048, engine.context.settings.n_threads, tap=False))

        def read(depth: int, layers: tuple[int, ...] | None = ()) -> None:
            doc = engine.document()
            for t in tokens:
                doc.append([t], depth, layers)

        def read_plain() -> None:
            plain.remove(0)
            pos = 0
            for t in tokens:
                plain.decode(t, pos, n_layer, ())
                pos += len(t)

        depths = sorted({max(1, n_layer // 4), n_layer // 2, 3 * n_layer // 4})
        cases: list[tuple[str, Callable[[], object], float | None]] = [
            ("full depth (engine, reads nothing)", lambda: read(n_layer), 1.0),
            ("full depth, plain decode, no callback", read_plain, None),
            ("full depth, reading every layer", lambda: read(n_layer, None), None),
            *[(f"stopped after {d}/{n_layer} layers", lambda d=d: read(d), d / n_layer) for d in depths],
            ("sentence split, pysbd", lambda: splitter.split(text), None),
            ("sentence split, regex", lambda: regex.split(text), None),
            ("tokenize sentences", lambda: engine.tokenize_sentences(sentences), None),
        ]
        times: list[list[float]] = [[] for _ in cases]
        for fn in [c[1] for c in cases]:  # warm-up
            fn()
        for _ in range(rounds):
            for slot, (_, fn, _) in enumerate(cases):
                times[slot].append(_time_once(fn))
        plain.close()
    medians = [statistics.median(t) for t in times]
    full = medians[0]
    timings = [Timing(name, m, m / full, ideal) for (name, _, ideal), m in zip(cases, medians)]
    return {
        "model": str(model_path),
        "n_layer": n_layer,
        "n_tokens": sum(map(len, tokens)),
        "n_sentences": len(sentences),
        "rounds": rounds,
        "timings": timings,
        "callback_overhead": medians[0] / medians[1] - 1,
        "pysbd_share": medians[-3] / (medians[-3] + medians[-1] + full),
        "regex_share": medians[-2] / (medians[-2] + medians[-1] + full),
    }


def format_engine_benchmark(result: dict) -> str:
    lines = [
        f"model {result['model']}: {result['n_layer']} layers; text {result['n_tokens']} tokens in "
        f"{result['n_sentences']} sentences, one decode per sentence; median of {result['rounds']} rounds",
        f"{'case':44} {'ms':>9} {'× full':>8} {'ideal':>7}",
    ]
    for t in result["timings"]:
        ideal = f"{t.ideal:7.3f}" if t.ideal is not None else ""
        lines.append(f"{t.name:44} {t.seconds * 1e3:9.2f} {t.ratio:8.3f} {ideal}")
    lines += [
        f"eval-callback overhead vs plain full-depth decode: {result['callback_overhead'] * 100:+.1f}%",
        f"sentence splitter share of (split + tokenize + full-depth compute): pysbd {result['pysbd_share'] * 100:.1f}%,"
        f" regex {result['regex_share'] * 100:.2f}%",
    ]
    return "\n".join(lines)
