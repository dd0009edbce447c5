/* bind_frozen.c: the compact (frozen) weights' GEMM, qgemm (csrc/cpu/gemm.c), and the int8 linear layer,
 * int8_pack and int8_linear (csrc/cpu/qlinear_int8.c), for tltorch._C; int8_dequant (the int8 weight as a
 * dense float tensor) for tltorch._C and tltorch._cuda (csrc/cuda/dequant.cu), whose frozen layers multiply
 * that with cuBLAS. */
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

/* A byte buffer of at least `need` bytes for the int8 layer (its packed weight, its workspace): 1-D uint8 or
 * int8, contiguous, 4-byte aligned (it holds float32 scales); written when `out`. 0, or -1 with ValueError. */
static int
need_bytes(tl_call *k, const tl_arg *a, int64_t need, int out)
{
    if (tl_check_ndim(&a->t, 1, &k->why) || (out && tl_check_writable(&a->t, &k->why))) return tl_raise_check(&k->why);
    if ((a->t.dtype == TL_UINT8 || a->t.dtype == TL_INT8) && a->t.shape[0] >= need &&
        (a->t.strides[0] == 1 || a->t.shape[0] <= 1) && !((uintptr_t)a->t.data & 3))
        return 0;
    PyErr_Format(PyExc_ValueError, "argument '%s' must be a contiguous, 4-byte aligned uint8 vector of at least %lld "
                 "bytes", a->name, (long long)need);
    return -1;
}

PyDoc_STRVAR(int8_pack_doc, "int8_pack(w, w_scale, group, packed, nthreads): the int8 weight w (N, K) and its scales "
             "(N,) or (N, groups) written into packed (uint8, tltorch._C.int8_bytes(N, K, group, True) bytes) in the "
             "int8 layer's layout.");

static PyObject *
py_int8_pack(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg w = TL_ARG_INIT("w"), sc = TL_ARG_INIT("w_scale"), packed = TL_ARG_INIT("packed");
    tl_arg *t[] = {&w, &sc, &packed};
    static const int pos[] = {0, 1, 3};
    tl_call k;
    int group;
    tl_status st = TL_RAISED;

    if (tl_call_begin(&k, mod, args, nargs, 4, TL_TAIL_NONE, "int8_pack(w, w_scale, group, packed") < 0) return NULL;
    if (tl_get_int(args[2], "group", &group) < 0 || tl_call_tail(&k) < 0) return NULL;
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 3) < 0 ||
        tl_call_check(&k, tl_check_int8_pack(&w.t, &sc.t, group, &k.why)) < 0 ||
        need_bytes(&k, &packed, k.dev->cpu.int8_packed_bytes(w.t.shape[0], w.t.shape[1], group), 1) < 0)
        goto end;
    Py_BEGIN_ALLOW_THREADS
    st = k.dev->cpu.int8_pack(&w.t, &sc.t, group, &packed.t);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "int8_pack", NULL);
}

PyDoc_STRVAR(int8_linear_doc, "int8_linear(x, packed, bias, y, ws, nthreads): y = x W^T + bias with x quantised to "
             "uint8 per row and group into ws (uint8, tltorch._C.int8_bytes(rows, K, group, False) bytes) and W the "
             "int8 weight int8_pack wrote into packed, in place.");

static PyObject *
py_int8_linear(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg x = TL_ARG_INIT("x"), packed = TL_ARG_INIT("packed"), y = TL_ARG_INIT("y"), bias = TL_ARG_INIT("bias"),
           ws = TL_ARG_INIT("ws");
    tl_arg *t[] = {&x, &packed, &y, &ws, &bias};
    static const int pos[] = {0, 1, 3, 4, 2};
    tl_call k;
    int64_t N, K, G;
    tl_status st = TL_RAISED;

    if (tl_call_begin(&k, mod, args, nargs, 5, TL_TAIL_NONE, "int8_linear(x, packed, bias, y, ws") < 0 ||
        tl_call_tail(&k) < 0)
        return NULL;
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 4) < 0) goto end;
    if (need_bytes(&k, &packed, 0, 0) < 0) goto end;
    if (k.dev->cpu.int8_packed_info(&packed.t, &N, &K, &G)) {
        PyErr_SetString(PyExc_ValueError, "argument 'packed' is not a weight written by int8_pack");
        goto end;
    }
    if (tl_call_check(&k, tl_check_int8_linear(&x.t, tl_opt(&bias), &y.t, N, K, &k.why)) < 0 ||
        need_bytes(&k, &ws, k.dev->cpu.int8_ws_bytes(x.t.shape[0], K, G), 1) < 0)
        goto end;
    Py_BEGIN_ALLOW_THREADS
    st = k.dev->cpu.int8_linear(&x.t, &packed.t, tl_opt(&bias), &y.t, &ws.t, k.nthreads);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "int8_linear", NULL);
}

PyDoc_STRVAR(int8_dequant_cpu_doc, "int8_dequant(w, w_scale, group, out, nthreads): out = w * w_scale (one scale a "
             "row, or a row and group of `group` columns), rounded once to out's dtype, in place.");
PyDoc_STRVAR(int8_dequant_cuda_doc, "int8_dequant(w, w_scale, group, out): out = w * w_scale (one scale a row, or a "
             "row and group of `group` columns), rounded once to out's dtype, in place, on the current stream.");

static PyObject *
py_int8_dequant(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg w = TL_ARG_INIT("w"), sc = TL_ARG_INIT("w_scale"), out = TL_ARG_INIT("out");
    tl_arg *t[] = {&w, &sc, &out};
    static const int pos[] = {0, 1, 3};
    tl_call k;
    int group;
    tl_status st = TL_RAISED;

    if (tl_call_begin(&k, mod, args, nargs, 4, TL_TAIL_NONE, "int8_dequant(w, w_scale, group, out") < 0) return NULL;
    if (tl_get_int(args[2], "group", &group) < 0 || tl_call_tail(&k) < 0) return NULL;
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 3) < 0 ||
        tl_call_check(&k, tl_check_int8_dequant(&w.t, &sc.t, group, &out.t, &k.why)) < 0)
        goto end;
    Py_BEGIN_ALLOW_THREADS
    st = k.dev->device == TL_CPU ? k.dev->cpu.int8_dequant(&w.t, &sc.t, group, &out.t, k.nthreads)
                                 : k.dev->cuda.int8_dequant(&w.t, &sc.t, group, &out.t, k.s.stream);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "int8_dequant", NULL);
}

const tl_family tl_frozen_family = {
    .cpu = (PyMethodDef[]){TL_METHOD("qgemm", py_qgemm, qgemm_doc), TL_METHOD("int8_pack", py_int8_pack, int8_pack_doc),
                           TL_METHOD("int8_linear", py_int8_linear, int8_linear_doc),
                           TL_METHOD("int8_dequant", py_int8_dequant, int8_dequant_cpu_doc), {NULL}},
    .cuda = (PyMethodDef[]){TL_METHOD("int8_dequant", py_int8_dequant, int8_dequant_cuda_doc), {NULL}}};
