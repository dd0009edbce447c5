"""One argument check per op for both modules (csrc/check.c, through csrc/python/bind_<family>.c): a bad
argument gets the same exception, with the same message naming it, from tltorch._C and tltorch._cuda.

The tensors are fakes: DLPack capsules describing a CPU tensor's memory as on the CPU (for tltorch._C) or on
cuda:0 (for tltorch._cuda), read-only where asked. Every call here stops at an argument check, before any
kernel or CUDA call, so no GPU is needed."""
import ctypes

import pytest
import torch

from test_cuda_stream import DLDataType, DLDevice, DLPackVersion, DLTensor, capsule_new
from tltorch import _C

try:
    from tltorch import _cuda
except ImportError:
    _cuda = None

pytestmark = pytest.mark.skipif(_cuda is None, reason="tltorch._cuda is not built")


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


VERSIONED = b"dltensor_versioned"  # the capsule keeps a pointer to its name: it lives with the module
DLDTYPE = {torch.float32: (2, 32), torch.float16: (2, 16), torch.bfloat16: (4, 16), torch.float64: (2, 64),
           torch.int64: (0, 64), torch.int32: (0, 32), torch.uint8: (1, 8)}
CPU, CUDA = (1, 0), (2, 0)


class Fake:
    """t's memory, said to be on `device`; DLPack's read-only flag set when readonly."""

    def __init__(self, t, device, readonly=False):
        self.t, self.device = t, device
        n = max(1, t.dim())
        self._shape = (ctypes.c_int64 * n)(*t.shape)
        self._strides = (ctypes.c_int64 * n)(*t.stride())
        m = self._m = DLManagedTensorVersioned()
        m.version = DLPackVersion(1, 0)
        m.flags = 1 if readonly else 0
        m.dl_tensor.data = t.data_ptr() or None
        m.dl_tensor.device = DLDevice(*device)
        m.dl_tensor.ndim = t.dim()
        m.dl_tensor.dtype = DLDataType(*DLDTYPE[t.dtype], 1)
        m.dl_tensor.shape = self._shape
        m.dl_tensor.strides = self._strides

    def __dlpack__(self, *, stream=None, max_version=None):
        return capsule_new(ctypes.addressof(self._m), VERSIONED, None)

    def __dlpack_device__(self):
        return self.device


def zeros(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


# Each op: its arguments as (name, value) in order, a tensor as ("T", tensor, kind): "in" or "out", "?" where
# None is allowed; then what tltorch._C and tltorch._cuda take after them. The values are valid: each case
# below spoils one tensor.
OPS = {
    "gemm": ([("a", ("T", zeros(3, 4), "in")), ("b", ("T", zeros(4, 5), "in")), ("c", ("T", zeros(3, 5), "out")),
              ("bias", ("T", zeros(5), "in?")), ("ws", None), ("alpha", 1.0), ("beta", 0.0)], [1], [False]),
    "colsum": ([("x", ("T", zeros(3, 6), "in")), ("out", ("T", zeros(6), "out")), ("beta", 0.0)], [1], []),
    "linear_xent": ([("x", ("T", zeros(4, 3), "in")), ("weight", ("T", zeros(5, 3), "in")),
                     ("bias", ("T", zeros(5), "in?")), ("target", ("T", zeros(4, dtype=torch.int64), "in")),
                     ("class_weight", ("T", zeros(5), "in?")), ("ignore_index", -100), ("label_smoothing", 0.1),
                     ("reduction", 0), ("grad_rows", None), ("loss", ("T", zeros(1), "out?")),
                     ("dx", ("T", zeros(4, 3), "out?")), ("dw", ("T", zeros(5, 3), "out?")),
                     ("db", ("T", zeros(5), "out?")), ("ws", None)], [1], [None, False]),
    "dropout": ([("x", ("T", zeros(4, 3), "in")), ("out", ("T", zeros(4, 3), "out")), ("p", 0.25), ("seed", 7)],
                [1], []),
    "lora_forward": ([("x", ("T", zeros(4, 3), "in")), ("w", ("T", zeros(5, 3), "in")),
                      ("bias", ("T", zeros(5), "in?")), ("a", ("T", zeros(2, 3), "in")),
                      ("b", ("T", zeros(5, 2), "in")), ("scale", 0.5), ("p", 0.0), ("seed", 3),
                      ("y", ("T", zeros(4, 5), "out")), ("su", ("T", zeros(4, 2), "out")), ("ws", None)],
                     [1], [None, False]),
    "lora_backward": ([("dy", ("T", zeros(4, 5), "in")), ("x", ("T", zeros(4, 3), "in")),
                       ("w", ("T", zeros(5, 3), "in")), ("a", ("T", zeros(2, 3), "in")),
                       ("b", ("T", zeros(5, 2), "in")), ("su", ("T", zeros(4, 2), "in")), ("scale", 0.5),
                       ("p", 0.0), ("seed", 3), ("dx", ("T", zeros(4, 3), "out?")), ("da", ("T", zeros(2, 3), "out?")),
                       ("db", ("T", zeros(5, 2), "out?")), ("ws", None)], [1], [None, False]),
    "pool": ([("h", ("T", zeros(2, 3, 4), "in")), ("mask", ("T", zeros(2, 3, dtype=torch.int64), "in?")),
              ("mode", 1), ("out", ("T", zeros(2, 4), "out"))], [1], []),
    "adamw": ([("param", ("T", zeros(5), "out")), ("grad", ("T", zeros(5), "in")),
               ("exp_avg", ("T", zeros(5), "out")), ("exp_avg_sq", ("T", zeros(5), "out")), ("lr", 1e-3),
               ("beta1", 0.9), ("beta2", 0.999), ("eps", 1e-8), ("weight_decay", 0.0), ("step", 1),
               ("anchor", ("T", zeros(5), "in?")), ("l2sp", 0.1)], [1], []),
}


# Spoilings that are no fault there: x's rows are free in colsum; a 1-element loss may have any dims; dw may
# also be in x's dtype on CUDA (its plan says when), so the messages say each module's rule.
ALLOWED = {("colsum", "x", "size"), ("linear_xent", "loss", "ndim"), ("linear_xent", "loss", "stride 0"),
           ("linear_xent", "dw", "float64")}


def spoiled(t, kind):
    """(what, tensor or None, readonly): t made wrong one way at a time."""
    grown = list(t.shape)
    grown[0] += 1
    if not kind.endswith("?"):
        yield "None", None, False
    yield "float64", t.double(), False
    yield "ndim", t[None], False
    yield "size", torch.zeros(grown, dtype=t.dtype), False
    if kind.startswith("out"):
        yield "read-only", t, True
        yield "stride 0", t.as_strided(t.shape, (0,) + t.stride()[1:]), False


def call(mod, device, op, spoil):
    """(exception type, message) of tltorch._C's or tltorch._cuda's op with spoil = (name, tensor, readonly)
    in the place of that argument; None when it raised nothing of the kind."""
    params, cpu_tail, cuda_tail = OPS[op]
    values = []
    for name, v in params:
        readonly = False
        if name == spoil[0]:
            v, readonly = spoil[1], spoil[2]
            v = None if v is None else ("T", v, "in")
        if isinstance(v, tuple) and v[0] == "T":
            v = Fake(v[1], device, readonly)
        values.append(v)
    values += cpu_tail if mod is _C else cuda_tail
    try:
        getattr(mod, op)(*values)
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return None


def cases():
    for op, (params, _, _) in OPS.items():
        for name, v in params:
            if isinstance(v, tuple) and v[0] == "T":
                for what, t, readonly in spoiled(v[1], v[2]):
                    if (op, name, what) not in ALLOWED:
                        yield pytest.param(op, name, what, t, readonly, id=f"{op}-{name}-{what}")


@pytest.mark.parametrize("op,name,what,t,readonly", list(cases()))
def test_both_modules_word_a_bad_argument_alike(op, name, what, t, readonly):
    cpu = call(_C, CPU, op, (name, t, readonly))
    cuda = call(_cuda, CUDA, op, (name, t, readonly))
    assert cpu is not None, f"tltorch._C.{op} took a {what} {name}"
    assert cuda == cpu
