/* bind_lora.c: the LoRA family, dropout, lora_forward and lora_backward (csrc/cpu/lora.c, csrc/cuda/lora.cu),
 * for tltorch._C and tltorch._cuda, and tltorch._C's lora_workspace (the workspace its kernels ask for). */
#include "bind.h"

#define LAYOUT_HINT                                                                                         \
    "x, w, a, b and dy each need a unit stride in one dim and a leading dimension covering the other; y, su, " \
    "dx, da and db a unit stride in dim 1 and rows at least as far apart as they are long"

/* seed: an int in [0, 2**64). */
static int
get_seed(PyObject *o, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "argument 'seed' must be an int, not %.200s", Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "argument 'seed' must be in [0, 2**64)");
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* p: a dropout probability in [0, 1). */
static int
get_dropout(PyObject *o, float *out)
{
    if (tl_get_float(o, "p", out) < 0) return -1;
    if (!(*out >= 0.0f && *out < 1.0f)) {
        PyErr_SetString(PyExc_ValueError, "argument 'p' (the dropout probability) must be in [0, 1)");
        return -1;
    }
    return 0;
}

/* What lora_forward and lora_backward take alike besides tensors. */
typedef struct {
    float scale, p;
    uint64_t seed;
} lora_opts;

/* A LoRA call of n arguments of its own (sig, as tl_call_begin's), scale, p and seed at args[at..at+2]. */
static int
lora_begin(tl_call *k, PyObject *mod, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t n, const char *sig, int at,
           lora_opts *o)
{
    if (tl_call_begin(k, mod, args, nargs, n, TL_TAIL_CUBLAS, sig) < 0) return -1;
    if (tl_get_float(args[at], "scale", &o->scale) < 0 || get_dropout(args[at + 1], &o->p) < 0 ||
        get_seed(args[at + 2], &o->seed) < 0)
        return -1;
    return tl_call_tail(k);
}

/* The float32 workspace of `need` elements: tl.h's sizes on the CPU; lora.cu's on CUDA, smaller (cuBLAS keeps
 * the partial sums), and there a workspace is checked even when none is needed. */
static int
check_ws(tl_call *k, const tl_arg *ws, int64_t need)
{
    const tl_tensor *t = &ws->t;
    if (k->dev->device == TL_CPU) {
        if (need == 0) return 0;
        if (ws->via && (tl_check_ndim(t, 1, &k->why) || tl_check_writable(t, &k->why))) return tl_raise_check(&k->why);
        if (ws->via && t->dtype == TL_FLOAT32 && t->strides[0] == 1 && t->shape[0] >= need) return 0;
    } else {
        if (!ws->via) {
            if (need == 0) return 0;
            PyErr_Format(PyExc_ValueError, "argument 'ws' is required: a contiguous float32 vector of at least %lld "
                         "elements", (long long)need);
            return -1;
        }
        if (tl_check_ndim(t, 1, &k->why)) return tl_raise_check(&k->why);
        if (t->dtype == TL_FLOAT32 && (t->strides[0] == 1 || t->shape[0] <= 1) && t->shape[0] >= need)
            return need > 0 && tl_check_writable(t, &k->why) ? tl_raise_check(&k->why) : 0;
    }
    PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at least %lld elements",
                 (long long)need);
    return -1;
}

PyDoc_STRVAR(dropout_cpu_doc, "dropout(x, out, p, seed, nthreads): out = dropout(x) with the mask drawn from seed.");
PyDoc_STRVAR(dropout_cuda_doc, "dropout(x, out, p, seed): out = dropout(x) with the counter-based mask of tl.h "
             "(element i*D + k of x (N, D) kept iff hash(seed, i*D + k) >= p * 2**32, kept elements scaled by "
             "1/(1-p)), in place, on the current stream; the CPU kernel drops the same elements.");

static PyObject *
py_dropout(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg x = TL_ARG_INIT("x"), out = TL_ARG_INIT("out");
    tl_arg *t[] = {&x, &out};
    static const int pos[] = {0, 1};
    tl_call k;
    float p;
    uint64_t seed;
    tl_status st = TL_RAISED;

    if (tl_call_begin(&k, mod, args, nargs, 4, TL_TAIL_NONE, "dropout(x, out, p, seed") < 0) return NULL;
    if (get_dropout(args[2], &p) < 0 || get_seed(args[3], &seed) < 0 || tl_call_tail(&k) < 0) return NULL;
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 2) < 0 || tl_call_check(&k, tl_check_dropout(&x.t, &out.t, &k.why)) < 0)
        goto end;
    Py_BEGIN_ALLOW_THREADS
    st = k.dev->device == TL_CPU ? k.dev->cpu.dropout(&x.t, &out.t, p, seed, k.nthreads)
                                 : k.dev->cuda.dropout(&x.t, &out.t, p, seed, k.s.stream);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "dropout", NULL);
}

PyDoc_STRVAR(lora_forward_cpu_doc, "lora_forward(x, w, bias, a, b, scale, p, seed, y, su, ws, nthreads): y = x w^T "
             "+ bias + su b^T with su = scale * dropout(x) a^T, in place.");
PyDoc_STRVAR(lora_forward_cuda_doc, "lora_forward(x, w, bias, a, b, scale, p, seed, y, su, ws, cublas_ws, "
             "allow_tf32): su = scale * dropout(x) a^T and y = x w^T + bias + su b^T, in place, on the current "
             "stream; ws: float32 of N*in elements when p > 0 (else None).");

/* bias and ws may be None. */
static PyObject *
py_lora_forward(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg x = TL_ARG_INIT("x"), w = TL_ARG_INIT("w"), bias = TL_ARG_INIT("bias"), a = TL_ARG_INIT("a"),
           b = TL_ARG_INIT("b"), y = TL_ARG_INIT("y"), su = TL_ARG_INIT("su"), ws = TL_ARG_INIT("ws");
    tl_arg *t[] = {&x, &w, &a, &b, &y, &su, &bias, &ws};
    static const int pos[] = {0, 1, 3, 4, 8, 9, 2, 10};
    tl_call k;
    lora_opts o;
    tl_status st = TL_RAISED;

    if (lora_begin(&k, mod, args, nargs, 11, "lora_forward(x, w, bias, a, b, scale, p, seed, y, su, ws", 5, &o) < 0)
        return NULL;
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 6) < 0 ||
        tl_call_check(&k, tl_check_lora_forward(&x.t, &w.t, tl_opt(&bias), &a.t, &b.t, &y.t, &su.t, &k.why)) < 0)
        goto end;
    const int cpu = k.dev->device == TL_CPU;
    const int64_t N = x.t.shape[0], in = x.t.shape[1], out = w.t.shape[0], r = a.t.shape[0];
    const int64_t need = cpu ? tl_lora_forward_ws(N, in, out, r, o.p, x.t.dtype) : o.p > 0.0f ? N * in : 0;
    if (check_ws(&k, &ws, need) < 0 || tl_call_cublas(&k, &k.cws, &x) < 0) goto end;

    Py_BEGIN_ALLOW_THREADS
    if (cpu)
        st = k.dev->cpu.lora_forward(&x.t, &w.t, tl_opt(&bias), &a.t, &b.t, o.scale, o.p, o.seed, &y.t, &su.t,
                                     tl_opt(&ws), k.nthreads);
    else
        st = k.dev->cuda.lora_forward(k.ctx, &x.t, &w.t, tl_opt(&bias), &a.t, &b.t, o.scale, o.p, o.seed, &y.t, &su.t,
                                      tl_opt(&ws), k.cws_data, k.cws_bytes, k.tf32, k.s.stream);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "lora_forward", LAYOUT_HINT);
}

PyDoc_STRVAR(lora_backward_cpu_doc, "lora_backward(dy, x, w, a, b, su, scale, p, seed, dx, da, db, ws, nthreads): "
             "the LoRA layer's gradients (dx, da, db may be None), in place.");
PyDoc_STRVAR(lora_backward_cuda_doc, "lora_backward(dy, x, w, a, b, su, scale, p, seed, dx, da, db, ws, cublas_ws, "
             "allow_tf32): the LoRA layer's dx (x's dtype), da and db (float32), each None when not wanted, in "
             "place, on the current stream; ws: float32 of N*r elements when dx or da is wanted, plus N*in for da "
             "when p > 0.");

/* Each of dx, da, db may be None (not wanted), and so may ws when nothing needs it. */
static PyObject *
py_lora_backward(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg dy = TL_ARG_INIT("dy"), x = TL_ARG_INIT("x"), w = TL_ARG_INIT("w"), a = TL_ARG_INIT("a"),
           b = TL_ARG_INIT("b"), su = TL_ARG_INIT("su"), dx = TL_ARG_INIT("dx"), da = TL_ARG_INIT("da"),
           db = TL_ARG_INIT("db"), ws = TL_ARG_INIT("ws");
    tl_arg *t[] = {&x, &dy, &w, &a, &b, &su, &dx, &da, &db, &ws}; /* x first: its producer decides the stream */
    static const int pos[] = {1, 0, 2, 3, 4, 5, 9, 10, 11, 12};
    tl_call k;
    lora_opts o;
    tl_status st = TL_RAISED;

    if (lora_begin(&k, mod, args, nargs, 13, "lora_backward(dy, x, w, a, b, su, scale, p, seed, dx, da, db, ws", 6,
                   &o) < 0)
        return NULL;
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 6) < 0 ||
        tl_call_check(&k, tl_check_lora_backward(&dy.t, &x.t, &w.t, &a.t, &b.t, &su.t, tl_opt(&dx), tl_opt(&da),
                                                 tl_opt(&db), &k.why)) < 0)
        goto end;
    const int cpu = k.dev->device == TL_CPU;
    const int64_t N = x.t.shape[0], in = x.t.shape[1], out = w.t.shape[0], r = a.t.shape[0];
    /* CUDA: sv (N x r) when dx or da is wanted, and the dropped x (N x in) for da */
    const int64_t need = cpu ? tl_lora_backward_ws(N, in, out, r, o.p, x.t.dtype, dx.via != 0, da.via != 0)
                             : (dx.via || da.via ? N * r : 0) + (da.via && o.p > 0.0f ? N * in : 0);
    if (check_ws(&k, &ws, need) < 0 || tl_call_cublas(&k, &k.cws, &x) < 0) goto end;

    Py_BEGIN_ALLOW_THREADS
    if (cpu)
        st = k.dev->cpu.lora_backward(&dy.t, &x.t, &w.t, &a.t, &b.t, &su.t, o.scale, o.p, o.seed, tl_opt(&dx),
                                      tl_opt(&da), tl_opt(&db), tl_opt(&ws), k.nthreads);
    else
        st = k.dev->cuda.lora_backward(k.ctx, &dy.t, &x.t, &w.t, &a.t, &b.t, &su.t, o.scale, o.p, o.seed, tl_opt(&dx),
                                       tl_opt(&da), tl_opt(&db), tl_opt(&ws), k.cws_data, k.cws_bytes, k.tf32,
                                       k.s.stream);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "lora_backward", LAYOUT_HINT);
}

PyDoc_STRVAR(lora_workspace_doc, "lora_workspace(kind, N, in, out, r, p, float32, want_dx, want_da): float32 "
             "elements of workspace the LoRA forward (kind 0) or backward (kind 1) needs.");

/* float32 says whether x is float32. */
static PyObject *
py_lora_workspace(PyObject *mod, PyObject *args)
{
    int kind, f32, want_dx, want_da;
    long long N, in, out, r;
    float p;
    if (!PyArg_ParseTuple(args, "iLLLLfppp", &kind, &N, &in, &out, &r, &p, &f32, &want_dx, &want_da)) return NULL;
    if (N < 0 || in < 0 || out < 0 || r < 0) {
        PyErr_SetString(PyExc_ValueError, "sizes must be >= 0");
        return NULL;
    }
    const tl_dtype dt = f32 ? TL_FLOAT32 : TL_BFLOAT16;
    return PyLong_FromLongLong(kind == 0 ? tl_lora_forward_ws(N, in, out, r, p, dt)
                                         : tl_lora_backward_ws(N, in, out, r, p, dt, want_dx, want_da));
}

const tl_family tl_lora_family = {
    .cpu = (PyMethodDef[]){{"lora_workspace", py_lora_workspace, METH_VARARGS, lora_workspace_doc},
                           TL_METHOD("dropout", py_dropout, dropout_cpu_doc),
                           TL_METHOD("lora_forward", py_lora_forward, lora_forward_cpu_doc),
                           TL_METHOD("lora_backward", py_lora_backward, lora_backward_cpu_doc), {NULL}},
    .cuda = (PyMethodDef[]){TL_METHOD("dropout", py_dropout, dropout_cuda_doc),
                            TL_METHOD("lora_forward", py_lora_forward, lora_forward_cuda_doc),
                            TL_METHOD("lora_backward", py_lora_backward, lora_backward_cuda_doc), {NULL}},
};
