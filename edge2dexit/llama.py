"""Every ctypes detail of edge2dexit: the llama.cpp model, context, batch, and the eval-callback tap.

Nothing outside this module touches ctypes or llama_cpp. The layer above (`engine.py`) sees plain Python
and numpy: `Model.tokenize`, `Context.decode(...) -> {layer: rows}`, `Context.remove(...)`.

How a depth-limited decode works (NOTES.md §2, re-checked against the vendored llama.cpp 0c1e570):
ggml's scheduler asks the eval callback, node by node, whether we want a tensor (ask=True); for the
nodes we want it computes the graph up to there, synchronises and calls again with the data (ask=False).
Returning False from that second call makes the scheduler skip the rest of the current split. On the CPU
the whole graph is one split, so nothing after the node runs, `llama_decode` returns 0 and the KV cache
keeps the positions, valid below the depth reached. The output layer (lm_head) comes after the last
`l_out`, so stopping at any `l_out` never computes it.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

import llama_cpp
from llama_cpp._ggml import libggml

from .errors import Edge2DExitError, ModelError
from .keys import Keys


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


# --- logging: keep llama.cpp quiet, but remember its last errors for our messages ------------------------

_GGML_LOG_LEVEL_ERROR = 3
_recent_errors: list[str] = []


# typedef void (*ggml_log_callback)(enum ggml_log_level level, const char * text, void * user_data);
@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == _GGML_LOG_LEVEL_ERROR:
        _recent_errors.append(text.decode("utf-8", "replace").strip())
        del _recent_errors[:-5]
    if os.environ.get("EDGE2DEXIT_LLAMA_LOG"):
        print(text.decode("utf-8", "replace"), end="", flush=True)


llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


def _last_llama_error() -> str:
    return _recent_errors[-1] if _recent_errors else "no message from llama.cpp"


class LlamaError(Edge2DExitError):
    """llama.cpp refused an operation (decode failure, context creation failure)."""


# --- model ---------------------------------------------------------------------------------------------


class Model:
    """A GGUF model loaded by llama.cpp. Close it (or use `with`) to free its memory."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0):
        self.path = Path(path)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        _recent_errors.clear()
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise ModelError(f"llama.cpp could not load {self.path}: {_last_llama_error()}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_layer: int = llama_cpp.llama_model_n_layer(self._model)
        self.n_embd: int = llama_cpp.llama_model_n_embd(self._model)
        self.architecture: str = self.metadata(Keys.General.ARCHITECTURE)

    def metadata(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
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
        return list(tokens[:n])

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the eval-callback tap -----------------------------------------------------------------------------


class _LayerTap:
    """The `cb_eval` callback: asks only for the `l_out-<i>` tensors wanted, copies their rows, and stops the
    graph after the deepest one. One tap lives as long as its context; `arm` sets it up for each decode."""

    def __init__(self, n_embd: int):
        self.n_embd = n_embd
        self._wanted: dict[bytes, int | None] = {}  # tensor name -> layer to copy (None: stop there only)
        self._stop = b""
        self._on_layer: Callable[[int, np.ndarray], bool] | None = None
        self.rows: dict[int, list[np.ndarray]] = {}
        self.reached = 0
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def arm(
        self, read_layers: Sequence[int], stop_layer: int, on_layer: Callable[[int, np.ndarray], bool] | None
    ) -> None:
        self._wanted = {f"l_out-{layer}".encode(): layer for layer in read_layers}
        self._stop = f"l_out-{stop_layer}".encode()
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
    n_ctx: int = 2048
    n_threads: int | None = None  # None: all cores llama.cpp detects
    n_batch: int = 512
    tap: bool = True  # False: no eval callback at all (full-depth decodes only; the benchmark's baseline)


class Decoded(NamedTuple):
    rows: dict[int, np.ndarray]  # layer -> [n_tokens, n_embd] float32, for the layers read
    depth: int  # layers computed: the depth asked for, or less where on_layer stopped the graph


class Context:
    """One llama.cpp context with a single sequence (seq 0) and an eval-callback tap."""

    def __init__(self, model: Model, settings: ContextSettings = ContextSettings()):
        self.model = model
        self.settings = settings
        self.tap = _LayerTap(model.n_embd)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_batch = params.n_ubatch = min(settings.n_batch, settings.n_ctx)
        params.n_seq_max = 1
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
        self._ctx = llama_cpp.llama_init_from_model(model._model, params)
        if not self._ctx:
            raise LlamaError(f"llama.cpp could not create a context of {settings.n_ctx} tokens: {_last_llama_error()}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx: int = llama_cpp.llama_n_ctx(self._ctx)
        self.n_batch: int = llama_cpp.llama_n_batch(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def decode(
        self,
        tokens: Sequence[int],
        start_pos: int,
        depth: int,
        read_layers: Sequence[int],
        on_layer: Callable[[int, np.ndarray], bool] | None = None,
    ) -> "Decoded":
        """Decode `tokens` at positions start_pos.. of seq 0, computing layers 0..depth-1 only.

        Returns the rows [n_tokens, n_embd] float32 of each layer in `read_layers` (all < depth).
        `on_layer(layer, rows)` is called as each read layer is computed; returning True stops the graph
        right there (the KV of these positions is then valid below that layer + 1). Early stops need the
        tokens to fit one decode (n_batch).
        Reading the last layer flags every token as an output, because llama.cpp keeps only output rows
        in the last layer; the graph still stops before the output layer.
        """
        n_layer = self.model.n_layer
        if not 1 <= depth <= n_layer:
            raise ValueError(f"depth must be in 1..{n_layer}, got {depth}")
        if any(not 0 <= layer < depth for layer in read_layers):
            raise ValueError(f"layers to read must be below the depth {depth}: {sorted(read_layers)}")
        if not self.settings.tap and (depth != n_layer or read_layers):
            raise ValueError("a context without the eval tap can only decode at full depth, reading nothing")
        if on_layer is not None and len(tokens) > self.n_batch:
            raise ValueError(f"an early stop needs the tokens in one decode of at most {self.n_batch}")
        outputs = n_layer - 1 in read_layers
        self.tap.arm(read_layers, depth - 1, on_layer)
        for first in range(0, len(tokens), self.n_batch):
            self._decode_chunk(tokens[first : first + self.n_batch], start_pos + first, outputs)
        rows = {layer: np.concatenate(blocks) for layer, blocks in self.tap.rows.items() if blocks}
        return Decoded(rows, self.tap.reached)

    def _decode_chunk(self, tokens: Sequence[int], start_pos: int, outputs: bool) -> None:
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = outputs
        _recent_errors.clear()
        status = llama_cpp.llama_decode(self._ctx, batch)
        if self.tap.error is not None:
            raise self.tap.error
        if status != 0:
            raise LlamaError(f"llama_decode failed with status {status}: {_last_llama_error()}")

    def remove(self, start_pos: int, end_pos: int = -1) -> None:
        """Forget positions [start_pos, end_pos) of seq 0 (end_pos -1: to the end)."""
        if not llama_cpp.llama_memory_seq_rm(self._memory, 0, start_pos, end_pos):
            raise LlamaError(f"llama.cpp could not remove positions {start_pos}..{end_pos} from its cache")

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- quantization --------------------------------------------------------------------------------------

QUANT_TYPES = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
               "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}


def quantize(source: str | Path, destination: str | Path, kind: str, n_threads: int | None = None) -> None:
    """Re-quantize a GGUF with llama.cpp's own quantizer (already-quantized input allowed)."""
    if kind not in QUANT_TYPES:
        raise ModelError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANT_TYPES)} (or keep)")
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
