/* bind_adamw.c: the fused AdamW step, adamw (csrc/cpu/adamw.c, csrc/cuda/adamw.cu), for tltorch._C and
 * tltorch._cuda. */
#include "bind.h"

#include <math.h>

static int
get_double(PyObject *o, const char *name, double *out)
{
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be a real number, not %.200s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    *out = v;
    return 0;
}

static int
get_step(PyObject *o, int64_t *out)
{
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError))
            PyErr_SetString(PyExc_ValueError, "argument 'step' is out of range");
        else
            PyErr_Format(PyExc_TypeError, "argument 'step' must be an int, not %.200s", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (v < 1) {
        PyErr_Format(PyExc_ValueError, "argument 'step' must be >= 1 (the step being taken), got %lld", v);
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

/* (lr, beta1, beta2, eps, weight_decay, step) from args[0..5] and l2sp from args[7], each checked by name. */
static int
get_opts(PyObject *const *args, tl_adamw_opts *o)
{
    if (get_double(args[0], "lr", &o->lr) < 0 || get_double(args[1], "beta1", &o->beta1) < 0 ||
        get_double(args[2], "beta2", &o->beta2) < 0 || get_double(args[3], "eps", &o->eps) < 0 ||
        get_double(args[4], "weight_decay", &o->weight_decay) < 0 || get_step(args[5], &o->step) < 0 ||
        get_double(args[7], "l2sp", &o->l2sp) < 0)
        return -1;
    const char *bad = !isfinite(o->lr)                          ? "argument 'lr' must be finite"
                      : !(o->beta1 >= 0.0 && o->beta1 < 1.0)  ? "argument 'beta1' must be in [0, 1)"
                      : !(o->beta2 >= 0.0 && o->beta2 < 1.0)  ? "argument 'beta2' must be in [0, 1)"
                      : !(o->eps >= 0.0 && isfinite(o->eps))   ? "argument 'eps' must be finite and >= 0"
                      : !isfinite(o->weight_decay)              ? "argument 'weight_decay' must be finite"
                      : !(o->l2sp >= 0.0 && isfinite(o->l2sp)) ? "argument 'l2sp' must be finite and >= 0"
                                                                : NULL;
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(adamw_cpu_doc, "adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, "
             "anchor, l2sp, nthreads): one AdamW step on 1-D tensors, in place; anchor (None or param's twin) "
             "with l2sp > 0 adds the gradient of l2sp * ||param - anchor||^2.");
PyDoc_STRVAR(adamw_cuda_doc, "adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, "
             "anchor, l2sp): one torch.optim.AdamW step, in place, on the current stream (float32 states and "
             "math), with the L2-SP term as on the CPU.");

/* The CPU's threads split the elements: there the states may not share memory with each other or with the
 * tensors read. step counts from 1. */
static PyObject *
py_adamw(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg param = TL_ARG_INIT("param"), grad = TL_ARG_INIT("grad"), m = TL_ARG_INIT("exp_avg"),
           v = TL_ARG_INIT("exp_avg_sq"), anchor = TL_ARG_INIT("anchor");
    tl_arg *t[] = {&param, &grad, &m, &v, &anchor};
    static const int pos[] = {0, 1, 2, 3, 10};
    tl_call k;
    tl_adamw_opts o;
    tl_status st = TL_RAISED;

    if (tl_call_begin(&k, mod, args, nargs, 12, TL_TAIL_NONE, "adamw(param, grad, exp_avg, exp_avg_sq, lr, beta1, "
                      "beta2, eps, weight_decay, step, anchor, l2sp") < 0)
        return NULL;
    if (get_opts(args + 4, &o) < 0 || tl_call_tail(&k) < 0) return NULL;
    if (o.l2sp != 0.0 && args[10] == Py_None) {
        PyErr_SetString(PyExc_ValueError, "argument 'anchor' is needed when l2sp > 0 (the values to pull toward)");
        return NULL;
    }
    const int cpu = k.dev->device == TL_CPU;
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 4) < 0 ||
        tl_call_check(&k, tl_check_adamw(&param.t, &grad.t, &m.t, &v.t, tl_opt(&anchor), cpu, &k.why)) < 0)
        goto end;
    Py_BEGIN_ALLOW_THREADS
    st = cpu ? k.dev->cpu.adamw(&param.t, &grad.t, &m.t, &v.t, tl_opt(&anchor), &o, k.nthreads)
             : k.dev->cuda.adamw(&param.t, &grad.t, &m.t, &v.t, tl_opt(&anchor), &o, k.s.stream);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "adamw", NULL);
}

const tl_family tl_adamw_family = {.cpu = (PyMethodDef[]){TL_METHOD("adamw", py_adamw, adamw_cpu_doc), {NULL}},
                                   .cuda = (PyMethodDef[]){TL_METHOD("adamw", py_adamw, adamw_cuda_doc), {NULL}}};
