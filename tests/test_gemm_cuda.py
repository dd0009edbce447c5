"""The CUDA kernels (tltorch._cuda) against their CPU twins (tltorch._C, same random inputs, same
layouts) and the float64 reference.

Tests marked `cuda` need a GPU and a built tltorch._cuda, and skip otherwise. A few tests at the end
need only the built extension (no GPU): it must import, and reject CPU tensors cleanly.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import tltorch
from conftest import (DTYPES, HAVE_GPU, INFO, LOW_PRECISION, TOL, assert_close, assert_twin, dtype_id, empty2d,
                      make2d, names_arg, randn, ref_gemm, rel_err, to_cuda)
from tltorch import _C, ops
from tltorch.functional import linear

KC = _C.GEMM_KC
NAN = float("nan")
gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU and tltorch._cuda")


# ---- gemm ---------------------------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (7, 33, 1), (1, 7, 33), (33, 7, 7), (5, 0, 9), (0, 7, 5), (6, 5, 0),
          (37, 1000, 41), (1001, 33, 333), (65, 40, 48), (2, 3, 8)]  # N % 8 == 0: the bias fill's 16-byte path


def shape_id(s):
    return "x".join(map(str, s))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("la,lb", [("contig", "contig"), ("t", "t"), ("stride2", "offset"),
                                   ("offset", "tstride")], ids=lambda v: v)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_cuda_gemm_matches_cpu_twin(shape, la, lb, dtype, gen, no_tf32):
    M, K, N = shape
    a, b = make2d(M, K, la, dtype, gen), make2d(K, N, lb, dtype, gen)
    bias = randn((N,), dtype, gen)
    c_cpu = empty2d(M, N, "contig", dtype)
    c_gpu = to_cuda(c_cpu)
    ops.gemm(a, b, c_cpu, bias)
    ops.gemm(to_cuda(a), to_cuda(b), c_gpu, to_cuda(bias))
    ref = ref_gemm(a, b, None, bias, 1.0, 0.0)
    assert_twin(c_gpu, c_cpu, ref, dtype, what=f"gemm {shape} {la}/{lb}")
    if dtype in LOW_PRECISION and K > 0:  # no worse than torch's own cuBLAS call on the same inputs
        c_plain = torch.empty(M, N, dtype=dtype, device="cuda")
        ops.gemm(to_cuda(a), to_cuda(b), c_plain)
        assert_close(c_plain, ref_gemm(a, b, None, None, 1.0, 0.0), dtype,
                     torch_out=to_cuda(a) @ to_cuda(b))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, -1.0), (0.0, 1.5), (2.0, 0.0)])
@pytest.mark.parametrize("c_layout", ["contig", "offset"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_cuda_gemm_alpha_beta(alpha, beta, c_layout, with_bias, dtype, gen, no_tf32):
    M, K, N = 19, 2 * KC + 3, 27
    a, b = make2d(M, K, "contig", dtype, gen), make2d(K, N, "t", dtype, gen)
    bias = randn((N,), dtype, gen) if with_bias else None
    c_cpu = empty2d(M, N, c_layout, dtype)  # NaN: beta = 0 must not read it
    c0 = randn((M, N), dtype, gen)
    if beta != 0:
        c_cpu.copy_(c0)
    c_gpu = to_cuda(c_cpu)
    ops.gemm(a, b, c_cpu, bias, alpha, beta)
    ops.gemm(to_cuda(a), to_cuda(b), c_gpu, to_cuda(bias), alpha, beta)
    assert not torch.isnan(c_gpu).any()
    assert_twin(c_gpu, c_cpu, ref_gemm(a, b, c0, bias, alpha, beta), dtype, what=f"a={alpha} b={beta}")


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("in_dtype", LOW_PRECISION, ids=dtype_id)
def test_cuda_gemm_mixed_dtypes(in_dtype, gen, no_tf32):
    """float32 c with low-precision inputs; a float32 bias with a low-precision c."""
    M, K, N = 23, 500, 31
    a, b = randn((M, K), in_dtype, gen), randn((K, N), in_dtype, gen)
    bias32 = torch.randn(N, generator=gen)
    c32 = torch.empty(M, N, device="cuda")
    ops.gemm(to_cuda(a), to_cuda(b), c32, to_cuda(bias32))
    assert_close(c32, ref_gemm(a, b, None, bias32, 1.0, 0.0), torch.float32, what="float32 c")
    c_cpu = torch.empty(M, N, dtype=in_dtype)
    c_gpu = to_cuda(c_cpu)
    ops.gemm(a, b, c_cpu, bias32)
    ops.gemm(to_cuda(a), to_cuda(b), c_gpu, to_cuda(bias32))
    assert_twin(c_gpu, c_cpu, ref_gemm(a, b, None, bias32, 1.0, 0.0), in_dtype, what="float32 bias")


@pytest.mark.cuda
@gpu
def test_cuda_gemm_runs_on_the_current_stream(gen, no_tf32):
    a = torch.randn(512, 300, generator=gen)
    b = torch.randn(300, 200, generator=gen)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ag, bg = a.cuda(non_blocking=True), b.cuda(non_blocking=True)
        ag.mul_(2.0)  # queued on s: a kernel on another stream could read ag before this
        c = torch.empty(512, 200, device="cuda")
        ops.gemm(ag, bg, c)
        out = torch.empty(200, device="cuda")
        ops.colsum(c, out)
    s.synchronize()
    ref = 2.0 * (a.double() @ b.double())
    assert_close(c, ref, torch.float32)
    assert_close(out, ref.sum(0), torch.float32)


@pytest.mark.cuda
@gpu
def test_cuda_gemm_bad_arguments(gen):
    a = torch.randn(4, 3, device="cuda")
    b = torch.randn(3, 5, device="cuda")
    c = torch.zeros(4, 5, device="cuda")
    with pytest.raises(ValueError):  # c needs a unit stride in dim 1 on CUDA (tl.h)
        ops.gemm(a, b, torch.zeros(5, 4, device="cuda").t())
    with pytest.raises(ValueError) as ei:
        ops.gemm(a.cpu(), b, c)
    names_arg(ei, "a")
    with pytest.raises(ValueError) as ei:
        ops.gemm(a, b, c, torch.zeros(5))
    names_arg(ei, "bias")
    with pytest.raises(TypeError) as ei:
        ops.gemm(a.double(), b.double(), c)
    names_arg(ei, "a")
    with pytest.raises(ValueError) as ei:
        ops.gemm(a, b[:2], c)
    names_arg(ei, "b")
    with pytest.raises(ValueError) as ei:
        ops.gemm(a, b, torch.zeros(1, 5, device="cuda").expand(4, 5))
    names_arg(ei, "c")
    assert torch.equal(c, torch.zeros_like(c))


# ---- colsum -------------------------------------------------------------------------------------------

@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contig", "t", "stride2", "offset"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (1000, 3), (3, 1000), (70, 257), (0, 5), (5, 0)],
                         ids=shape_id)
@pytest.mark.parametrize("out_kind,beta", [("same", 0.0), ("float32", 0.0), ("same", 0.5),
                                           ("strided", -1.0)])
def test_cuda_colsum_matches_cpu_twin(shape, layout, dtype, out_kind, beta, gen):
    M, N = shape
    x = make2d(M, N, layout, dtype, gen)
    out_dtype = torch.float32 if out_kind == "float32" else dtype
    out0 = randn((N,), out_dtype, gen)
    base = torch.empty(2 * N if out_kind == "strided" else N, dtype=out_dtype)
    out_cpu = base[::2] if out_kind == "strided" else base
    out_cpu.copy_(out0 if beta != 0 else torch.full_like(out0, NAN))
    out_gpu = to_cuda(out_cpu)
    ops.colsum(x, out_cpu, beta)
    ops.colsum(to_cuda(x), out_gpu, beta)
    ref = x.double().sum(0) + (beta * out0.double() if beta != 0 else 0)
    assert_twin(out_gpu, out_cpu, ref, out_dtype, what=f"colsum {shape} {layout}")


# ---- linear -------------------------------------------------------------------------------------------

def twin_inputs(lead, K, N, x_layout, w_layout, dtype, gen, bias=True):
    if x_layout == "contig" or not lead:
        x = randn((*lead, K), dtype, gen)
    elif x_layout == "strided":
        x = randn((*lead, 2 * K), dtype, gen)[..., ::2]
    else:  # transposed
        x = randn((*lead[:-1], K, lead[-1]), dtype, gen).mT
    w = make2d(N, K, w_layout, dtype, gen)
    b = randn((N,), dtype, gen) if bias else None
    return x, w, b


LINEAR_CASES = [((), 7, 33, "contig", "contig"), ((7,), 33, 7, "strided", "t"),
                ((2, 3, 4), 9, 5, "transposed", "stride2"), ((0,), 5, 3, "contig", "contig"),
                ((2, 0), 5, 3, "contig", "t"), ((2, 600), 70, 130, "contig", "contig"),
                ((13,), 1000, 11, "transposed", "t")]


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lead,K,N,xl,wl", LINEAR_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_cuda_linear_forward_and_grads(lead, K, N, xl, wl, with_bias, dtype, gen, no_tf32):
    x, w, b = twin_inputs(lead, K, N, xl, wl, dtype, gen, bias=with_bias)
    g = randn((*lead, N), dtype, gen)
    gpu_ = [to_cuda(t).requires_grad_() if t is not None else None for t in (x, w, b)]
    cpu = [t.requires_grad_() if t is not None else None for t in (x, w, b)]  # same layouts
    y_cpu = linear(*cpu)
    y_gpu = linear(*gpu_)
    y_cpu.backward(g)
    y_gpu.backward(to_cuda(g))
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in cpu]
    y_ref = F.linear(*ref)
    y_ref.backward(g.double())
    assert y_gpu.shape == (*lead, N) and y_gpu.is_cuda
    assert_twin(y_gpu.detach(), y_cpu.detach(), y_ref.detach(), dtype, what="y")
    for name, tc, tg, tr in zip(("x", "weight", "bias"), cpu, gpu_, ref):
        if tc is None:
            continue
        assert tg.grad is not None and tg.grad.is_cuda and tg.grad.dtype == dtype, name
        assert_twin(tg.grad, tc.grad, tr.grad, dtype, what=f"d{name}")


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("flags", [(False, True, False), (True, False, False), (False, False, True),
                                   (False, True, True)],
                         ids=lambda f: "".join("xwb"[i] for i in range(3) if f[i]))
def test_cuda_linear_grads_only_when_required(flags, gen, no_tf32):
    x, w, b = twin_inputs((3, 5), 33, 17, "strided", "t", torch.float32, gen)
    x, w, b = (to_cuda(t).requires_grad_(f) for t, f in zip((x, w, b), flags))
    g = torch.randn(3, 5, 17, generator=gen)
    linear(x, w, b).backward(to_cuda(g))
    xd, wd, bd = (t.detach().cpu().double().requires_grad_(t.requires_grad) for t in (x, w, b))
    F.linear(xd, wd, bd).backward(g.double())
    for t, td in ((x, xd), (w, wd), (b, bd)):
        if t.requires_grad:
            assert_close(t.grad, td.grad, torch.float32)
        else:
            assert t.grad is None


@pytest.mark.cuda
@gpu
def test_cuda_linear_device_mismatch_names_argument(gen):
    x = torch.randn(4, 6, device="cuda")
    with pytest.raises(ValueError, match=r"\bweight\b"):
        linear(x, torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"\bbias\b"):
        linear(x, torch.randn(3, 6, device="cuda"), torch.randn(3))


@pytest.mark.cuda
@gpu
def test_cuda_backend_info():
    info = tltorch.backend_info()
    assert info["cuda_built"] is True and info["cuda_available"] is True
    assert isinstance(info["device_name"], str) and info["device_name"]


@pytest.mark.cuda
@gpu
def test_cuda_tf32_flag_reaches_cublas(gen):
    """torch.backends.cuda.matmul.allow_tf32 decides: off gives float32 accuracy; on (on GPUs with
    TF32, compute capability >= 8.0) gives TF32's visibly larger error."""
    a = torch.randn(64, 4096, generator=gen)
    b = torch.randn(4096, 64, generator=gen)
    ref = a.double() @ b.double()
    prev = torch.backends.cuda.matmul.allow_tf32
    errs = {}
    try:
        for flag in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = flag
            c = torch.empty(64, 64, device="cuda")
            ops.gemm(a.cuda(), b.cuda(), c)
            errs[flag] = rel_err(c, ref)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert errs[False] <= TOL[torch.float32]
    assert errs[True] <= 1e-2
    if torch.cuda.get_device_capability() >= (8, 0):
        assert errs[True] > 10 * errs[False], errs


# ---- the built extension, with or without a GPU -------------------------------------------------------

def test_cuda_extension_built_when_expected():
    """tests/run.sh sets TLTORCH_EXPECT_CUDA_BUILT=1 where nvcc exists: the build must not have
    quietly skipped tltorch._cuda."""
    if os.environ.get("TLTORCH_EXPECT_CUDA_BUILT") != "1":
        pytest.skip("TLTORCH_EXPECT_CUDA_BUILT is not set")
    assert INFO["cuda_built"] is True


@pytest.mark.skipif(not INFO["cuda_built"], reason="tltorch._cuda is not built")
def test_cuda_extension_rejects_cpu_tensors_cleanly():
    """The CUDA binding imports without a GPU and answers CPU tensors with a ValueError naming the
    argument (before it ever touches the CUDA runtime)."""
    cuda = ops.cuda_module()
    n = cuda.device_count()
    assert isinstance(n, int) and n >= 0
    a, b, c = torch.randn(4, 3), torch.randn(3, 5), torch.zeros(4, 5)
    with pytest.raises(ValueError) as ei:
        cuda.gemm(a, b, c, None, None, 1.0, 0.0, False)
    names_arg(ei, "c")
    with pytest.raises(ValueError) as ei:
        cuda.colsum(a, torch.zeros(3), 0.0)
    names_arg(ei, "out")
    with pytest.raises(TypeError, match="positional arguments"):
        cuda.gemm(a, b, c)
    with pytest.raises(TypeError) as ei:
        cuda.gemm([1.0], b, c, None, None, 1.0, 0.0, False)
    names_arg(ei, "a")
    assert torch.equal(c, torch.zeros(4, 5))
