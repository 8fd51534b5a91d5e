"""Every ctypes detail of edge2dexit: the llama.cpp model, context and batch handles, and the eval-callback tap.

Nothing outside this module touches ctypes or llama_cpp. The layer above (`engine`) sees plain Python and numpy:
`Model.tokenize`, `Context.decode(spans, depth, ...) -> Decoded`, `Context.remove`, `Context.copy`. Each class owns
one C handle and frees it through an ExitStack (`lifetime.Owner`: `close()`, `with`, or garbage collection). The
llama.cpp backend starts lazily, once, when the first model loads.

How a depth-limited decode works (docs/llama-cpp.md §1): ggml's scheduler asks the eval callback, node by node,
whether we want a tensor (ask=True); for the nodes we want it computes the graph up to there, synchronises and
calls again with the data (ask=False). Returning False from that second call makes the scheduler skip the rest of
the current split. On the CPU the whole graph is one split, so nothing after the node runs, `llama_decode` returns
0 and the KV cache keeps the positions, valid below the depth reached. The output layer (lm_head) comes after the
last `l_out`, so stopping at any `l_out` never computes it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from contextlib import contextmanager
from functools import cache
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

import llama_cpp
from llama_cpp._ggml import libggml

from .errors import LlamaError, ModelError, SettingsError
from .keys import Keys, layer_output
from .lifetime import Owner


# --- ggml structs and functions that llama_cpp does not bind -------------------------------------------

# ggml.h: GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64
# struct ggml_tensor {
#     enum ggml_type type; struct ggml_backend_buffer * buffer;
#     int64_t ne[GGML_MAX_DIMS]; size_t nb[GGML_MAX_DIMS];
#     enum ggml_op op; int32_t op_params[GGML_MAX_OP_PARAMS / sizeof(int32_t)]; int32_t flags;
#     struct ggml_tensor * src[GGML_MAX_SRC]; struct ggml_tensor * view_src; size_t view_offs;
#     void * data; char name[GGML_MAX_NAME]; void * extra; char padding[8];
# };
class _GGMLTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_NAME_OFFSET = _GGMLTensor.name.offset
_GGML_TYPE_F32 = 0

# GGML_API void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data, size_t offset, size_t size);
_ggml_backend_tensor_get = libggml.ggml_backend_tensor_get
_ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml_backend_tensor_get.restype = None


# --- logging and start-up: keep llama.cpp quiet, but remember its last errors for our messages ----------------

_GGML_LOG_LEVEL_ERROR = 4  # ggml.h of the bundled llama.cpp (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5)
_recent_errors: list[str] = []


# typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == _GGML_LOG_LEVEL_ERROR:
        _recent_errors.append(text.decode("utf-8", "replace").strip())
        del _recent_errors[:-5]
    if os.environ.get("EDGE2DEXIT_LLAMA_LOG"):
        print(text.decode("utf-8", "replace"), end="", flush=True)


_backend_lock = threading.Lock()
_backend_started = False


def _start_backend() -> None:
    """Install our log callback and start llama.cpp's backend, once per process, before the first model."""
    global _backend_started
    with _backend_lock:
        if not _backend_started:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_started = True


def _last_llama_error() -> str:
    return _recent_errors[-1] if _recent_errors else "no message from llama.cpp"


@cache
def gpu_offload() -> bool:
    """Whether this build of llama.cpp can offload layers to a GPU (CUDA, Metal, Vulkan...)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ctrl-C held back while llama.cpp computes, and raised once it returned. Python runs a signal handler between
    bytecodes of whatever Python code runs, and inside llama_decode that is the eval callback: a KeyboardInterrupt
    raised there stops the graph half way, and what the decode was to read is missing. Only the main thread
    receives signals, so elsewhere there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)  # Python's own handler raises KeyboardInterrupt here
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


# --- model ---------------------------------------------------------------------------------------------


class Model(Owner):
    """A GGUF model loaded by llama.cpp."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0):
        super().__init__()
        _start_backend()
        self.path = Path(path)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        # No "extra" CPU buffer types (AMX, weight repacking): on CPUs with AMX, a llama.cpp built for the native
        # CPU crashes in ggml_backend_amx_mul_mat on quantized weights, and the plain buffers are as fast for
        # models this small (docs/llama-cpp.md §6).
        params.use_extra_bufts = False
        _recent_errors.clear()
        handle = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            raise ModelError(f"llama.cpp could not load {self.path}: {_last_llama_error()}")
        self._resources.callback(llama_cpp.llama_model_free, handle)
        self.handle = handle
        self._vocab = llama_cpp.llama_model_get_vocab(handle)
        self.n_layer: int = llama_cpp.llama_model_n_layer(handle)
        self.n_embd: int = llama_cpp.llama_model_n_embd(handle)
        self.architecture: str = self.metadata(Keys.General.ARCHITECTURE.name)

    def load_lora(self, path: str | Path, scale: float = 1.0) -> "LoraAdapter":
        """Load a llama.cpp LoRA adapter file for this model (freed with the model, before it), to be applied
        times `scale` (1: as trained)."""
        _recent_errors.clear()
        handle = llama_cpp.llama_adapter_lora_init(self.handle, str(path).encode())
        if not handle:
            raise ModelError(f"llama.cpp could not load the LoRA adapter {path} for {self.path.name}: "
                             f"{_last_llama_error()}")
        self._resources.callback(llama_cpp.llama_adapter_lora_free, handle)
        return LoraAdapter(Path(path), handle, scale)

    def metadata(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """Token ids of `text`; special-token text in the input is treated as plain text."""
        raw = text.encode("utf-8")
        capacity = len(raw) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), tokens, capacity, add_bos, False)
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), tokens, capacity, add_bos, False)
        return tokens[:n]


class LoraAdapter(NamedTuple):
    """A LoRA adapter loaded by `Model.load_lora`; its model owns the C handle."""

    path: Path
    handle: object  # llama_adapter_lora_p
    scale: float


# --- the eval-callback tap -----------------------------------------------------------------------------

# on_layer(layer, rows): called as each read layer is computed, with its rows [n_tokens, n_embd] in batch order;
# returning True ends the decode after that layer.
LayerHook = Callable[[int, np.ndarray], bool]


class _LayerTap:
    """The `cb_eval` callback: asks only for the `l_out-<i>` tensors wanted, copies their rows, and stops the
    graph after the deepest one. One tap lives as long as its context; `arm` sets it up for each decode."""

    def __init__(self, n_embd: int):
        self.n_embd = n_embd
        self._wanted: dict[bytes, int | None] = {}  # tensor name -> layer to copy (None: stop there only)
        self._stop = b""
        self._on_layer: LayerHook | None = None
        self.rows: dict[int, list[np.ndarray]] = {}
        self.reached = 0
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def arm(self, read_layers: Sequence[int], stop_layer: int, on_layer: LayerHook | None) -> None:
        self._wanted = {layer_output(layer): layer for layer in read_layers}
        self._stop = layer_output(stop_layer)
        self._wanted.setdefault(self._stop, None)
        self._on_layer = on_layer
        self.rows = {layer: [] for layer in read_layers}
        self.reached = stop_layer + 1
        self.error = None

    def _on_node(self, tensor: int, ask: bool, user_data: int) -> bool:
        # ctypes would swallow an exception raised here and return False, which silently stops the graph:
        # keep it and let the decode re-raise it.
        try:
            name = ctypes.string_at(tensor + _NAME_OFFSET)
            if ask:
                return name in self._wanted
            layer = self._wanted[name]
            if layer is not None:
                self._copy_rows(tensor, layer)
                if self._on_layer is not None and self._on_layer(layer, self.rows[layer][-1]):
                    self.reached = layer + 1
                    return False
            return name != self._stop
        except BaseException as exc:  # noqa: BLE001 - re-raised by Context.decode
            self.error = exc
            return False

    def _copy_rows(self, tensor: int, layer: int) -> None:
        t = _GGMLTensor.from_address(tensor)
        if t.type != _GGML_TYPE_F32 or t.ne[0] != self.n_embd:
            raise LlamaError(f"unexpected l_out-{layer} tensor: type {t.type}, shape {tuple(t.ne)}")
        n_rows, row_bytes = t.ne[1], t.nb[1]
        block = np.empty((n_rows, row_bytes // 4), dtype=np.float32)
        if n_rows:
            _ggml_backend_tensor_get(tensor, block.ctypes.data, 0, n_rows * row_bytes)
        self.rows[layer].append(block[:, : self.n_embd])


# --- context -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int = 2048  # KV cells of every sequence together
    n_seq: int = 1  # sequences (documents) the context holds at once
    n_batch: int = 512  # tokens in one graph; a decode that may stop inside the graph must fit in one
    n_threads: int | None = None  # None: llama.cpp's default
    tap: bool = True  # False: no eval callback at all (full-depth decodes only; the benchmarks' baseline)


class Span(NamedTuple):
    """Tokens of one sequence at consecutive positions from `start`."""

    seq: int
    start: int
    tokens: Sequence[int]


class Decoded(NamedTuple):
    rows: dict[int, np.ndarray]  # layer -> [n_tokens, n_embd] float32 in span order, for the layers read
    depth: int  # layers computed: the depth asked for, or less where on_layer stopped the graph


class Context(Owner):
    """One llama.cpp context with `n_seq` sequences and an eval-callback tap, optionally computing through a LoRA
    adapter of its model (set here, before anything is decoded: the adapter changes what the KV cache holds)."""

    def __init__(self, model: Model, settings: ContextSettings = ContextSettings(), lora: LoraAdapter | None = None):
        super().__init__()
        self.model = model
        self.settings = settings
        self.tap = _LayerTap(model.n_embd)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_batch = params.n_ubatch = min(settings.n_batch, settings.n_ctx)
        params.n_seq_max = settings.n_seq
        # One KV buffer for every sequence: llama.cpp then splits a batch into graphs in batch order, of n_ubatch
        # tokens (docs/llama-cpp.md §4), which a stop inside the graph and our row bookkeeping rely on.
        params.kv_unified = True
        # llama.cpp reserves an n_batch × n_vocab logits tensor; we never compute it, so its pages are never
        # touched and cost address space, not memory.
        params.embeddings = False
        params.no_perf = True
        params.swa_full = True  # removing and re-decoding text must not depend on a pruned sliding window
        if settings.n_threads:
            params.n_threads = params.n_threads_batch = settings.n_threads
        if settings.tap:
            params.cb_eval = self.tap.callback
        _recent_errors.clear()
        handle = llama_cpp.llama_init_from_model(model.handle, params)
        if not handle:
            raise SettingsError(f"llama.cpp could not create a context of {settings.n_ctx} tokens for "
                                f"{settings.n_seq - 1 or 1} document(s) at once ({_last_llama_error()}): lower the "
                                "context size (--n-ctx) or the documents in flight (--width)")
        self._resources.callback(llama_cpp.llama_free, handle)
        self._ctx = handle
        if lora is not None:
            # LLAMA_API int32_t llama_set_adapters_lora(struct llama_context * ctx, struct llama_adapter_lora ** adapters,
            #                                           size_t n_adapters, float * scales);
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora.handle)
            if llama_cpp.llama_set_adapters_lora(handle, adapters, 1, (ctypes.c_float * 1)(lora.scale)) != 0:
                raise LlamaError(f"llama.cpp could not apply the LoRA adapter {lora.path}: {_last_llama_error()}")
        self.lora = lora
        self._memory = llama_cpp.llama_get_memory(handle)
        self.n_ctx: int = llama_cpp.llama_n_ctx(handle)
        self.n_batch: int = llama_cpp.llama_n_batch(handle)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.decode_seconds = 0.0  # time spent inside llama_decode, for the overhead figures of the benchmarks
        self._resources.callback(llama_cpp.llama_batch_free, self._batch)

    def decode(
        self,
        spans: Sequence[Span],
        depth: int,
        read_layers: Sequence[int],
        on_layer: LayerHook | None = None,
    ) -> Decoded:
        """Decode `spans` (each at its own sequence and positions), computing layers 0..depth-1 only.

        Returns the rows [n_tokens, n_embd] float32 of each layer in `read_layers` (all < depth), in span order.
        `on_layer(layer, rows)` is called as each read layer is computed; returning True stops the graph right
        there (the KV of these positions is then valid below that layer + 1). A decode with `on_layer` must fit
        one graph (n_batch tokens); longer ones are decoded in graphs of n_batch tokens.
        Reading the last layer flags every token as an output, because llama.cpp keeps only output rows in the
        last layer; the graph still stops before the output layer.
        """
        n_layer = self.model.n_layer
        n_tokens = sum(len(s.tokens) for s in spans)
        if not 1 <= depth <= n_layer:
            raise ValueError(f"depth must be in 1..{n_layer}, got {depth}")
        if any(not 0 <= layer < depth for layer in read_layers):
            raise ValueError(f"layers to read must be below the depth {depth}: {sorted(read_layers)}")
        if not self.settings.tap and (depth != n_layer or read_layers):
            raise ValueError("a context without the eval tap can only decode at full depth, reading nothing")
        if on_layer is not None and n_tokens > self.n_batch:
            raise ValueError(f"an early stop needs the tokens in one graph of at most {self.n_batch}, got {n_tokens}")
        outputs = n_layer - 1 in read_layers
        self.tap.arm(read_layers, depth - 1, on_layer)
        chunks = _chunks(spans, self.n_batch)
        for chunk in chunks:
            self._decode_chunk(chunk, outputs)
        missing = [layer for layer in read_layers if layer < self.tap.reached and len(self.tap.rows[layer]) != len(chunks)]
        if missing:  # a graph that ended early without our say: never answer with part of the states
            raise LlamaError(f"llama.cpp ended the decode before layer {missing[0]} could be read")
        rows = {layer: np.concatenate(blocks) for layer, blocks in self.tap.rows.items() if blocks}
        return Decoded(rows, self.tap.reached)

    def _decode_chunk(self, spans: list[Span], outputs: bool) -> None:
        batch, i = self._batch, 0
        for seq, start, tokens in spans:
            for offset, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + offset
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = outputs
                i += 1
        batch.n_tokens = i
        _recent_errors.clear()
        started = time.perf_counter()
        with _interrupts_held():
            status = llama_cpp.llama_decode(self._ctx, batch)
        self.decode_seconds += time.perf_counter() - started
        if self.tap.error is not None:
            raise self.tap.error
        if status != 0:
            raise LlamaError(f"llama_decode failed with status {status}: {_last_llama_error()}")

    def remove(self, seq: int, start: int = 0, end: int = -1) -> None:
        """Forget positions [start, end) of sequence `seq` (end -1: to the end)."""
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, start, end):
            raise LlamaError(f"llama.cpp could not remove positions {start}..{end} of sequence {seq} from its cache")

    def copy(self, source: int, destination: int) -> None:
        """Make every cached position of `source` part of `destination` too (shared cells, no recompute)."""
        llama_cpp.llama_memory_seq_cp(self._memory, source, destination, -1, -1)


def _chunks(spans: Sequence[Span], size: int) -> list[list[Span]]:
    """`spans` cut into consecutive chunks of at most `size` tokens (a span may be cut in two)."""
    chunks: list[list[Span]] = []
    room = 0
    for seq, start, tokens in spans:
        while tokens:
            if room == 0:
                chunks.append([])
                room = size
            head, tokens = tokens[:room], tokens[room:]
            chunks[-1].append(Span(seq, start, head))
            start += len(head)
            room -= len(head)
    return chunks


# --- quantization --------------------------------------------------------------------------------------

QUANT_TYPES = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
               "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}


def quantize(source: str | Path, destination: str | Path, kind: str, n_threads: int | None = None) -> None:
    """Re-quantize a GGUF with llama.cpp's own quantizer (already-quantized input allowed)."""
    if kind not in QUANT_TYPES:
        raise ModelError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANT_TYPES)}")
    _start_backend()
    # LLAMA_API uint32_t llama_model_quantize(const char * fname_inp, const char * fname_out,
    #                                         const llama_model_quantize_params * params);
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.allow_requantize = True
    params.nthread = n_threads or 0
    _recent_errors.clear()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params))
    if status != 0:
        raise ModelError(f"llama.cpp could not quantize {source} to {kind}: {_last_llama_error()}")
