/* cuda_module.c: tltorch._cuda, the CPython binding of the CUDA kernels.
 *
 * Like tltorch._C: tensors arrive as DLPack-capable objects (outputs and the cuBLAS workspace
 * included, allocated by the caller with torch), are checked with messages that name the argument,
 * and the kernel runs with the GIL released on one stream per call, decided by the reference argument
 * (the output, or x), which each binding imports first:
 *  - a torch tensor: torch's current stream for its device, asked through the DLPack exchange table
 *    (torch >= 2.9) or, without one, as torch.cuda.current_stream(device).cuda_stream; the caching
 *    allocator's reuse of outputs and workspaces is then ordered after the kernel;
 *  - another producer without the table (CuPy, ...): the legacy default stream, DLPack's default.
 * Every other argument's producer is asked for that stream (__dlpack__(stream=...)), so that it orders
 * its pending work before the kernel; bridge.c has the details. work_stream_of(obj) says the stream.
 * The per-device cuBLAS contexts are created on first use, never at import, so the module imports on a
 * machine without a GPU or a driver (device_count() is then 0). cuBLAS itself is not linked: the first
 * context opens the library (csrc/cuda/common.cu), so the module also imports where cuBLAS is missing,
 * and a GEMM there raises a RuntimeError that says how to install it. Positional arguments only:
 * tltorch/_ops.py is the one caller. */
#include "bridge.h" /* first: Python.h sets the feature macros */

#include <limits.h>
#include <math.h>

#define STR(x) #x
#define XSTR(x) STR(x)

typedef struct {
    tl_bridge bridge;
    tl_cuda_context **ctx; /* [nctx], one per device, each NULL until a call needs it */
    int nctx;
} module_state;

static module_state *
state_of(PyObject *mod)
{
    return (module_state *)PyModule_GetState(mod);
}

static tl_bridge *
bridge_of(PyObject *mod)
{
    return &state_of(mod)->bridge;
}

/* The parsing helpers below are tltorch._C's (module.c), kept in step by hand. */
static int
need_cuda(const tl_arg *a)
{
    if (a->t.device == TL_CUDA) return 0;
    PyErr_Format(PyExc_ValueError, "argument '%s' is on the CPU; tltorch._cuda runs on CUDA GPUs (CPU "
                 "tensors go to tltorch._C)", a->name);
    return -1;
}

/* Raise for `st`; CUDA and cuBLAS failures carry the runtime's own words, layout errors say what
 * the kernel can read. */
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

/* None, or NULL with raise_status's exception: a binding's last step. */
static PyObject *
finish(tl_status st, const char *op, const char *layout_hint)
{
    if (!st) return Py_NewRef(Py_None);
    raise_status(st, op, layout_hint);
    return NULL;
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

/* A CUDA tensor on the device of ref. */
static int
need_cuda_on(const tl_arg *a, const tl_arg *ref)
{
    return need_cuda(a) || tl_need_same_device(a, ref) ? -1 : 0;
}

/* The cuBLAS workspace argument: None, or a contiguous uint8 CUDA vector on ref's device starting on a
 * 256-byte boundary (an empty one is as None). */
static int
cublas_workspace(const tl_arg *ws, const tl_arg *ref, void **data, size_t *bytes)
{
    *data = NULL;
    *bytes = 0;
    if (!ws->via) return 0;
    if (need_cuda(ws) || tl_need_same_device(ws, ref) || tl_need_ndim(ws, 1) || tl_need_writable(ws)) return -1;
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
        *data = ws->t.data;
        *bytes = (size_t)ws->t.shape[0];
    }
    return 0;
}

/* gemm(a, b, c, bias, ws, alpha, beta, allow_tf32): c = alpha * a @ b + beta * c + bias, in place. */
static PyObject *
py_gemm(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = bridge_of(mod);
    tl_arg a = TL_ARG_INIT("a"), b = TL_ARG_INIT("b"), c = TL_ARG_INIT("c"), bias = TL_ARG_INIT("bias"),
           ws = TL_ARG_INIT("ws");
    PyObject *ret = NULL;
    tl_cuda_context *ctx = NULL;
    tl_stream s = {0};
    void *ws_data = NULL;
    size_t ws_bytes = 0;
    float alpha, beta;
    int tf32;
    tl_status st;

    if (tl_nargs_is(nargs, 8, "gemm(a, b, c, bias, ws, alpha, beta, allow_tf32)") < 0) return NULL;
    if (tl_get_float(args[5], "alpha", &alpha) < 0 || tl_get_float(args[6], "beta", &beta) < 0) return NULL;
    if ((tf32 = PyObject_IsTrue(args[7])) < 0) return NULL;
    /* c first: the output's producer decides the stream. */
    if (tl_arg_import_on(br, args[2], &c, &s) < 0 || tl_arg_import_on(br, args[0], &a, &s) < 0 ||
        tl_arg_import_on(br, args[1], &b, &s) < 0)
        goto fail;
    if (args[3] != Py_None && tl_arg_import_on(br, args[3], &bias, &s) < 0) goto fail;
    if (args[4] != Py_None && tl_arg_import_on(br, args[4], &ws, &s) < 0) goto fail;

    if (need_cuda(&c) || need_cuda_on(&a, &c) || need_cuda_on(&b, &c)) goto fail;
    if ((bias.via && need_cuda_on(&bias, &c)) || tl_check_gemm_args(&a, &b, &c, &bias) < 0) goto fail;
    if (cublas_workspace(&ws, &c, &ws_data, &ws_bytes) < 0) goto fail;
    if (context_for(mod, c.t.device_id, &ctx) < 0) goto fail;

    Py_BEGIN_ALLOW_THREADS
    st = tl_gemm_cuda(ctx, &a.t, &b.t, bias.via ? &bias.t : NULL, &c.t, alpha, beta, ws_data, ws_bytes,
                      tf32, s.stream);
    Py_END_ALLOW_THREADS
    ret = finish(st, "tltorch._cuda.gemm", "a and b each need a unit stride in one dim and a leading "
                 "dimension covering the other; c a unit stride in dim 1 and rows at least c.shape[1] apart");
fail:
    tl_arg_release(&a);
    tl_arg_release(&b);
    tl_arg_release(&c);
    tl_arg_release(&bias);
    tl_arg_release(&ws);
    return ret;
}

/* colsum(x, out, beta): out = beta * out + x.sum(0), in place. */
static PyObject *
py_colsum(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = bridge_of(mod);
    tl_arg x = TL_ARG_INIT("x"), out = TL_ARG_INIT("out");
    PyObject *ret = NULL;
    tl_stream s = {0};
    float beta;
    tl_status st;

    if (tl_nargs_is(nargs, 3, "colsum(x, out, beta)") < 0) return NULL;
    if (tl_get_float(args[2], "beta", &beta) < 0) return NULL;
    /* out first: the output's producer decides the stream. */
    if (tl_arg_import_on(br, args[1], &out, &s) < 0 || tl_arg_import_on(br, args[0], &x, &s) < 0) goto fail;
    if (need_cuda(&out) || need_cuda_on(&x, &out) || tl_check_colsum_args(&x, &out) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = tl_colsum_cuda(&x.t, &out.t, beta, s.stream);
    Py_END_ALLOW_THREADS
    ret = finish(st, "tltorch._cuda.colsum", NULL);
fail:
    tl_arg_release(&x);
    tl_arg_release(&out);
    return ret;
}

/* linear_xent(x, w, bias, target, class_weight, ignore_index, label_smoothing, reduction, grad_rows,
 *             loss, dx, dw, db, ws, cublas_ws, allow_tf32): the fused linear + cross-entropy head (tl.h),
 * in place; tltorch._C.linear_xent's checks and messages, with nthreads replaced by cuBLAS's workspace
 * (None or uint8, as gemm's) and allow_tf32. ws: float32, TL_XENT_CUDA_WS_EXTRA + rows * (C + D + 1).
 * reduction: 0 mean, 1 sum, 2 none. Optional tensors may be None. */
static PyObject *
py_linear_xent(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = bridge_of(mod);
    tl_arg x = TL_ARG_INIT("x"), w = TL_ARG_INIT("weight"), bias = TL_ARG_INIT("bias"),
           target = TL_ARG_INIT("target"), cw = TL_ARG_INIT("class_weight"),
           grow = TL_ARG_INIT("grad_rows"), loss = TL_ARG_INIT("loss"), dx = TL_ARG_INIT("dx"),
           dw = TL_ARG_INIT("dw"), db = TL_ARG_INIT("db"), ws = TL_ARG_INIT("ws"),
           cws = TL_ARG_INIT("cublas_ws");
    tl_arg *opt[] = {&bias, &cw, &grow, &loss, &dx, &dw, &db, &cws};
    const int opt_pos[] = {2, 4, 8, 9, 10, 11, 12, 14};
    PyObject *ret = NULL;
    tl_cuda_context *ctx = NULL;
    tl_stream s = {0};
    void *cws_data = NULL;
    size_t cws_bytes = 0;
    tl_xent_opts o;
    int tf32;
    int64_t bad = 0;
    tl_status st;

    if (tl_nargs_is(nargs, 16, "linear_xent(x, w, bias, target, class_weight, ignore_index, label_smoothing, "
                 "reduction, grad_rows, loss, dx, dw, db, ws, cublas_ws, allow_tf32)") < 0)
        return NULL;
    if (tl_get_xent_opts(args[5], args[6], args[7], &o) < 0) return NULL;
    if ((tf32 = PyObject_IsTrue(args[15])) < 0) return NULL;
    if (tl_arg_import_on(br, args[0], &x, &s) < 0 || tl_arg_import_on(br, args[1], &w, &s) < 0 ||
        tl_arg_import_on(br, args[3], &target, &s) < 0)
        goto fail;
    /* None is refused below with the size it needs (unlike tltorch._C, every C takes a workspace). */
    if (args[13] != Py_None && tl_arg_import_on(br, args[13], &ws, &s) < 0) goto fail;
    for (size_t k = 0; k < sizeof opt / sizeof *opt; k++)
        if (args[opt_pos[k]] != Py_None && tl_arg_import_on(br, args[opt_pos[k]], opt[k], &s) < 0) goto fail;

    if (need_cuda(&x) || need_cuda_on(&w, &x) || need_cuda_on(&target, &x) || (ws.via && need_cuda_on(&ws, &x)))
        goto fail;
    for (size_t k = 0; k < sizeof opt / sizeof *opt; k++)
        if (opt[k]->via && need_cuda_on(opt[k], &x)) goto fail;
    if (tl_check_xent_args(&x, &w, &bias, &target, &cw, &grow, &loss, &dx, &dw, &db, o.reduction, 1) < 0 ||
        (ws.via && tl_need_ndim(&ws, 1)))
        goto fail;
    const int64_t N = x.t.shape[0], D = x.t.shape[1], C = w.t.shape[0];
    if (!ws.via || ws.t.dtype != TL_FLOAT32 || (ws.t.strides[0] != 1 && ws.t.shape[0] > 1) ||
        (N > 0 && ws.t.shape[0] < TL_XENT_CUDA_WS_EXTRA + C + D + 1) || tl_need_writable(&ws)) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at least "
                         "%d + C + D + 1 = %lld elements (on CUDA for any number of classes)",
                         TL_XENT_CUDA_WS_EXTRA, (long long)(TL_XENT_CUDA_WS_EXTRA + C + D + 1));
        goto fail;
    }
    if (cublas_workspace(&cws, &x, &cws_data, &cws_bytes) < 0) goto fail;
    if (context_for(mod, x.t.device_id, &ctx) < 0) goto fail;

    Py_BEGIN_ALLOW_THREADS
    st = tl_linear_xent_cuda(ctx, &x.t, &w.t, bias.via ? &bias.t : NULL, &target.t, cw.via ? &cw.t : NULL, &o,
                             grow.via ? &grow.t : NULL, loss.via ? &loss.t : NULL, dx.via ? &dx.t : NULL,
                             dw.via ? &dw.t : NULL, db.via ? &db.t : NULL, &ws.t, cws_data, cws_bytes, tf32,
                             &bad, s.stream);
    Py_END_ALLOW_THREADS
    if (st == TL_ERR_INDEX) {
        PyErr_Format(PyExc_ValueError, "target holds class index %lld, outside [0, %lld) and not "
                     "ignore_index (%lld)", (long long)bad, (long long)C, (long long)o.ignore_index);
        goto fail;
    }
    if (st == TL_ERR_DTYPE && dw.via && dw.t.dtype != TL_FLOAT32) {
        PyErr_SetString(PyExc_TypeError, "argument 'dw' must be float32 with this workspace: chunks of rows add "
                        "up into it (xent_workspace says when it may be in x's dtype)");
        goto fail;
    }
    ret = finish(st, "tltorch._cuda.linear_xent", "x and weight each need a unit stride in one dim and a "
                 "leading dimension covering the other; dx and dw a unit stride in dim 1 and rows at least "
                 "as far apart as they are long");
fail:
    tl_arg_release(&x);
    tl_arg_release(&w);
    tl_arg_release(&target);
    tl_arg_release(&ws);
    for (size_t k = 0; k < sizeof opt / sizeof *opt; k++) tl_arg_release(opt[k]);
    return ret;
}

/* ---- LoRA, dropout, pooling, AdamW ------------------------------------------------------------------ */

/* The LoRA workspace: None when need == 0, else a contiguous float32 CUDA vector on x's device of at
 * least `need` elements (lora.cu's use: the dropped x, sv; the CPU's larger sizes do too). */
static int
lora_workspace(const tl_arg *ws, const tl_arg *x, int64_t need)
{
    if (!ws->via) {
        if (need == 0) return 0;
        PyErr_Format(PyExc_ValueError, "argument 'ws' is required: a contiguous float32 vector of at least %lld "
                     "elements", (long long)need);
        return -1;
    }
    if (need_cuda_on(ws, x) || tl_need_ndim(ws, 1)) return -1;
    if (ws->t.dtype != TL_FLOAT32 || (ws->t.strides[0] != 1 && ws->t.shape[0] > 1) || ws->t.shape[0] < need) {
        PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at least %lld "
                     "elements", (long long)need);
        return -1;
    }
    return need > 0 ? tl_need_writable(ws) : 0;
}

#define LORA_LAYOUT_HINT                                                                                 \
    "x, w, a, b and dy each need a unit stride in one dim and a leading dimension covering the other; y, " \
    "su, dx, da and db a unit stride in dim 1 and rows at least as far apart as they are long"

/* What lora_forward and lora_backward take alike besides their tensors, and where they run. */
typedef struct {
    float scale, p;
    uint64_t seed;
    int tf32;
    tl_cuda_context *ctx;
    tl_stream s;
    void *cws_data;
    size_t cws_bytes;
} lora_call;

/* scale, p, seed from args[0..2]; allow_tf32 from tf32. */
static int
lora_scalars(PyObject *const *args, PyObject *tf32, lora_call *c)
{
    if (tl_get_float(args[0], "scale", &c->scale) < 0 || tl_get_dropout(args[1], &c->p) < 0 ||
        tl_get_seed(args[2], &c->seed) < 0)
        return -1;
    return (c->tf32 = PyObject_IsTrue(tf32)) < 0 ? -1 : 0;
}

/* req[k] from args[req_pos[k]], opt[k] from args[opt_pos[k]] unless None, for a call on c->s; req[0] is
 * x, whose producer decides that stream. Then every tensor on x's GPU but the last two of opt (ws and
 * cublas_ws: their checks come with their sizes). */
static int
lora_import(PyObject *mod, PyObject *const *args, tl_arg *const *req, const int *req_pos, size_t nreq,
            tl_arg *const *opt, const int *opt_pos, size_t nopt, lora_call *c)
{
    tl_bridge *br = bridge_of(mod);
    const tl_arg *x = req[0];
    for (size_t k = 0; k < nreq; k++)
        if (tl_arg_import_on(br, args[req_pos[k]], req[k], &c->s) < 0) return -1;
    for (size_t k = 0; k < nopt; k++)
        if (args[opt_pos[k]] != Py_None && tl_arg_import_on(br, args[opt_pos[k]], opt[k], &c->s) < 0) return -1;
    if (need_cuda(x)) return -1;
    for (size_t k = 0; k < nreq; k++)
        if (req[k] != x && need_cuda_on(req[k], x)) return -1;
    for (size_t k = 0; k + 2 < nopt; k++)
        if (opt[k]->via && need_cuda_on(opt[k], x)) return -1;
    return 0;
}

/* The workspaces (ws of `need` float32 elements, cws cuBLAS's) and x's device's context. */
static int
lora_setup(PyObject *mod, const tl_arg *x, const tl_arg *ws, int64_t need, const tl_arg *cws, lora_call *c)
{
    if (lora_workspace(ws, x, need) < 0 || cublas_workspace(cws, x, &c->cws_data, &c->cws_bytes) < 0) return -1;
    return context_for(mod, x->t.device_id, &c->ctx);
}

#define COUNT(arr) (sizeof(arr) / sizeof *(arr))

/* dropout(x, out, p, seed): out = dropout(x) (tl.h's mask), in place, on the current stream. */
static PyObject *
py_dropout(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = bridge_of(mod);
    tl_arg x = TL_ARG_INIT("x"), out = TL_ARG_INIT("out");
    PyObject *ret = NULL;
    tl_stream s = {0};
    float p;
    uint64_t seed;
    tl_status st;

    if (tl_nargs_is(nargs, 4, "dropout(x, out, p, seed)") < 0) return NULL;
    if (tl_get_dropout(args[2], &p) < 0 || tl_get_seed(args[3], &seed) < 0) return NULL;
    if (tl_arg_import_on(br, args[0], &x, &s) < 0 || tl_arg_import_on(br, args[1], &out, &s) < 0) goto fail;
    if (need_cuda(&x) || need_cuda_on(&out, &x) || tl_check_dropout_args(&x, &out) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = tl_dropout_cuda(&x.t, &out.t, p, seed, s.stream);
    Py_END_ALLOW_THREADS
    ret = finish(st, "tltorch._cuda.dropout", NULL);
fail:
    tl_arg_release(&x);
    tl_arg_release(&out);
    return ret;
}

/* lora_forward(x, w, bias, a, b, scale, p, seed, y, su, ws, cublas_ws, allow_tf32): su = scale *
 * dropout(x) a^T, y = x w^T + bias + su b^T, in place. bias, ws, cublas_ws may be None. */
static PyObject *
py_lora_forward(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg x = TL_ARG_INIT("x"), w = TL_ARG_INIT("w"), bias = TL_ARG_INIT("bias"), a = TL_ARG_INIT("a"),
           b = TL_ARG_INIT("b"), y = TL_ARG_INIT("y"), su = TL_ARG_INIT("su"), ws = TL_ARG_INIT("ws"),
           cws = TL_ARG_INIT("cublas_ws");
    tl_arg *req[] = {&x, &w, &a, &b, &y, &su}, *opt[] = {&bias, &ws, &cws};
    const int req_pos[] = {0, 1, 3, 4, 8, 9}, opt_pos[] = {2, 10, 11};
    PyObject *ret = NULL;
    lora_call c = {0};
    tl_status st;

    if (tl_nargs_is(nargs, 13, "lora_forward(x, w, bias, a, b, scale, p, seed, y, su, ws, cublas_ws, "
                    "allow_tf32)") < 0 ||
        lora_scalars(args + 5, args[12], &c) < 0)
        return NULL;
    if (lora_import(mod, args, req, req_pos, COUNT(req), opt, opt_pos, COUNT(opt), &c) < 0 ||
        tl_check_lora_forward_args(&x, &w, &bias, &a, &b, &y, &su) < 0)
        goto fail;
    const int64_t N = x.t.shape[0], in = x.t.shape[1];
    if (lora_setup(mod, &x, &ws, c.p > 0.0f ? N * in : 0, &cws, &c) < 0) goto fail;

    Py_BEGIN_ALLOW_THREADS
    st = tl_lora_forward_cuda(c.ctx, &x.t, &w.t, bias.via ? &bias.t : NULL, &a.t, &b.t, c.scale, c.p, c.seed, &y.t,
                              &su.t, ws.via ? &ws.t : NULL, c.cws_data, c.cws_bytes, c.tf32, c.s.stream);
    Py_END_ALLOW_THREADS
    ret = finish(st, "tltorch._cuda.lora_forward", LORA_LAYOUT_HINT);
fail:
    for (size_t k = 0; k < COUNT(req); k++) tl_arg_release(req[k]);
    for (size_t k = 0; k < COUNT(opt); k++) tl_arg_release(opt[k]);
    return ret;
}

/* lora_backward(dy, x, w, a, b, su, scale, p, seed, dx, da, db, ws, cublas_ws, allow_tf32): the LoRA
 * layer's gradients (dx of x's dtype, da and db float32), in place; each of dx, da, db may be None (not
 * wanted), and so may ws when nothing needs it and cublas_ws. */
static PyObject *
py_lora_backward(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg dy = TL_ARG_INIT("dy"), x = TL_ARG_INIT("x"), w = TL_ARG_INIT("w"), a = TL_ARG_INIT("a"),
           b = TL_ARG_INIT("b"), su = TL_ARG_INIT("su"), dx = TL_ARG_INIT("dx"), da = TL_ARG_INIT("da"),
           db = TL_ARG_INIT("db"), ws = TL_ARG_INIT("ws"), cws = TL_ARG_INIT("cublas_ws");
    tl_arg *req[] = {&x, &dy, &w, &a, &b, &su}, *opt[] = {&dx, &da, &db, &ws, &cws};
    const int req_pos[] = {1, 0, 2, 3, 4, 5}, opt_pos[] = {9, 10, 11, 12, 13};
    PyObject *ret = NULL;
    lora_call c = {0};
    tl_status st;

    if (tl_nargs_is(nargs, 15, "lora_backward(dy, x, w, a, b, su, scale, p, seed, dx, da, db, ws, cublas_ws, "
                    "allow_tf32)") < 0 ||
        lora_scalars(args + 6, args[14], &c) < 0)
        return NULL;
    if (lora_import(mod, args, req, req_pos, COUNT(req), opt, opt_pos, COUNT(opt), &c) < 0 ||
        tl_check_lora_backward_args(&dy, &x, &w, &a, &b, &su, &dx, &da, &db) < 0)
        goto fail;
    /* sv (N x r) when dx or da is wanted, and the dropped x (N x in) for da. */
    const int64_t N = x.t.shape[0], in = x.t.shape[1], r = a.t.shape[0];
    const int64_t need = (dx.via || da.via ? N * r : 0) + (da.via && c.p > 0.0f ? N * in : 0);
    if (lora_setup(mod, &x, &ws, need, &cws, &c) < 0) goto fail;

    Py_BEGIN_ALLOW_THREADS
    st = tl_lora_backward_cuda(c.ctx, &dy.t, &x.t, &w.t, &a.t, &b.t, &su.t, c.scale, c.p, c.seed,
                               dx.via ? &dx.t : NULL, da.via ? &da.t : NULL, db.via ? &db.t : NULL,
                               ws.via ? &ws.t : NULL, c.cws_data, c.cws_bytes, c.tf32, c.s.stream);
    Py_END_ALLOW_THREADS
    ret = finish(st, "tltorch._cuda.lora_backward", LORA_LAYOUT_HINT);
fail:
    for (size_t k = 0; k < COUNT(req); k++) tl_arg_release(req[k]);
    for (size_t k = 0; k < COUNT(opt); k++) tl_arg_release(opt[k]);
    return ret;
}

/* pool(h, mask, mode, out): out[b] = the CLS token (mode 0), the masked mean (1) or max (2) of h[b], in
 * place; mask may be None. */
static PyObject *
py_pool(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = bridge_of(mod);
    tl_arg h = TL_ARG_INIT("h"), mask = TL_ARG_INIT("mask"), out = TL_ARG_INIT("out");
    PyObject *ret = NULL;
    tl_stream s = {0};
    int mode;
    tl_status st;

    if (tl_nargs_is(nargs, 4, "pool(h, mask, mode, out)") < 0 || tl_get_pool_mode(args[2], &mode) < 0) return NULL;
    if (tl_arg_import_on(br, args[0], &h, &s) < 0 || tl_arg_import_on(br, args[3], &out, &s) < 0) goto fail;
    if (args[1] != Py_None && tl_arg_import_on(br, args[1], &mask, &s) < 0) goto fail;
    if (need_cuda(&h) || need_cuda_on(&out, &h) || (mask.via && need_cuda_on(&mask, &h))) goto fail;
    if (tl_check_pool_args(&h, &mask, &out, mode) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = tl_pool_cuda(&h.t, mask.via ? &mask.t : NULL, mode, &out.t, s.stream);
    Py_END_ALLOW_THREADS
    ret = finish(st, "tltorch._cuda.pool", NULL);
fail:
    tl_arg_release(&h);
    tl_arg_release(&mask);
    tl_arg_release(&out);
    return ret;
}

/* adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step): one AdamW step, in
 * place (torch.optim.AdamW's formula; float32 states). */
static PyObject *
py_adamw(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = bridge_of(mod);
    tl_arg param = TL_ARG_INIT("param"), grad = TL_ARG_INIT("grad"), m = TL_ARG_INIT("exp_avg"),
           v = TL_ARG_INIT("exp_avg_sq");
    tl_arg *ts[] = {&param, &grad, &m, &v};
    PyObject *ret = NULL;
    tl_stream s = {0};
    tl_adamw_opts o;
    tl_status st;

    if (tl_nargs_is(nargs, 10, "adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, "
                    "step)") < 0)
        return NULL;
    if (tl_get_adamw_opts(args + 4, &o) < 0) return NULL;
    for (size_t k = 0; k < COUNT(ts); k++)
        if (tl_arg_import_on(br, args[k], ts[k], &s) < 0) goto fail;
    if (need_cuda(&param)) goto fail;
    for (size_t k = 1; k < COUNT(ts); k++)
        if (need_cuda_on(ts[k], &param)) goto fail;
    if (tl_check_adamw_args(&param, &grad, &m, &v) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = tl_adamw_cuda(&param.t, &grad.t, &m.t, &v.t, &o, s.stream);
    Py_END_ALLOW_THREADS
    ret = finish(st, "tltorch._cuda.adamw", NULL);
fail:
    for (size_t k = 0; k < COUNT(ts); k++) tl_arg_release(ts[k]);
    return ret;
}

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
    if (tl_arg_import_on(bridge_of(mod), obj, &a, &s) < 0 || need_cuda(&a) < 0) goto fail;
    ret = PyLong_FromVoidPtr(s.stream);
fail:
    tl_arg_release(&a);
    return ret;
}

/* xent_workspace(N, D, C, dx_acc, budget) -> (floats, dw_narrow): linear_xent's workspace for these sizes
 * within budget float32 elements where it can, and whether dw may then be in x's dtype (tl.h). */
static PyObject *
py_xent_workspace(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    long long v[5];
    if (tl_nargs_is(nargs, 5, "xent_workspace(N, D, C, dx_acc, budget)") < 0) return NULL;
    for (int k = 0; k < 5; k++) {
        v[k] = PyLong_AsLongLong(args[k]);
        if (v[k] == -1 && PyErr_Occurred()) return NULL;
        if (v[k] < 0) {
            PyErr_SetString(PyExc_ValueError, "xent_workspace: sizes must be >= 0");
            return NULL;
        }
    }
    if (v[2] < 1 || v[4] < 1) {
        PyErr_SetString(PyExc_ValueError, "xent_workspace: C and budget must be >= 1");
        return NULL;
    }
    int narrow = 0;
    const int64_t n = tl_xent_cuda_workspace(v[0], v[1], v[2], v[3] != 0, v[4], &narrow);
    return Py_BuildValue("(LO)", (long long)n, narrow ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"gemm", (PyCFunction)(void (*)(void))py_gemm, METH_FASTCALL,
     "gemm(a, b, c, bias, ws, alpha, beta, allow_tf32): c = alpha*a@b + beta*c + bias, in place, with "
     "cuBLAS on the current stream; ws: a uint8 CUDA tensor for cuBLAS's workspace, or None."},
    {"colsum", (PyCFunction)(void (*)(void))py_colsum, METH_FASTCALL,
     "colsum(x, out, beta): out = beta*out + x.sum(0), in place, on the current stream."},
    {"linear_xent", (PyCFunction)(void (*)(void))py_linear_xent, METH_FASTCALL,
     "linear_xent(x, w, bias, target, class_weight, ignore_index, label_smoothing, reduction, grad_rows, "
     "loss, dx, dw, db, ws, cublas_ws, allow_tf32): the fused linear + cross-entropy head, in place, on "
     "the current stream; ws: float32 of " XSTR(TL_XENT_CUDA_WS_EXTRA) " + rows * (C + D + 1) elements."},
    {"xent_workspace", (PyCFunction)(void (*)(void))py_xent_workspace, METH_FASTCALL,
     "xent_workspace(N, D, C, dx_acc, budget) -> (floats, dw_narrow): linear_xent's float32 workspace for "
     "these sizes within budget elements where it can (the whole batch, else blocks of classes, else "
     "chunks of rows), and whether dw may then be in x's dtype; dx_acc: dx is bfloat16/float16."},
    {"dropout", (PyCFunction)(void (*)(void))py_dropout, METH_FASTCALL,
     "dropout(x, out, p, seed): out = dropout(x) with the counter-based mask of tl.h (element i*D + k of x "
     "(N, D) kept iff hash(seed, i*D + k) >= p * 2**32, kept elements scaled by 1/(1-p)), in place, on the "
     "current stream; the CPU kernel drops the same elements."},
    {"lora_forward", (PyCFunction)(void (*)(void))py_lora_forward, METH_FASTCALL,
     "lora_forward(x, w, bias, a, b, scale, p, seed, y, su, ws, cublas_ws, allow_tf32): su = scale * "
     "dropout(x) a^T and y = x w^T + bias + su b^T, in place, on the current stream; ws: float32 of "
     "N*in elements when p > 0 (else None)."},
    {"lora_backward", (PyCFunction)(void (*)(void))py_lora_backward, METH_FASTCALL,
     "lora_backward(dy, x, w, a, b, su, scale, p, seed, dx, da, db, ws, cublas_ws, allow_tf32): the LoRA "
     "layer's dx (x's dtype), da and db (float32), each None when not wanted, in place, on the current "
     "stream; ws: float32 of N*r elements when dx or da is wanted, plus N*in for da when p > 0."},
    {"pool", (PyCFunction)(void (*)(void))py_pool, METH_FASTCALL,
     "pool(h, mask, mode, out): out[b] = h[b, 0] (mode 0), or the mean (1) or max (2) of h[b, t] over the "
     "tokens whose mask is nonzero (all when mask is None), in place, on the current stream."},
    {"adamw", (PyCFunction)(void (*)(void))py_adamw, METH_FASTCALL,
     "adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step): one "
     "torch.optim.AdamW step, in place, on the current stream (float32 states and math)."},
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
    if (tl_bridge_init(bridge_of(mod)) < 0) return -1;
    /* linear_xent's workspace: XENT_WS_EXTRA + rows * (C + D + 1) float32 elements. */
    if (PyModule_AddIntConstant(mod, "XENT_WS_EXTRA", TL_XENT_CUDA_WS_EXTRA) < 0) return -1;
    return 0;
}

static int
module_traverse(PyObject *mod, visitproc visit, void *arg)
{
    return tl_bridge_traverse(bridge_of(mod), visit, arg);
}

static int
module_clear(PyObject *mod)
{
    tl_bridge_clear(bridge_of(mod));
    return 0;
}

static void
module_free(void *mod)
{
    module_state *ms = state_of((PyObject *)mod);
    if (!ms) return;
    module_clear((PyObject *)mod);
    for (int i = 0; i < ms->nctx; i++) tl_cuda_context_destroy(ms->ctx[i]);
    PyMem_Free(ms->ctx);
    ms->ctx = NULL;
    ms->nctx = 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "tltorch._cuda", "tltorch's CUDA kernels.", sizeof(module_state), methods,
    slots, module_traverse, module_clear, module_free,
};

PyMODINIT_FUNC
PyInit__cuda(void)
{
    return PyModuleDef_Init(&moduledef);
}
