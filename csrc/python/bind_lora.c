/* bind_lora.c: tltorch._C's LoRA kernels (csrc/cpu/lora.c): dropout, lora_forward, lora_backward.
 * Positional arguments, outputs and workspaces allocated by the caller (tltorch/_ops.py). */
#include "bridge.h" /* first: it brings Python.h */

static int
check_ws(const tl_arg *ws, int64_t need)
{
    if (need == 0) return 0;
    if (ws->via && !tl_need_cpu(ws) && !tl_need_ndim(ws, 1) && !tl_need_writable(ws) &&
        ws->t.dtype == TL_FLOAT32 && ws->t.strides[0] == 1 && ws->t.shape[0] >= need)
        return 0;
    if (!PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at least %lld "
                     "elements", (long long)need);
    return -1;
}

/* dropout(x, out, p, seed, nthreads): out = dropout(x), the mask drawn from seed (tl.h). */
static PyObject *
py_dropout(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg x = TL_ARG_INIT("x"), out = TL_ARG_INIT("out");
    PyObject *ret = NULL;
    float p;
    uint64_t seed;
    int nthreads;
    tl_status st;
    if (tl_nargs_is(nargs, 5, "dropout(x, out, p, seed, nthreads)") < 0) return NULL;
    if (tl_get_dropout(args[2], &p) < 0 || tl_get_seed(args[3], &seed) < 0 || tl_get_threads(args[4], &nthreads) < 0)
        return NULL;
    if (tl_arg_import(tl_cpu_bridge(mod), args[0], &x) < 0 || tl_arg_import(tl_cpu_bridge(mod), args[1], &out) < 0)
        goto fail;
    if (tl_need_cpu(&x) || tl_need_cpu(&out) || tl_check_dropout_args(&x, &out) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = tl_dropout_cpu(&x.t, &out.t, p, seed, nthreads);
    Py_END_ALLOW_THREADS
    ret = st ? tl_raise_status(st, "tltorch._C.dropout") : Py_NewRef(Py_None);
fail:
    tl_arg_release(&x);
    tl_arg_release(&out);
    return ret;
}

/* lora_forward(x, w, bias, a, b, scale, p, seed, y, su, ws, nthreads) */
static PyObject *
py_lora_forward(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = tl_cpu_bridge(mod);
    tl_arg x = TL_ARG_INIT("x"), w = TL_ARG_INIT("w"), bias = TL_ARG_INIT("bias"), a = TL_ARG_INIT("a"),
           b = TL_ARG_INIT("b"), y = TL_ARG_INIT("y"), su = TL_ARG_INIT("su"), ws = TL_ARG_INIT("ws");
    tl_arg *all[] = {&x, &w, &bias, &a, &b, &y, &su, &ws};
    const int pos[] = {0, 1, 2, 3, 4, 8, 9, 10};
    PyObject *ret = NULL;
    float scale, p;
    uint64_t seed;
    int nthreads;
    tl_status st;
    if (tl_nargs_is(nargs, 12, "lora_forward(x, w, bias, a, b, scale, p, seed, y, su, ws, nthreads)") < 0)
        return NULL;
    if (tl_get_float(args[5], "scale", &scale) < 0 || tl_get_dropout(args[6], &p) < 0 ||
        tl_get_seed(args[7], &seed) < 0 || tl_get_threads(args[11], &nthreads) < 0)
        return NULL;
    for (int k = 0; k < 8; k++) {
        if (args[pos[k]] == Py_None) {
            if (all[k] == &bias || all[k] == &ws) continue;
            PyErr_Format(PyExc_TypeError, "argument '%s' must be a tensor, not None", all[k]->name);
            goto fail;
        }
        if (tl_arg_import(br, args[pos[k]], all[k]) < 0 || tl_need_cpu(all[k])) goto fail;
    }
    if (tl_check_lora_forward_args(&x, &w, &bias, &a, &b, &y, &su) < 0) goto fail;
    const int64_t N = x.t.shape[0], in = x.t.shape[1], out = w.t.shape[0], r = a.t.shape[0];
    if (check_ws(&ws, tl_lora_forward_ws(N, in, out, r, p, x.t.dtype)) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = tl_lora_forward_cpu(&x.t, &w.t, bias.via ? &bias.t : NULL, &a.t, &b.t, scale, p, seed, &y.t, &su.t,
                             ws.via ? &ws.t : NULL, nthreads);
    Py_END_ALLOW_THREADS
    ret = st ? tl_raise_status(st, "tltorch._C.lora_forward") : Py_NewRef(Py_None);
fail:
    for (int k = 0; k < 8; k++) tl_arg_release(all[k]);
    return ret;
}

/* lora_backward(dy, x, w, a, b, su, scale, p, seed, dx, da, db, ws, nthreads) */
static PyObject *
py_lora_backward(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = tl_cpu_bridge(mod);
    tl_arg dy = TL_ARG_INIT("dy"), x = TL_ARG_INIT("x"), w = TL_ARG_INIT("w"), a = TL_ARG_INIT("a"),
           b = TL_ARG_INIT("b"), su = TL_ARG_INIT("su"), dx = TL_ARG_INIT("dx"), da = TL_ARG_INIT("da"),
           db = TL_ARG_INIT("db"), ws = TL_ARG_INIT("ws");
    tl_arg *all[] = {&dy, &x, &w, &a, &b, &su, &dx, &da, &db, &ws};
    const int pos[] = {0, 1, 2, 3, 4, 5, 9, 10, 11, 12};
    PyObject *ret = NULL;
    float scale, p;
    uint64_t seed;
    int nthreads;
    tl_status st;
    if (tl_nargs_is(nargs, 14, "lora_backward(dy, x, w, a, b, su, scale, p, seed, dx, da, db, ws, nthreads)") < 0)
        return NULL;
    if (tl_get_float(args[6], "scale", &scale) < 0 || tl_get_dropout(args[7], &p) < 0 ||
        tl_get_seed(args[8], &seed) < 0 || tl_get_threads(args[13], &nthreads) < 0)
        return NULL;
    for (int k = 0; k < 10; k++) {
        if (args[pos[k]] == Py_None) {
            if (k >= 6) continue; /* dx, da, db, ws are optional */
            PyErr_Format(PyExc_TypeError, "argument '%s' must be a tensor, not None", all[k]->name);
            goto fail;
        }
        if (tl_arg_import(br, args[pos[k]], all[k]) < 0 || tl_need_cpu(all[k])) goto fail;
    }
    if (tl_check_lora_backward_args(&dy, &x, &w, &a, &b, &su, &dx, &da, &db) < 0) goto fail;
    const int64_t N = x.t.shape[0], in = x.t.shape[1], out = w.t.shape[0], r = a.t.shape[0];
    if (check_ws(&ws, tl_lora_backward_ws(N, in, out, r, p, x.t.dtype, dx.via != 0, da.via != 0)) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = tl_lora_backward_cpu(&dy.t, &x.t, &w.t, &a.t, &b.t, &su.t, scale, p, seed, dx.via ? &dx.t : NULL,
                              da.via ? &da.t : NULL, db.via ? &db.t : NULL, ws.via ? &ws.t : NULL, nthreads);
    Py_END_ALLOW_THREADS
    ret = st ? tl_raise_status(st, "tltorch._C.lora_backward") : Py_NewRef(Py_None);
fail:
    for (int k = 0; k < 10; k++) tl_arg_release(all[k]);
    return ret;
}

/* workspace(kind, N, in, out, r, p, float32, want_dx, want_da): the float32 elements tl_lora_forward_ws
 * (kind 0) or tl_lora_backward_ws (kind 1) asks for; float32 says whether x is float32. */
static PyObject *
py_workspace(PyObject *mod, PyObject *args)
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

PyMethodDef tl_lora_methods[] = {
    {"lora_workspace", py_workspace, METH_VARARGS,
     "lora_workspace(kind, N, in, out, r, p, float32, want_dx, want_da): float32 elements of workspace the "
     "LoRA forward (kind 0) or backward (kind 1) needs."},
    {"dropout", (PyCFunction)(void (*)(void))py_dropout, METH_FASTCALL,
     "dropout(x, out, p, seed, nthreads): out = dropout(x) with the mask drawn from seed."},
    {"lora_forward", (PyCFunction)(void (*)(void))py_lora_forward, METH_FASTCALL,
     "lora_forward(x, w, bias, a, b, scale, p, seed, y, su, ws, nthreads): y = x w^T + bias + su b^T with "
     "su = scale * dropout(x) a^T, in place."},
    {"lora_backward", (PyCFunction)(void (*)(void))py_lora_backward, METH_FASTCALL,
     "lora_backward(dy, x, w, a, b, su, scale, p, seed, dx, da, db, ws, nthreads): the LoRA layer's "
     "gradients (dx, da, db may be None), in place."},
    {NULL, NULL, 0, NULL},
};
