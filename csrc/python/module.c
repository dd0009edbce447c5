/* module.c: tltorch._C, the CPython binding of the CPU kernels.
 *
 * Each function takes its tensors as DLPack-capable objects (outputs included, allocated by the caller),
 * checks them with messages that name the argument, releases the GIL around the kernel, and turns a
 * tl_status into an exception. Positional arguments only: tltorch/_ops.py is the one caller and gives
 * them names. */
#include "bridge.h" /* first: it brings Python.h */

#include <limits.h>

#include "../cpu/cpu.h"

typedef struct {
    tl_bridge bridge; /* first: tl_cpu_bridge() reads it from the other binding files */
} module_state;

#define bridge_of tl_cpu_bridge
#define need_cpu tl_need_cpu

static void
transpose2d(tl_tensor *t)
{
    int64_t s = t->shape[0], st = t->strides[0];
    t->shape[0] = t->shape[1];
    t->strides[0] = t->strides[1];
    t->shape[1] = s;
    t->strides[1] = st;
}

/* gemm(a, b, c, bias, ws, alpha, beta, nthreads[, trans]): c = alpha * op(a) @ op(b) + beta * c + bias, in
 * place; op transposes a when trans & 1, b when trans & 2 (a view: no copy, no torch call). */
static PyObject *
py_gemm(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = bridge_of(mod);
    tl_arg a = TL_ARG_INIT("a"), b = TL_ARG_INIT("b"), c = TL_ARG_INIT("c"), bias = TL_ARG_INIT("bias"),
           ws = TL_ARG_INIT("ws");
    PyObject *ret = NULL;
    float alpha, beta;
    int nthreads, trans = 0;
    tl_status st;

    if (nargs != 8 && nargs != 9) {
        PyErr_Format(PyExc_TypeError, "gemm(a, b, c, bias, ws, alpha, beta, nthreads[, trans]) takes 8 or 9 "
                     "positional arguments, got %zd", nargs);
        return NULL;
    }
    if (tl_get_float(args[5], "alpha", &alpha) < 0 || tl_get_float(args[6], "beta", &beta) < 0 ||
        tl_get_threads(args[7], &nthreads) < 0 || (nargs == 9 && tl_get_int(args[8], "trans", &trans) < 0))
        return NULL;
    if (tl_arg_import(br, args[0], &a) < 0 || tl_arg_import(br, args[1], &b) < 0 ||
        tl_arg_import(br, args[2], &c) < 0)
        goto fail;
    if (args[3] != Py_None && tl_arg_import(br, args[3], &bias) < 0) goto fail;
    if (args[4] != Py_None && tl_arg_import(br, args[4], &ws) < 0) goto fail;

    if (need_cpu(&a) || need_cpu(&b) || need_cpu(&c)) goto fail;
    if (tl_need_ndim(&a, 2) || tl_need_ndim(&b, 2) || tl_need_ndim(&c, 2)) goto fail;
    if (trans < 0 || trans > 3) {
        PyErr_Format(PyExc_ValueError, "argument 'trans' must be 0, 1, 2 or 3, got %d", trans);
        goto fail;
    }
    if (trans & 1) transpose2d(&a.t);
    if (trans & 2) transpose2d(&b.t);
    if ((bias.via && need_cpu(&bias)) || tl_check_gemm_args(&a, &b, &c, &bias) < 0) goto fail;
    if (ws.via) {
        if (need_cpu(&ws) || tl_need_ndim(&ws, 1) || tl_need_writable(&ws)) goto fail;
        if (ws.t.dtype != TL_FLOAT32 || ws.t.strides[0] != 1 || ws.t.shape[0] < tl_numel(&c.t)) {
            PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at "
                         "least %lld elements", (long long)tl_numel(&c.t));
            goto fail;
        }
    } else if (c.t.dtype != TL_FLOAT32 && a.t.shape[1] > TL_GEMM_KC && tl_numel(&c.t) > 0) {
        PyErr_Format(PyExc_ValueError, "argument 'ws' is required (a float32 vector of %lld elements) "
                     "when c is %s and K > %d", (long long)tl_numel(&c.t), tl_dtype_name(c.t.dtype),
                     TL_GEMM_KC);
        goto fail;
    }

    Py_BEGIN_ALLOW_THREADS
    st = tl_gemm_cpu(&a.t, &b.t, bias.via ? &bias.t : NULL, &c.t, alpha, beta, ws.via ? &ws.t : NULL,
                     nthreads);
    Py_END_ALLOW_THREADS
    if (st) {
        tl_raise_status(st, "tltorch._C.gemm");
        goto fail;
    }
    ret = Py_NewRef(Py_None);
fail:
    tl_arg_release(&a);
    tl_arg_release(&b);
    tl_arg_release(&c);
    tl_arg_release(&bias);
    tl_arg_release(&ws);
    return ret;
}

/* qgemm(a, b, scale, axis, c, bias, ws, nthreads, trans): c = op(a) @ (op(b) * scale along axis) + bias, in
 * place: a stored (frozen) weight b of float32/bfloat16/float16, or int8 with its per-channel scale;
 * axis 0 scales op(b)'s rows (K), 1 its columns (N). a may have another float dtype than b. */
static PyObject *
py_qgemm(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = bridge_of(mod);
    tl_arg a = TL_ARG_INIT("a"), b = TL_ARG_INIT("b"), sc = TL_ARG_INIT("scale"), c = TL_ARG_INIT("c"),
           bias = TL_ARG_INIT("bias"), ws = TL_ARG_INIT("ws");
    PyObject *ret = NULL;
    int axis, nthreads, trans;
    tl_status st;
    if (tl_nargs_is(nargs, 9, "qgemm(a, b, scale, axis, c, bias, ws, nthreads, trans)") < 0) return NULL;
    if (tl_get_int(args[3], "axis", &axis) < 0 || tl_get_threads(args[7], &nthreads) < 0 ||
        tl_get_int(args[8], "trans", &trans) < 0)
        return NULL;
    if (axis != 0 && axis != 1) {
        PyErr_Format(PyExc_ValueError, "argument 'axis' must be 0 or 1, got %d", axis);
        return NULL;
    }
    if (trans < 0 || trans > 3) {
        PyErr_Format(PyExc_ValueError, "argument 'trans' must be 0, 1, 2 or 3, got %d", trans);
        return NULL;
    }
    if (tl_arg_import(br, args[0], &a) < 0 || tl_arg_import(br, args[1], &b) < 0 ||
        tl_arg_import(br, args[4], &c) < 0)
        goto fail;
    if (args[2] != Py_None && tl_arg_import(br, args[2], &sc) < 0) goto fail;
    if (args[5] != Py_None && tl_arg_import(br, args[5], &bias) < 0) goto fail;
    if (args[6] != Py_None && tl_arg_import(br, args[6], &ws) < 0) goto fail;
    if (need_cpu(&a) || need_cpu(&b) || need_cpu(&c) || (sc.via && need_cpu(&sc)) || (bias.via && need_cpu(&bias)) ||
        (ws.via && need_cpu(&ws)))
        goto fail;
    if (tl_need_ndim(&a, 2) || tl_need_ndim(&b, 2) || tl_need_ndim(&c, 2) || tl_need_float(&a)) goto fail;
    if (trans & 1) transpose2d(&a.t);
    if (trans & 2) transpose2d(&b.t);
    if (b.t.dtype == TL_INT8 ? !sc.via : !tl_is_float_dtype(b.t.dtype)) {
        PyErr_Format(PyExc_TypeError, "argument 'b' has dtype %s; expected float32, bfloat16, float16, or int8 "
                     "with a scale", tl_dtype_name(b.t.dtype));
        goto fail;
    }
    if (sc.via && (tl_need_ndim(&sc, 1) || tl_need_float(&sc) ||
                   tl_need_size(&sc, 0, b.t.shape[axis], axis ? "b's columns" : "b's rows")))
        goto fail;
    if (tl_need_dtype_f32_or(&c, &a) || tl_need_size(&b, 0, a.t.shape[1], "a.shape[1]") ||
        tl_need_size(&c, 0, a.t.shape[0], "a.shape[0]") || tl_need_size(&c, 1, b.t.shape[1], "b.shape[1]") ||
        tl_need_writable(&c))
        goto fail;
    if (bias.via && (tl_need_ndim(&bias, 1) || tl_need_dtype_f32_or(&bias, &c) ||
                     tl_need_size(&bias, 0, c.t.shape[1], "c.shape[1]")))
        goto fail;
    if (c.t.dtype != TL_FLOAT32 && a.t.shape[1] > TL_GEMM_KC && tl_numel(&c.t) > 0 &&
        (!ws.via || tl_need_ndim(&ws, 1) || ws.t.dtype != TL_FLOAT32 || ws.t.strides[0] != 1 ||
         ws.t.shape[0] < tl_numel(&c.t))) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at least %lld "
                         "elements when c is %s and K > %d", (long long)tl_numel(&c.t),
                         tl_dtype_name(c.t.dtype), TL_GEMM_KC);
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    st = tl_qgemm_cpu(&a.t, &b.t, sc.via ? &sc.t : NULL, axis, bias.via ? &bias.t : NULL, &c.t, 1.0f, 0.0f,
                      ws.via ? &ws.t : NULL, nthreads);
    Py_END_ALLOW_THREADS
    if (st) {
        tl_raise_status(st, "tltorch._C.qgemm");
        goto fail;
    }
    ret = Py_NewRef(Py_None);
fail:
    tl_arg_release(&a);
    tl_arg_release(&b);
    tl_arg_release(&sc);
    tl_arg_release(&c);
    tl_arg_release(&bias);
    tl_arg_release(&ws);
    return ret;
}

/* colsum(x, out, beta, nthreads): out = beta * out + x.sum(0), in place. */
static PyObject *
py_colsum(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = bridge_of(mod);
    tl_arg x = TL_ARG_INIT("x"), out = TL_ARG_INIT("out");
    PyObject *ret = NULL;
    float beta;
    int nthreads;
    tl_status st;

    if (tl_nargs_is(nargs, 4, "colsum(x, out, beta, nthreads)") < 0) return NULL;
    if (tl_get_float(args[2], "beta", &beta) < 0 || tl_get_threads(args[3], &nthreads) < 0) return NULL;
    if (tl_arg_import(br, args[0], &x) < 0 || tl_arg_import(br, args[1], &out) < 0) goto fail;
    if (need_cpu(&x) || need_cpu(&out) || tl_check_colsum_args(&x, &out) < 0) goto fail;
    Py_BEGIN_ALLOW_THREADS
    st = tl_colsum_cpu(&x.t, &out.t, beta, nthreads);
    Py_END_ALLOW_THREADS
    if (st) {
        tl_raise_status(st, "tltorch._C.colsum");
        goto fail;
    }
    ret = Py_NewRef(Py_None);
fail:
    tl_arg_release(&x);
    tl_arg_release(&out);
    return ret;
}

/* linear_xent(x, w, bias, target, class_weight, ignore_index, label_smoothing, reduction, grad_rows,
 *             loss, dx, dw, db, ws, nthreads): the fused linear + cross-entropy head (tl.h), in place.
 * reduction: 0 mean, 1 sum, 2 none. Optional tensors may be None. */
static PyObject *
py_linear_xent(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = bridge_of(mod);
    tl_arg x = TL_ARG_INIT("x"), w = TL_ARG_INIT("weight"), bias = TL_ARG_INIT("bias"),
           target = TL_ARG_INIT("target"), cw = TL_ARG_INIT("class_weight"),
           grow = TL_ARG_INIT("grad_rows"), loss = TL_ARG_INIT("loss"), dx = TL_ARG_INIT("dx"),
           dw = TL_ARG_INIT("dw"), db = TL_ARG_INIT("db"), ws = TL_ARG_INIT("ws");
    tl_arg *opt[] = {&bias, &cw, &grow, &loss, &dx, &dw, &db};
    const int opt_pos[] = {2, 4, 8, 9, 10, 11, 12};
    PyObject *ret = NULL;
    tl_xent_opts o;
    int nthreads;
    int64_t bad = 0;
    tl_status st;

    if (tl_nargs_is(nargs, 15, "linear_xent(x, w, bias, target, class_weight, ignore_index, label_smoothing, "
                 "reduction, grad_rows, loss, dx, dw, db, ws, nthreads)") < 0)
        return NULL;
    if (tl_get_xent_opts(args[5], args[6], args[7], &o) < 0 || tl_get_threads(args[14], &nthreads) < 0)
        return NULL;
    if (tl_arg_import(br, args[0], &x) < 0 || tl_arg_import(br, args[1], &w) < 0 ||
        tl_arg_import(br, args[3], &target) < 0)
        goto fail;
    if (args[13] != Py_None && tl_arg_import(br, args[13], &ws) < 0) goto fail;
    for (size_t k = 0; k < sizeof opt / sizeof *opt; k++)
        if (args[opt_pos[k]] != Py_None && tl_arg_import(br, args[opt_pos[k]], opt[k]) < 0) goto fail;

    if (need_cpu(&x) || need_cpu(&w) || need_cpu(&target) || (ws.via && need_cpu(&ws))) goto fail;
    for (size_t k = 0; k < sizeof opt / sizeof *opt; k++)
        if (opt[k]->via && need_cpu(opt[k])) goto fail;
    if (tl_check_xent_args(&x, &w, &bias, &target, &cw, &grow, &loss, &dx, &dw, &db, o.reduction, 0) < 0 ||
        (ws.via && tl_need_ndim(&ws, 1)))
        goto fail;
    const int64_t N = x.t.shape[0], D = x.t.shape[1], C = w.t.shape[0];
    if (!ws.via ? C > TL_XENT_SKINNY_C
                : (ws.t.dtype != TL_FLOAT32 || (ws.t.strides[0] != 1 && ws.t.shape[0] > 1) ||
                   (N > 0 && ws.t.shape[0] < C + D + 1) || tl_need_writable(&ws))) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at least "
                         "C + D + 1 = %lld elements (None only with at most %d classes)",
                         (long long)(C + D + 1), TL_XENT_SKINNY_C);
        goto fail;
    }

    Py_BEGIN_ALLOW_THREADS
    st = tl_linear_xent_cpu(&x.t, &w.t, bias.via ? &bias.t : NULL, &target.t, cw.via ? &cw.t : NULL, &o,
                            grow.via ? &grow.t : NULL, loss.via ? &loss.t : NULL, dx.via ? &dx.t : NULL,
                            dw.via ? &dw.t : NULL, db.via ? &db.t : NULL, ws.via ? &ws.t : NULL, &bad,
                            nthreads);
    Py_END_ALLOW_THREADS
    if (st == TL_ERR_INDEX) {
        PyErr_Format(PyExc_ValueError, "target holds class index %lld, outside [0, %lld) and not "
                     "ignore_index (%lld)", (long long)bad, (long long)C, (long long)o.ignore_index);
        goto fail;
    }
    if (st) {
        tl_raise_status(st, "tltorch._C.linear_xent");
        goto fail;
    }
    ret = Py_NewRef(Py_None);
fail:
    tl_arg_release(&x);
    tl_arg_release(&w);
    tl_arg_release(&target);
    tl_arg_release(&ws);
    for (size_t k = 0; k < sizeof opt / sizeof *opt; k++) tl_arg_release(opt[k]);
    return ret;
}

/* describe(obj): what the bridge sees, for tests and debugging. */
static PyObject *
py_describe(PyObject *mod, PyObject *obj)
{
    static const char *via_names[] = {"none", "exchange", "exchange_managed", "versioned", "legacy"};
    tl_arg a = TL_ARG_INIT("obj");
    PyObject *shape = NULL, *strides = NULL, *ret = NULL;
    if (tl_arg_import(bridge_of(mod), obj, &a) < 0) goto fail;
    if (!(shape = PyTuple_New(a.t.ndim)) || !(strides = PyTuple_New(a.t.ndim))) goto fail;
    for (int i = 0; i < a.t.ndim; i++) {
        PyObject *s = PyLong_FromLongLong(a.t.shape[i]), *st = PyLong_FromLongLong(a.t.strides[i]);
        if (!s || !st) {
            Py_XDECREF(s);
            Py_XDECREF(st);
            goto fail;
        }
        PyTuple_SET_ITEM(shape, i, s);
        PyTuple_SET_ITEM(strides, i, st);
    }
    ret = Py_BuildValue("{s:O,s:O,s:s,s:s,s:i,s:O,s:s,s:K}", "shape", shape, "strides", strides, "dtype",
                        tl_dtype_name(a.t.dtype), "device", a.t.device == TL_CUDA ? "cuda" : "cpu",
                        "device_id", a.t.device_id, "readonly", a.readonly ? Py_True : Py_False, "via",
                        via_names[a.via], "data", (unsigned long long)(uintptr_t)a.t.data);
fail:
    Py_XDECREF(shape);
    Py_XDECREF(strides);
    tl_arg_release(&a);
    return ret;
}

static PyObject *
py_cpu_isa(PyObject *mod, PyObject *unused)
{
    return PyUnicode_FromString(tl_cpu_isa());
}

static PyObject *
py_default_threads(PyObject *mod, PyObject *unused)
{
    return PyLong_FromLong(tl_cpu_default_threads());
}

static PyMethodDef methods[] = {
    {"gemm", (PyCFunction)(void (*)(void))py_gemm, METH_FASTCALL,
     "gemm(a, b, c, bias, ws, alpha, beta, nthreads[, trans]): c = alpha*op(a)@op(b) + beta*c + bias, "
     "in place; trans bit 0 transposes a, bit 1 b."},
    {"qgemm", (PyCFunction)(void (*)(void))py_qgemm, METH_FASTCALL,
     "qgemm(a, b, scale, axis, c, bias, ws, nthreads, trans): c = op(a) @ (op(b) * scale along axis) + bias "
     "with a stored weight b (float, or int8 with its scale), in place."},
    {"colsum", (PyCFunction)(void (*)(void))py_colsum, METH_FASTCALL,
     "colsum(x, out, beta, nthreads): out = beta*out + x.sum(0), in place."},
    {"linear_xent", (PyCFunction)(void (*)(void))py_linear_xent, METH_FASTCALL,
     "linear_xent(x, w, bias, target, class_weight, ignore_index, label_smoothing, reduction, grad_rows, "
     "loss, dx, dw, db, ws, nthreads): the fused linear + cross-entropy head, in place."},
    {"describe", py_describe, METH_O, "describe(obj): the tensor as the DLPack bridge reads it."},
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use here."},
    {"default_threads", py_default_threads, METH_NOARGS, "Threads used when nthreads <= 0."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *mod)
{
    if (tl_bridge_init(bridge_of(mod)) < 0) return -1;
    (void)tl_cpu_level(); /* fix the SIMD level now, with the GIL held (it reads the environment) */
    if (PyModule_AddIntConstant(mod, "GEMM_KC", TL_GEMM_KC) < 0) return -1;
    if (PyModule_AddIntConstant(mod, "XENT_SKINNY_C", TL_XENT_SKINNY_C) < 0) return -1;
    /* the kernels bound in the other csrc/python/bind_*.c files */
    if (PyModule_AddFunctions(mod, tl_lora_methods) < 0) return -1;
    if (PyModule_AddFunctions(mod, tl_workflow_methods) < 0) return -1;
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
    module_clear((PyObject *)mod);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "tltorch._C", "tltorch's C kernels (CPU).", sizeof(module_state), methods,
    slots, module_traverse, module_clear, module_free,
};

PyMODINIT_FUNC
PyInit__C(void)
{
    return PyModuleDef_Init(&moduledef);
}
