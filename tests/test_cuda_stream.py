"""The stream tltorch._cuda's kernels run on (csrc/python/bridge.c, cuda_module.c), checked without a
GPU through fake producers: DLPack tensors that say they are on a CUDA device but are never touched (each
call below stops at work_stream_of or at an argument check, before any kernel or CUDA call).

The call's reference argument (the output, or x) decides the stream: torch's current stream for a torch
tensor (without the exchange table, as with torch < 2.9, asked as torch.cuda.current_stream(device)),
the legacy default stream for other producers; every argument read through __dlpack__ is asked for it.
"""
import ctypes
from types import SimpleNamespace

import pytest
import torch

from conftest import names_arg

try:
    from tltorch import _cuda as cuda
except ImportError:
    cuda = None

pytestmark = pytest.mark.skipif(cuda is None, reason="tltorch._cuda is not built")

KDL_CPU, KDL_CUDA = 1, 2
LEGACY = 1  # DLPack's stream= for the legacy default stream (whose handle is 0)
NOT_ASKED = "not asked"


# ---- DLPack's structs, as csrc/dlpack.h lays them out -------------------------------------------------

class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


DLTENSOR_FROM_PY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.POINTER(DLTensor))
MANAGED_FROM_PY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
CURRENT_STREAM = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p))


class DLPackExchangeAPI(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("prev_api", ctypes.c_void_p),
                ("managed_tensor_allocator", ctypes.c_void_p),
                ("managed_tensor_from_py_object_no_sync", MANAGED_FROM_PY),
                ("managed_tensor_to_py_object_no_sync", ctypes.c_void_p),
                ("dltensor_from_py_object_no_sync", DLTENSOR_FROM_PY),
                ("current_work_stream", CURRENT_STREAM)]


capsule_new = ctypes.pythonapi.PyCapsule_New
capsule_new.restype = ctypes.py_object
capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
# A capsule keeps a pointer to its name, not a copy: the names live as long as this module.
DLTENSOR, EXCHANGE_TABLE = b"dltensor", b"dlpack_exchange_api"


class Fake:
    """A float32 tensor of `shape` on (device_type, device_id), never dereferenced, without the exchange
    table; __dlpack__ records the stream= it was asked for (NOT_ASKED when none) and answers with a
    legacy capsule. dlpack_1: __dlpack__ takes max_version (DLPack >= 1.0), else only stream (older torch)."""

    def __init__(self, shape=(2, 2), device=(KDL_CUDA, 0), dlpack_1=True):
        self.device = device
        self.asked = []
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._m = DLManagedTensor()  # kept alive with the producer: the capsule points into it
        self._m.dl_tensor.device = DLDevice(*device)
        self._m.dl_tensor.ndim = len(shape)
        self._m.dl_tensor.dtype = DLDataType(2, 32, 1)  # kDLFloat, 32 bits
        self._m.dl_tensor.shape = self._shape
        self.__dlpack__ = self._dlpack_1 if dlpack_1 else self._dlpack_0

    def _record(self, stream):
        self.asked.append(stream)
        return capsule_new(ctypes.addressof(self._m), DLTENSOR, None)

    def _dlpack_1(self, *, stream=NOT_ASKED, max_version=None):
        return self._record(stream)

    def _dlpack_0(self, stream=NOT_ASKED):
        return self._record(stream)

    def __dlpack_device__(self):
        return self.device


class OldTorch(torch.Tensor):
    """A torch tensor as torch < 2.9 exports it (no exchange table), with Fake's DLPack answers."""
    __dlpack_c_exchange_api__ = None

    def __dlpack__(self, *args, **kwargs):
        return self.fake.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.fake.__dlpack_device__()

    @property
    def asked(self):
        return self.fake.asked


def old_torch(*args, **kwargs):
    t = torch.empty(0).as_subclass(OldTorch)
    t.fake = Fake(*args, **kwargs)
    return t


# A producer with the exchange table (as torch >= 2.9): read through dltensor_from_py_object_no_sync, its
# current stream given by current_work_stream. Module-level: the table must outlive every cached type.
EXCHANGE_CALLS = []


@DLTENSOR_FROM_PY
def _exchange_dltensor(obj, out):
    ctypes.memmove(out, ctypes.addressof(obj._m.dl_tensor), ctypes.sizeof(DLTensor))
    return 0


@MANAGED_FROM_PY
def _exchange_managed(obj, out):
    return -1  # never called: the bridge prefers the borrowed DLTensor


@CURRENT_STREAM
def _exchange_stream(device_type, device_id, out):
    EXCHANGE_CALLS.append((device_type, device_id))
    out[0] = Exchange.current or None
    return 0


EXCHANGE_API = DLPackExchangeAPI(DLPackVersion(1, 0), None, None, _exchange_managed, None,
                                 _exchange_dltensor, _exchange_stream)


class Exchange(Fake):
    """Fake with the exchange table; its __dlpack__ is asked only when a read through the table would
    not wait for its work (its current stream is not the call's)."""
    __dlpack_c_exchange_api__ = capsule_new(ctypes.addressof(EXCHANGE_API), EXCHANGE_TABLE, None)
    current = 0


@pytest.fixture
def torch_stream(monkeypatch):
    """torch.cuda.current_stream replaced: it answers `handle` (settable) and records the devices asked."""
    state = SimpleNamespace(handle=0x7F00, devices=[])

    def current_stream(device=None):
        state.devices.append(device)
        return SimpleNamespace(cuda_stream=state.handle)

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    return state


@pytest.fixture
def exchange():
    Exchange.current = 0
    EXCHANGE_CALLS.clear()
    yield Exchange
    Exchange.current = 0


def mismatched_gemm(make, device=(KDL_CUDA, 0)):
    """gemm's a, b, c with b.shape[0] != a.shape[1]: every argument imported, then a ValueError."""
    a, b, c = make((2, 3), device), make((4, 5), device), make((2, 5), device)
    with pytest.raises(ValueError, match="a.shape"):
        cuda.gemm(a, b, c, None, None, 1.0, 0.0, False)
    return a, b, c


# ---- torch without the exchange table: torch's current stream ----------------------------------------

@pytest.mark.parametrize("dlpack_1", [True, False], ids=["dlpack1", "dlpack0"])
@pytest.mark.parametrize("dev", [0, 1])
def test_old_torch_runs_on_torchs_current_stream(torch_stream, dlpack_1, dev):
    t = old_torch(device=(KDL_CUDA, dev), dlpack_1=dlpack_1)
    assert cuda.work_stream_of(t) == 0x7F00
    assert torch_stream.devices == [dev]  # the tensor's device, not the current one
    assert t.asked == [0x7F00]  # == torch's current stream: torch adds no wait


def test_old_torch_on_the_default_stream_asks_for_dlpacks_legacy_stream(torch_stream):
    """torch's default stream is the legacy one (handle 0); DLPack calls it 1 (0 is not allowed)."""
    torch_stream.handle = 0
    t = old_torch()
    assert cuda.work_stream_of(t) == 0
    assert t.asked == [LEGACY]


def test_every_argument_is_asked_for_the_outputs_stream(torch_stream):
    a, b, c = mismatched_gemm(lambda shape, device: old_torch(shape, device))
    assert len(torch_stream.devices) == 1  # c, imported first, decided; the others were told
    assert a.asked == b.asked == c.asked == [0x7F00]
    out, x = old_torch((3,)), Fake((4, 2))  # colsum: out, after x in the arguments, decides
    with pytest.raises(ValueError):
        cuda.colsum(x, out, 0.0)
    assert out.asked == x.asked == [0x7F00] and len(torch_stream.devices) == 2


def test_lora_backward_asks_x_first(torch_stream):
    """dy comes before x in lora_backward's arguments, but x's producer decides the stream (here x is
    on cuda:1, dy on cuda:0: dy is asked for no stream and the device check names it)."""
    x, dy = old_torch((4, 3), (KDL_CUDA, 1)), old_torch((4, 5), (KDL_CUDA, 0))
    w, a, b, su = (old_torch(s, (KDL_CUDA, 1)) for s in [(5, 3), (2, 3), (5, 2), (4, 2)])
    with pytest.raises(ValueError, match="cuda:0") as ei:
        cuda.lora_backward(dy, x, w, a, b, su, 1.0, 0.0, 0, None, None, None, None, None, False)
    names_arg(ei, "dy")
    assert torch_stream.devices == [1] and dy.asked == [NOT_ASKED]
    assert all(t.asked == [0x7F00] for t in (x, w, a, b, su))


def test_arguments_off_the_calls_gpu_are_not_handed_its_stream(torch_stream):
    """A CPU tensor is asked for no stream (DLPack: None on the CPU); one on another GPU neither, and the
    device check names it."""
    c, a = old_torch((2, 5)), old_torch((2, 3), (KDL_CPU, 0))
    with pytest.raises(ValueError, match="CPU") as ei:
        cuda.gemm(a, old_torch((3, 5)), c, None, None, 1.0, 0.0, False)
    names_arg(ei, "a")
    assert a.asked == [NOT_ASKED] and c.asked == [0x7F00]
    b = old_torch((3, 5), (KDL_CUDA, 1))
    with pytest.raises(ValueError, match="cuda:1") as ei:
        cuda.gemm(old_torch((2, 3)), b, old_torch((2, 5)), None, None, 1.0, 0.0, False)
    names_arg(ei, "b")
    assert b.asked == [NOT_ASKED]


def test_failing_current_stream_lookup_raises_and_releases(monkeypatch):
    def broken(device=None):
        raise RuntimeError("no current stream here")

    monkeypatch.setattr(torch.cuda, "current_stream", broken)
    t = old_torch()
    with pytest.raises(RuntimeError, match="no current stream here"):
        cuda.work_stream_of(t)
    assert t.asked == []


# ---- other producers: the legacy default stream --------------------------------------------------------

def test_other_producers_run_on_the_legacy_default_stream(torch_stream):
    a, b, c = mismatched_gemm(Fake)
    assert a.asked == b.asked == c.asked == [LEGACY]
    assert torch_stream.devices == []  # torch is not asked about another library's tensor
    assert cuda.work_stream_of(Fake()) == 0


def test_torch_output_decides_for_other_producers_inputs(torch_stream):
    a, b = Fake((2, 3)), Fake((4, 5))
    c = old_torch((2, 5))
    with pytest.raises(ValueError):
        cuda.gemm(a, b, c, None, None, 1.0, 0.0, False)
    assert a.asked == b.asked == c.asked == [0x7F00]


def test_bad_dlpack_device_names_the_argument():
    bad = Fake()
    bad.__dlpack_device__ = lambda: "cuda:0"
    with pytest.raises(TypeError, match="__dlpack_device__") as ei:
        cuda.work_stream_of(bad)
    names_arg(ei, "obj")


# ---- producers with the exchange table -----------------------------------------------------------------

def test_exchange_table_says_the_stream(exchange):
    exchange.current = 0x5100
    t = exchange((2, 2), (KDL_CUDA, 1))
    assert cuda.work_stream_of(t) == 0x5100
    assert EXCHANGE_CALLS == [(KDL_CUDA, 1)] and t.asked == []  # read through the table, not __dlpack__


def test_exchange_argument_on_the_calls_stream_is_read_through_the_table(torch_stream, exchange):
    torch_stream.handle = exchange.current = 0x7F00
    a, b, c = exchange((2, 3)), exchange((4, 5)), old_torch((2, 5))
    with pytest.raises(ValueError):
        cuda.gemm(a, b, c, None, None, 1.0, 0.0, False)
    assert a.asked == b.asked == [] and c.asked == [0x7F00]


def test_exchange_argument_on_another_stream_is_asked_for_the_calls(torch_stream, exchange):
    """The table's reads do not wait: an argument whose producer works on another stream than the
    call goes through __dlpack__(stream=<the call's>) instead."""
    exchange.current = 0x5100
    a, b, c = exchange((2, 3)), exchange((4, 5)), old_torch((2, 5))
    with pytest.raises(ValueError):
        cuda.gemm(a, b, c, None, None, 1.0, 0.0, False)
    assert a.asked == b.asked == c.asked == [0x7F00]
    a, b, c = exchange((2, 3)), exchange((4, 5)), Fake((2, 5))  # the legacy default stream
    with pytest.raises(ValueError):
        cuda.gemm(a, b, c, None, None, 1.0, 0.0, False)
    assert a.asked == b.asked == c.asked == [LEGACY]
