/* bind_pool.c: sequence pooling, pool (csrc/cpu/pool.c, csrc/cuda/pool.cu), for tltorch._C and tltorch._cuda. */
#include "bind.h"

/* mode: TL_POOL_CLS (0), TL_POOL_MEAN (1) or TL_POOL_MAX (2). */
static int
get_mode(PyObject *o, int *mode)
{
    if (tl_get_int(o, "mode", mode) < 0) return -1;
    if (*mode != TL_POOL_CLS && *mode != TL_POOL_MEAN && *mode != TL_POOL_MAX) {
        PyErr_Format(PyExc_ValueError, "argument 'mode' must be 0 (cls), 1 (mean) or 2 (max), got %d", *mode);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(pool_cpu_doc, "pool(h, mask, mode, out, nthreads): out = h pooled over its tokens (mode 0 cls, 1 mean, "
             "2 max; mask None or (B, T), nonzero = counts), in place.");
PyDoc_STRVAR(pool_cuda_doc, "pool(h, mask, mode, out): out[b] = h[b, 0] (mode 0), or the mean (1) or max (2) of h[b, "
             "t] over the tokens whose mask is nonzero (all when mask is None), in place, on the current stream.");

/* The CPU's threads split the rows of out while reading h: there out may not share memory with h or mask. */
static PyObject *
py_pool(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    tl_arg h = TL_ARG_INIT("h"), mask = TL_ARG_INIT("mask"), out = TL_ARG_INIT("out");
    tl_arg *t[] = {&h, &out, &mask};
    static const int pos[] = {0, 3, 1};
    tl_call k;
    int mode;
    tl_status st = TL_RAISED;

    if (tl_call_begin(&k, mod, args, nargs, 4, TL_TAIL_NONE, "pool(h, mask, mode, out") < 0) return NULL;
    if (get_mode(args[2], &mode) < 0 || tl_call_tail(&k) < 0) return NULL;
    const int cpu = k.dev->device == TL_CPU;
    if (tl_call_import(&k, t, pos, TL_COUNT(t), 2) < 0 ||
        tl_call_check(&k, tl_check_pool(&h.t, tl_opt(&mask), mode, &out.t, cpu, &k.why)) < 0)
        goto end;
    Py_BEGIN_ALLOW_THREADS
    st = cpu ? k.dev->cpu.pool(&h.t, tl_opt(&mask), mode, &out.t, k.nthreads)
             : k.dev->cuda.pool(&h.t, tl_opt(&mask), mode, &out.t, k.s.stream);
    Py_END_ALLOW_THREADS
end:
    return tl_call_end(&k, t, TL_COUNT(t), st, "pool", NULL);
}

const tl_family tl_pool_family = {.cpu = (PyMethodDef[]){TL_METHOD("pool", py_pool, pool_cpu_doc), {NULL}},
                                  .cuda = (PyMethodDef[]){TL_METHOD("pool", py_pool, pool_cuda_doc), {NULL}}};
