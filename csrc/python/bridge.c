/* bridge.c: DLPack import for the extension modules.
 *
 * Three ways in, fastest first:
 *  1. The producer's type publishes `__dlpack_c_exchange_api__` (torch >= 2.9): one C call fills a
 *     borrowed DLTensor, no capsule and no Python call per tensor. The table is cached per type.
 *  2. `obj.__dlpack__(max_version=(1, m))` returns a "dltensor_versioned" capsule.
 *  3. Older producers: `obj.__dlpack__()` returns a legacy "dltensor" capsule.
 * A raw capsule may also be passed directly. A consumed capsule is renamed "used_..." so that its
 * own destructor leaves the tensor alone, and we call the deleter exactly once in tl_arg_release.
 *
 * Streams (tl_arg_import_on, tltorch._cuda's calls): the call runs on the current stream of the producer
 * of its first CUDA argument, for that argument's device:
 *  - a producer with the exchange table says it (current_work_stream; torch's current stream);
 *  - a torch tensor without it (torch < 2.9) is asked torch.cuda.current_stream(device).cuda_stream;
 *  - any other producer (CuPy, ...) gets the legacy default stream: what DLPack's producers assume when
 *    no stream is named, and one that their blocking streams (CuPy's default kind) are ordered with both
 *    ways, so that the kernel runs after their pending work and before their next.
 * Every argument read through __dlpack__ on that device is asked for stream=<the call's stream> (1 for
 * the legacy default stream; 0 is not a DLPack stream), so its producer makes the stream wait for its
 * own pending work; torch adds no wait when it is its current stream. The exchange table's reads do not
 * wait, so an argument whose producer's current stream is another one is read through __dlpack__. */
#include "bridge.h"

#include <math.h>

#include <limits.h>
#include <string.h>

int
tl_bridge_init(tl_bridge *b)
{
    memset(b, 0, sizeof *b);
    b->max_version = Py_BuildValue("(ii)", DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION);
    b->str_dlpack = PyUnicode_InternFromString("__dlpack__");
    b->str_exchange = PyUnicode_InternFromString("__dlpack_c_exchange_api__");
    b->str_device = PyUnicode_InternFromString("__dlpack_device__");
    b->str_torch = PyUnicode_InternFromString("torch");
    b->str_current_stream = PyUnicode_InternFromString("current_stream");
    b->str_cuda_stream = PyUnicode_InternFromString("cuda_stream");
    b->kw_max_version = Py_BuildValue("(s)", "max_version");
    b->kw_stream = Py_BuildValue("(s)", "stream");
    b->kw_stream_max_version = Py_BuildValue("(ss)", "stream", "max_version");
    if (!b->max_version || !b->str_dlpack || !b->str_exchange || !b->str_device || !b->str_torch ||
        !b->str_current_stream || !b->str_cuda_stream || !b->kw_max_version || !b->kw_stream ||
        !b->kw_stream_max_version)
        return -1;
    return 0;
}

void
tl_bridge_clear(tl_bridge *b)
{
    for (int i = 0; i < b->n; i++) Py_CLEAR(b->type[i]);
    b->n = 0;
    Py_CLEAR(b->max_version);
    Py_CLEAR(b->str_dlpack);
    Py_CLEAR(b->str_exchange);
    Py_CLEAR(b->str_device);
    Py_CLEAR(b->str_torch);
    Py_CLEAR(b->str_current_stream);
    Py_CLEAR(b->str_cuda_stream);
    Py_CLEAR(b->kw_max_version);
    Py_CLEAR(b->kw_stream);
    Py_CLEAR(b->kw_stream_max_version);
    Py_CLEAR(b->torch_tensor);
    Py_CLEAR(b->torch_cuda);
}

int
tl_bridge_traverse(tl_bridge *b, visitproc visit, void *arg)
{
    for (int i = 0; i < b->n; i++) Py_VISIT(b->type[i]);
    Py_VISIT(b->torch_tensor);
    Py_VISIT(b->torch_cuda);
    return 0;
}

/* The exchange table of obj's type, or NULL (no exception) when it has none. -1 on error. */
static int
exchange_api(tl_bridge *b, PyObject *obj, const DLPackExchangeAPI **out)
{
    PyTypeObject *tp = Py_TYPE(obj);
    *out = NULL;
    for (int i = 0; i < b->n; i++)
        if (b->type[i] == tp) {
            *out = b->api[i];
            return 0;
        }
    const DLPackExchangeAPI *api = NULL;
    PyObject *cap = PyObject_GetAttr((PyObject *)tp, b->str_exchange);
    if (!cap) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
    } else {
        if (PyCapsule_IsValid(cap, "dlpack_exchange_api")) {
            api = (const DLPackExchangeAPI *)PyCapsule_GetPointer(cap, "dlpack_exchange_api");
            /* A table of another major version is not ours to read; fall back to __dlpack__. */
            if (api && (api->header.version.major != DLPACK_MAJOR_VERSION ||
                        !api->managed_tensor_from_py_object_no_sync))
                api = NULL;
        }
        Py_DECREF(cap);
    }
    if (b->n < TL_BRIDGE_CACHE) { /* the table lives as long as the process, per the spec */
        Py_INCREF(tp);
        b->type[b->n] = tp;
        b->api[b->n] = api;
        b->n++;
    }
    *out = api;
    return 0;
}

static const char *
device_name(int dev)
{
    switch (dev) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda";
    case kDLCUDAHost: return "cuda_host";
    case kDLCUDAManaged: return "cuda_managed";
    case kDLROCM: return "rocm";
    case kDLMetal: return "mps";
    case kDLOneAPI: return "xpu";
    default: return "another device";
    }
}

/* Fill out->t from a DLTensor; -1 with an exception for what tl_tensor cannot describe. */
static int
from_dltensor(const DLTensor *dl, tl_arg *out)
{
    tl_tensor *t = &out->t;
    const DLDataType d = dl->dtype;
    if (d.lanes != 1) goto bad_dtype;
    if (d.code == kDLFloat && d.bits == 32) t->dtype = TL_FLOAT32;
    else if (d.code == kDLFloat && d.bits == 16) t->dtype = TL_FLOAT16;
    else if (d.code == kDLBfloat && d.bits == 16) t->dtype = TL_BFLOAT16;
    else if (d.code == kDLFloat && d.bits == 64) t->dtype = TL_FLOAT64;
    else if (d.code == kDLInt && d.bits == 64) t->dtype = TL_INT64;
    else if (d.code == kDLInt && d.bits == 32) t->dtype = TL_INT32;
    else if (d.code == kDLInt && d.bits == 8) t->dtype = TL_INT8;
    else if (d.code == kDLUInt && d.bits == 8) t->dtype = TL_UINT8;
    else goto bad_dtype;

    switch ((int)dl->device.device_type) {
    case kDLCPU:
    case kDLCUDAHost: t->device = TL_CPU; t->device_id = 0; break;
    case kDLCUDA: t->device = TL_CUDA; t->device_id = dl->device.device_id; break;
    default:
        PyErr_Format(PyExc_ValueError,
                     "argument '%s' is on %s; tltorch runs on the CPU and on CUDA GPUs", out->name,
                     device_name((int)dl->device.device_type));
        return -1;
    }
    if (dl->ndim < 0 || dl->ndim > TL_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "argument '%s' has %d dimensions; at most %d are supported",
                     out->name, (int)dl->ndim, TL_MAX_NDIM);
        return -1;
    }
    t->ndim = dl->ndim;
    int64_t compact = 1;
    for (int i = dl->ndim - 1; i >= 0; i--) {
        t->shape[i] = dl->shape[i];
        if (t->shape[i] < 0) {
            PyErr_Format(PyExc_ValueError, "argument '%s' has a negative size", out->name);
            return -1;
        }
        t->strides[i] = dl->strides ? dl->strides[i] : compact;
        compact *= t->shape[i];
    }
    t->data = dl->data ? (char *)dl->data + dl->byte_offset : NULL;
    if (t->data && (uintptr_t)t->data % tl_dtype_size(t->dtype) != 0) {
        PyErr_Format(PyExc_ValueError, "argument '%s' is not aligned to its %zu-byte elements", out->name,
                     tl_dtype_size(t->dtype));
        return -1;
    }
    return 0;
bad_dtype:
    PyErr_Format(PyExc_TypeError, "argument '%s' has a DLPack dtype (code %d, %d bits, %d lanes) "
                 "that tltorch does not take", out->name, (int)d.code, (int)d.bits, (int)d.lanes);
    return -1;
}

/* Take ownership of a capsule's managed tensor: rename it, remember the deleter. */
static int
from_capsule(PyObject *cap, tl_arg *out)
{
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (!m || PyCapsule_SetName(cap, "used_dltensor_versioned") < 0) return -1;
        out->managed = m;
        out->via = TL_VIA_VERSIONED;
        if (m->version.major != DLPACK_MAJOR_VERSION) {
            PyErr_Format(PyExc_ValueError, "argument '%s' is a DLPack %u.%u tensor; tltorch reads 1.x",
                         out->name, m->version.major, m->version.minor);
            return -1;
        }
        out->readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
        return from_dltensor(&m->dl_tensor, out);
    }
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
        if (!m || PyCapsule_SetName(cap, "used_dltensor") < 0) return -1;
        out->managed = m;
        out->via = TL_VIA_LEGACY;
        return from_dltensor(&m->dl_tensor, out);
    }
    const char *nm = PyCapsule_GetName(cap);
    if (!nm) PyErr_Clear();
    if (nm && (!strcmp(nm, "used_dltensor") || !strcmp(nm, "used_dltensor_versioned")))
        PyErr_Format(PyExc_ValueError, "argument '%s' is a DLPack capsule that was already consumed",
                     out->name);
    else
        PyErr_Format(PyExc_TypeError, "argument '%s' is a capsule named '%s', not a DLPack tensor",
                     out->name, nm ? nm : "?");
    return -1;
}

/* Keep the producer's reason (e.g. "requires grad") but say which argument it was about. Returns -1. */
static int
producer_failed(const tl_arg *out)
{
    PyObject *et, *ev, *etb;
    PyErr_Fetch(&et, &ev, &etb);
    PyErr_NormalizeException(&et, &ev, &etb);
    /* The producer's first line only: torch appends a C++ backtrace to some messages. */
    PyObject *msg = ev ? PyObject_Str(ev) : NULL, *first = NULL;
    if (msg) {
        Py_ssize_t nl = PyUnicode_FindChar(msg, '\n', 0, PyUnicode_GET_LENGTH(msg), 1);
        first = nl >= 0 ? PyUnicode_Substring(msg, 0, nl) : Py_NewRef(msg);
    }
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "argument '%s' could not be read through DLPack: %S", out->name,
                 first ? first : Py_None);
    Py_XDECREF(msg);
    Py_XDECREF(first);
    Py_XDECREF(et);
    Py_XDECREF(ev);
    Py_XDECREF(etb);
    return -1;
}

/* Through the exchange table: a borrowed DLTensor where the producer offers one, else a managed one. */
static int
from_exchange(const DLPackExchangeAPI *api, PyObject *obj, tl_arg *out)
{
    out->api = api;
    if (api->dltensor_from_py_object_no_sync) {
        DLTensor dl;
        if (api->dltensor_from_py_object_no_sync(obj, &dl) != 0) return producer_failed(out);
        out->via = TL_VIA_EXCHANGE;
        return from_dltensor(&dl, out);
    }
    DLManagedTensorVersioned *m = NULL;
    if (api->managed_tensor_from_py_object_no_sync(obj, &m) != 0 || !m) return producer_failed(out);
    out->managed = m;
    out->via = TL_VIA_EXCHANGE_MANAGED;
    out->readonly = (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    return from_dltensor(&m->dl_tensor, out);
}

/* 1 when obj is a torch tensor, 0 when not (also while torch is not imported: then none exists), -1 on
 * error. torch.Tensor and torch.cuda are kept from the first look at an imported torch. */
static int
is_torch_tensor(tl_bridge *b, PyObject *obj)
{
    PyObject *torch = NULL, *tensor = NULL, *cuda = NULL;
    if (!b->torch_tensor) {
        if (!(torch = PyImport_GetModule(b->str_torch))) return PyErr_Occurred() ? -1 : 0;
        if (!(tensor = PyObject_GetAttrString(torch, "Tensor")) ||
            !(cuda = PyObject_GetAttrString(torch, "cuda")))
            goto fail;
        Py_XSETREF(b->torch_tensor, tensor);
        Py_XSETREF(b->torch_cuda, cuda);
        Py_DECREF(torch);
    }
    return PyObject_IsInstance(obj, b->torch_tensor);
fail:
    Py_XDECREF(torch);
    Py_XDECREF(tensor);
    Py_XDECREF(cuda);
    return -1;
}

/* The current stream on CUDA device dev of obj's producer, read without its exchange table: torch's
 * (torch.cuda.current_stream, looked up per call so that a replacement of it is obeyed) for a torch
 * tensor, else the legacy default stream (NULL). 0, or -1 with an exception. */
static int
producer_stream(tl_bridge *b, PyObject *obj, int dev, void **stream)
{
    PyObject *fn = NULL, *cur = NULL, *handle = NULL;
    int rc = -1, torch = is_torch_tensor(b, obj);
    *stream = NULL;
    if (torch <= 0) return torch;
    if (!(fn = PyObject_GetAttr(b->torch_cuda, b->str_current_stream)) ||
        !(cur = PyObject_CallFunction(fn, "i", dev)) || !(handle = PyObject_GetAttr(cur, b->str_cuda_stream)))
        goto fail;
    *stream = PyLong_AsVoidPtr(handle);
    if (*stream || !PyErr_Occurred()) rc = 0;
fail:
    Py_XDECREF(fn);
    Py_XDECREF(cur);
    Py_XDECREF(handle);
    return rc;
}

/* The current stream of an exchange-table producer on out's device. */
static int
exchange_stream(tl_bridge *b, PyObject *obj, const tl_arg *out, void **stream)
{
    *stream = NULL;
    if (!out->api->current_work_stream) return producer_stream(b, obj, out->t.device_id, stream);
    if (out->api->current_work_stream(kDLCUDA, out->t.device_id, stream) == 0) return 0;
    if (!PyErr_Occurred())
        PyErr_Format(PyExc_RuntimeError, "the current CUDA stream of argument '%s' could not be read", out->name);
    return -1;
}

/* What obj.__dlpack_device__() says: *type 0 when obj has no such method. */
static int
dlpack_device(tl_bridge *b, PyObject *obj, const tl_arg *out, int *type, int *id)
{
    PyObject *meth = NULL, *dev = NULL;
    long t = -1, i = -1;
    int rc = -1;
    *type = *id = 0;
    if (!(meth = PyObject_GetAttr(obj, b->str_device))) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        return 0;
    }
    if (!(dev = PyObject_CallNoArgs(meth))) {
        rc = producer_failed(out);
        goto done;
    }
    if (PyTuple_Check(dev) && PyTuple_GET_SIZE(dev) == 2) {
        t = PyLong_AsLong(PyTuple_GET_ITEM(dev, 0));
        i = t == -1 ? -1 : PyLong_AsLong(PyTuple_GET_ITEM(dev, 1));
        PyErr_Clear(); /* a bad entry is reported below */
    }
    if (t < 0 || t > INT_MAX || i < 0 || i > INT_MAX) {
        PyErr_Format(PyExc_TypeError, "argument '%s': __dlpack_device__ returned %R, not a (device_type, "
                     "device_id) pair of ints", out->name, dev);
        goto done;
    }
    *type = (int)t;
    *id = (int)i;
    rc = 0;
done:
    Py_XDECREF(meth);
    Py_XDECREF(dev);
    return rc;
}

/* The stream= to hand obj's producer in __dlpack__ (*arg NULL: none, for a tensor that is not on a CUDA
 * GPU, or is on another one than the call, which the device checks then refuse), deciding s first when
 * obj is the call's first CUDA argument. */
static int
stream_arg(tl_bridge *b, PyObject *obj, const tl_arg *out, tl_stream *s, PyObject **arg)
{
    int type, id;
    *arg = NULL;
    if (dlpack_device(b, obj, out, &type, &id) < 0) return -1;
    if (type != kDLCUDA || (s->decided && id != s->device_id)) return 0;
    if (!s->decided) {
        if (producer_stream(b, obj, id, &s->stream) < 0) return -1;
        s->decided = 1;
        s->device_id = id;
    }
    *arg = PyLong_FromVoidPtr(s->stream ? s->stream : (void *)1);
    return *arg ? 0 : -1;
}

/* obj.__dlpack__(stream=, max_version=), stream= left out when stream is NULL and max_version dropped
 * for a producer older than DLPack 1.0 (its TypeError). A new reference, or NULL with an exception. */
static PyObject *
call_dlpack(tl_bridge *b, PyObject *meth, PyObject *stream)
{
    const size_t off = PY_VECTORCALL_ARGUMENTS_OFFSET;
    PyObject *args[3] = {NULL, stream, b->max_version};
    PyObject *cap = stream ? PyObject_Vectorcall(meth, args + 1, off, b->kw_stream_max_version)
                           : PyObject_Vectorcall(meth, args + 2, off, b->kw_max_version);
    if (cap || !PyErr_ExceptionMatches(PyExc_TypeError)) return cap;
    PyErr_Clear();
    return stream ? PyObject_Vectorcall(meth, args + 1, off, b->kw_stream) : PyObject_CallNoArgs(meth);
}

int
tl_arg_import(tl_bridge *b, PyObject *obj, tl_arg *out)
{
    return tl_arg_import_on(b, obj, out, NULL);
}

int
tl_arg_import_on(tl_bridge *b, PyObject *obj, tl_arg *out, tl_stream *s)
{
    const DLPackExchangeAPI *api = NULL;
    PyObject *meth = NULL, *stream = NULL, *cap = NULL;
    int rc = -1;

    if (PyCapsule_CheckExact(obj)) return from_capsule(obj, out);
    if (exchange_api(b, obj, &api) < 0) return -1;
    if (api) {
        void *cur;
        if (from_exchange(api, obj, out) < 0) return -1;
        if (!s || out->t.device != TL_CUDA || (s->decided && out->t.device_id != s->device_id)) return 0;
        if (exchange_stream(b, obj, out, &cur) < 0) return -1;
        if (!s->decided) {
            s->decided = 1;
            s->device_id = out->t.device_id;
            s->stream = cur;
        }
        if (cur == s->stream) return 0;
        /* Its producer works on another stream than the call: ask again, through __dlpack__. */
        tl_arg_release(out);
        *out = (tl_arg)TL_ARG_INIT(out->name);
    }

    if (s && stream_arg(b, obj, out, s, &stream) < 0) return -1;
    if (!(meth = PyObject_GetAttr(obj, b->str_dlpack))) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "argument '%s' must be a tensor or array that supports DLPack (torch.Tensor, "
                         "numpy.ndarray, ...), not %.200s", out->name, Py_TYPE(obj)->tp_name);
        }
        goto done;
    }
    if (!(cap = call_dlpack(b, meth, stream))) {
        rc = producer_failed(out);
        goto done;
    }
    if (!PyCapsule_CheckExact(cap)) {
        PyErr_Format(PyExc_TypeError, "argument '%s': __dlpack__ returned %.200s, not a capsule",
                     out->name, Py_TYPE(cap)->tp_name);
        goto done;
    }
    rc = from_capsule(cap, out);
done:
    Py_XDECREF(meth);
    Py_XDECREF(stream);
    Py_XDECREF(cap);
    return rc;
}

void
tl_arg_release(tl_arg *a)
{
    void *m = a->managed;
    a->managed = NULL;
    if (!m) return;
    if (a->via == TL_VIA_LEGACY) {
        DLManagedTensor *lm = m;
        if (lm->deleter) lm->deleter(lm);
    } else {
        DLManagedTensorVersioned *vm = m;
        if (vm->deleter) vm->deleter(vm);
    }
}

/* ---- checks ------------------------------------------------------------------------------------ */

int
tl_need_ndim(const tl_arg *a, int ndim)
{
    if (a->t.ndim == ndim) return 0;
    PyErr_Format(PyExc_ValueError, "argument '%s' must be %d-D, got a %d-D tensor", a->name, ndim,
                 a->t.ndim);
    return -1;
}

int
tl_need_float(const tl_arg *a)
{
    tl_dtype d = a->t.dtype;
    if (d == TL_FLOAT32 || d == TL_FLOAT16 || d == TL_BFLOAT16) return 0;
    PyErr_Format(PyExc_TypeError, "argument '%s' has dtype %s; expected float32, bfloat16 or float16",
                 a->name, tl_dtype_name(d));
    return -1;
}

int
tl_need_dtype_of(const tl_arg *a, const tl_arg *ref)
{
    if (a->t.dtype == ref->t.dtype) return 0;
    PyErr_Format(PyExc_TypeError, "argument '%s' has dtype %s; expected %s, the dtype of '%s'", a->name,
                 tl_dtype_name(a->t.dtype), tl_dtype_name(ref->t.dtype), ref->name);
    return -1;
}

int
tl_need_dtype_f32_or(const tl_arg *a, const tl_arg *ref)
{
    if (a->t.dtype == TL_FLOAT32 || a->t.dtype == ref->t.dtype) return 0;
    PyErr_Format(PyExc_TypeError, "argument '%s' has dtype %s; expected float32 or %s (the dtype of '%s')",
                 a->name, tl_dtype_name(a->t.dtype), tl_dtype_name(ref->t.dtype), ref->name);
    return -1;
}

int
tl_need_size(const tl_arg *a, int dim, int64_t size, const char *what)
{
    if (a->t.shape[dim] == size) return 0;
    PyErr_Format(PyExc_ValueError, "argument '%s' has size %lld in dim %d; expected %lld (%s)", a->name,
                 (long long)a->t.shape[dim], dim, (long long)size, what);
    return -1;
}

int
tl_need_writable(const tl_arg *a)
{
    if (a->readonly) {
        PyErr_Format(PyExc_ValueError, "argument '%s' is read-only", a->name);
        return -1;
    }
    if (tl_numel(&a->t) == 0) return 0; /* nothing will be written */
    for (int i = 0; i < a->t.ndim; i++)
        if (a->t.shape[i] > 1 && a->t.strides[i] == 0) {
            PyErr_Format(PyExc_ValueError,
                         "argument '%s' is an output but has overlapping elements (stride 0 in dim %d)",
                         a->name, i);
            return -1;
        }
    /* No two elements may share memory (threads would race on them): with the dims of size > 1 sorted
     * by |stride|, each stride must step over everything the smaller ones span. */
    int64_t st[TL_MAX_NDIM], sz[TL_MAX_NDIM];
    int n = 0;
    for (int i = 0; i < a->t.ndim; i++)
        if (a->t.shape[i] > 1) {
            int64_t s = a->t.strides[i] < 0 ? -a->t.strides[i] : a->t.strides[i];
            int k = n++;
            while (k > 0 && st[k - 1] > s) {
                st[k] = st[k - 1];
                sz[k] = sz[k - 1];
                k--;
            }
            st[k] = s;
            sz[k] = a->t.shape[i];
        }
    int64_t span = 1; /* elements covered by the smaller strides, +1 */
    for (int k = 0; k < n; k++) {
        if (st[k] < span) {
            PyErr_Format(PyExc_ValueError, "argument '%s' is an output whose elements overlap in memory "
                         "(a stride of %lld does not step over the %lld elements before it)",
                         a->name, (long long)st[k], (long long)span);
            return -1;
        }
        span = st[k] * (sz[k] - 1) + span;
    }
    return 0;
}

int
tl_need_same_device(const tl_arg *a, const tl_arg *ref)
{
    if (a->t.device == ref->t.device && a->t.device_id == ref->t.device_id) return 0;
    PyErr_Format(PyExc_ValueError, "argument '%s' is on %s:%d but '%s' is on %s:%d", a->name,
                 a->t.device == TL_CUDA ? "cuda" : "cpu", a->t.device_id, ref->name,
                 ref->t.device == TL_CUDA ? "cuda" : "cpu", ref->t.device_id);
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

/* ---- positional arguments ------------------------------------------------------------------------ */

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

int
tl_need_index(const tl_arg *a)
{
    if (a->t.dtype == TL_INT64 || a->t.dtype == TL_INT32) return 0;
    PyErr_Format(PyExc_TypeError, "argument '%s' has dtype %s; expected int64 or int32 class indices",
                 a->name, tl_dtype_name(a->t.dtype));
    return -1;
}

/* ---- gemm and colsum ---------------------------------------------------------------------------- */

int
tl_check_gemm_args(const tl_arg *a, const tl_arg *b, const tl_arg *c, const tl_arg *bias)
{
    if (tl_need_ndim(a, 2) || tl_need_ndim(b, 2) || tl_need_ndim(c, 2)) return -1;
    if (tl_need_float(a) || tl_need_dtype_of(b, a) || tl_need_dtype_f32_or(c, a)) return -1;
    if (tl_need_size(b, 0, a->t.shape[1], "a.shape[1]") || tl_need_size(c, 0, a->t.shape[0], "a.shape[0]") ||
        tl_need_size(c, 1, b->t.shape[1], "b.shape[1]") || tl_need_writable(c))
        return -1;
    if (bias->via && (tl_need_ndim(bias, 1) || tl_need_dtype_f32_or(bias, c) ||
                      tl_need_size(bias, 0, c->t.shape[1], "c.shape[1]")))
        return -1;
    return 0;
}

int
tl_check_colsum_args(const tl_arg *x, const tl_arg *out)
{
    if (tl_need_ndim(x, 2) || tl_need_ndim(out, 1) || tl_need_float(x) || tl_need_dtype_f32_or(out, x) ||
        tl_need_size(out, 0, x->t.shape[1], "x.shape[1]") || tl_need_writable(out))
        return -1;
    return 0;
}

/* ---- linear_xent --------------------------------------------------------------------------------- */

int
tl_get_xent_opts(PyObject *ignore_index, PyObject *label_smoothing, PyObject *reduction, tl_xent_opts *o)
{
    float eps;
    int red;
    long long ign = PyLong_AsLongLong(ignore_index);
    if (ign == -1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "argument 'ignore_index' must be an int of at most 64 bits");
        return -1;
    }
    if (tl_get_float(label_smoothing, "label_smoothing", &eps) < 0 || tl_get_int(reduction, "reduction", &red) < 0)
        return -1;
    if (!(eps >= 0.0f && eps <= 1.0f)) { /* %R: PyErr_Format has no float conversion */
        PyErr_Format(PyExc_ValueError, "argument 'label_smoothing' must be in [0, 1], got %R", label_smoothing);
        return -1;
    }
    if (red < TL_REDUCE_MEAN || red > TL_REDUCE_NONE) {
        PyErr_Format(PyExc_ValueError, "argument 'reduction' must be 0 (mean), 1 (sum) or 2 (none)");
        return -1;
    }
    o->ignore_index = ign;
    o->label_smoothing = eps;
    o->reduction = red;
    return 0;
}

int
tl_check_xent_args(const tl_arg *x, const tl_arg *w, const tl_arg *bias, const tl_arg *target,
                   const tl_arg *cw, const tl_arg *grow, const tl_arg *loss, const tl_arg *dx,
                   const tl_arg *dw, const tl_arg *db, int reduction, int dw_of_x)
{
    if (tl_need_ndim(x, 2) || tl_need_ndim(w, 2) || tl_need_ndim(target, 1)) return -1;
    if (tl_need_float(x) || tl_need_dtype_of(w, x) || tl_need_index(target)) return -1;
    const int64_t N = x->t.shape[0], D = x->t.shape[1], C = w->t.shape[0];
    if (tl_need_size(w, 1, D, "x.shape[1]") || tl_need_size(target, 0, N, "x.shape[0]")) return -1;
    if (C < 1) {
        PyErr_SetString(PyExc_ValueError, "argument 'weight' must have at least one class (row)");
        return -1;
    }
    if (bias->via && (tl_need_ndim(bias, 1) || tl_need_dtype_of(bias, x) || tl_need_size(bias, 0, C, "classes")))
        return -1;
    if (cw->via && (tl_need_ndim(cw, 1) || tl_need_dtype_f32_or(cw, x) || tl_need_size(cw, 0, C, "classes")))
        return -1;
    if (grow->via && (tl_need_ndim(grow, 1) || tl_need_float(grow) || tl_need_size(grow, 0, N, "rows")))
        return -1;
    if (loss->via) {
        if (tl_need_dtype_f32_or(loss, x) || tl_need_writable(loss)) return -1;
        if (reduction == TL_REDUCE_NONE) {
            if (tl_need_ndim(loss, 1) || tl_need_size(loss, 0, N, "rows")) return -1;
        } else if (tl_numel(&loss->t) != 1) {
            PyErr_SetString(PyExc_ValueError, "argument 'loss' must hold one element for mean/sum");
            return -1;
        }
    }
    if (dx->via && (tl_need_ndim(dx, 2) || tl_need_dtype_f32_or(dx, x) || tl_need_size(dx, 0, N, "rows") ||
                    tl_need_size(dx, 1, D, "features") || tl_need_writable(dx)))
        return -1;
    for (int k = 0; k < 2; k++) {
        const tl_arg *g = k ? db : dw;
        if (!g->via) continue;
        if (!k && dw_of_x && g->t.dtype == x->t.dtype) {
            /* in W's dtype: allowed where the kernel writes each row of dW once (tl.h) */
        } else if (g->t.dtype != TL_FLOAT32) {
            PyErr_Format(PyExc_TypeError, "argument '%s' must be float32 (an accumulator)%s", g->name,
                         !k && dw_of_x ? " or of x's dtype" : "");
            return -1;
        }
        if (tl_need_ndim(g, k ? 1 : 2) || tl_need_size(g, 0, C, "classes") ||
            (!k && tl_need_size(g, 1, D, "features")) || tl_need_writable(g))
            return -1;
    }
    return 0;
}

int
tl_need_cpu(const tl_arg *a)
{
    if (a->t.device == TL_CPU) return 0;
    PyErr_Format(PyExc_ValueError, "argument '%s' is on cuda:%d; tltorch._C runs on the CPU (CUDA "
                 "tensors go to tltorch._cuda)", a->name, a->t.device_id);
    return -1;
}

/* ---- dropout and LoRA ---------------------------------------------------------------------------- */

int
tl_get_seed(PyObject *o, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "argument 'seed' must be an int, not %.200s", Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "argument 'seed' must be in [0, 2**64)");
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

int
tl_get_dropout(PyObject *o, float *out)
{
    if (tl_get_float(o, "p", out) < 0) return -1;
    if (!(*out >= 0.0f && *out < 1.0f)) {
        PyErr_SetString(PyExc_ValueError, "argument 'p' (the dropout probability) must be in [0, 1)");
        return -1;
    }
    return 0;
}

static int
check_lora_args(const tl_arg *x, const tl_arg *w, const tl_arg *bias, const tl_arg *a, const tl_arg *b)
{
    if (tl_need_ndim(x, 2) || tl_need_ndim(w, 2) || tl_need_ndim(a, 2) || tl_need_ndim(b, 2)) return -1;
    if (tl_need_float(x) || tl_need_dtype_of(w, x) || tl_need_dtype_of(a, x) || tl_need_dtype_of(b, x)) return -1;
    if (tl_need_same_device(w, x) || tl_need_same_device(a, x) || tl_need_same_device(b, x)) return -1;
    const int64_t in = x->t.shape[1], out = w->t.shape[0], r = a->t.shape[0];
    if (tl_need_size(w, 1, in, "x's in_features") || tl_need_size(a, 1, in, "x's in_features") ||
        tl_need_size(b, 0, out, "w's out_features") || tl_need_size(b, 1, r, "a's rank"))
        return -1;
    if (bias->via && (tl_need_ndim(bias, 1) || tl_need_dtype_of(bias, x) || tl_need_same_device(bias, x) ||
                      tl_need_size(bias, 0, out, "w's out_features")))
        return -1;
    return 0;
}

/* An output of rows x cols, of ref's dtype or float32 (f32), on ref's device; via == 0: not wanted. */
static int
check_lora_out(const tl_arg *t, const tl_arg *ref, int64_t rows, int64_t cols, int f32)
{
    if (!t->via) return 0;
    if (tl_need_ndim(t, 2) || tl_need_same_device(t, ref) || tl_need_writable(t)) return -1;
    if (f32 ? t->t.dtype != TL_FLOAT32 : t->t.dtype != ref->t.dtype) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be %s, not %s", t->name,
                     f32 ? "float32" : tl_dtype_name(ref->t.dtype), tl_dtype_name(t->t.dtype));
        return -1;
    }
    return tl_need_size(t, 0, rows, "rows") || tl_need_size(t, 1, cols, "columns") ? -1 : 0;
}

int
tl_check_lora_forward_args(const tl_arg *x, const tl_arg *w, const tl_arg *bias, const tl_arg *a, const tl_arg *b,
                           const tl_arg *y, const tl_arg *su)
{
    if (check_lora_args(x, w, bias, a, b) < 0) return -1;
    const int64_t N = x->t.shape[0], out = w->t.shape[0], r = a->t.shape[0];
    return check_lora_out(y, x, N, out, 0) < 0 || check_lora_out(su, x, N, r, 0) < 0 ? -1 : 0;
}

int
tl_check_lora_backward_args(const tl_arg *dy, const tl_arg *x, const tl_arg *w, const tl_arg *a, const tl_arg *b,
                            const tl_arg *su, const tl_arg *dx, const tl_arg *da, const tl_arg *db)
{
    const tl_arg nobias = TL_ARG_INIT("bias");
    if (check_lora_args(x, w, &nobias, a, b) < 0) return -1;
    const int64_t N = x->t.shape[0], in = x->t.shape[1], out = w->t.shape[0], r = a->t.shape[0];
    if (tl_need_ndim(dy, 2) || tl_need_dtype_of(dy, x) || tl_need_size(dy, 0, N, "x's rows") ||
        tl_need_size(dy, 1, out, "w's out_features") || tl_need_ndim(su, 2) || tl_need_dtype_of(su, x) ||
        tl_need_size(su, 0, N, "x's rows") || tl_need_size(su, 1, r, "a's rank"))
        return -1;
    if (check_lora_out(dx, x, N, in, 0) < 0 || check_lora_out(da, x, r, in, 1) < 0 ||
        check_lora_out(db, x, out, r, 1) < 0)
        return -1;
    return 0;
}

int
tl_check_dropout_args(const tl_arg *x, const tl_arg *out)
{
    if (tl_need_ndim(x, 2) || tl_need_float(x) || tl_need_ndim(out, 2) || tl_need_dtype_f32_or(out, x) ||
        tl_need_writable(out) || tl_need_size(out, 0, x->t.shape[0], "x's rows") ||
        tl_need_size(out, 1, x->t.shape[1], "x's columns"))
        return -1;
    return 0;
}

/* ---- pooling ------------------------------------------------------------------------------------- */

int
tl_get_pool_mode(PyObject *o, int *mode)
{
    if (tl_get_int(o, "mode", mode) < 0) return -1;
    if (*mode != TL_POOL_CLS && *mode != TL_POOL_MEAN && *mode != TL_POOL_MAX) {
        PyErr_Format(PyExc_ValueError, "argument 'mode' must be 0 (cls), 1 (mean) or 2 (max), got %d", *mode);
        return -1;
    }
    return 0;
}

int
tl_check_pool_args(const tl_arg *h, const tl_arg *mask, const tl_arg *out, int mode)
{
    if (tl_need_ndim(h, 3) || tl_need_ndim(out, 2) || tl_need_float(h) || tl_need_dtype_f32_or(out, h)) return -1;
    const int64_t B = h->t.shape[0], T = h->t.shape[1], D = h->t.shape[2];
    if (tl_need_size(out, 0, B, "h.shape[0]") || tl_need_size(out, 1, D, "h.shape[2]") || tl_need_writable(out))
        return -1;
    if (mask->via) {
        const tl_dtype md = mask->t.dtype;
        if (md != TL_INT64 && md != TL_INT32 && md != TL_UINT8 && md != h->t.dtype) {
            PyErr_Format(PyExc_TypeError, "argument 'mask' has dtype %s; expected int64, int32, uint8 (bool) "
                         "or %s (the dtype of 'h')", tl_dtype_name(md), tl_dtype_name(h->t.dtype));
            return -1;
        }
        if (tl_need_ndim(mask, 2) || tl_need_size(mask, 0, B, "h.shape[0]") ||
            tl_need_size(mask, 1, T, "h.shape[1]"))
            return -1;
    }
    if (mode == TL_POOL_CLS && T == 0 && B > 0 && D > 0) {
        PyErr_SetString(PyExc_ValueError, "argument 'h' has no tokens (h.shape[1] == 0); cls pooling takes "
                        "the first one");
        return -1;
    }
    return 0;
}

/* ---- AdamW --------------------------------------------------------------------------------------- */

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

/* The AdamW hyperparameters from Python numbers, each checked by name. */
int
tl_get_adamw_opts(PyObject *const *args, tl_adamw_opts *o)
{
    if (get_double(args[0], "lr", &o->lr) < 0 || get_double(args[1], "beta1", &o->beta1) < 0 ||
        get_double(args[2], "beta2", &o->beta2) < 0 || get_double(args[3], "eps", &o->eps) < 0 ||
        get_double(args[4], "weight_decay", &o->weight_decay) < 0 || get_step(args[5], &o->step) < 0)
        return -1;
    const char *bad = !isfinite(o->lr)                          ? "argument 'lr' must be finite"
                      : !(o->beta1 >= 0.0 && o->beta1 < 1.0)  ? "argument 'beta1' must be in [0, 1)"
                      : !(o->beta2 >= 0.0 && o->beta2 < 1.0)  ? "argument 'beta2' must be in [0, 1)"
                      : !(o->eps >= 0.0 && isfinite(o->eps))   ? "argument 'eps' must be finite and >= 0"
                      : !isfinite(o->weight_decay)              ? "argument 'weight_decay' must be finite"
                                                                : NULL;
    if (bad) {
        PyErr_SetString(PyExc_ValueError, bad);
        return -1;
    }
    return 0;
}

int
tl_check_adamw_args(const tl_arg *param, const tl_arg *grad, const tl_arg *exp_avg, const tl_arg *exp_avg_sq)
{
    const tl_arg *all[] = {param, grad, exp_avg, exp_avg_sq};
    for (int k = 0; k < 4; k++)
        if (tl_need_ndim(all[k], 1)) return -1;
    if (tl_need_float(param) || tl_need_dtype_f32_or(grad, param)) return -1;
    for (int k = 2; k < 4; k++)
        if (all[k]->t.dtype != TL_FLOAT32) {
            PyErr_Format(PyExc_TypeError, "argument '%s' has dtype %s; expected float32 (optimizer state is "
                         "kept in float32)", all[k]->name, tl_dtype_name(all[k]->t.dtype));
            return -1;
        }
    for (int k = 1; k < 4; k++)
        if (tl_need_size(all[k], 0, param->t.shape[0], "param's numel")) return -1;
    return tl_need_writable(param) || tl_need_writable(exp_avg) || tl_need_writable(exp_avg_sq) ? -1 : 0;
}
