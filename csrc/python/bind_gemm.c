/* bind_gemm.c: the GEMM family, gemm and colsum (csrc/cpu/gemm.c, gemm_colsum.c, csrc/cuda/gemm.cu), for tltorch._C and
 * tltorch._cuda. */
#include "bind.h"

/* The CPU's float32 partial sums of c: required when c is not float32 and K > TL_GEMM_KC (tl.h). */
static int
check_partials(tl_call *k, const tl_arg *ws, const tl_arg *a, const tl_arg *c)
{
    if (ws->via) {
        const int64_t n = tl_numel(&c->t);
        if (tl_check_ndim(&ws->t, 1, &k->why) || tl_check_writable(&ws->t, &k->why)) return tl_raise_check(&k->why);
        if (ws->t.dtype == TL_FLOAT32 && ws->t.strides[0] == 1 && ws->t.shape[0] >= n) return 0;
        PyErr_Format(PyExc_ValueError, "argument 'ws' must be a contiguous float32 vector of at least %lld elements",
                     (long long)n);
        return -1;
    }
    if (c->t.dtype == TL_FLOAT32 || a->t.shape[1] <= TL_GEMM_KC || tl_numel(&c->t) == 0) return 0;
    PyErr_Format(PyExc_ValueError, "argument 'ws' is required (a float32 vector of %lld elements) when c is %s and "
                 "K > %d", (long long)tl_numel(&c->t), tl_dtype_name(c->t.dtype), TL_GEMM_KC);
    return -1;
}

PyDoc_STRVAR(gemm_cpu_doc, "gemm(a, b, c, bias, ws, alpha, beta, nthreads[, trans]): c = alpha*op(a)@op(b) + "
             "beta*c + bias, in place; trans bit 0 transposes a, bit 1 b.");
PyDoc_STRVAR(gemm_cuda_doc, "gemm(a, b, c, bias, ws, alpha, beta, allow_tf32): c = alpha*a@b + beta*c + bias, in "
             "place, with cuBLAS on the current stream; ws: a uint8 CUDA tensor for cuBLAS's workspace, or None.");

/* op(a), op(b): a and b, or their transposes for trans bits 0 and 1 (views: no copy; the CPU's alone). ws: the
 * CPU's float32 partial sums, or cuBLAS's workspace on CUDA. */
static PyObject *
py_gemm(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg a = TL_ARG_INIT("a"), b = TL_ARG_INIT("b"), c = TL_ARG_INIT("c"), bias = TL_ARG_INIT("bias"),
           ws = TL_ARG_INIT("ws");
    tl_arg *t[] = {&c, &a, &b, &bias, &ws}; /* c first: the output's producer decides the stream */
    static const int pos[] = {2, 0, 1, 3, 4};
    tl_call k;
    float alpha, beta;
    int trans = 0;
    tl_status st = TL_RAISED;

    const int cpu = tl_module_of(mod)->dev->device == TL_CPU, with_trans = cpu && nargs == 9;
    if (cpu && nargs != 8 && !with_trans) { /* the CPU's takes an optional trans last */
        PyErr_Format(PyExc_TypeError, "gemm(a, b, c, bias, ws, alpha, beta, nthreads[, trans]) takes 8 or 9 "
                     "positional arguments, got %zd", nargs);
        return NULL;
    }
    if (tl_call_begin(&k, mod, args, nargs - with_trans, 7, TL_TAIL_TF32, "gemm(a, b, c, bias, ws, alpha, beta") < 0)
        return NULL;
    if (tl_get_float(args[5], "alpha", &alpha) < 0 || tl_get_float(args[6], "beta", &beta) < 0 ||
        tl_call_tail(&k) < 0 || (with_trans && tl_get_int(args[8], "trans", &trans) < 0))
        return NULL;
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 3) < 0) goto end;
    if (trans < 0 || trans > 3) {
        PyErr_Format(PyExc_ValueError, "argument 'trans' must be 0, 1, 2 or 3, got %d", trans);
        goto end;
    }
    if (trans & 1) tl_transpose2d(&a.t);
    if (trans & 2) tl_transpose2d(&b.t);
    if (tl_call_check(&k, tl_check_gemm(&a.t, &b.t, &c.t, tl_opt(&bias), &k.why)) < 0 ||
        (cpu ? check_partials(&k, &ws, &a, &c) : tl_call_cublas(&k, &ws, &c)) < 0)
        goto end;

    Py_BEGIN_ALLOW_THREADS
    if (cpu)
        st = k.dev->cpu.gemm(&a.t, &b.t, tl_opt(&bias), &c.t, alpha, beta, tl_opt(&ws), k.nthreads);
    else
        st = k.dev->cuda.gemm(k.ctx, &a.t, &b.t, tl_opt(&bias), &c.t, alpha, beta, k.cws_data, k.cws_bytes, k.tf32,
                              k.s.stream);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "gemm",
                       "a and b each need a unit stride in one dim and a leading dimension covering the other; c a "
                       "unit stride in dim 1 and rows at least c.shape[1] apart");
}

PyDoc_STRVAR(colsum_cpu_doc, "colsum(x, out, beta, nthreads): out = beta*out + x.sum(0), in place.");
PyDoc_STRVAR(colsum_cuda_doc, "colsum(x, out, beta): out = beta*out + x.sum(0), in place, on the current stream.");

static PyObject *
py_colsum(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg x = TL_ARG_INIT("x"), out = TL_ARG_INIT("out");
    tl_arg *t[] = {&out, &x}; /* out first: the output's producer decides the stream */
    static const int pos[] = {1, 0};
    tl_call k;
    float beta;
    tl_status st = TL_RAISED;

    if (tl_call_begin(&k, mod, args, nargs, 3, TL_TAIL_NONE, "colsum(x, out, beta") < 0) return NULL;
    if (tl_get_float(args[2], "beta", &beta) < 0 || tl_call_tail(&k) < 0) return NULL;
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 2) < 0 || tl_call_check(&k, tl_check_colsum(&x.t, &out.t, &k.why)) < 0)
        goto end;
    Py_BEGIN_ALLOW_THREADS
    st = k.dev->device == TL_CPU ? k.dev->cpu.colsum(&x.t, &out.t, beta, k.nthreads)
                                 : k.dev->cuda.colsum(&x.t, &out.t, beta, k.s.stream);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "colsum", NULL);
}

const tl_family tl_gemm_family = {
    .cpu = (PyMethodDef[]){TL_METHOD("gemm", py_gemm, gemm_cpu_doc), TL_METHOD("colsum", py_colsum, colsum_cpu_doc),
                           {NULL}},
    .cuda = (PyMethodDef[]){TL_METHOD("gemm", py_gemm, gemm_cuda_doc), TL_METHOD("colsum", py_colsum, colsum_cuda_doc),
                            {NULL}},
};
