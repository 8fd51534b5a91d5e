/* The hot part of the eval-callback tap (llama.py), in C.

   ggml's scheduler calls `cb_eval` for every node of the graph, about 930 per decode of SmolLM2, first asking
   whether the node is wanted (ask = true) and then, for a wanted one, handing over its data (ask = false). Through
   a Python ctypes callback each of those calls costs a few microseconds, which on a GPU is more than the decode
   itself (docs/llama-cpp.md §10). Here the ask answer (is the node an `l_out-<i>` we read or stop after), the copy
   of its rows into preallocated buffers and the stop after the deepest layer run in C; Python is called only for a
   layer whose rows a stop rule must see.

   No link to ggml: `ggml_backend_tensor_get` comes in as a function pointer, and the tensor is read through a
   mirror of `struct ggml_tensor` (ggml.h of the llama.cpp that llama-cpp-python 0.3.36 bundles; llama.py has the
   same mirror for the Python tap). The module itself only tells Python where `e2d_tap_eval` lives. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#define GGML_MAX_DIMS 4
#define GGML_MAX_OP_PARAMS 64
#define GGML_MAX_SRC 10
#define GGML_MAX_NAME 64
#define GGML_TYPE_F32 0

struct ggml_tensor {
    int type;
    void *buffer;
    int64_t ne[GGML_MAX_DIMS];
    size_t nb[GGML_MAX_DIMS];
    int op;
    int32_t op_params[GGML_MAX_OP_PARAMS / sizeof(int32_t)];
    int32_t flags;
    struct ggml_tensor *src[GGML_MAX_SRC];
    struct ggml_tensor *view_src;
    size_t view_offs;
    void *data;
    char name[GGML_MAX_NAME];
    void *extra;
    char padding[8];
};

typedef void (*tensor_get_fn)(const struct ggml_tensor *tensor, void *data, size_t offset, size_t size);
/* Python: the rows of `layer` are in its buffer (rows_written of them); true ends the decode after that layer. */
typedef bool (*layer_fn)(int32_t layer);

enum { TAP_OK = 0, TAP_BAD_TENSOR = 1, TAP_OVERFLOW = 2 };

/* Shared with Python (llama.py `_CTapState` mirrors it field by field). */
struct e2d_tap {
    tensor_get_fn tensor_get;
    layer_fn on_layer;      /* NULL: no Python call at all */
    int32_t n_embd;
    int32_t n_layer;
    int32_t stop_layer;     /* the graph ends after this layer's output */
    int32_t reached;        /* out: layers computed (stop_layer + 1, or where on_layer stopped the graph) */
    int32_t stopped;        /* out: the graph was ended; nodes of a later split (GPU offload) are neither asked
                               for nor copied */
    int32_t status;         /* out: TAP_* */
    int32_t bad_layer;      /* out: the layer of a TAP_BAD_TENSOR or TAP_OVERFLOW */
    uint8_t *wanted;        /* [n_layer]: 1 = copy this layer's rows */
    uint8_t *notify;        /* [n_layer]: 1 = call on_layer once they are copied */
    float **buffers;        /* [n_layer]: where each wanted layer's rows go, rows of n_embd floats */
    int64_t *rows_written;  /* [n_layer]: rows copied so far in this decode (a long decode comes in chunks) */
    int64_t capacity_rows;  /* rows every buffer holds */
};

/* The layer of an `l_out-<i>` name, or -1. */
static int32_t layer_of(const char *name) {
    if (strncmp(name, "l_out-", 6) != 0) {
        return -1;
    }
    int32_t layer = 0;
    const char *digit = name + 6;
    if (*digit < '0' || *digit > '9') {
        return -1;
    }
    for (; *digit >= '0' && *digit <= '9'; digit++) {
        layer = layer * 10 + (*digit - '0');
        if (layer > (1 << 20)) {
            return -1;
        }
    }
    return *digit == '\0' ? layer : -1;
}

static bool copy_rows(struct e2d_tap *tap, const struct ggml_tensor *t, int32_t layer) {
    int64_t n_rows = t->ne[1];
    size_t row_bytes = (size_t)tap->n_embd * sizeof(float);
    if (t->type != GGML_TYPE_F32 || t->ne[0] != tap->n_embd || t->nb[1] < row_bytes) {
        tap->status = TAP_BAD_TENSOR;
        tap->bad_layer = layer;
        return false;
    }
    if (tap->rows_written[layer] + n_rows > tap->capacity_rows) {
        tap->status = TAP_OVERFLOW;
        tap->bad_layer = layer;
        return false;
    }
    float *into = tap->buffers[layer] + tap->rows_written[layer] * tap->n_embd;
    if (t->nb[1] == row_bytes) {
        if (n_rows) {
            tap->tensor_get(t, into, 0, (size_t)n_rows * row_bytes);
        }
    } else {
        for (int64_t row = 0; row < n_rows; row++) {
            tap->tensor_get(t, into + row * tap->n_embd, (size_t)row * t->nb[1], row_bytes);
        }
    }
    tap->rows_written[layer] += n_rows;
    return true;
}

/* ggml_backend_sched_eval_callback: bool (*)(struct ggml_tensor * t, bool ask, void * user_data) */
static bool e2d_tap_eval(struct ggml_tensor *t, bool ask, void *user_data) {
    struct e2d_tap *tap = (struct e2d_tap *)user_data;
    int32_t layer = layer_of(t->name);
    if (layer < 0 || layer >= tap->n_layer) {
        return ask ? false : true;
    }
    bool wanted = tap->wanted[layer] != 0;
    if (ask) {
        return !tap->stopped && (wanted || layer == tap->stop_layer);
    }
    if (tap->stopped) {
        return false;
    }
    if (wanted && !copy_rows(tap, t, layer)) {
        tap->stopped = 1;
        return false;
    }
    if (wanted && tap->on_layer != NULL && tap->notify[layer] && tap->on_layer(layer)) {
        tap->reached = layer + 1;
        tap->stopped = 1;
        return false;
    }
    if (layer == tap->stop_layer) {
        tap->stopped = 1;
        return false;
    }
    return true;
}

static PyObject *eval_address(PyObject *self, PyObject *unused) {
    return PyLong_FromVoidPtr((void *)&e2d_tap_eval);
}

static PyObject *state_size(PyObject *self, PyObject *unused) {
    return PyLong_FromSize_t(sizeof(struct e2d_tap));
}

static PyMethodDef methods[] = {
    {"eval_address", eval_address, METH_NOARGS, "Address of the C eval callback (a ggml_backend_sched_eval_callback)."},
    {"state_size", state_size, METH_NOARGS, "sizeof(struct e2d_tap), to check the Python mirror against."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tap", "The eval-callback tap of edge2dexit, in C (see llama.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__tap(void) {
    return PyModule_Create(&module);
}
