"""How an engine reads: context size, documents in flight, threads, GPU offload, reading ahead. Kept apart from the
engine so that the CLI can build its options from these defaults without loading llama.cpp.

A setting left at None is chosen for the backend llama.cpp was built with (`for_backend`):
- `n_gpu_layers`: every layer where llama.cpp can offload to a GPU, else 0;
- `width` (documents in flight in `classify_many`): 1 on the CPU, where sharing decodes gained 0.9–1.4× depending
  on the CPU (docs/llama-cpp.md §5), and GPU_WIDTH on a GPU, where prefix-mean's documents per second grew with the
  width up to 32 and fell at 64 (docs/llama-cpp.md §10, measured with the Python tap on an H200).

Reading ahead (`min_decode_tokens`): sentence-by-sentence reads wait until a decode holds 64 tokens, because on
the CPU a smaller decode takes a row-by-row attention kernel, 1.7–2.8× slower per token (docs/llama-cpp.md §9). On a
GPU, where a small decode costs about as much as a larger one, reading ahead should cost nothing; it has not been
measured there yet (docs/llama-cpp.md §10), so the CPU's figure stands for both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import SettingsError

# llama.cpp's CPU flash attention takes a tiled path only for decodes of at least 64 tokens; smaller decodes are
# computed row by row, 1.7–2.8× slower per token once a few hundred tokens are cached (docs/llama-cpp.md §9).
# Policies that read sentence by sentence read ahead until one decode holds this many tokens. (Here, not in
# document.py, so that these settings load without numpy: `from edge2dexit import EngineSettings` comes first.)
MIN_DECODE_TOKENS = 64

GPU_WIDTH = 32
EVERY_LAYER = 1 << 30  # llama.cpp offloads min(n_gpu_layers, layers + 1)


@dataclass(frozen=True)
class EngineSettings:
    n_ctx: int = 2048  # tokens per document: task prompt + text
    width: int | None = None  # documents in flight (sequences of one context); None: for the backend
    n_batch: int = 2048  # tokens in one graph; a decode that may stop inside the graph must fit in one
    n_threads: int | None = None  # None: every core this process may use
    n_gpu_layers: int | None = None  # layers offloaded to a GPU build of llama.cpp; None: every layer there, else 0
    min_decode_tokens: int = MIN_DECODE_TOKENS  # sentence-by-sentence reads read ahead this far (1: never)
    tap: str | None = None  # the eval callback: "c" or "python" (llama.TAPS); None: the C tap where it was built

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least {least}, got {value}"
                    for name, value, least in (("n_ctx", self.n_ctx, 16), ("n_batch", self.n_batch, 16),
                                               ("width", self.width, 1), ("n_threads", self.n_threads, 1),
                                               ("n_gpu_layers", self.n_gpu_layers, 0),
                                               ("min_decode_tokens", self.min_decode_tokens, 1))
                    if value is not None and (not isinstance(value, int) or value < least)]
        if problems:
            raise SettingsError("; ".join(problems))

    def for_backend(self, gpu: bool) -> "EngineSettings":
        """These settings with every one left at None chosen for a CPU (`gpu` False) or GPU build of llama.cpp."""
        return replace(
            self,
            width=self.width or (GPU_WIDTH if gpu else 1),
            n_gpu_layers=self.n_gpu_layers if self.n_gpu_layers is not None else (EVERY_LAYER if gpu else 0),
        )
