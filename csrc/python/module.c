/* module.c: tltorch._C, the CPU kernels' module: its device table (the CPU kernels, the CPU's device check)
 * and what only it has (describe, the SIMD level, the thread default). The bindings are the bind_<family>.c
 * files it shares with tltorch._cuda (bind.h); each releases the GIL around its kernel. */
#include "bind.h" /* first: it brings Python.h */

#include "../cpu/cpu.h"

static int
need_cpu(const tl_arg *a, const tl_arg *ref)
{
    if (a->t.device == TL_CPU) return 0;
    PyErr_Format(PyExc_ValueError, "argument '%s' is on cuda:%d; tltorch._C runs on the CPU (CUDA tensors go to "
                 "tltorch._cuda)", a->name, a->t.device_id);
    return -1;
}

static void
raise_status(tl_status st, const char *op, const char *layout_hint)
{
    tl_raise_status(st, op); /* any stride is read here: no layout hint */
}

static const tl_backend cpu = {
    .name = "tltorch._C",
    .device = TL_CPU,
    .need_device = need_cpu,
    .raise = raise_status,
    .cpu = {.gemm = tl_gemm_cpu, .qgemm = tl_qgemm_cpu, .colsum = tl_colsum_cpu, .linear_xent = tl_linear_xent_cpu,
            .dropout = tl_dropout_cpu, .lora_forward = tl_lora_forward_cpu, .lora_backward = tl_lora_backward_cpu,
            .pool = tl_pool_cpu, .adamw = tl_adamw_cpu, .linear_head = tl_linear_head_cpu,
            .distill_rows = tl_distill_rows_cpu, .int8_pack = tl_int8_pack_cpu, .int8_linear = tl_int8_linear_cpu,
            .int8_packed_info = tl_int8_packed_info,
            .int8_packed_bytes = tl_int8_packed_bytes, .int8_ws_bytes = tl_int8_linear_ws_bytes,
            .int8_dequant = tl_int8_dequant_cpu},
};

/* describe(obj): what the bridge sees, for tests and debugging. */
static PyObject *
py_describe(PyObject *mod, PyObject *obj)
{
    static const char *via_names[] = {"none", "exchange", "exchange_managed", "versioned", "legacy"};
    tl_arg a = TL_ARG_INIT("obj");
    PyObject *shape = NULL, *strides = NULL, *ret = NULL;
    if (tl_arg_import(&tl_module_of(mod)->bridge, obj, &a) < 0) goto fail;
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
py_bf16_gemm_isa(PyObject *mod, PyObject *unused)
{
    return PyUnicode_FromString(tl_gemm_bf16_isa());
}

static PyObject *
py_int8_isa(PyObject *mod, PyObject *unused)
{
    return PyUnicode_FromString(tl_int8_isa());
}

/* int8_bytes(rows, K, group, packed): the int8 linear layer's workspace for `rows` rows of x (packed
 * false), or the packed weight of `rows` output channels (true), in bytes. */
static PyObject *
py_int8_bytes(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (tl_nargs_is(nargs, 4, "int8_bytes(rows, K, group, packed)") < 0) return NULL;
    long long v[3];
    static const char *names[] = {"rows", "K", "group"};
    for (int i = 0; i < 3; i++) {
        v[i] = PyLong_AsLongLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred()) return NULL;
        if (v[i] < 0) {
            PyErr_Format(PyExc_ValueError, "argument '%s' must be >= 0, got %lld", names[i], v[i]);
            return NULL;
        }
    }
    const int packed = PyObject_IsTrue(args[3]);
    if (packed < 0) return NULL;
    if (!tl_int8_group_ok(v[2])) {
        PyErr_Format(PyExc_ValueError, "argument 'group' must be a multiple of 4 in [4, %d], got %lld",
                     TL_INT8_MAX_GROUP, v[2]);
        return NULL;
    }
    return PyLong_FromLongLong(packed ? tl_int8_packed_bytes(v[0], v[1], v[2]) : tl_int8_linear_ws_bytes(v[0], v[1], v[2]));
}

static PyObject *
py_default_threads(PyObject *mod, PyObject *unused)
{
    return PyLong_FromLong(tl_cpu_default_threads());
}

static PyObject *
py_threads(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    int n;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "threads(n[, flops]) takes 1 or 2 arguments");
        return NULL;
    }
    const double flops = nargs == 2 ? PyFloat_AsDouble(args[1]) : 0.0;
    if ((flops == -1.0 && PyErr_Occurred()) || tl_get_threads(args[0], &n) < 0) return NULL;
    return PyLong_FromLong(tl_threads_for(n, flops));
}

static PyMethodDef methods[] = {
    {"describe", py_describe, METH_O, "describe(obj): the tensor as the DLPack bridge reads it."},
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use here."},
    {"int8_isa", py_int8_isa, METH_NOARGS, "The instruction set the int8 linear layer uses here."},
    {"bf16_gemm_isa", py_bf16_gemm_isa, METH_NOARGS,
     "The GEMM micro-kernel bfloat16 operands take here: avx512_bf16 (dot products) or widened to float32."},
    {"int8_bytes", (PyCFunction)(void (*)(void))py_int8_bytes, METH_FASTCALL,
     "int8_bytes(rows, K, group, packed): bytes of the int8 layer's packed weight (packed true; rows = out "
     "features) or of its workspace for rows of x."},
    {"default_threads", py_default_threads, METH_NOARGS, "Threads used when nthreads <= 0."},
    {"threads", (PyCFunction)(void (*)(void))py_threads, METH_FASTCALL,
     "threads(n[, flops]): the threads a CPU kernel asked for n, of flops work, takes now (fewer while other "
     "processes keep the CPUs busy, unless the work is large)."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *mod)
{
    if (tl_module_init(mod, &cpu) < 0) return -1;
    (void)tl_cpu_level(); /* fix the SIMD level now, with the GIL held (it reads the environment) */
    (void)tl_int8_isa();  /* and the int8 kernel's (it asks Linux for the AMX tile state) */
    if (PyModule_AddIntConstant(mod, "GEMM_KC", TL_GEMM_KC) < 0) return -1;
    return PyModule_AddIntConstant(mod, "XENT_SKINNY_C", TL_XENT_SKINNY_C);
}

TL_MODULE(_C, "tltorch._C", "tltorch's C kernels (CPU).", tl_module, methods, module_exec, tl_module_free)
