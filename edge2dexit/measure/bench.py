"""Engine benchmark: what a depth-limited decode really saves, and what our overheads cost, in one run.

Every figure is a ratio of medians measured in the same process, same threads, interleaved round by round,
so that a noisy shared machine moves all of them together.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..convert.settings import SENTIMENT_PROMPT
from ..document import sentence_by_sentence
from ..settings import MIN_DECODE_TOKENS
from ..engine import Engine, EngineSettings
from ..llama import NO_TAP, Context, ContextSettings, Model, Span, available_taps, gpu_offload
from ..sentences import Splitter
from .plain import PlainReader



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
    """Time sentence-by-sentence reads of `text` stopped after L/4, L/2, 3L/4 and L layers, the same read ahead to
    decodes of MIN_DECODE_TOKENS, the whole text in one decode with and without the eval callback, reading every
    layer's states, and the sentence splitters; then what each eval-callback tap costs (`tap_overhead`)."""
    with Engine.load(model_path, EngineSettings(n_threads=n_threads)) as engine, PlainReader(engine) as plain:
        n_layer = engine.n_layer
        splitter, regex = Splitter("pysbd"), Splitter("regex")
        sentences = splitter.split(text)
        tokens = [engine.tokenize(s) for s in sentences]
        whole = [t for sentence in tokens for t in sentence]

        def read(depth: int, layers: tuple[int, ...] | None = ()) -> None:
            engine.run(sentence_by_sentence(engine.document(), tokens, depth, layers))

        def read_ahead() -> None:  # as sentence-by-sentence policies read a whole text (docs/llama-cpp.md §9)
            doc, group = engine.document(), []
            for i, sentence in enumerate(tokens):
                group.append(sentence)
                if sum(map(len, group)) >= MIN_DECODE_TOKENS or i == len(tokens) - 1:
                    engine.run(doc.append(group, n_layer, ()))
                    group = []

        def read_whole() -> None:
            engine.run(engine.document().append([whole], n_layer, ()))

        depths = sorted({max(1, n_layer // 4), n_layer // 2, 3 * n_layer // 4})
        cases: list[tuple[str, Callable[[], object], float | None]] = [
            ("full depth, one decode per sentence", lambda: read(n_layer), 1.0),
            (f"full depth, read ahead to {MIN_DECODE_TOKENS} tokens a decode", read_ahead, None),
            ("full depth, whole text in one decode", read_whole, None),
            ("the same, plain decode, no callback", lambda: plain.read(whole), None),
            ("full depth, reading every layer", lambda: read(n_layer, None), None),
            *[(f"stopped after {d}/{n_layer} layers", lambda d=d: read(d), d / n_layer) for d in depths],
            ("sentence split, pysbd", lambda: splitter.split(text), None),
            ("sentence split, regex", lambda: regex.split(text), None),
            ("tokenize sentences", lambda: [engine.tokenize(s) for s in sentences], None),
        ]
        times: list[list[float]] = [[] for _ in cases]
        for fn in [c[1] for c in cases]:  # warm-up
            fn()
        for _ in range(rounds):
            for slot, (_, fn, _) in enumerate(cases):
                times[slot].append(_time_once(fn))
    medians = [statistics.median(t) for t in times]
    full, whole_read, plain_read = medians[0], medians[2], medians[3]
    timings = [Timing(name, m, m / full, ideal) for (name, _, ideal), m in zip(cases, medians)]
    return {
        "model": str(model_path),
        "n_layer": n_layer,
        "n_tokens": len(whole),
        "n_sentences": len(sentences),
        "rounds": rounds,
        "timings": timings,
        "callback_overhead": whole_read / plain_read - 1,
        "pysbd_share": medians[-3] / (medians[-3] + medians[-1] + full),
        "regex_share": medians[-2] / (medians[-2] + medians[-1] + full),
        "taps": tap_overhead(model_path, tokens, rounds, n_threads),
    }


@dataclass(frozen=True)
class TapCost:
    decode: str  # what one decode carries
    reading: str  # "nothing" or "every layer"
    seconds: dict[str, float]  # tap ("plain": no callback) -> median seconds of one decode


def tap_overhead(model_path: str | Path, sentences: list[list[int]], rounds: int = 7,
                 n_threads: int | None = None) -> list[TapCost]:
    """One decode at full depth after a cached prompt, of one sentence, of 64 tokens and of the whole text, through
    a context with no eval callback (plain), with the C tap and with the Python tap, reading nothing (the callback
    only asks and stops) or every layer: what each tap adds to llama.cpp's own decode, interleaved round by round.
    Layers are offloaded to a GPU as an engine would (EngineSettings.for_backend)."""
    settings = EngineSettings(n_threads=n_threads).for_backend(gpu_offload())
    whole = [t for sentence in sentences for t in sentence]
    sizes = {f"one sentence ({len(sentences[0])} tokens)": sentences[0], f"{len(whole[:64])} tokens": whole[:64],
             f"whole text ({len(whole)} tokens)": whole}
    with ExitStack() as stack:
        model = stack.enter_context(Model(model_path, n_gpu_layers=settings.n_gpu_layers))
        prompt = model.tokenize(SENTIMENT_PROMPT, add_bos=True)
        n_ctx = len(prompt) + len(whole) + 16
        contexts = {}
        for tap in ("plain", *available_taps()):
            context = stack.enter_context(Context(model, ContextSettings(
                n_ctx, 1, n_ctx, settings.n_threads, NO_TAP if tap == "plain" else tap)))
            context.decode([Span(0, 0, prompt)], model.n_layer, ())
            contexts[tap] = context

        def decode(context: Context, tokens: list[int], layers: range) -> None:
            context.remove(0, len(prompt))
            context.decode([Span(0, len(prompt), tokens)], model.n_layer, layers)

        every = range(model.n_layer)
        cases = [(size, reading, tap) for size in sizes for reading, layers in (("nothing", ()), ("every layer", every))
                 for tap in contexts if tap != "plain" or not layers]
        times: dict[tuple[str, str, str], list[float]] = {case: [] for case in cases}
        for round_ in range(rounds + 1):  # the first round warms up
            for size, reading, tap in cases:
                layers = every if reading == "every layer" else range(0)
                took = _time_once(lambda: decode(contexts[tap], sizes[size], layers))
                if round_:
                    times[size, reading, tap].append(took)
    costs = []
    for size in sizes:
        plain = statistics.median(times[size, "nothing", "plain"])
        for reading in ("nothing", "every layer"):
            costs.append(TapCost(size, reading, {"plain": plain, **{
                tap: statistics.median(times[size, reading, tap]) for tap in available_taps()}}))
    return costs


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
        f"eval-callback overhead, whole text at full depth vs a plain decode: {result['callback_overhead'] * 100:+.1f}%",
        f"sentence splitter share of (split + tokenize + full-depth compute): pysbd {result['pysbd_share'] * 100:.1f}%,"
        f" regex {result['regex_share'] * 100:.2f}%",
        "",
        "one decode at full depth after a cached prompt: plain (no eval callback) against each tap, "
        f"{'GPU' if gpu_offload() else 'CPU'}; median ms and the overhead over plain",
        f"{'decode':28} {'reading':12} {'plain':>8} " + " ".join(f"{tap + ' tap':>17}" for tap in available_taps()),
    ]
    for cost in result["taps"]:
        plain = cost.seconds["plain"]
        cells = " ".join(f"{cost.seconds[tap] * 1e3:8.3f} ({cost.seconds[tap] / plain - 1:+6.1%})"
                         for tap in available_taps())
        lines.append(f"{cost.decode:28} {cost.reading:12} {plain * 1e3:8.3f} {cells}")
    return "\n".join(lines)
