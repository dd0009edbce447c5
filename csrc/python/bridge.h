/* bridge.h: turning Python objects into tl_tensor views through DLPack (bridge.c), and nothing else.
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

#endif /* TL_BRIDGE_H */
