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
import sys
import threading
import time
import warnings
import weakref
from contextlib import contextmanager
from functools import cache
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

from . import native  # noqa: F401  (first: llama.cpp loaded before numpy, with OpenMP's threads sleeping)

import numpy as np  # noqa: E402

import llama_cpp  # noqa: E402
from llama_cpp._ggml import libggml  # noqa: E402

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


# --- ctypes arrays ---------------------------------------------------------------------------------------------


@cache
def _array_type(item: type, length: int) -> type:
    """`item * length`, made once: ctypes keeps array types only while they are used, and each one it makes anew is
    a reference cycle for the garbage collector (a slow creep over millions of tokenized sentences)."""
    return item * length


def _array(item: type, length: int, *values) -> ctypes.Array:
    """A ctypes array of `length` items of `item`; token buffers are rounded up to a power of two, so that few
    array types are ever made."""
    if item is llama_cpp.llama_token:
        length = 1 << max(0, length - 1).bit_length()
    return _array_type(item, length)(*values)


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
        buf = _array(ctypes.c_char, 256)
        n = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else ""

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """Token ids of `text`; special-token text in the input is treated as plain text."""
        raw = text.encode("utf-8")
        capacity = len(raw) + 8
        tokens = _array(llama_cpp.llama_token, capacity)
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), tokens, capacity, add_bos, False)
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            tokens = _array(llama_cpp.llama_token, capacity)
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

TAPS = ("c", "python")  # the C tap (_tap.c), or the pure-Python one where the C extension was not built
_warned_no_c_tap = False


def _c_tap_module():
    """The C tap's extension module, or None where it was not built (no compiler at install time)."""
    try:
        from . import _tap
    except ImportError:
        return None
    return _tap


def available_taps() -> tuple[str, ...]:
    """The taps this installation can use."""
    return tuple(tap for tap in TAPS if tap != "c" or _c_tap_module() is not None)


def choose_tap(wanted: str | None) -> str:
    """The tap to use: `wanted` ("c" or "python"), or by default the C tap where it was built; the first time the
    default has to fall back to Python, a warning says so."""
    global _warned_no_c_tap
    if wanted is not None:
        if wanted not in TAPS:
            raise SettingsError(f"unknown tap {wanted!r}; choose one of {', '.join(TAPS)}")
        if wanted == "c" and _c_tap_module() is None:
            raise SettingsError("the C tap was not built with this installation (no C compiler at install time)")
        return wanted
    if _c_tap_module() is not None:
        return "c"
    if not _warned_no_c_tap:
        _warned_no_c_tap = True
        warnings.warn("edge2dexit's C eval-callback tap was not built (no C compiler when it was installed): using "
                      "the Python tap, which costs ~2 µs per graph node (a few percent on a CPU, more than the "
                      "decode itself on a GPU)", RuntimeWarning, stacklevel=2)
    return "python"


class _Tap:
    """What a context's eval callback needs for one decode: the layers to read and to stop after, a buffer per
    layer read for every row of the decode (in batch order, filled chunk by chunk), and what came of it."""

    def __init__(self, n_embd: int, n_layer: int):
        self.n_embd, self.n_layer = n_embd, n_layer
        self.buffers: dict[int, np.ndarray] = {}
        self.on_layer: LayerHook | None = None
        self.error: BaseException | None = None  # raised by Context.decode once llama.cpp has returned

    def arm(self, read_layers: Sequence[int], stop_layer: int, on_layer: LayerHook | None, n_rows: int) -> None:
        self.buffers = {layer: np.empty((n_rows, self.n_embd), dtype=np.float32) for layer in read_layers}
        self.on_layer = on_layer
        self.error = None

    def start_graph(self) -> None:
        """Before each llama_decode of the decode (a long one comes in chunks)."""

    def check(self) -> None:
        """After each llama_decode: raise what went wrong in the callback."""
        if self.error is not None:
            raise self.error

    def rows(self, layer: int) -> np.ndarray:
        """The rows of `layer` copied so far."""
        raise NotImplementedError

    @property
    def reached(self) -> int:
        """Layers computed: the depth asked for, or less where on_layer ended the graph."""
        raise NotImplementedError

    def _notify(self, layer: int) -> bool:
        """Hand the rows of `layer` to the decode's stop rule; True ends the graph. An exception (ctypes would
        swallow it and silently stop the graph) is kept for Context.decode to raise, and ends the graph."""
        try:
            return bool(self.on_layer(layer, self.rows(layer)))
        except BaseException as exc:  # noqa: BLE001 - re-raised by Context.decode
            self.error = exc
            return True


# ggml_backend_sched_eval_callback's user data for the C tap: `struct e2d_tap` of _tap.c, field by field.
class _CTapState(ctypes.Structure):
    _fields_ = [
        ("tensor_get", ctypes.c_void_p),
        ("on_layer", ctypes.c_void_p),
        ("n_embd", ctypes.c_int32),
        ("n_layer", ctypes.c_int32),
        ("stop_layer", ctypes.c_int32),
        ("reached", ctypes.c_int32),
        ("stopped", ctypes.c_int32),
        ("status", ctypes.c_int32),
        ("bad_layer", ctypes.c_int32),
        ("wanted", ctypes.POINTER(ctypes.c_uint8)),
        ("notify", ctypes.POINTER(ctypes.c_uint8)),
        ("buffers", ctypes.POINTER(ctypes.c_void_p)),  # float ** in C: set from numpy's addresses, no ctypes pointers
        ("rows_written", ctypes.POINTER(ctypes.c_int64)),
        ("capacity_rows", ctypes.c_int64),
    ]


_TAP_OK, _TAP_BAD_TENSOR, _TAP_OVERFLOW = 0, 1, 2


def _address(function) -> int:
    """The address of a ctypes function pointer, read from its bytes (ctypes.cast and from_buffer would each leave a
    reference cycle for the garbage collector)."""
    return int.from_bytes(memoryview(function).cast("B"), sys.byteorder)
# bool (*layer_fn)(int32_t layer): the C tap's call into Python for a layer a stop rule must see
_LayerFn = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_int32)


class _CTap(_Tap):
    """The eval callback in C (_tap.c): Python runs only for the layers a stop rule reads."""

    def __init__(self, n_embd: int, n_layer: int):
        super().__init__(n_embd, n_layer)
        module = _c_tap_module()
        if module.state_size() != ctypes.sizeof(_CTapState):
            raise LlamaError(f"the C tap's state is {module.state_size()} bytes, its Python mirror "
                             f"{ctypes.sizeof(_CTapState)}: rebuild edge2dexit")
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(module.eval_address())
        self._wanted = _array(ctypes.c_uint8, n_layer)
        self._notify_flags = _array(ctypes.c_uint8, n_layer)
        self._pointers = _array(ctypes.c_void_p, n_layer)
        self._rows_written = _array(ctypes.c_int64, n_layer)
        self.state = _CTapState(
            tensor_get=_address(_ggml_backend_tensor_get), n_embd=n_embd, n_layer=n_layer, wanted=self._wanted,
            notify=self._notify_flags, buffers=self._pointers, rows_written=self._rows_written)
        self.user_data = ctypes.addressof(self.state)
        tap = weakref.ref(self)  # the C function pointer must not keep the tap (and its context) alive
        self._layer_fn = _LayerFn(lambda layer: tap()._notify(layer))
        self._layer_fn_address = _address(self._layer_fn)

    def arm(self, read_layers: Sequence[int], stop_layer: int, on_layer: LayerHook | None, n_rows: int) -> None:
        super().arm(read_layers, stop_layer, on_layer, n_rows)
        ctypes.memset(self._wanted, 0, self.n_layer)
        ctypes.memset(self._rows_written, 0, ctypes.sizeof(self._rows_written))
        for layer, buffer in self.buffers.items():
            self._wanted[layer] = 1
            self._pointers[layer] = buffer.ctypes.data
        ctypes.memmove(self._notify_flags, self._wanted, self.n_layer)  # every layer read is shown to on_layer
        state = self.state
        state.on_layer = self._layer_fn_address if on_layer is not None else None
        state.stop_layer, state.reached, state.capacity_rows = stop_layer, stop_layer + 1, n_rows
        state.status = _TAP_OK

    def start_graph(self) -> None:
        self.state.stopped = 0

    def check(self) -> None:
        super().check()
        if self.state.status != _TAP_OK:
            what = ("an unexpected tensor (not F32 rows of n_embd)" if self.state.status == _TAP_BAD_TENSOR
                    else "more rows than the decode has tokens")
            raise LlamaError(f"the eval callback found {what} at l_out-{self.state.bad_layer}")

    def rows(self, layer: int) -> np.ndarray:
        return self.buffers[layer][: self._rows_written[layer]]

    @property
    def reached(self) -> int:
        return self.state.reached


class _PythonTap(_Tap):
    """The eval callback in Python, through ctypes: asked for each of the ~30 nodes per layer; where the C tap was
    not built. Answers as the C tap does."""

    def __init__(self, n_embd: int, n_layer: int):
        super().__init__(n_embd, n_layer)
        self._wanted: dict[bytes, int | None] = {}  # tensor name -> layer to copy (None: stop there only)
        self._stop = b""
        self._rows_written: dict[int, int] = {}
        self._reached = 0
        self._stopped = False
        tap = weakref.ref(self)  # the C function pointer must not keep the tap (and its context) alive
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(
            lambda tensor, ask, user_data: tap()._on_node(tensor, ask))
        self.user_data = None

    def arm(self, read_layers: Sequence[int], stop_layer: int, on_layer: LayerHook | None, n_rows: int) -> None:
        super().arm(read_layers, stop_layer, on_layer, n_rows)
        self._wanted = {layer_output(layer): layer for layer in read_layers}
        self._stop = layer_output(stop_layer)
        self._wanted.setdefault(self._stop, None)
        self._rows_written = dict.fromkeys(read_layers, 0)
        self._reached = stop_layer + 1

    def start_graph(self) -> None:
        self._stopped = False

    def rows(self, layer: int) -> np.ndarray:
        return self.buffers[layer][: self._rows_written[layer]]

    @property
    def reached(self) -> int:
        return self._reached

    def _on_node(self, tensor: int, ask: bool) -> bool:
        # ctypes would swallow an exception raised here and return False, which silently stops the graph:
        # keep it and let the decode re-raise it.
        try:
            name = ctypes.string_at(tensor + _NAME_OFFSET)
            if ask:
                return not self._stopped and name in self._wanted
            if self._stopped:
                return False
            layer = self._wanted[name]
            if layer is not None:
                self._copy_rows(tensor, layer)
                if self.on_layer is not None and self._notify(layer):
                    self._reached = layer + 1
                    self._stopped = True
                    return False
            self._stopped = name == self._stop
            return not self._stopped
        except BaseException as exc:  # noqa: BLE001 - re-raised by Context.decode
            self.error = exc
            self._stopped = True
            return False

    def _copy_rows(self, tensor: int, layer: int) -> None:
        t = _GGMLTensor.from_address(tensor)
        row_bytes = self.n_embd * 4
        if t.type != _GGML_TYPE_F32 or t.ne[0] != self.n_embd or t.nb[1] < row_bytes:
            raise LlamaError(f"the eval callback found an unexpected tensor (not F32 rows of n_embd) at l_out-{layer}: "
                             f"type {t.type}, shape {tuple(t.ne)}")
        start, n_rows = self._rows_written[layer], t.ne[1]
        into = self.buffers[layer][start : start + n_rows]
        if len(into) != n_rows:
            raise LlamaError(f"the eval callback found more rows than the decode has tokens at l_out-{layer}")
        if t.nb[1] == row_bytes:
            if n_rows:
                _ggml_backend_tensor_get(tensor, into.ctypes.data, 0, n_rows * row_bytes)
        else:
            for row in range(n_rows):
                _ggml_backend_tensor_get(tensor, into[row].ctypes.data, row * t.nb[1], row_bytes)
        self._rows_written[layer] = start + n_rows


# --- context -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextSettings:
    n_ctx: int = 2048  # KV cells of every sequence together
    n_seq: int = 1  # sequences (documents) the context holds at once
    n_batch: int = 512  # tokens in one graph; a decode that may stop inside the graph must fit in one
    n_threads: int | None = None  # None: llama.cpp's default
    # the eval callback: "c" or "python" (TAPS); None: the C tap where it was built; NO_TAP: none at all (full-depth
    # decodes only, reading nothing: the benchmarks' plain baseline)
    tap: str | None = None


NO_TAP = "none"


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
        tap = None if settings.tap == NO_TAP else {"c": _CTap, "python": _PythonTap}[choose_tap(settings.tap)]
        self.tap: _Tap | None = tap(model.n_embd, model.n_layer) if tap is not None else None
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
        if self.tap is not None:
            params.cb_eval = self.tap.callback
            params.cb_eval_user_data = self.tap.user_data
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
            adapters = _array(llama_cpp.llama_adapter_lora_p_ctypes, 1, lora.handle)
            if llama_cpp.llama_set_adapters_lora(handle, adapters, 1, _array(ctypes.c_float, 1, lora.scale)) != 0:
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
        if self.tap is None and (depth != n_layer or read_layers):
            raise ValueError("a context without the eval tap can only decode at full depth, reading nothing")
        if on_layer is not None and n_tokens > self.n_batch:
            raise ValueError(f"an early stop needs the tokens in one graph of at most {self.n_batch}, got {n_tokens}")
        outputs = n_layer - 1 in read_layers
        if self.tap is None:
            for chunk in _chunks(spans, self.n_batch):
                self._decode_chunk(chunk, outputs)
            return Decoded({}, depth)
        self.tap.arm(read_layers, depth - 1, on_layer, n_tokens)
        for chunk in _chunks(spans, self.n_batch):
            self._decode_chunk(chunk, outputs)
        reached = self.tap.reached
        rows = {layer: self.tap.rows(layer) for layer in read_layers if layer < reached}
        missing = [layer for layer, read in rows.items() if len(read) != n_tokens]
        if missing:  # a graph that ended early without our say: never answer with part of the states
            raise LlamaError(f"llama.cpp ended the decode before layer {missing[0]} could be read")
        return Decoded(rows, reached)

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
        if self.tap is not None:
            self.tap.start_graph()
        started = time.perf_counter()
        with _interrupts_held():
            status = llama_cpp.llama_decode(self._ctx, batch)
        self.decode_seconds += time.perf_counter() - started
        if self.tap is not None:
            self.tap.check()
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
