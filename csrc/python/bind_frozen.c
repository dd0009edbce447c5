/* bind_frozen.c: the compact (frozen) weights' GEMM, qgemm (csrc/cpu/gemm.c), for tltorch._C; CUDA has no
 * such kernel (a frozen layer's weight is converted to x's dtype there, for gemm). */
#include "bind.h"

PyDoc_STRVAR(qgemm_doc, "qgemm(a, b, scale, axis, c, bias, ws, nthreads, trans): c = op(a) @ (op(b) * scale along "
             "axis) + bias with a stored weight b (float, or int8 with its scale), in place.");

/* b: a stored (frozen) weight of float32/bfloat16/float16, or int8 with its per-channel scale; axis 0 scales
 * op(b)'s rows (K), 1 its columns (N). a may have another float dtype than b. */
static PyObject *
py_qgemm(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg a = TL_ARG_INIT("a"), b = TL_ARG_INIT("b"), sc = TL_ARG_INIT("scale"), c = TL_ARG_INIT("c"),
           bias = TL_ARG_INIT("bias"), ws = TL_ARG_INIT("ws");
    tl_arg *t[] = {&a, &b, &c, &sc, &bias, &ws};
    static const int pos[] = {0, 1, 4, 2, 5, 6};
    tl_call k;
    int axis, trans;
    tl_status st = TL_RAISED;

    /* nthreads is args[7], before trans: the op's own arguments are args[0..6] as far as the call goes */
    if (tl_nargs_is(nargs, 9, "qgemm(a, b, scale, axis, c, bias, ws, nthreads, trans)") < 0 ||
        tl_call_begin(&k, mod, args, 8, 7, TL_TAIL_NONE, "qgemm") < 0)
        return NULL;
    if (tl_get_int(args[3], "axis", &axis) < 0 || tl_call_tail(&k) < 0 || tl_get_int(args[8], "trans", &trans) < 0)
        return NULL;
    if (axis != 0 && axis != 1) {
        PyErr_Format(PyExc_ValueError, "argument 'axis' must be 0 or 1, got %d", axis);
        return NULL;
    }
    if (trans < 0 || trans > 3) {
        PyErr_Format(PyExc_ValueError, "argument 'trans' must be 0, 1, 2 or 3, got %d", trans);
        return NULL;
    }
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 3) < 0) goto end;
    if (trans & 1) tl_transpose2d(&a.t);
    if (trans & 2) tl_transpose2d(&b.t);
    if (tl_call_check(&k, tl_check_qgemm(&a.t, &b.t, tl_opt(&sc), axis, &c.t, tl_opt(&bias), &k.why)) < 0) goto end;
    /* the float32 partial sums, as gemm's (unread when not needed) */
    if (c.t.dtype != TL_FLOAT32 && a.t.shape[1] > TL_GEMM_KC && tl_numel(&c.t) > 0) {
        if (ws.via && tl_check_ndim(&ws.t, 1, &k.why)) {
            tl_raise_check(&k.why);
            goto end;
        }
        if (!ws.via || ws.t.dtype != TL_FLOAT32 || ws.t.strides[0] != 1 || ws.t.shape[0] < tl_numel(&c.t)) {
            PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at least %lld "
                         "elements when c is %s and K > %d", (long long)tl_numel(&c.t), tl_dtype_name(c.t.dtype),
                         TL_GEMM_KC);
            goto end;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    st = k.dev->cpu.qgemm(&a.t, &b.t, tl_opt(&sc), axis, tl_opt(&bias), &c.t, 1.0f, 0.0f, tl_opt(&ws), k.nthreads);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "qgemm", NULL);
}

const tl_family tl_frozen_family = {.cpu = (PyMethodDef[]){TL_METHOD("qgemm", py_qgemm, qgemm_doc), {NULL}}};
