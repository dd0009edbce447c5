"""The int8 linear layer (csrc/cpu/qlinear_int8.c): x quantised per row and group to uint8, an int8 weight
with per-channel (or per-channel-and-group) scales, against a float64 reference of the same quantised
arithmetic; every ISA path bitwise equal; thread counts bitwise equal; bad input named."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import dtype_id, make2d
from tltorch import _C

FLT_MIN = 1.17549435e-38


def quantize_rows(x, group):
    """The kernel's quantisation of x (M, K), in float32 torch ops (the same IEEE operations): per row and
    group, q (int64), a_s and zp (float32, per group as a list)."""
    x = x.float()
    qs, scales, zps = [], [], []
    for k0 in range(0, x.shape[1], group):
        xs = x[:, k0:k0 + group]
        zero = torch.zeros(())
        lo, hi = torch.minimum(xs.amin(1), zero), torch.maximum(xs.amax(1), zero)
        s = (hi - lo) / 255.0
        s = torch.where(s >= FLT_MIN, s, torch.ones_like(s))
        inv = 1.0 / s
        zp = torch.round(-lo * inv).clamp(0, 255)
        qs.append((torch.round(xs * inv[:, None]) + zp[:, None]).clamp(0, 255).long())
        scales.append(s)
        zps.append(zp)
    return qs, scales, zps


def ref_int8_linear(x, w, w_scale, group, bias):
    """y in float64 from the kernel's integers: exact integer sums, scales applied in float64."""
    M, N = x.shape[0], w.shape[0]
    y = torch.zeros(M, N, dtype=torch.float64)
    qs, scales, zps = quantize_rows(x, group)
    for g, (q, s, zp) in enumerate(zip(qs, scales, zps)):
        wg = w[:, g * group:(g + 1) * group].long()
        acc = q @ wg.T - zp.long()[:, None] * wg.sum(1)[None, :]
        ws = w_scale if w_scale.dim() == 1 else w_scale[:, g]
        y += s.double()[:, None] * ws.double()[None, :] * acc.double()
    if bias is not None:
        y += bias.double()
    return y


def pack(w, w_scale, group):
    packed = torch.empty(_C.int8_bytes(w.shape[0], w.shape[1], group, True), dtype=torch.uint8)
    _C.int8_pack(w, w_scale, group, packed, 1)
    return packed


def run(x, packed, bias, y, group, nthreads=1):
    ws = torch.empty(_C.int8_bytes(x.shape[0], x.shape[1], group, False), dtype=torch.uint8)
    _C.int8_linear(x, packed, bias, y, ws, nthreads)
    return y


def make_weight(N, K, group, per_group, gen):
    w = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    shape = (N, (K + group - 1) // group) if per_group else (N,)
    return w, torch.rand(*shape, generator=gen) * 0.02 + 1e-3


def max_rel(out, ref):
    """max |out - ref| over max |ref|, with out in float64 (inf for NaN)."""
    out = out.double()
    if ref.numel() == 0:
        return 0.0
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# The float32 epilogue (per group one product and two fused multiply-adds, then the bias) against
# float64: a few float32 roundings of terms no larger than the result's scale.
TOL32 = 2e-6

SHAPES = [(0, 13, 5), (1, 1, 1), (1, 70, 33), (7, 13, 5), (7, 64, 32), (13, 130, 70), (300, 385, 97)]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("group", [4, 64, 512])
@pytest.mark.parametrize("per_group", [False, True])
def test_int8_linear_matches_the_quantised_arithmetic(M, K, N, group, per_group, gen):
    w, w_scale = make_weight(N, K, group, per_group, gen)
    x = torch.randn(M, K, generator=gen) * 3
    bias = torch.randn(N, generator=gen)
    y = run(x, pack(w, w_scale, group), bias, torch.full((M, N), float("nan")), group)
    assert max_rel(y, ref_int8_linear(x, w, w_scale, group, bias)) <= TOL32


@pytest.mark.parametrize("layout", ["t", "stride2", "offset", "tstride"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_int8_linear_reads_any_layout_and_float_dtype(layout, dtype, gen):
    M, K, N, group = 37, 150, 45, 64
    w, w_scale = make_weight(N, K, group, True, gen)
    x = make2d(M, K, layout, dtype, gen, scale=2.0)
    packed = pack(w, w_scale, group)
    y = run(x, packed, None, torch.empty(M, N), group)
    assert max_rel(y, ref_int8_linear(x, w, w_scale, group, None)) <= TOL32
    # the same bits as from a contiguous float32 copy of the same values
    assert torch.equal(y, run(x.float().contiguous(), packed, None, torch.empty(M, N), group))


@pytest.mark.parametrize("y_layout", ["contig", "t", "stride2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_int8_linear_output_dtypes_and_layouts(y_layout, dtype, gen):
    """y of x's dtype is the float32 result rounded once (to nearest even); any strides."""
    M, K, N, group = 29, 96, 70, 32
    w, w_scale = make_weight(N, K, group, False, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    packed = pack(w, w_scale, group)
    y32 = run(x, packed, bias, torch.empty(M, N), group)
    y = torch.empty(N, M, dtype=dtype).t() if y_layout == "t" else \
        torch.empty(M, 2 * N, dtype=dtype)[:, ::2] if y_layout == "stride2" else torch.empty(M, N, dtype=dtype)
    run(x, packed, bias, y, group)
    assert torch.equal(y, y32.to(dtype))


def test_int8_linear_nan_row_stays_in_its_row(gen):
    M, K, N, group = 9, 64, 40, 32
    w, w_scale = make_weight(N, K, group, False, gen)
    x = torch.randn(M, K, generator=gen)
    x[2, 5] = float("nan")
    x[6, 40] = float("inf")
    y = run(x, pack(w, w_scale, group), None, torch.empty(M, N), group)
    bad = torch.zeros(M, dtype=torch.bool)
    bad[[2, 6]] = True
    assert torch.isnan(y[bad]).all()
    assert torch.isfinite(y[~bad]).all()
    assert max_rel(y[~bad], ref_int8_linear(x[~bad], w, w_scale, group, None)) <= TOL32


def test_int8_linear_zero_and_tiny_rows(gen):
    """An all-zero row gives exactly the bias; a row of subnormals (1 / scale would overflow) too."""
    M, K, N, group = 3, 40, 20, 8
    w, w_scale = make_weight(N, K, group, False, gen)
    x = torch.randn(M, K, generator=gen)
    x[0] = 0.0
    x[1] = 1e-41
    bias = torch.randn(N, generator=gen)
    y = run(x, pack(w, w_scale, group), bias, torch.empty(M, N), group)
    assert torch.equal(y[0], bias) and torch.equal(y[1], bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_int8_linear_thread_count_does_not_change_bits(dtype, gen):
    M, K, N, group = 301, 384, 200, 64
    w, w_scale = make_weight(N, K, group, True, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    packed = pack(w, w_scale, group)
    y1 = run(x, packed, None, torch.empty(M, N, dtype=dtype), group, 1)
    y2 = run(x, packed, None, torch.empty(M, N, dtype=dtype), group, 2)
    assert torch.equal(y1, y2)
    # fewer column slivers than threads: the rows are shared out instead
    w, w_scale = make_weight(20, K, group, False, gen)
    packed = pack(w, w_scale, group)
    assert torch.equal(run(x, packed, None, torch.empty(M, 20, dtype=dtype), group, 1),
                       run(x, packed, None, torch.empty(M, 20, dtype=dtype), group, 2))


# ---- every ISA path: bitwise equal -----------------------------------------------------------------

# Runs in a subprocess with TLTORCH_CPU_ISA set; saves its outputs for the parent to compare bitwise.
ISA_SCRIPT = r"""
import sys, torch
from tltorch import _C
cases = torch.load(sys.argv[1])
out = []
for x, w, s, group, bias in cases:
    packed = torch.empty(_C.int8_bytes(w.shape[0], w.shape[1], group, True), dtype=torch.uint8)
    _C.int8_pack(w, s, group, packed, 1)
    ws = torch.empty(_C.int8_bytes(x.shape[0], x.shape[1], group, False), dtype=torch.uint8)
    ys = []
    for nt in (1, 2):
        y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
        _C.int8_linear(x, packed, bias, y, ws, nt)
        ys.append(y)
    out.append(ys)
torch.save({"isa": _C.int8_isa(), "out": out}, sys.argv[2])
"""


def test_int8_linear_each_isa_path_same_bits(tmp_path, gen):
    cases = []
    for (M, K, N, group) in [(1, 1, 1, 4), (7, 13, 33, 4), (13, 130, 70, 64), (300, 385, 97, 128), (50, 600, 64, 512)]:
        for dtype in (torch.float32, torch.bfloat16):
            w, s = make_weight(N, K, group, group != 128, gen)
            cases.append((torch.randn(M, K, generator=gen).to(dtype) * 4, w, s, group,
                          torch.randn(N, generator=gen)))
    torch.save(cases, tmp_path / "cases.pt")
    results = {}
    for isa in ("native", "portable"):
        env = dict(os.environ, OMP_NUM_THREADS="2", TLTORCH_THREADS_LOAD="off")
        if isa == "portable":
            env["TLTORCH_CPU_ISA"] = "portable"
        else:
            env.pop("TLTORCH_CPU_ISA", None)
        out = tmp_path / f"{isa}.pt"
        proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(tmp_path / "cases.pt"), str(out)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[isa] = torch.load(out)
    assert results["portable"]["isa"] == "portable"
    for i, ((x, w, s, group, bias), yn, yp) in enumerate(zip(cases, results["native"]["out"],
                                                             results["portable"]["out"])):
        assert torch.equal(yn[0], yn[1]) and torch.equal(yp[0], yp[1]), f"case {i}: threads differ"
        assert torch.equal(yn[0], yp[0]), f"case {i}: {results['native']['isa']} and portable differ"
        assert max_rel(yp[0].float(), ref_int8_linear(x, w, s, group, bias)) <= (TOL32 if x.dtype == torch.float32
                                                                               else 2 ** -8)


# ---- bad input ---------------------------------------------------------------------------------------

def test_int8_linear_bad_input_names_the_argument(gen):
    N, K, group = 10, 20, 8
    w, s = make_weight(N, K, group, False, gen)
    packed = pack(w, s, group)
    x = torch.randn(4, K, generator=gen)
    ws = torch.empty(_C.int8_bytes(4, K, group, False), dtype=torch.uint8)
    with pytest.raises(TypeError, match="'x'"):
        _C.int8_linear(x.double(), packed, None, torch.empty(4, N, dtype=torch.float64), ws, 1)
    with pytest.raises(ValueError, match="'x'"):
        _C.int8_linear(torch.randn(4, K + 1), packed, None, torch.empty(4, N), ws, 1)
    with pytest.raises(ValueError, match="'y'"):
        _C.int8_linear(x, packed, None, torch.empty(4, N + 1), ws, 1)
    with pytest.raises(ValueError, match="'bias'"):
        _C.int8_linear(x, packed, torch.zeros(N + 1), torch.empty(4, N), ws, 1)
    with pytest.raises(ValueError, match="'ws'"):
        _C.int8_linear(x, packed, None, torch.empty(4, N), ws[:-1], 1)
    with pytest.raises(ValueError, match="'packed'"):
        _C.int8_linear(x, torch.zeros_like(packed), None, torch.empty(4, N), ws, 1)
    with pytest.raises(ValueError, match="'packed'"):
        _C.int8_linear(x, packed[:-1], None, torch.empty(4, N), ws, 1)
    with pytest.raises(ValueError, match="'group'"):
        _C.int8_pack(w, s, 6, torch.empty(10000, dtype=torch.uint8), 1)
    with pytest.raises(TypeError, match="'w'"):
        _C.int8_pack(w.float(), s, group, torch.empty(10000, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="'w_scale'"):
        _C.int8_pack(w, s[:-1], group, torch.empty(10000, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="'packed'"):
        _C.int8_pack(w, s, group, torch.empty(10, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="'group'"):
        _C.int8_bytes(4, K, 1024, False)
