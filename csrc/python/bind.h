/* bind.h: what the bind_<family>.c files share. tltorch._C and tltorch._cuda compile the same bindings;
 * each module's state points to its device table (tl_backend), which says what differs: the device a
 * tensor must be on, whether a call runs on a stream, how a kernel's status is raised, cuBLAS's context
 * and workspace (CUDA), and the kernels. A binding reads its arguments, has tl.h's check for its op
 * (csrc/check.c) check the tensors, words what failed (tl_raise_check), and calls its device's kernel
 * with the GIL released. Positional arguments only: tltorch's Python side is the one caller and names
 * them; a device adds its own after the op's (tl_call_begin). */
#ifndef TL_BIND_H
#define TL_BIND_H

#include "bridge.h" /* first: it brings Python.h */

#define TL_COUNT(arr) (sizeof(arr) / sizeof *(arr))
#define TL_METHOD(name, fn, doc) {name, (PyCFunction)(void (*)(void))(fn), METH_FASTCALL, doc}

typedef struct tl_backend tl_backend;

/* Both modules' state begins with this. */
typedef struct {
    tl_bridge bridge;
    const tl_backend *dev;
} tl_module;

/* What an op takes after its own arguments on CUDA, the value their count (on the CPU: nthreads, always). */
typedef enum {
    TL_TAIL_NONE = 0,
    TL_TAIL_TF32 = 1,  /* allow_tf32 */
    TL_TAIL_CUBLAS = 2 /* cublas_ws, allow_tf32 */
} tl_tail;

/* One call into a binding: where it runs, with the device's arguments. */
typedef struct {
    PyObject *mod;
    const tl_backend *dev;
    tl_bridge *br;
    PyObject *const *args;
    Py_ssize_t n; /* the op's own arguments: the device's come after them */
    tl_tail tail;
    tl_check why;        /* what the op's check found */
    tl_stream s;         /* CUDA: the stream, decided by the first tensor imported */
    int nthreads;        /* CPU */
    int tf32;            /* CUDA: allow_tf32 */
    tl_arg cws;          /* CUDA, TL_TAIL_CUBLAS: cublas_ws (via == 0: None, cuBLAS's own) */
    void *cws_data;      /* CUDA: cuBLAS's workspace and the device's context, from tl_backend.cublas */
    size_t cws_bytes;
    tl_cuda_context *ctx;
} tl_call;

/* A device's table: tltorch._C's is in module.c, tltorch._cuda's in cuda_module.c. */
struct tl_backend {
    const char *name; /* "tltorch._C" or "tltorch._cuda", for messages */
    tl_device device;
    /* 0, or -1 with ValueError naming a: a is not on this device (on CUDA: not on ref's GPU) */
    int (*need_device)(const tl_arg *a, const tl_arg *ref);
    /* raise the exception for a kernel's status st; op: "tltorch._C.gemm"; layout_hint: what CUDA's
     * kernels can read, for TL_ERR_LAYOUT */
    void (*raise)(tl_status st, const char *op, const char *layout_hint);
    /* CUDA: ws (cuBLAS's workspace; via == 0: None) checked for a call on ref's GPU, and that GPU's
     * context, into k (cws_data, cws_bytes, ctx); 0 or -1 with an exception */
    int (*cublas)(tl_call *k, const tl_arg *ws, const tl_arg *ref);
    struct { /* tltorch._C's */
        __typeof__(tl_gemm_cpu) *gemm;
        __typeof__(tl_qgemm_cpu) *qgemm;
        __typeof__(tl_colsum_cpu) *colsum;
        __typeof__(tl_linear_xent_cpu) *linear_xent;
        __typeof__(tl_linear_head_cpu) *linear_head;
        __typeof__(tl_distill_rows_cpu) *distill_rows;
        __typeof__(tl_dropout_cpu) *dropout;
        __typeof__(tl_lora_forward_cpu) *lora_forward;
        __typeof__(tl_lora_backward_cpu) *lora_backward;
        __typeof__(tl_pool_cpu) *pool;
        __typeof__(tl_adamw_cpu) *adamw;
        __typeof__(tl_int8_pack_cpu) *int8_pack;
        __typeof__(tl_int8_linear_cpu) *int8_linear;
        __typeof__(tl_int8_packed_info) *int8_packed_info;
        __typeof__(tl_int8_packed_bytes) *int8_packed_bytes;
        __typeof__(tl_int8_linear_ws_bytes) *int8_ws_bytes;
        __typeof__(tl_int8_dequant_cpu) *int8_dequant;
    } cpu;
    struct { /* tltorch._cuda's */
        __typeof__(tl_gemm_cuda) *gemm;
        __typeof__(tl_colsum_cuda) *colsum;
        __typeof__(tl_linear_xent_cuda) *linear_xent;
        __typeof__(tl_linear_head_cuda) *linear_head;
        __typeof__(tl_xent_cuda_workspace) *xent_workspace;
        __typeof__(tl_dropout_cuda) *dropout;
        __typeof__(tl_lora_forward_cuda) *lora_forward;
        __typeof__(tl_lora_backward_cuda) *lora_backward;
        __typeof__(tl_pool_cuda) *pool;
        __typeof__(tl_adamw_cuda) *adamw;
        __typeof__(tl_int8_dequant_cuda) *int8_dequant;
    } cuda;
};

/* A family's methods on each device (NULL: none there), from its bind_<family>.c. */
typedef struct {
    PyMethodDef *cpu, *cuda;
} tl_family;
extern const tl_family tl_gemm_family, tl_frozen_family, tl_head_family, tl_lora_family, tl_pool_family,
    tl_adamw_family;

/* A module's exec step: its state (tl_module) for the device dev, and every family's methods for it. */
int tl_module_init(PyObject *mod, const tl_backend *dev);
int tl_module_traverse(PyObject *mod, visitproc visit, void *arg);
int tl_module_clear(PyObject *mod);
void tl_module_free(void *mod);

/* The module `name` and its PyInit_<init>: a state of type `state` (beginning with a tl_module), its own methods,
 * exec (which calls tl_module_init), free_state (tl_module_free, or one that ends with it). */
#define TL_MODULE(init, name, doc, state, methods, exec, free_state)                                               \
    static PyModuleDef_Slot init##_slots[] = {{Py_mod_exec, exec}, {0, NULL}};                                   \
    static struct PyModuleDef init##_def = {PyModuleDef_HEAD_INIT, name, doc, sizeof(state), methods, init##_slots, \
                                           tl_module_traverse, tl_module_clear, free_state};                       \
    PyMODINIT_FUNC PyInit_##init(void)                                                                             \
    {                                                                                                              \
        return PyModuleDef_Init(&init##_def);                                                                      \
    }

static inline tl_module *
tl_module_of(PyObject *mod)
{
    return (tl_module *)PyModule_GetState(mod);
}

/* The tensor of an optional argument, NULL when it was None. */
static inline tl_tensor *
tl_opt(tl_arg *a)
{
    return a->via ? &a->t : NULL;
}

/* Swap dims 0 and 1 of a view (a 2-D one's transpose; any other keeps its ndim, which its check names). */
static inline void
tl_transpose2d(tl_tensor *t)
{
    int64_t s = t->shape[0], st = t->strides[0];
    t->shape[0] = t->shape[1];
    t->strides[0] = t->strides[1];
    t->shape[1] = s;
    t->strides[1] = st;
}

/* Raise the exception that fits a failed check (TypeError for a dtype, else ValueError). Returns -1. */
int tl_raise_check(const tl_check *why);
/* Raise the exception that fits `st`, naming the operation. Returns NULL for `return` chaining. */
PyObject *tl_raise_status(tl_status st, const char *op);

/* Scalar arguments; each returns 0, or -1 with an exception naming the argument. */
int tl_get_float(PyObject *o, const char *name, float *out);
int tl_get_int(PyObject *o, const char *name, int *out); /* any int that fits a C int */
int tl_get_threads(PyObject *o, int *out);              /* <= 0: the default; capped at 1024 */
int tl_nargs_is(Py_ssize_t nargs, Py_ssize_t want, const char *sig);

/* A binding's status until its kernel has answered: leaving then, an exception is set. */
#define TL_RAISED ((tl_status)-1)

/* tl_check.readonly for the bindings' tensors: each the t of a tl_arg. */
int tl_arg_readonly(const tl_tensor *t);
/* The slow paths of the steps below: the count's TypeError, a kernel's status raised. */
int tl_call_miscount(const tl_call *k, Py_ssize_t nargs, Py_ssize_t want, const char *sig);
void tl_call_raise(const tl_call *k, tl_status st, const char *op, const char *layout_hint);

/* A call's steps, inline: what they cost is what every call of a tiny op pays. */

/* Start a call of an op taking n arguments of its own (then the device's: nthreads on the CPU; on CUDA
 * those of `tail`); sig: "gemm(a, b, c, bias, ws, alpha, beta", for the count's message. 0 or -1 with
 * TypeError. The call's other fields are written by the steps that use them: nthreads and tf32 by
 * tl_call_tail, cws_data, cws_bytes and ctx by tl_call_cublas. */
static inline int
tl_call_begin(tl_call *k, PyObject *mod, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t n, tl_tail tail,
              const char *sig)
{
    tl_module *m = tl_module_of(mod);
    const Py_ssize_t want = n + (m->dev->device == TL_CPU ? 1 : (Py_ssize_t)tail);
    k->mod = mod;
    k->dev = m->dev;
    k->br = &m->bridge;
    k->args = args;
    k->n = n;
    k->tail = tail;
    k->why.readonly = tl_arg_readonly;
    k->s.decided = 0;
    k->cws.name = "cublas_ws";
    k->cws.via = TL_VIA_NONE;
    k->cws.managed = NULL;
    return nargs == want ? 0 : tl_call_miscount(k, nargs, want, sig);
}

/* The device's arguments' values: nthreads, allow_tf32 (read after the op's own scalars). */
static inline int
tl_call_tail(tl_call *k)
{
    if (k->dev->device == TL_CPU) return tl_get_threads(k->args[k->n], &k->nthreads);
    if (k->tail == TL_TAIL_NONE) return 0;
    k->tf32 = PyObject_IsTrue(k->args[k->n + (Py_ssize_t)k->tail - 1]);
    return k->tf32 < 0 ? -1 : 0;
}

/* t[i] from args[pos[i]] for i < n, t[0] first (on CUDA its producer decides the stream), None leaving
 * t[i] for i >= nreq unset; then cublas_ws (TL_TAIL_CUBLAS on CUDA); then every tensor's device. */
static inline int
tl_call_import(tl_call *k, tl_arg *const *t, const int *pos, int n, int nreq)
{
    tl_stream *s = k->dev->device == TL_CUDA ? &k->s : NULL;
    PyObject *const *args = k->args;
    /* Unrolled (n, nreq and pos are each binding's constants): these loops run on every call. */
#pragma GCC unroll 16
    for (int i = 0; i < n; i++)
        if ((i < nreq || args[pos[i]] != Py_None) && tl_arg_import_on(k->br, args[pos[i]], t[i], s) < 0) return -1;
    if (s && k->tail == TL_TAIL_CUBLAS && args[k->n] != Py_None && tl_arg_import_on(k->br, args[k->n], &k->cws, s) < 0)
        return -1;
#pragma GCC unroll 16
    for (int i = 0; i < n; i++) /* need_device words it when a tensor is elsewhere than t[0], or not there */
        if (t[i]->via && (t[i]->t.device != k->dev->device || t[i]->t.device_id != t[0]->t.device_id) &&
            k->dev->need_device(t[i], t[0]) < 0)
            return -1;
    return 0;
}

/* The op's check's verdict st (k->why says more): 0, or -1 with the exception naming the argument. */
static inline int
tl_call_check(tl_call *k, tl_status st)
{
    return st ? tl_raise_check(&k->why) : 0;
}

/* CUDA: cuBLAS's workspace ws and the context of ref's GPU (tl_backend.cublas); nothing on the CPU. */
static inline int
tl_call_cublas(tl_call *k, const tl_arg *ws, const tl_arg *ref)
{
    return k->dev->cublas ? k->dev->cublas(k, ws, ref) : 0;
}

/* The call's end: None for TL_OK, else NULL with the exception (st's, naming "<module>.<op>", or the one set
 * for TL_RAISED); then t[0..n) and cublas_ws handed back. */
static inline PyObject *
tl_call_end(tl_call *k, tl_arg *const *t, int n, tl_status st, const char *op, const char *layout_hint)
{
    if (st != TL_OK && st != TL_RAISED) tl_call_raise(k, st, op, layout_hint);
#pragma GCC unroll 16
    for (int i = 0; i < n; i++)
        if (t[i]->managed) tl_arg_release(t[i]);
    if (k->cws.managed) tl_arg_release(&k->cws);
    return st == TL_OK ? Py_NewRef(Py_None) : NULL;
}

#endif /* TL_BIND_H */
