/* bridge.c: DLPack import for the extension modules: a Python object in, a tl_tensor view out (tl_arg).
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
    PyObject **const owned[] = {&b->max_version, &b->str_dlpack, &b->str_exchange, &b->str_device, &b->str_torch,
                                &b->str_current_stream, &b->str_cuda_stream, &b->kw_max_version, &b->kw_stream,
                                &b->kw_stream_max_version, &b->torch_tensor, &b->torch_cuda};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) Py_CLEAR(*owned[i]);
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
