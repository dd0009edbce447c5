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

SHAPES = [(0, 13, 5), (5, 0, 7), (1, 1, 1), (1, 70, 33), (7, 13, 5), (7, 64, 32), (13, 130, 70), (300, 385, 97)]


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
    # many chunks of rows (each quantised while the one before is multiplied)
    w, w_scale = make_weight(70, 3072, group, False, gen)
    x = torch.randn(700, 3072, generator=gen).to(dtype)
    packed = pack(w, w_scale, group)
    y1 = run(x, packed, None, torch.empty(700, 70, dtype=dtype), group, 1)
    assert torch.equal(y1, run(x, packed, None, torch.empty(700, 70, dtype=dtype), group, 2))
    assert max_rel(y1.float(), ref_int8_linear(x, w, w_scale, group, None)) <= (TOL32 if dtype == torch.float32
                                                                                else 2 ** -8)
    # fewer column slivers than threads: the rows are shared out instead
    w, w_scale = make_weight(20, K, group, False, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    packed = pack(w, w_scale, group)
    assert torch.equal(run(x, packed, None, torch.empty(M, 20, dtype=dtype), group, 1),
                       run(x, packed, None, torch.empty(M, 20, dtype=dtype), group, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("y_layout", ["contig", "offset"])
def test_int8_linear_large_output_is_streamed_with_the_same_bits(dtype, y_layout, gen):
    """Outputs of 4 MB and more go out with streaming stores where a row's run of 16 is aligned (else
    ordinary ones): the same values as the same rows computed in small calls, for any thread count."""
    M, K, N, group = 1100, 70, 1000 if dtype == torch.float32 else 2000, 32
    w, w_scale = make_weight(N, K, group, True, gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen)
    packed = pack(w, w_scale, group)
    small = torch.cat([run(x[i:i + 100], packed, bias, torch.empty(min(100, M - i), N, dtype=dtype), group)
                       for i in range(0, M, 100)])
    for nthreads in (1, 2):
        if y_layout == "contig":
            y = torch.full((M, N), float("nan"), dtype=dtype)
        else:  # rows 3 elements off a line: each row's runs unaligned, some rows partly aligned
            y = torch.full((M, N + 5), float("nan"), dtype=dtype)[:, 3:3 + N]
        assert y.numel() * y.element_size() >= 4 << 20
        run(x, packed, bias, y, group, nthreads)
        assert torch.equal(y, small)
    assert max_rel(small.float(), ref_int8_linear(x, w, w_scale, group, bias)) <= (
        TOL32 if dtype == torch.float32 else 2 ** -8)


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
    for (M, K, N, group) in [(1, 1, 1, 4), (7, 13, 33, 4), (13, 130, 70, 64), (300, 385, 97, 128), (50, 600, 64, 512),
                             (33, 64, 32, 64), (70, 200, 40, 32), (45, 300, 40, 96), (29, 90, 33, 20),
                             (400, 3072, 40, 64), (37, 1000, 50, 64)]:
        for dtype in (torch.float32, torch.bfloat16):
            w, s = make_weight(N, K, group, group != 128, gen)
            cases.append((torch.randn(M, K, generator=gen).to(dtype) * 4, w, s, group,
                          torch.randn(N, generator=gen)))
    torch.save(cases, tmp_path / "cases.pt")
    results = {}
    for isa in ("native", "avx512", "portable"):  # avx512: AMX off, VNNI on where the CPU has them
        env = dict(os.environ, OMP_NUM_THREADS="2", TLTORCH_THREADS_LOAD="off")
        if isa == "native":
            env.pop("TLTORCH_CPU_ISA", None)
        else:
            env["TLTORCH_CPU_ISA"] = isa
        out = tmp_path / f"{isa}.pt"
        proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(tmp_path / "cases.pt"), str(out)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[isa] = torch.load(out)
    assert results["portable"]["isa"] == "portable" and results["avx512"]["isa"] != "amx"
    for i, ((x, w, s, group, bias), yn, yv, yp) in enumerate(zip(cases, results["native"]["out"],
                                                                 results["avx512"]["out"], results["portable"]["out"])):
        assert torch.equal(yn[0], yn[1]) and torch.equal(yv[0], yv[1]) and torch.equal(yp[0], yp[1]), \
            f"case {i}: threads differ"
        assert torch.equal(yn[0], yp[0]), f"case {i}: {results['native']['isa']} and portable differ"
        assert torch.equal(yv[0], yp[0]), f"case {i}: {results['avx512']['isa']} and portable differ"
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


# ---- int8_dequant: the weight as a dense float tensor ---------------------------------------------------

def ref_dequant(w, s, group, dtype):
    """w * s in float32 (torch's product, rounded once), then rounded to dtype."""
    s = s[:, None] if s.dim() == 1 else s.repeat_interleave(group, dim=1)[:, :w.shape[1]]
    return (w.float() * s).to(dtype)


@pytest.mark.parametrize("N,K,group", [(7, 13, None), (5, 77, 32), (33, 100, 8), (3, 16, 1), (4, 5, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["contig", "t", "stride2"])
def test_int8_dequant_matches_the_product(N, K, group, dtype, layout, gen):
    """Bitwise equal to torch's w.float() * s rounded to dtype, on every ISA path (the ISA reruns) and for
    any layout of w and out."""
    w = torch.randint(-128, 128, (N, K), generator=gen, dtype=torch.int8)
    if layout == "t":
        w = w.t().contiguous().t()
    elif layout == "stride2":
        w = torch.repeat_interleave(w, 2, dim=1)[:, ::2]
    s = torch.rand((N,) if group is None else (N, -(-K // group)), generator=gen) * 0.03 + 1e-4
    out = torch.full((K, N), float("nan"), dtype=dtype).t() if layout == "t" else torch.empty(N, K, dtype=dtype)
    for threads in (1, 2):
        _C.int8_dequant(w, s, group or 1, out, threads)
        assert torch.equal(out, ref_dequant(w, s, group, dtype))


def test_int8_dequant_bad_input_names_the_argument(gen):
    w = torch.randint(-127, 128, (6, 10), generator=gen, dtype=torch.int8)
    s = torch.rand(6, 3, generator=gen)
    out = torch.empty(6, 10)
    _C.int8_dequant(w, s, 4, out, 1)
    with pytest.raises(TypeError, match="'w'"):
        _C.int8_dequant(w.float(), s, 4, out, 1)
    with pytest.raises(TypeError, match="'w_scale'"):
        _C.int8_dequant(w, s.double(), 4, out, 1)
    with pytest.raises(ValueError, match="'w_scale'"):
        _C.int8_dequant(w, s, 3, out, 1)  # 4 groups of 3, not 3
    with pytest.raises(ValueError, match="'group'"):
        _C.int8_dequant(w, s, 0, out, 1)
    with pytest.raises(ValueError, match="'out'"):
        _C.int8_dequant(w, s, 4, torch.empty(6, 11), 1)
    with pytest.raises(TypeError, match="'out'"):
        _C.int8_dequant(w, s, 4, torch.empty(6, 10, dtype=torch.int32), 1)
    with pytest.raises(TypeError):
        _C.int8_dequant(w, "scale", 4, out, 1)


# ---- the layer: FrozenLinear(storage="int8") ----------------------------------------------------------

from tltorch import freeze, ops  # noqa: E402
from tltorch.nn import FrozenLinear  # noqa: E402
from tltorch.nn.frozen import INT8_GROUP  # noqa: E402


def make_layer(K, N, gen, activations="int8"):
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=gen) * K ** -0.5)
        lin.bias.copy_(torch.randn(N, generator=gen))
    return lin, FrozenLinear.from_linear(lin, "int8", activations)


def fro(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def expected_layer_output(m, x):
    """What an int8 FrozenLinear with activations="int8" gives for float x: the int8 kernel where the CPU
    has VNNI or AMX, else (its portable path is ~30x slower than the float GEMM) the float path."""
    if not ops.frozen.int8_fast():
        m.activations = "float"
        try:
            return m(x)
        finally:
            m.activations = "int8"
    g = m.group or INT8_GROUP
    rows = x.reshape(-1, x.shape[-1])
    y = run(rows, pack(m.weight, m.weight_scale, g), m.bias, torch.empty(rows.shape[0], m.out_features,
                                                                            dtype=x.dtype), g)
    return y.view(*x.shape[:-1], m.out_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_layer_runs_the_int8_kernel(dtype, gen):
    if dtype == torch.bfloat16 and ops.frozen.bf16_native():
        pytest.skip("bfloat16 x runs the bfloat16 GEMM on this CPU (test_layer_bfloat16_x)")
    lin, m = make_layer(150, 70, gen)
    assert m.activations == "int8" and "activations=int8" in repr(m)
    x = torch.randn(3, 11, 150, generator=gen).to(dtype)
    y = m(x)
    assert y.dtype == dtype and y.shape == (3, 11, 70)
    assert torch.equal(y, expected_layer_output(m, x))
    assert torch.equal(m(x[0, 0]), y[0, 0])  # 1-D x
    assert (m.packed_weight is not None) == ops.frozen.int8_fast()  # packed only for the kernel


@pytest.mark.parametrize("K,N", [(384, 384), (1536, 384), (100, 37)])
def test_layer_accuracy_floor(K, N, gen):
    """Against the float32 layer: int8 activations add about half again the weight's own rounding error
    (Gaussian and GELU-shaped inputs: 0.0057-0.0067 against 0.0038-0.0040 measured)."""
    lin, m = make_layer(K, N, gen)
    weight_only = FrozenLinear.from_linear(lin, "int8", activations="float")
    for x in (torch.randn(200, K, generator=gen), torch.nn.functional.gelu(torch.randn(200, K, generator=gen))):
        ref = lin(x).detach()
        err, err_w = fro(m(x), ref), fro(weight_only(x), ref)
        assert err <= 1e-2 and err <= 2 * err_w, (err, err_w)


def test_layer_input_gradient_is_dy_times_the_weight(gen):
    lin, m = make_layer(40, 24, gen)
    x = torch.randn(9, 40, generator=gen, requires_grad=True)
    dy = torch.randn(9, 24, generator=gen)
    y = m(x)
    y.backward(dy)
    kernel = "Int8Linear" if ops.frozen.int8_fast() else "FrozenLinear"  # expected_layer_output's routes
    assert y.grad_fn is not None and kernel in type(y.grad_fn).__name__
    assert max_rel(x.grad, dy.double() @ m.dequantized_weight(torch.float64)) <= 1e-5
    with torch.no_grad():
        assert torch.equal(m(x), y)  # the same forward with and without autograd


def test_layer_weight_only_activations(gen):
    lin, m = make_layer(50, 20, gen, activations="float")
    x = torch.randn(6, 50, generator=gen)
    ref = ops.frozen_linear(x, m.dequantized_weight(), None, m.bias)
    assert torch.equal(m(x), ref)
    assert m.packed_weight is None  # never packed
    m.activations = "int8"
    assert torch.equal(m(x), ref) != ops.frozen.int8_fast()  # x quantised only where the kernel is fast
    with pytest.raises(ValueError, match="activations"):
        m.activations = "int4"
    net = freeze(torch.nn.Sequential(torch.nn.Linear(8, 4)), storage="int8", activations="float")
    assert net[0].activations == "float"
    with pytest.raises(ValueError, match="activations"):
        freeze(torch.nn.Sequential(torch.nn.Linear(8, 4)), storage="int8", activations="fp8")


@pytest.mark.skipif(not ops.frozen.int8_fast(), reason="the layer runs its float path on a CPU without "
                    "VNNI or AMX: no packed weight to keep current")
def test_layer_repacks_after_load_state_dict_and_in_place_edits(gen):
    lin, m = make_layer(64, 33, gen)
    x = torch.randn(5, 64, generator=gen)
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}  # the packed weight is not saved
    fresh = FrozenLinear(64, 33, storage="int8")
    assert fresh.packed_weight is None
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), m(x))
    with torch.no_grad():
        m.weight[3] = -m.weight[3]
    y = m(x)
    g = m.group or INT8_GROUP
    ref = run(x, pack(m.weight, m.weight_scale, g), m.bias, torch.empty(5, 33), g)
    assert torch.equal(y, ref)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), y)


def test_layer_bad_input_names_the_argument(gen):
    lin, m = make_layer(12, 5, gen)
    with pytest.raises(TypeError, match="x"):
        m(torch.ones(2, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="x"):
        m(torch.ones(2, 13))
    with pytest.raises(ValueError, match="x"):
        m(torch.ones(2, 12, device="meta"))
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            lin.weight[1, 2] = bad
        with pytest.raises(ValueError, match=r"weight.*int8"):
            FrozenLinear.from_linear(lin, "int8")


# ---- group scales: FrozenLinear.from_linear(linear, "int8", group=G) ------------------------------------

@pytest.mark.parametrize("group", [32, 64])
def test_layer_group_scales(group, gen):
    """One scale per output channel and group of `group` inputs (the last group short): each block's
    absmax / 127, every weight within half its block's step, x quantised in the same groups by the kernel."""
    lin, _ = make_layer(150, 70, gen)
    per_channel = FrozenLinear.from_linear(lin, "int8", group=None)
    m = FrozenLinear.from_linear(lin, "int8", group=group)
    groups = -(-150 // group)
    assert m.group == group and m.weight_scale.shape == (70, groups) and f"group={group}" in repr(m)
    w = lin.weight.detach()
    blocks = torch.nn.functional.pad(w, (0, groups * group - 150)).view(70, groups, group)
    torch.testing.assert_close(m.weight_scale, blocks.abs().amax(2) / 127, rtol=1e-6, atol=0)
    step = m.weight_scale.repeat_interleave(group, dim=1)[:, :150]
    wq = m.dequantized_weight()
    assert torch.equal(wq, m.weight.float() * step)
    assert ((wq - w).abs() <= 0.5 * step * (1 + 1e-5)).all()
    assert fro(wq, w) < fro(per_channel.dequantized_weight(), w)
    assert m.weight_bytes() == 70 * 150 + 70 * groups * 4
    for dtype in (torch.float32,) if ops.frozen.bf16_native() else (torch.float32, torch.bfloat16):
        x = torch.randn(3, 11, 150, generator=gen).to(dtype)
        y = m(x)
        assert y.dtype == dtype and torch.equal(y, expected_layer_output(m, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_layer_group_scales_input_gradient(dtype, gen):
    """dx = dy (W*s) with s per group, through the dequantised weight."""
    lin, _ = make_layer(100, 24, gen)
    m = FrozenLinear.from_linear(lin, "int8", group=32)
    x = torch.randn(9, 100, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(9, 24, generator=gen).to(dtype)
    m(x).backward(dy)
    assert x.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max_rel(x.grad, dy.double() @ m.dequantized_weight(torch.float64)) <= tol


def test_layer_group_scales_float_activations(gen):
    lin, _ = make_layer(100, 24, gen)
    m = FrozenLinear.from_linear(lin, "int8", activations="float", group=32)
    x = torch.randn(2, 5, 100, generator=gen, requires_grad=True)
    y = m(x)
    assert max_rel(y, x.double() @ m.dequantized_weight(torch.float64).T + m.bias.double()) <= 1e-5
    assert m.packed_weight is None
    dy = torch.randn(2, 5, 24, generator=gen)
    y.backward(dy)
    assert max_rel(x.grad, dy.double() @ m.dequantized_weight(torch.float64)) <= 1e-5


@pytest.mark.skipif(not ops.frozen.int8_fast(), reason="the layer runs its float path on a CPU without "
                    "VNNI or AMX: no packed weight to keep current")
def test_layer_group_scales_load_per_channel_state_dict(gen):
    """A per-channel scale (N,), as saved by a layer without groups, loads into a grouped layer unchanged:
    the same scale in every group."""
    lin, old = make_layer(150, 33, gen)
    old_sd = FrozenLinear.from_linear(lin, "int8", group=None).state_dict()
    assert old_sd["weight_scale"].shape == (33,)
    fresh = FrozenLinear(150, 33, storage="int8", group=64)
    fresh.load_state_dict(old_sd)
    assert fresh.weight_scale.shape == (33, 3)
    assert torch.equal(fresh.dequantized_weight(), ops.dequant(old_sd["weight"], old_sd["weight_scale"], torch.float32))
    x = torch.randn(5, 150, generator=gen)
    ref = run(x, pack(old_sd["weight"], old_sd["weight_scale"], 64), old_sd["bias"], torch.empty(5, 33), 64)
    assert torch.equal(fresh(x), ref)
    grouped = FrozenLinear.from_linear(lin, "int8", group=64)
    fresh.load_state_dict(grouped.state_dict())
    assert torch.equal(fresh(x), grouped(x))


@pytest.mark.skipif(not ops.frozen.int8_fast(), reason="the layer runs its float path on a CPU without "
                    "VNNI or AMX: no packed weight to keep current")
def test_layer_group_scales_set_weight(gen):
    """set_weight (a LoRA merge) requantises in the layer's groups; with a scale, takes it as stored."""
    lin, _ = make_layer(96, 20, gen)
    m = FrozenLinear.from_linear(lin, "int8", group=32)
    w2 = torch.randn(20, 96, generator=gen) * 0.1
    m.set_weight(w2)
    assert m.weight_scale.shape == (20, 3)
    lin2 = torch.nn.Linear(96, 20)
    with torch.no_grad():
        lin2.weight.copy_(w2)
    assert torch.equal(m.dequantized_weight(), FrozenLinear.from_linear(lin2, "int8", group=32).dequantized_weight())
    x = torch.randn(4, 96, generator=gen)
    y = m(x)  # repacked
    assert torch.equal(y, run(x, pack(m.weight, m.weight_scale, 32), m.bias, torch.empty(4, 20), 32))
    weight, scale = m.weight.clone(), m.weight_scale.clone()
    m.set_weight(torch.zeros(20, 96))
    m.set_weight(weight, scale)
    assert torch.equal(m(x), y)


def test_group_option_checks_and_freeze(gen):
    for bad in (0, 30, 1024, 64.0, True):
        with pytest.raises(ValueError, match="group"):
            FrozenLinear(64, 8, storage="int8", group=bad)
        with pytest.raises(ValueError, match="group"):
            freeze(torch.nn.Sequential(torch.nn.Linear(8, 4)), storage="int8", group=bad)
    net = freeze(torch.nn.Sequential(torch.nn.Linear(70, 4)), storage="int8", group=32)
    assert net[0].group == 32 and net[0].weight_scale.shape == (4, 3)
    assert freeze(torch.nn.Sequential(torch.nn.Linear(70, 4)), storage="int8", group=None)[0].weight_scale.shape == (4,)
    assert FrozenLinear(64, 8, storage="bfloat16", group=32).group is None  # float storages have no scales


@pytest.mark.parametrize("group", [None, 32])
def test_layer_under_bf16_autocast(group, gen):
    """Under torch.autocast("cpu", bfloat16) x may come float32 or bfloat16 from the ops before: as
    nn.Linear there, the layer computes in bfloat16 and y is bfloat16 (the ops after it run in
    bfloat16 too); under autocast to float16 (not a dtype of the layer) a float32 x stays float32."""
    lin, _ = make_layer(150, 40, gen)
    m = FrozenLinear.from_linear(lin, "int8", group=group)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(7, 150, generator=gen).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, m(x.bfloat16()))
        with torch.autocast("cpu", dtype=torch.float16):
            y = m(x)
        assert y.dtype == dtype and torch.equal(y, m(x))


@pytest.mark.parametrize("group", [None, 32])
def test_layer_bfloat16_x(group, gen):
    """bfloat16 x: where the CPU multiplies bfloat16 natively, the weight expanded to bfloat16 and
    nn.Linear's bfloat16 product (x not quantised); else the int8 kernel. Close to the float64 product
    either way; its input gradient too. Under autocast to bfloat16 a float32 x is cast first."""
    lin, _ = make_layer(150, 70, gen)
    m = FrozenLinear.from_linear(lin, "int8", group=group)
    x = torch.randn(3, 11, 150, generator=gen).bfloat16().requires_grad_()
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 11, 70)
    wq = m.dequantized_weight(torch.float64)
    ref = x.detach().double() @ wq.t() + m.bias.double()
    native = ops.frozen.bf16_native()
    assert fro(y, ref) <= (6e-3 if native else 2e-2)  # bf16 output rounding; with 8-bit x, its rounding too
    if native:
        w16 = ops.int8_dequant(m.weight, m.weight_scale, m.group or 150, torch.bfloat16)
        assert torch.equal(y.detach(), ops.frozen_linear(x.detach(), w16, None, m.bias))
    dy = torch.randn(3, 11, 70, generator=gen).bfloat16()
    y.backward(dy)
    assert x.grad.dtype == torch.bfloat16 and fro(x.grad, dy.double() @ wq) <= 1e-2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ya = m(x.detach().float())
    assert ya.dtype == torch.bfloat16 and torch.equal(ya, m(x.detach()).detach())
