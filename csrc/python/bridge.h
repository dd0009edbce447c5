/* bridge.h: turning Python objects into tl_tensor views through DLPack, and tl_status into exceptions.
 * Shared by the two extension modules (tltorch._C and tltorch._cuda); each keeps its own bridge state. */
#ifndef TL_BRIDGE_H
#define TL_BRIDGE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../dlpack.h"
#include "../tl.h"

#define TL_BRIDGE_CACHE 16

/* Per-module state: which Python types publish the DLPack C exchange table, and torch's Tensor type
 * and torch.cuda module once torch is imported (for the stream of a tensor read without that table). */
typedef struct {
    PyTypeObject *type[TL_BRIDGE_CACHE]; /* strong references */
    const DLPackExchangeAPI *api[TL_BRIDGE_CACHE];
    int n;
    PyObject *max_version; /* the tuple (1, DLPACK_MINOR_VERSION) */
    PyObject *str_dlpack, *str_exchange, *str_device, *str_torch, *str_current_stream, *str_cuda_stream;
    PyObject *kw_max_version, *kw_stream, *kw_stream_max_version;
    PyObject *torch_tensor, *torch_cuda; /* NULL until torch is seen imported */
} tl_bridge;

/* The stream a call into tltorch._cuda runs on. The call's first CUDA argument decides it (each binding
 * imports its reference argument, the output or x, first): the producer's current stream for that
 * device. Every argument then read through __dlpack__ is asked for it as stream=, so that its producer
 * orders its pending work before the kernel (bridge.c says how each kind of producer is asked). */
typedef struct {
    int decided;
    int device_id;
    void *stream; /* cudaStream_t; NULL: the legacy default stream */
} tl_stream;

/* How an argument reached us; what must be released after the kernel. */
typedef enum { TL_VIA_NONE = 0, TL_VIA_EXCHANGE, TL_VIA_EXCHANGE_MANAGED, TL_VIA_VERSIONED, TL_VIA_LEGACY } tl_via;

typedef struct {
    tl_tensor t;
    const char *name; /* the argument's name, for messages */
    tl_via via;
    int readonly;
    const DLPackExchangeAPI *api; /* the producer's exchange table, if it has one */
    void *managed;                /* DLManagedTensor(Versioned)* we must hand back */
} tl_arg;

int tl_bridge_init(tl_bridge *b);
void tl_bridge_clear(tl_bridge *b);
int tl_bridge_traverse(tl_bridge *b, visitproc visit, void *arg);

/* Import `obj` as argument `name`. Returns 0, or -1 with an exception naming the argument. `out`
 * must be zero-initialised (TL_ARG_INIT) so that tl_arg_release is safe whatever happened. */
#define TL_ARG_INIT(nm) {.name = (nm)}
int tl_arg_import(tl_bridge *b, PyObject *obj, tl_arg *out);
/* The same for a call that runs on a CUDA stream: decides *s (tl_stream) or hands it to the producer. */
int tl_arg_import_on(tl_bridge *b, PyObject *obj, tl_arg *out, tl_stream *s);
/* Hand a managed tensor back to its producer (its deleter runs exactly once). Needs the GIL. */
void tl_arg_release(tl_arg *a);

/* Checks that raise TypeError/ValueError naming the argument; each returns 0 or -1. */
int tl_need_ndim(const tl_arg *a, int ndim);
int tl_need_float(const tl_arg *a);                      /* float32, float16 or bfloat16 */
int tl_need_dtype_of(const tl_arg *a, const tl_arg *ref); /* same dtype as ref */
int tl_need_dtype_f32_or(const tl_arg *a, const tl_arg *ref);
int tl_need_size(const tl_arg *a, int dim, int64_t size, const char *what);
int tl_need_writable(const tl_arg *a);                   /* not read-only, no overlapping elements */
int tl_need_same_device(const tl_arg *a, const tl_arg *ref);

/* Positional-argument helpers shared by the modules; each returns 0, or -1 with an exception naming it. */
int tl_nargs_is(Py_ssize_t nargs, Py_ssize_t want, const char *sig);
int tl_get_float(PyObject *o, const char *name, float *out);
int tl_get_int(PyObject *o, const char *name, int *out); /* any int that fits a C int */
int tl_get_threads(PyObject *o, int *out);              /* <= 0: the default; capped at 1024 */
int tl_need_index(const tl_arg *a);                     /* int64 or int32 class indices */

/* gemm's and colsum's tensor checks (devices are each module's business). */
int tl_check_gemm_args(const tl_arg *a, const tl_arg *b, const tl_arg *c, const tl_arg *bias);
int tl_check_colsum_args(const tl_arg *x, const tl_arg *out);

/* linear_xent's options from (ignore_index, label_smoothing, reduction) and its tensor checks (the
 * tensors imported and on one device; the workspace is each module's own business). dw: float32, or
 * also x's dtype when dw_of_x (CUDA, which says itself when its plan allows that). */
int tl_get_xent_opts(PyObject *ignore_index, PyObject *label_smoothing, PyObject *reduction,
                     tl_xent_opts *o);
int tl_check_xent_args(const tl_arg *x, const tl_arg *w, const tl_arg *bias, const tl_arg *target,
                       const tl_arg *cw, const tl_arg *grow, const tl_arg *loss, const tl_arg *dx,
                       const tl_arg *dw, const tl_arg *db, int reduction, int dw_of_x);

/* The dropout and LoRA kernels' scalar and tensor checks (shared by both modules): seed is an int in
 * [0, 2**64), p a dropout probability in [0, 1). The tensors imported (bias and the gradients dx, da, db
 * may have via == 0: none, not wanted); the CPU or the GPU is each module's business, and so are the
 * workspaces. */
int tl_get_seed(PyObject *o, uint64_t *out);
int tl_get_dropout(PyObject *o, float *out);
int tl_check_dropout_args(const tl_arg *x, const tl_arg *out);
int tl_check_lora_forward_args(const tl_arg *x, const tl_arg *w, const tl_arg *bias, const tl_arg *a,
                               const tl_arg *b, const tl_arg *y, const tl_arg *su);
int tl_check_lora_backward_args(const tl_arg *dy, const tl_arg *x, const tl_arg *w, const tl_arg *a,
                                const tl_arg *b, const tl_arg *su, const tl_arg *dx, const tl_arg *da,
                                const tl_arg *db);

/* pool's mode (0 cls, 1 mean, 2 max) and its tensor checks (mask may have via == 0). */
int tl_get_pool_mode(PyObject *o, int *mode);
int tl_check_pool_args(const tl_arg *h, const tl_arg *mask, const tl_arg *out, int mode);

/* AdamW's (lr, beta1, beta2, eps, weight_decay, step) from args[0..5], each checked by name, and its
 * tensor checks (1-D, float32 states, one length; devices and overlaps are each module's business). */
int tl_get_adamw_opts(PyObject *const *args, tl_adamw_opts *o);
int tl_check_adamw_args(const tl_arg *param, const tl_arg *grad, const tl_arg *exp_avg, const tl_arg *exp_avg_sq);

/* tltorch._C's pieces: its module state begins with its bridge; a tensor that is not on the CPU raises
 * ValueError; the method tables of the binding files other than module.c (bind_*.c). */
static inline tl_bridge *
tl_cpu_bridge(PyObject *mod)
{
    return (tl_bridge *)PyModule_GetState(mod);
}
int tl_need_cpu(const tl_arg *a);
extern PyMethodDef tl_lora_methods[];
extern PyMethodDef tl_workflow_methods[];

/* Raise the exception that fits `st`, naming the operation. Returns NULL for `return` chaining. */
PyObject *tl_raise_status(tl_status st, const char *op);

#endif /* TL_BRIDGE_H */
