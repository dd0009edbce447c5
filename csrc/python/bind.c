/* bind.c: the bindings' shared steps (bind.h): a call's device arguments, its tensors' import and device
 * checks, the messages of failed checks and statuses, scalar arguments; and what the two modules share: their
 * state's bridge and device table, and every family's methods. */
#include "bind.h"

#include <limits.h>
#include <stddef.h>

/* tl_check reports tensors; the bindings hand it the t of their tl_args, whose names and read-only flags
 * the messages need. */
_Static_assert(offsetof(tl_arg, t) == 0, "a tl_arg begins with its tensor");

static const tl_arg *
arg_of(const tl_tensor *t)
{
    return (const tl_arg *)t;
}

int
tl_arg_readonly(const tl_tensor *t)
{
    return arg_of(t)->readonly;
}

/* ---- a call's slow paths ------------------------------------------------------------------------------ */

/* CUDA's arguments after an op's own, by tl_tail (whose value is their count). */
static const char *const cuda_tail[] = {")", ", allow_tf32)", ", cublas_ws, allow_tf32)"};

int
tl_call_miscount(const tl_call *k, Py_ssize_t nargs, Py_ssize_t want, const char *sig)
{
    PyErr_Format(PyExc_TypeError, "%s%s takes %zd positional arguments, got %zd", sig,
                 k->dev->device == TL_CPU ? ", nthreads)" : cuda_tail[k->tail], want, nargs);
    return -1;
}

void
tl_call_raise(const tl_call *k, tl_status st, const char *op, const char *layout_hint)
{
    char name[64];
    snprintf(name, sizeof name, "%s.%s", k->dev->name, op);
    k->dev->raise(st, name, layout_hint);
}

/* ---- messages -------------------------------------------------------------------------------------- */

int
tl_raise_check(const tl_check *why)
{
    PyObject *type = why->status == TL_ERR_DTYPE ? PyExc_TypeError : PyExc_ValueError;
    const tl_tensor *t = why->arg, *ref = why->ref;
    const char *name = t ? arg_of(t)->name : NULL, *dt = t ? tl_dtype_name(t->dtype) : NULL;
    switch (why->need) {
    case TL_NEED_NDIM:
        PyErr_Format(type, "argument '%s' must be %d-D, got a %d-D tensor", name, (int)why->want, t->ndim);
        break;
    case TL_NEED_DTYPE:
        PyErr_Format(type, "argument '%s' has dtype %s; expected %s", name, dt, why->what);
        break;
    case TL_NEED_DTYPE_OF:
        PyErr_Format(type, "argument '%s' has dtype %s; expected %s, the dtype of '%s'", name, dt,
                     tl_dtype_name(ref->dtype), arg_of(ref)->name);
        break;
    case TL_NEED_DTYPE_OR:
        PyErr_Format(type, "argument '%s' has dtype %s; expected %s or %s (the dtype of '%s')", name, dt, why->what,
                     tl_dtype_name(ref->dtype), arg_of(ref)->name);
        break;
    case TL_NEED_DTYPE_IS:
        PyErr_Format(type, "argument '%s' must be %s, not %s", name, tl_dtype_name((tl_dtype)why->want), dt);
        break;
    case TL_NEED_SIZE:
        PyErr_Format(type, "argument '%s' has size %lld in dim %d; expected %lld (%s)", name,
                     (long long)t->shape[why->dim], why->dim, (long long)why->want, why->what);
        break;
    case TL_NEED_WRITABLE:
        PyErr_Format(type, "argument '%s' is read-only", name);
        break;
    case TL_NEED_NO_BROADCAST:
        PyErr_Format(type, "argument '%s' is an output but has overlapping elements (stride 0 in dim %d)", name,
                     why->dim);
        break;
    case TL_NEED_NO_OVERLAP:
        PyErr_Format(type, "argument '%s' is an output whose elements overlap in memory (a stride of %lld does not "
                     "step over the %lld elements before it)", name, (long long)why->got, (long long)why->want);
        break;
    case TL_NEED_APART:
        PyErr_Format(type, "argument '%s' overlaps argument '%s' in memory; pass separate tensors", name,
                     arg_of(ref)->name);
        break;
    case TL_NEED_TEXT:
        if (name) PyErr_Format(type, "argument '%s' %s", name, why->what);
        else PyErr_SetString(type, why->what);
        break;
    default:
        PyErr_Format(PyExc_SystemError, "unknown argument check %d", (int)why->need);
    }
    return -1;
}

PyObject *
tl_raise_status(tl_status st, const char *op)
{
    PyObject *type = PyExc_RuntimeError;
    switch (st) {
    case TL_ERR_DTYPE: type = PyExc_TypeError; break;
    case TL_ERR_SHAPE:
    case TL_ERR_DEVICE:
    case TL_ERR_LAYOUT:
    case TL_ERR_VALUE:
    case TL_ERR_INDEX: type = PyExc_ValueError; break;
    case TL_ERR_NOMEM: type = PyExc_MemoryError; break;
    default: break;
    }
    PyErr_Format(type, "%s: %s", op, tl_status_string(st));
    return NULL;
}

/* ---- scalar arguments ------------------------------------------------------------------------------ */

int
tl_nargs_is(Py_ssize_t nargs, Py_ssize_t want, const char *sig)
{
    if (nargs == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s takes %zd positional arguments, got %zd", sig, want, nargs);
    return -1;
}

int
tl_get_float(PyObject *o, const char *name, float *out)
{
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be a real number, not %.200s", name,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    *out = (float)v;
    return 0;
}

int
tl_get_int(PyObject *o, const char *name, int *out)
{
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            PyErr_Format(PyExc_TypeError, "argument '%s' must be an int, not %.200s", name,
                         Py_TYPE(o)->tp_name);
        else
            PyErr_Format(PyExc_ValueError, "argument '%s' is out of range", name);
        return -1;
    }
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "argument '%s' is out of range: %lld", name, v);
        return -1;
    }
    *out = (int)v;
    return 0;
}

int
tl_get_threads(PyObject *o, int *out)
{
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "argument 'nthreads' must be an int of at most 64 bits, not %.200s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    *out = v <= 0 ? 0 : v > 1024 ? 1024 : (int)v;
    return 0;
}

/* ---- the modules ---------------------------------------------------------------------------------- */

int
tl_module_init(PyObject *mod, const tl_backend *dev)
{
    static const tl_family *const families[] = {&tl_gemm_family, &tl_frozen_family, &tl_head_family,
                                                &tl_lora_family, &tl_pool_family,   &tl_adamw_family};
    tl_module *m = tl_module_of(mod);
    m->dev = dev;
    if (tl_bridge_init(&m->bridge) < 0) return -1;
    for (size_t i = 0; i < TL_COUNT(families); i++) {
        PyMethodDef *f = dev->device == TL_CPU ? families[i]->cpu : families[i]->cuda;
        if (f && PyModule_AddFunctions(mod, f) < 0) return -1;
    }
    return 0;
}

int
tl_module_traverse(PyObject *mod, visitproc visit, void *arg)
{
    return tl_bridge_traverse(&tl_module_of(mod)->bridge, visit, arg);
}

int
tl_module_clear(PyObject *mod)
{
    tl_bridge_clear(&tl_module_of(mod)->bridge);
    return 0;
}

void
tl_module_free(void *mod)
{
    tl_module_clear((PyObject *)mod);
}
