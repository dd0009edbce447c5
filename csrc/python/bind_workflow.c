/* bind_workflow.c: tltorch._C's workflow kernels: sequence pooling and the fused AdamW step. */
#include "bridge.h" /* first: it brings Python.h */

#include <math.h>

#include "../cpu/cpu.h"

/* The bytes [lo, hi) that a tensor's elements span (lo == hi when it is empty). */
static void
span(const tl_tensor *t, uintptr_t *lo, uintptr_t *hi)
{
    const int64_t es = (int64_t)tl_dtype_size(t->dtype);
    int64_t a = 0, b = 0;
    if (tl_numel(t) == 0 || !t->data) {
        *lo = *hi = 0;
        return;
    }
    for (int i = 0; i < t->ndim; i++) {
        const int64_t ext = (t->shape[i] - 1) * t->strides[i];
        if (ext < 0) a += ext;
        else b += ext;
    }
    *lo = (uintptr_t)((const char *)t->data + a * es);
    *hi = (uintptr_t)((const char *)t->data + (b + 1) * es);
}

/* `out` is written while `in` is read (or written) by other threads: their memory must not meet. */
static int
need_apart(const tl_arg *out, const tl_arg *in)
{
    uintptr_t l1, h1, l2, h2;
    span(&out->t, &l1, &h1);
    span(&in->t, &l2, &h2);
    if (l1 == h1 || l2 == h2 || h1 <= l2 || h2 <= l1) return 0;
    PyErr_Format(PyExc_ValueError, "argument '%s' overlaps argument '%s' in memory; pass separate tensors",
                 out->name, in->name);
    return -1;
}

/* pool(h, mask, mode, out, nthreads): out[b] = cls / masked mean / masked max of h[b] over tokens, in
 * place. mode: 0 cls, 1 mean, 2 max; mask may be None. */
static PyObject *
py_pool(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = tl_cpu_bridge(mod);
    tl_arg h = TL_ARG_INIT("h"), mask = TL_ARG_INIT("mask"), out = TL_ARG_INIT("out");
    PyObject *ret = NULL;
    int mode, nthreads;
    tl_status st;

    if (tl_nargs_is(nargs, 5, "pool(h, mask, mode, out, nthreads)") < 0) return NULL;
    if (tl_get_pool_mode(args[2], &mode) < 0 || tl_get_threads(args[4], &nthreads) < 0) return NULL;
    if (tl_arg_import(br, args[0], &h) < 0 || tl_arg_import(br, args[3], &out) < 0) goto fail;
    if (args[1] != Py_None && tl_arg_import(br, args[1], &mask) < 0) goto fail;

    if (tl_need_cpu(&h) || tl_need_cpu(&out) || (mask.via && tl_need_cpu(&mask))) goto fail;
    if (tl_check_pool_args(&h, &mask, &out, mode) < 0 || need_apart(&out, &h) ||
        (mask.via && need_apart(&out, &mask)))
        goto fail;

    Py_BEGIN_ALLOW_THREADS
    st = tl_pool_cpu(&h.t, mask.via ? &mask.t : NULL, mode, &out.t, nthreads);
    Py_END_ALLOW_THREADS
    ret = st ? tl_raise_status(st, "tltorch._C.pool") : Py_NewRef(Py_None);
fail:
    tl_arg_release(&h);
    tl_arg_release(&mask);
    tl_arg_release(&out);
    return ret;
}

/* adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, nthreads): one
 * AdamW step in place on 1-D tensors (torch.optim.AdamW's formula; step counts from 1). */
static PyObject *
py_adamw(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_bridge *br = tl_cpu_bridge(mod);
    tl_arg p = TL_ARG_INIT("param"), g = TL_ARG_INIT("grad"), m = TL_ARG_INIT("exp_avg"),
           v = TL_ARG_INIT("exp_avg_sq");
    tl_arg *all[] = {&p, &g, &m, &v};
    PyObject *ret = NULL;
    tl_adamw_opts o;
    int nthreads;
    tl_status st;

    if (tl_nargs_is(nargs, 11, "adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, "
                    "weight_decay, step, nthreads)") < 0)
        return NULL;
    if (tl_get_adamw_opts(args + 4, &o) < 0 || tl_get_threads(args[10], &nthreads) < 0) return NULL;
    for (int k = 0; k < 4; k++)
        if (tl_arg_import(br, args[k], all[k]) < 0) goto fail;
    for (int k = 0; k < 4; k++)
        if (tl_need_cpu(all[k])) goto fail;
    if (tl_check_adamw_args(&p, &g, &m, &v) < 0) goto fail;
    /* Each element is read and written by one thread: the three outputs must not share memory with
     * each other or with the gradient. */
    if (need_apart(&p, &m) || need_apart(&p, &v) || need_apart(&m, &v) || need_apart(&p, &g) ||
        need_apart(&m, &g) || need_apart(&v, &g))
        goto fail;

    Py_BEGIN_ALLOW_THREADS
    st = tl_adamw_cpu(&p.t, &g.t, &m.t, &v.t, &o, nthreads);
    Py_END_ALLOW_THREADS
    ret = st ? tl_raise_status(st, "tltorch._C.adamw") : Py_NewRef(Py_None);
fail:
    for (int k = 0; k < 4; k++) tl_arg_release(all[k]);
    return ret;
}

PyMethodDef tl_workflow_methods[] = {
    {"pool", (PyCFunction)(void (*)(void))py_pool, METH_FASTCALL,
     "pool(h, mask, mode, out, nthreads): out = h pooled over its tokens (mode 0 cls, 1 mean, 2 max; "
     "mask None or (B, T), nonzero = counts), in place."},
    {"adamw", (PyCFunction)(void (*)(void))py_adamw, METH_FASTCALL,
     "adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, nthreads): one "
     "AdamW step on 1-D tensors, in place."},
    {NULL, NULL, 0, NULL},
};
