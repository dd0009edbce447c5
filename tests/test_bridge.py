"""The DLPack bridge (csrc/python/bridge.c) and the argument checks of tltorch._C (csrc/python/module.c):
every way a tensor gets in, ownership of what the producers hand over, and bad input of every kind
raising TypeError/ValueError that names the argument."""
import ctypes
import sys

import numpy as np
import pytest
import torch

from conftest import DTYPES, assert_close, dtype_id, names_arg, randn
from tltorch import _C

KC = _C.GEMM_KC
NAN = float("nan")


def capsule_name(cap):
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype = ctypes.c_char_p
    get_name.argtypes = [ctypes.py_object]
    return get_name(cap).decode()


def use_count(t):
    """References to t's TensorImpl from C++ (a DLPack capsule's managed tensor holds one)."""
    return t._use_count()


def np_randn(shape, gen):
    return torch.randn(*shape, generator=gen).numpy()


class LegacyProducer:
    """A producer older than DLPack 1.0: __dlpack__ takes no max_version and returns a 'dltensor'."""

    def __init__(self, arr):
        self.arr = arr
        self.calls = 0

    def __dlpack__(self, stream=None):
        self.calls += 1
        return self.arr.__dlpack__()  # numpy without max_version: a legacy capsule

    def __dlpack_device__(self):
        return self.arr.__dlpack_device__()


# ---- describe: what the bridge sees -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("view", ["contig", "t", "slice", "stride2", "3d_mT", "expand"])
def test_describe_torch_views(view, dtype):
    base = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(5, 6, 7).to(dtype)
    t = {"contig": base, "t": base[0].t(), "slice": base[1:, 2:, 3:], "stride2": base[:, ::2, 1::3],
         "3d_mT": base.mT, "expand": base[:1, :1, :].expand(4, 3, 7)}[view]
    d = _C.describe(t)
    assert d["via"] == "exchange"
    assert d["shape"] == tuple(t.shape)
    assert d["strides"] == t.stride()
    assert d["dtype"] == dtype_id(dtype)
    assert d["device"] == "cpu" and d["device_id"] == 0
    assert d["readonly"] is False
    assert d["data"] == t.data_ptr()  # storage offsets included


@pytest.mark.parametrize("view", ["contig", "neg0", "neg1", "both", "fortran"])
def test_describe_numpy_views(view):
    base = np.arange(30, dtype=np.float32).reshape(5, 6)
    a = {"contig": base, "neg0": base[::-1], "neg1": base[1:, ::-2], "both": base[::-2, ::-1],
         "fortran": np.asfortranarray(base)}[view]
    d = _C.describe(a)
    assert d["via"] == "versioned"
    assert d["shape"] == a.shape
    assert d["strides"] == tuple(s // a.itemsize for s in a.strides)
    assert d["data"] == a.ctypes.data
    assert d["dtype"] == "float32" and d["readonly"] is False


@pytest.mark.parametrize("np_dtype,name", [(np.float32, "float32"), (np.float16, "float16"),
                                           (np.float64, "float64"), (np.int64, "int64"),
                                           (np.int32, "int32"), (np.int8, "int8"), (np.uint8, "uint8")])
def test_describe_numpy_dtypes(np_dtype, name):
    assert _C.describe(np.zeros((2, 3), dtype=np_dtype))["dtype"] == name


def test_describe_zero_size_0d_and_8d():
    for shape in [(0,), (0, 3), (4, 0), (2, 0, 5)]:
        d = _C.describe(torch.empty(shape))
        assert d["shape"] == shape
        assert _C.describe(np.empty(shape, np.float32))["shape"] == shape
    d = _C.describe(torch.tensor(2.5))
    assert d["shape"] == () and d["strides"] == ()
    assert _C.describe(np.array(1.0, np.float32))["shape"] == ()
    t8 = torch.zeros([2, 1, 2, 1, 2, 1, 2, 1])
    assert _C.describe(t8)["shape"] == tuple(t8.shape)


@pytest.mark.parametrize("make", [lambda: torch.zeros([1] * 9), lambda: np.zeros([1] * 9, np.float32),
                                  lambda: torch.zeros([2] * 9)[..., 0:1]])
def test_nine_dims_raise_value_error(make):
    with pytest.raises(ValueError, match="9 dimensions") as ei:
        _C.describe(make())
    names_arg(ei, "obj")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int16, torch.bool, torch.uint16],
                         ids=dtype_id)
def test_unsupported_dtypes_raise_type_error(dtype, gen):
    t = torch.zeros(4, 4, dtype=dtype)
    with pytest.raises(TypeError) as ei:
        _C.describe(t)
    names_arg(ei, "obj")
    f = torch.randn(4, 4, generator=gen)
    with pytest.raises(TypeError) as ei:
        _C.gemm(t, f, torch.empty(4, 4), None, None, 1.0, 0.0, 1)
    names_arg(ei, "a")
    with pytest.raises(TypeError) as ei:
        _C.gemm(f, f, t, None, None, 1.0, 0.0, 1)
    names_arg(ei, "c")
    with pytest.raises(TypeError) as ei:
        _C.colsum(t, torch.empty(4), 0.0, 1)
    names_arg(ei, "x")


# ---- capsules: raw, versioned, legacy, consumed once --------------------------------------------------

@pytest.mark.parametrize("versioned", [False, True])
def test_raw_capsule_is_consumed_once(versioned, gen):
    t = torch.randn(3, 4, generator=gen)
    before = use_count(t)
    cap = t.__dlpack__(max_version=(1, 0)) if versioned else t.__dlpack__()
    assert capsule_name(cap) == ("dltensor_versioned" if versioned else "dltensor")
    assert use_count(t) == before + 1  # the capsule's managed tensor holds the tensor
    d = _C.describe(cap)
    assert d["via"] == ("versioned" if versioned else "legacy")
    assert d["shape"] == (3, 4) and d["data"] == t.data_ptr()
    assert capsule_name(cap) == ("used_dltensor_versioned" if versioned else "used_dltensor")
    assert use_count(t) == before  # the deleter ran, while the capsule object lives on
    with pytest.raises(ValueError, match="already consumed") as ei:
        _C.describe(cap)
    names_arg(ei, "obj")
    del cap  # the capsule's own destructor must now leave the tensor alone
    assert use_count(t) == before


def test_raw_capsule_into_gemm_writes_through(gen):
    a, b = torch.randn(5, 7, generator=gen), torch.randn(7, 3, generator=gen)
    c = torch.full((5, 3), NAN)
    _C.gemm(a.__dlpack__(), b.__dlpack__(max_version=(1, 0)), c.__dlpack__(), None, None, 1.0, 0.0, 1)
    assert_close(c, a.double() @ b.double(), torch.float32)
    cap = c.__dlpack__()
    _C.gemm(a, b, cap, None, None, 1.0, 0.0, 1)
    with pytest.raises(ValueError, match="already consumed") as ei:
        _C.gemm(a, b, cap, None, None, 1.0, 0.0, 1)
    names_arg(ei, "c")


def test_capsule_of_another_kind_raises_type_error():
    cap = ctypes.pythonapi.PyCapsule_New
    cap.restype = ctypes.py_object
    cap.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    buf = ctypes.create_string_buffer(16)
    other = cap(ctypes.addressof(buf), b"not_a_tensor", None)
    with pytest.raises(TypeError, match="not_a_tensor") as ei:
        _C.describe(other)
    names_arg(ei, "obj")


def test_legacy_producer(gen):
    arr = np_randn((4, 6), gen)
    prod = LegacyProducer(arr)
    legacy_cap = arr.__dlpack__()
    assert capsule_name(legacy_cap) == "dltensor"
    del legacy_cap
    rc = sys.getrefcount(arr)
    d = _C.describe(prod)
    assert d["via"] == "legacy"
    assert d["shape"] == (4, 6) and d["data"] == arr.ctypes.data
    assert prod.calls == 1  # max_version was refused with TypeError, then one call without it
    for _ in range(200):
        _C.describe(prod)
    assert sys.getrefcount(arr) == rc, "the legacy deleter did not run exactly once per import"
    # And as real gemm operands, output included.
    b = np_randn((6, 5), gen)
    out = np.full((4, 5), np.nan, np.float32)
    _C.gemm(prod, LegacyProducer(b), LegacyProducer(out), None, None, 1.0, 0.0, 1)
    assert_close(torch.from_numpy(out), torch.from_numpy(arr).double() @ torch.from_numpy(b).double(),
                 torch.float32)
    assert sys.getrefcount(arr) == rc


class BadProducer:
    def __init__(self, result=None, exc=None):
        self.result, self.exc = result, exc

    def __dlpack__(self, stream=None, max_version=None):
        if self.exc is not None:
            raise self.exc
        return self.result


def test_misbehaving_producers_raise_cleanly():
    with pytest.raises(TypeError, match="not a capsule") as ei:
        _C.describe(BadProducer(result=[1, 2]))
    names_arg(ei, "obj")
    with pytest.raises(TypeError, match="custom failure") as ei:
        _C.describe(BadProducer(exc=BufferError("custom failure")))
    names_arg(ei, "obj")
    with pytest.raises(TypeError, match="custom failure") as ei:
        _C.gemm(torch.zeros(2, 2), BadProducer(exc=RuntimeError("custom failure")), torch.zeros(2, 2),
                None, None, 1.0, 0.0, 1)
    names_arg(ei, "b")


# ---- ownership: the deleter runs exactly once, on success and on every error path -----------------------

def test_numpy_refcounts_unchanged_after_many_calls(gen):
    a, b = np_randn((6, 5), gen), np_randn((5, 4), gen)
    c, bias = np.zeros((6, 4), np.float32), np_randn((4,), gen)
    out = np.zeros(4, np.float32)
    arrays = (a, b, c, bias, out)
    before = [sys.getrefcount(x) for x in arrays]
    for _ in range(300):
        _C.describe(a)
        _C.gemm(a, b, c, bias, None, 1.0, 0.0, 1)
        _C.colsum(a[:, :4], out, 1.0, 1)
        with pytest.raises(ValueError):  # shape mismatch, after all imports succeeded
            _C.gemm(a, a, c, bias, None, 1.0, 0.0, 1)
        with pytest.raises(TypeError):  # a later argument fails to import
            _C.gemm(a, b, c, "bias", None, 1.0, 0.0, 1)
        with pytest.raises(TypeError):  # a dtype check fails
            _C.gemm(a, b.astype(np.float64), c, None, None, 1.0, 0.0, 1)
    assert [sys.getrefcount(x) for x in arrays] == before


def test_torch_storage_refs_unchanged_after_many_calls(gen):
    a, b, c = torch.randn(6, 5, generator=gen), torch.randn(5, 4, generator=gen), torch.zeros(6, 4)
    before = [use_count(x) for x in (a, b, c)]
    rc = [sys.getrefcount(x) for x in (a, b, c)]
    for _ in range(300):
        _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
        _C.gemm(a.__dlpack__(), b.__dlpack__(max_version=(1, 0)), c, None, None, 1.0, 0.0, 1)
        with pytest.raises(ValueError):
            _C.gemm(a.__dlpack__(), a.__dlpack__(), c, None, None, 1.0, 0.0, 1)
    assert [use_count(x) for x in (a, b, c)] == before
    assert [sys.getrefcount(x) for x in (a, b, c)] == rc


# ---- NumPy in and out ---------------------------------------------------------------------------------

@pytest.mark.parametrize("a_view", ["contig", "rev0", "rev1", "fortran"])
@pytest.mark.parametrize("b_view", ["contig", "rev_both", "t"])
def test_gemm_numpy_inputs_and_output(a_view, b_view, gen):
    M, K, N = 9, 13, 11
    a_base, b_base = np_randn((M, K), gen), np_randn((K, N), gen)
    a = {"contig": a_base, "rev0": a_base[::-1], "rev1": a_base[:, ::-1],
         "fortran": np.asfortranarray(a_base)}[a_view]
    b = {"contig": b_base, "rev_both": b_base[::-1, ::-1], "t": np.ascontiguousarray(b_base.T).T}[b_view]
    bias = np_randn((N,), gen)
    c = np.full((M, N), np.nan, np.float32)
    c_ptr = c.ctypes.data
    assert _C.gemm(a, b, c, bias, None, 1.0, 0.0, 1) is None
    assert c.ctypes.data == c_ptr
    ref = torch.from_numpy(np.ascontiguousarray(a)).double() @ torch.from_numpy(
        np.ascontiguousarray(b)).double() + torch.from_numpy(bias).double()
    assert_close(torch.from_numpy(c), ref, torch.float32, what=f"numpy {a_view}/{b_view}")


def test_gemm_numpy_negative_stride_output_and_mixed_producers(gen):
    M, K, N = 8, 5, 7
    a = torch.randn(M, K, generator=gen)  # torch in, numpy out (reversed view)
    b = np_randn((K, N), gen)[::-1]
    c_base = np.full((M, N), np.nan, np.float32)
    c = c_base[::-1, ::-1]
    _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
    ref = a.double() @ torch.from_numpy(np.ascontiguousarray(b)).double()
    assert_close(torch.from_numpy(np.ascontiguousarray(c)), ref, torch.float32)
    # The writes went through the view into the base array.
    assert_close(torch.from_numpy(c_base), ref.flip(0, 1), torch.float32)


def test_colsum_numpy(gen):
    x = np_randn((31, 9), gen)[::-1, ::2]
    out = np.full(5, np.nan, np.float32)
    _C.colsum(x, out, 0.0, 1)
    assert_close(torch.from_numpy(out), torch.from_numpy(np.ascontiguousarray(x)).double().sum(0),
                 torch.float32)


def test_numpy_float16_gemm(gen):
    a, b = np_randn((6, 5), gen).astype(np.float16), np_randn((5, 3), gen).astype(np.float16)
    c = np.zeros((6, 3), np.float16)
    _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
    ref = torch.from_numpy(a).double() @ torch.from_numpy(b).double()
    assert_close(torch.from_numpy(c), ref, torch.float16)


def test_readonly_numpy_output_raises(gen):
    a, b = np_randn((4, 3), gen), np_randn((3, 2), gen)
    a.flags.writeable = False  # read-only inputs are fine
    assert _C.describe(a)["readonly"] is True
    c = np.zeros((4, 2), np.float32)
    _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
    c.flags.writeable = False
    snapshot = c.copy()
    with pytest.raises(ValueError, match="read-only") as ei:
        _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
    names_arg(ei, "c")
    assert np.array_equal(c, snapshot)
    out = np.zeros(2, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only") as ei:
        _C.colsum(b, out, 0.0, 1)
    names_arg(ei, "out")
    ws = np.zeros(4 * 2, np.float32)
    ws.flags.writeable = False
    a16 = np.zeros((4, KC + 1), np.float16)
    with pytest.raises(ValueError) as ei:
        _C.gemm(a16, np.zeros((KC + 1, 2), np.float16), np.zeros((4, 2), np.float16), None, ws,
                1.0, 0.0, 1)
    names_arg(ei, "ws")


def test_expanded_output_raises(gen):
    a, b = torch.randn(4, 3, generator=gen), torch.randn(3, 5, generator=gen)
    c = torch.zeros(1, 5).expand(4, 5)
    with pytest.raises(ValueError, match="stride 0") as ei:
        _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
    names_arg(ei, "c")
    c = torch.zeros(4, 1).expand(4, 5)
    with pytest.raises(ValueError) as ei:
        _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
    names_arg(ei, "c")
    with pytest.raises(ValueError) as ei:
        _C.colsum(b, torch.zeros(1).expand(5), 0.0, 1)
    names_arg(ei, "out")
    # A stride-0 dim of size 1 is not overlapping, and stride-0 *inputs* are fine.
    c1 = torch.zeros(4, 1).as_strided((4, 1), (1, 0))
    _C.gemm(a, b[:, :1], c1, None, None, 1.0, 0.0, 1)
    ones = torch.ones(1, 3).expand(4, 3)
    c = torch.empty(4, 5)
    _C.gemm(ones, b, c, None, None, 1.0, 0.0, 1)
    assert_close(c, b.double().sum(0).expand(4, 5), torch.float32)


# ---- bad input everywhere: TypeError/ValueError naming the argument ----------------------------------

def gemm_args(gen, dtype=torch.float32, M=4, K=3, N=5):
    return [randn((M, K), dtype, gen), randn((K, N), dtype, gen), torch.zeros(M, N, dtype=dtype),
            randn((N,), dtype, gen), None, 1.0, 0.0, 1]


GEMM_BAD = [
    # (index, replacement (callable of the valid args), exception, argument named)
    (0, lambda a: [[1.0, 2.0]], TypeError, "a"),
    (0, lambda a: None, TypeError, "a"),
    (0, lambda a: "abc", TypeError, "a"),
    (0, lambda a: 3.0, TypeError, "a"),
    (1, lambda a: None, TypeError, "b"),
    (2, lambda a: None, TypeError, "c"),
    (2, lambda a: [[0.0] * 5] * 4, TypeError, "c"),
    (3, lambda a: "bias", TypeError, "bias"),
    (4, lambda a: [0.0] * 20, TypeError, "ws"),
    (0, lambda a: a[0].double(), TypeError, "a"),
    (0, lambda a: a[0].to(torch.int32), TypeError, "a"),
    (1, lambda a: a[1].double(), TypeError, "b"),
    (1, lambda a: a[1].half(), TypeError, "b"),
    (2, lambda a: a[2].double(), TypeError, "c"),
    (2, lambda a: a[2].half(), TypeError, "c"),
    (3, lambda a: a[3].double(), TypeError, "bias"),
    (3, lambda a: a[3].bfloat16(), TypeError, "bias"),
    (0, lambda a: a[0][None], ValueError, "a"),
    (0, lambda a: a[0][0], ValueError, "a"),
    (0, lambda a: torch.tensor(1.0), ValueError, "a"),
    (1, lambda a: a[1].t(), ValueError, "b"),
    (1, lambda a: a[1][:2], ValueError, "b"),
    (2, lambda a: a[2][:3], ValueError, "c"),
    (2, lambda a: a[2][:, :4], ValueError, "c"),
    (2, lambda a: a[2].t(), ValueError, "c"),
    (2, lambda a: a[2].reshape(20), ValueError, "c"),
    (3, lambda a: a[3][:4], ValueError, "bias"),
    (3, lambda a: a[3][None], ValueError, "bias"),
    (3, lambda a: torch.tensor(1.0), ValueError, "bias"),
    (4, lambda a: torch.empty(19), ValueError, "ws"),
    (4, lambda a: torch.empty(20, dtype=torch.float64), ValueError, "ws"),
    (4, lambda a: torch.empty(4, 5), ValueError, "ws"),
    (5, lambda a: "one", TypeError, "alpha"),
    (5, lambda a: None, TypeError, "alpha"),
    (5, lambda a: [1.0], TypeError, "alpha"),
    (6, lambda a: "zero", TypeError, "beta"),
    (6, lambda a: torch.zeros(2), TypeError, "beta"),
    (7, lambda a: 1.5, TypeError, "nthreads"),
    (7, lambda a: "2", TypeError, "nthreads"),
    (7, lambda a: None, TypeError, "nthreads"),
    (7, lambda a: 2 ** 80, TypeError, "nthreads"),
    (8, lambda a: "t", TypeError, "trans"),
    (8, lambda a: 1.0, TypeError, "trans"),
    (8, lambda a: 1, ValueError, "b"),  # a transposed is 3 x 4: b's 3 rows no longer match
    (8, lambda a: 3, ValueError, "b"),
    (0, lambda a: torch.empty(4, 3, device="meta"), TypeError, "a"),
    (2, lambda a: torch.empty(4, 5, device="meta"), TypeError, "c"),
    (3, lambda a: torch.empty(5, device="meta"), TypeError, "bias"),
]


@pytest.mark.parametrize("idx,make,exc,name", GEMM_BAD,
                         ids=[f"{i}-{n}-{e.__name__}-{k}" for k, (i, _, e, n) in enumerate(GEMM_BAD)])
def test_gemm_bad_arguments(idx, make, exc, name, gen):
    args = gemm_args(gen)
    c_before = args[2].clone()
    if idx == 8:
        args.append(0)
    args[idx] = make(args)
    with pytest.raises(exc) as ei:
        _C.gemm(*args)
    names_arg(ei, name)
    assert torch.equal(args[2] if idx != 2 else c_before, c_before)  # nothing was written


def test_gemm_bad_argument_count_and_keywords(gen):
    args = gemm_args(gen)
    for n in (0, 3, 7, 10):  # 8, or 9 with the optional trans
        with pytest.raises(TypeError, match="positional arguments"):
            _C.gemm(*(args + [0, 0])[:n])
    with pytest.raises(TypeError):
        _C.gemm(*args[:7], nthreads=1)
    with pytest.raises(TypeError, match="positional arguments"):
        _C.colsum(torch.zeros(2, 2), torch.zeros(2), 0.0)


COLSUM_BAD = [
    (0, lambda a: None, TypeError, "x"),
    (0, lambda a: [[1.0]], TypeError, "x"),
    (1, lambda a: "out", TypeError, "out"),
    (0, lambda a: a[0].double(), TypeError, "x"),
    (0, lambda a: a[0].long(), TypeError, "x"),
    (1, lambda a: a[1].double(), TypeError, "out"),
    (1, lambda a: a[1].bfloat16(), TypeError, "out"),
    (0, lambda a: a[0][0], ValueError, "x"),
    (0, lambda a: a[0][None], ValueError, "x"),
    (1, lambda a: a[1][:4], ValueError, "out"),
    (1, lambda a: torch.zeros(1, 6), ValueError, "out"),
    (2, lambda a: "b", TypeError, "beta"),
    (3, lambda a: 0.5, TypeError, "nthreads"),
    (0, lambda a: torch.empty(3, 6, device="meta"), TypeError, "x"),
]


@pytest.mark.parametrize("idx,make,exc,name", COLSUM_BAD,
                         ids=[f"{i}-{n}-{e.__name__}-{k}" for k, (i, _, e, n) in enumerate(COLSUM_BAD)])
def test_colsum_bad_arguments(idx, make, exc, name, gen):
    args = [torch.randn(3, 6, generator=gen), torch.zeros(6), 0.0, 1]
    args[idx] = make(args)
    with pytest.raises(exc) as ei:
        _C.colsum(*args)
    names_arg(ei, name)


def test_meta_tensors_rejected_cleanly_by_describe():
    with pytest.raises((TypeError, ValueError)) as ei:
        _C.describe(torch.empty(2, 3, device="meta"))
    names_arg(ei, "obj")


def test_nonpositive_thread_counts_mean_default(gen):
    a, b = torch.randn(120, 130, generator=gen), torch.randn(130, 110, generator=gen)  # threaded
    ref = None
    for nt in (0, -1, -(2 ** 40), 10 ** 6):
        c = torch.full((120, 110), NAN)
        _C.gemm(a, b, c, None, None, 1.0, 0.0, nt)
        ref = c if ref is None else ref
        assert torch.equal(c, ref)
    assert_close(ref, a.double() @ b.double(), torch.float32)


def test_zero_size_operands(gen):
    for M, K, N in [(0, 0, 0), (0, 5, 3), (3, 5, 0), (3, 0, 4), (0, 0, 4)]:
        a, b = torch.randn(M, K, generator=gen), torch.randn(K, N, generator=gen)
        c = torch.full((M, N), NAN)
        _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
        assert torch.equal(c, torch.zeros(M, N))
        out = torch.full((K,), NAN)
        _C.colsum(a, out, 0.0, 1)
        assert torch.equal(out, torch.zeros(K)) if M == 0 else torch.allclose(out, a.sum(0))


def test_zero_size_numpy_output():
    """NumPy gives every dim of an empty array stride 0; with no elements nothing can overlap, so
    an empty output is as writable as any other."""
    c = np.zeros((0, 3), np.float32)
    assert _C.describe(c)["shape"] == (0, 3)
    _C.gemm(np.zeros((0, 2), np.float32), np.zeros((2, 3), np.float32), c, None, None, 1.0, 0.0, 1)
    _C.gemm(np.zeros((4, 2), np.float32), np.zeros((2, 0), np.float32), np.zeros((4, 0), np.float32),
            None, None, 1.0, 0.0, 1)
    _C.colsum(np.zeros((3, 0), np.float32), np.zeros(0, np.float32), 0.0, 1)


def test_low_precision_torch_dtypes_through_bridge(gen):
    for dtype in DTYPES:
        a = randn((7, 9), dtype, gen)
        b = randn((9, 4), dtype, gen)
        c = torch.empty(7, 4, dtype=dtype)
        _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
        assert_close(c, a.double() @ b.double(), dtype)


# ---- regressions from review ------------------------------------------------------------------------

def test_internally_overlapping_output_raises():
    c = torch.zeros(20).as_strided((4, 4), (1, 1))  # rows overlap: threads would race on them
    with pytest.raises(ValueError, match="overlap"):
        _C.gemm(torch.ones(4, 4), torch.ones(4, 4), c, None, None, 1.0, 0.0, 1)


def test_misaligned_numpy_data_raises():
    a = np.frombuffer(bytearray(257), np.float32, offset=1, count=64).reshape(8, 8)
    with pytest.raises(ValueError, match="aligned"):
        _C.describe(a)


@pytest.mark.parametrize("trans", [-1, 4, 2 ** 32 + 3])
def test_gemm_trans_out_of_range_raises(trans):
    c = torch.empty(2, 2)
    with pytest.raises(ValueError, match="trans"):
        _C.gemm(torch.ones(2, 3), torch.ones(3, 2), c, None, None, 1.0, 0.0, 1, trans)


def test_negative_bit_tensors_read_with_their_sign(gen):
    import tltorch
    x = torch.randn(4, 3, dtype=torch.cfloat, generator=gen).conj().imag  # a view with the negative bit
    assert x.is_neg()
    w = torch.randn(5, 3, generator=gen)
    got = tltorch.functional.linear(x, w)
    ref = x.resolve_neg().double() @ w.double().t()
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
