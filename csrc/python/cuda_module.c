/* cuda_module.c: tltorch._cuda, the CUDA kernels' module: its device table (the CUDA kernels, the device
 * check, cuBLAS's contexts and workspace) and what only it has (device_count, device_name, work_stream_of).
 * The bindings are the bind_<family>.c files it shares with tltorch._C (bind.h).
 *
 * A call's kernel runs with the GIL released on one stream, decided by its reference argument (the output,
 * or x), which each binding imports first:
 *  - a torch tensor: torch's current stream for its device, asked through the DLPack exchange table
 *    (torch >= 2.9) or, without one, as torch.cuda.current_stream(device).cuda_stream; the caching
 *    allocator's reuse of outputs and workspaces is then ordered after the kernel;
 *  - another producer without the table (CuPy, ...): the legacy default stream, DLPack's default.
 * Every other argument's producer is asked for that stream (__dlpack__(stream=...)), so that it orders
 * its pending work before the kernel; bridge.c has the details. work_stream_of(obj) says the stream.
 * The per-device cuBLAS contexts are created on first use, never at import, so the module imports on a
 * machine without a GPU or a driver (device_count() is then 0). cuBLAS itself is not linked: the first
 * context opens the library (csrc/cuda/common.cu), so the module also imports where cuBLAS is missing,
 * and a GEMM there raises a RuntimeError that says how to install it. */
#include "bind.h" /* first: Python.h sets the feature macros */

#include <limits.h>

typedef struct {
    tl_module m; /* first: the bindings read it */
    tl_cuda_context **ctx; /* [nctx], one per device, each NULL until a call needs it */
    int nctx;
} module_state;

static module_state *
state_of(PyObject *mod)
{
    return (module_state *)PyModule_GetState(mod);
}

static int
need_cuda(const tl_arg *a)
{
    if (a->t.device == TL_CUDA) return 0;
    PyErr_Format(PyExc_ValueError, "argument '%s' is on the CPU; tltorch._cuda runs on CUDA GPUs (CPU "
                 "tensors go to tltorch._C)", a->name);
    return -1;
}

/* A CUDA tensor on ref's GPU. */
static int
need_cuda_on(const tl_arg *a, const tl_arg *ref)
{
    if (need_cuda(a) < 0) return -1;
    if (a->t.device == ref->t.device && a->t.device_id == ref->t.device_id) return 0;
    PyErr_Format(PyExc_ValueError, "argument '%s' is on %s:%d but '%s' is on %s:%d", a->name,
                 a->t.device == TL_CUDA ? "cuda" : "cpu", a->t.device_id, ref->name,
                 ref->t.device == TL_CUDA ? "cuda" : "cpu", ref->t.device_id);
    return -1;
}

/* CUDA and cuBLAS failures carry the runtime's own words, layout errors say what the kernel can read. */
static void
raise_status(tl_status st, const char *op, const char *layout_hint)
{
    if (st == TL_ERR_CUDA || st == TL_ERR_CUBLAS)
        PyErr_Format(PyExc_RuntimeError, "%s: %s: %s", op, tl_status_string(st), tl_cuda_last_error());
    else if (st == TL_ERR_LAYOUT && layout_hint)
        PyErr_Format(PyExc_ValueError, "%s: %s (%s)", op, tl_status_string(st), layout_hint);
    else
        tl_raise_status(st, op);
}

/* The device's context, created on first use. The GIL is released while CUDA initialises (that can
 * take seconds), so another thread may have got there first: its context wins. */
static int
context_for(PyObject *mod, int dev, tl_cuda_context **out)
{
    module_state *ms = state_of(mod);
    if (!ms->ctx) {
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = tl_cuda_device_count();
        Py_END_ALLOW_THREADS
        if (!ms->ctx) {
            if (n <= 0) {
                PyErr_Format(PyExc_RuntimeError, "tltorch._cuda: no CUDA device is visible (%s)",
                             tl_cuda_last_error());
                return -1;
            }
            tl_cuda_context **arr = PyMem_Calloc((size_t)n, sizeof *arr);
            if (!arr) {
                PyErr_NoMemory();
                return -1;
            }
            ms->ctx = arr;
            ms->nctx = n;
        }
    }
    if (dev < 0 || dev >= ms->nctx) {
        PyErr_Format(PyExc_ValueError, "tltorch._cuda: CUDA device %d does not exist (%d visible)", dev,
                     ms->nctx);
        return -1;
    }
    if (!ms->ctx[dev]) {
        tl_cuda_context *ctx = NULL;
        tl_status st;
        Py_BEGIN_ALLOW_THREADS
        st = tl_cuda_context_create(dev, &ctx);
        Py_END_ALLOW_THREADS
        if (st) {
            if (st == TL_ERR_DEVICE) st = TL_ERR_CUDA; /* the message is in tl_cuda_last_error */
            raise_status(st, "tltorch._cuda: creating the cuBLAS context", NULL);
            return -1;
        }
        if (ms->ctx[dev])
            tl_cuda_context_destroy(ctx);
        else
            ms->ctx[dev] = ctx;
    }
    *out = ms->ctx[dev];
    return 0;
}

/* cuBLAS's workspace: None, or a contiguous uint8 vector on ref's GPU starting on a 256-byte boundary (an
 * empty one is as None); then that GPU's context. */
static int
cublas_setup(tl_call *k, const tl_arg *ws, const tl_arg *ref)
{
    k->cws_data = NULL;
    k->cws_bytes = 0;
    if (ws->via) {
        if (need_cuda_on(ws, ref) < 0) return -1;
        if (tl_check_ndim(&ws->t, 1, &k->why) || tl_check_writable(&ws->t, &k->why)) return tl_raise_check(&k->why);
        if (ws->t.dtype != TL_UINT8 || (ws->t.shape[0] > 1 && ws->t.strides[0] != 1)) {
            PyErr_Format(PyExc_ValueError, "argument '%s' (the cuBLAS workspace) must be a contiguous uint8 vector",
                         ws->name);
            return -1;
        }
        if (ws->t.shape[0] > 0) {
            if ((uintptr_t)ws->t.data % 256 != 0) {
                PyErr_Format(PyExc_ValueError, "argument '%s' (the cuBLAS workspace) must start on a 256-byte "
                             "boundary", ws->name);
                return -1;
            }
            k->cws_data = ws->t.data;
            k->cws_bytes = (size_t)ws->t.shape[0];
        }
    }
    return context_for(k->mod, ref->t.device_id, &k->ctx);
}

static const tl_backend cuda = {
    .name = "tltorch._cuda",
    .device = TL_CUDA,
    .need_device = need_cuda_on,
    .raise = raise_status,
    .cublas = cublas_setup,
    .cuda = {.gemm = tl_gemm_cuda, .colsum = tl_colsum_cuda, .linear_xent = tl_linear_xent_cuda,
             .xent_workspace = tl_xent_cuda_workspace, .dropout = tl_dropout_cuda,
             .lora_forward = tl_lora_forward_cuda, .lora_backward = tl_lora_backward_cuda, .pool = tl_pool_cuda,
             .adamw = tl_adamw_cuda, .int8_dequant = tl_int8_dequant_cuda,
             .linear_head = tl_linear_head_cuda},
};

static PyObject *
py_device_count(PyObject *mod, PyObject *unused)
{
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = tl_cuda_device_count();
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *
py_device_name(PyObject *mod, PyObject *arg)
{
    char name[256];
    tl_status st;
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "argument 'index' must be an int, not %.200s", Py_TYPE(arg)->tp_name);
        return NULL;
    }
    if (v < 0 || v > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "argument 'index' must be a CUDA device index, got %ld", v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    st = tl_cuda_device_name((int)v, name, sizeof name);
    Py_END_ALLOW_THREADS
    if (st) {
        PyErr_Format(st == TL_ERR_DEVICE ? PyExc_ValueError : PyExc_RuntimeError,
                     "tltorch._cuda.device_name(%ld): %s", v, tl_cuda_last_error());
        return NULL;
    }
    return PyUnicode_FromString(name);
}

/* work_stream_of(obj): the stream a kernel whose reference argument is obj runs on, its producer asked
 * as the kernels ask it (no GPU needed). */
static PyObject *
py_work_stream_of(PyObject *mod, PyObject *obj)
{
    tl_arg a = TL_ARG_INIT("obj");
    tl_stream s = {0};
    PyObject *ret = NULL;
    if (tl_arg_import_on(&state_of(mod)->m.bridge, obj, &a, &s) < 0 || need_cuda(&a) < 0) goto fail;
    ret = PyLong_FromVoidPtr(s.stream);
fail:
    tl_arg_release(&a);
    return ret;
}

static PyMethodDef methods[] = {
    {"device_count", py_device_count, METH_NOARGS, "CUDA devices visible (0 with no driver or GPU)."},
    {"device_name", py_device_name, METH_O, "device_name(index): the CUDA device's name."},
    {"work_stream_of", py_work_stream_of, METH_O,
     "work_stream_of(obj): the CUDA stream (cudaStream_t as an int; 0: the legacy default stream) that a "
     "kernel whose output (or x) is obj runs on, obj's producer asked as the kernels ask it; needs no GPU."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *mod)
{
    if (tl_module_init(mod, &cuda) < 0) return -1;
    /* linear_xent's workspace: XENT_WS_EXTRA + rows * (C + D + 1) float32 elements. */
    return PyModule_AddIntConstant(mod, "XENT_WS_EXTRA", TL_XENT_CUDA_WS_EXTRA);
}

static void
module_free(void *mod)
{
    module_state *ms = state_of((PyObject *)mod);
    if (!ms) return;
    for (int i = 0; i < ms->nctx; i++) tl_cuda_context_destroy(ms->ctx[i]);
    PyMem_Free(ms->ctx);
    ms->ctx = NULL;
    ms->nctx = 0;
    tl_module_free(mod);
}

TL_MODULE(_cuda, "tltorch._cuda", "tltorch's CUDA kernels.", module_state, methods, module_exec, module_free)
