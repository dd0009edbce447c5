"""tltorch._C.gemm and tltorch._C.colsum (csrc/cpu/gemm*.c) against float64 references."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import (DTYPES, LAYOUTS, LOW_PRECISION, TOL, assert_close, assert_rounded_once,
                      dtype_id, empty2d, make2d, names_arg, randn, ref_gemm)
from tltorch import _C

KC = _C.GEMM_KC
NAN = float("nan")


def ws_for(c, K):
    """The float32 workspace _C.gemm needs for a non-float32 c when K spans several blocks, else None."""
    if c.dtype != torch.float32 and K > KC and c.numel():
        return torch.empty(c.numel(), dtype=torch.float32).fill_(NAN)  # contents must not matter
    return None


# (M, K, N): odd sizes, each of M/K/N empty, K just past one block, several K blocks (K > GEMM_KC),
# and several M and N cache blocks (MC = 960 rows, NC = 320 columns).
SHAPES = [
    (1, 1, 1), (1, 7, 33), (7, 33, 1), (33, 7, 7), (13, 1, 17), (5, 0, 9), (0, 7, 5), (6, 5, 0),
    (17, KC + 1, 23), (37, 1000, 41), (1001, 33, 333),
]
LAYOUT_PAIRS = [("contig", "contig"), ("t", "contig"), ("contig", "t"), ("t", "t"),
                ("stride2", "offset"), ("offset", "tstride")]


def shape_id(s):
    return "x".join(map(str, s))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("la,lb", LAYOUT_PAIRS, ids=lambda v: v)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gemm_matches_reference(shape, la, lb, dtype, gen):
    M, K, N = shape
    a = make2d(M, K, la, dtype, gen)
    b = make2d(K, N, lb, dtype, gen)
    c = empty2d(M, N, "contig", dtype)  # beta = 0: the NaN in c must never be read
    _C.gemm(a, b, c, None, ws_for(c, K), 1.0, 0.0, 1)
    ref = ref_gemm(a, b, None, None, 1.0, 0.0)
    assert_close(c, ref, dtype, torch_out=a @ b, what=f"gemm {shape} {la}/{lb}")
    if dtype in LOW_PRECISION and K > KC:
        assert_rounded_once(c, ref, dtype, what="gemm with ws")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("c_layout", ["contig", "t", "stride2", "offset"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, -1.0), (-2.0, 0.25), (0.0, 1.5), (3.0, 0.0)])
@pytest.mark.parametrize("shape", [(7, 33, 19), (9, 0, 5), (11, 2 * KC + 5, 35)], ids=shape_id)
def test_gemm_alpha_beta_c_layouts(shape, alpha, beta, c_layout, dtype, gen):
    M, K, N = shape
    a = make2d(M, K, "contig", dtype, gen)
    b = make2d(K, N, "t", dtype, gen)
    c = empty2d(M, N, c_layout, dtype)
    if beta != 0:
        c.copy_(randn((M, N), dtype, gen))
    c0 = c.clone()
    _C.gemm(a, b, c, None, ws_for(c, K), alpha, beta, 1)
    ref = ref_gemm(a, b, c0, None, alpha, beta)
    assert_close(c, ref, dtype, what=f"alpha={alpha} beta={beta} c {c_layout}")
    if dtype in LOW_PRECISION and K > KC and alpha != 0:
        assert_rounded_once(c, ref, dtype, what="alpha/beta with ws")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("K", [0, 5, KC, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_beta0_never_reads_c(K, with_bias, dtype, gen):
    M, N = 9, 21
    a = make2d(M, K, "contig", dtype, gen)
    b = make2d(K, N, "contig", dtype, gen)
    bias = randn((N,), dtype, gen) if with_bias else None
    for layout in ("contig", "stride2"):
        c = empty2d(M, N, layout, dtype, fill=NAN)
        _C.gemm(a, b, c, bias, ws_for(c, K), 1.0, 0.0, 1)
        assert not torch.isnan(c).any(), "beta = 0 read the NaN in c"
        assert_close(c, ref_gemm(a, b, None, bias, 1.0, 0.0), dtype, what=f"beta=0 K={K}")
    if K == 0:  # C = bias (or 0) exactly
        expect = bias.expand(M, N) if with_bias else torch.zeros(M, N, dtype=dtype)
        assert torch.equal(c, expect)


@pytest.mark.parametrize("c_dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("K", [1, 33, 1000])
def test_gemm_float32_bias_with_low_precision_c(K, c_dtype, gen):
    """A float32 bias is added before the one rounding to c's dtype, not rounded first."""
    M, N = 40, 70
    a = randn((M, K), c_dtype, gen, scale=0.05)  # small products: the bias dominates the sum
    b = randn((K, N), c_dtype, gen)
    bias = torch.randn(N, generator=gen) * 3 + 0.1  # float32 values that c_dtype cannot represent
    assert not torch.equal(bias.to(c_dtype).float(), bias)
    c = empty2d(M, N, "contig", c_dtype)
    _C.gemm(a, b, c, bias, ws_for(c, K), 1.0, 0.0, 1)
    ref = ref_gemm(a, b, None, bias, 1.0, 0.0)
    assert_close(c, ref, c_dtype)
    assert_rounded_once(c, ref, c_dtype, what="float32 bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias_kind", ["contig", "strided", "float32"])
def test_gemm_bias_layouts(bias_kind, dtype, gen):
    M, K, N = 13, 29, 37
    a = make2d(M, K, "offset", dtype, gen)
    b = make2d(K, N, "stride2", dtype, gen)
    if bias_kind == "contig":
        bias = randn((N,), dtype, gen)
    elif bias_kind == "strided":
        bias = randn((3 * N,), dtype, gen)[1::3]
    else:
        bias = torch.randn(N, generator=gen)
    c = empty2d(M, N, "t", dtype)
    c0 = randn((M, N), dtype, gen)
    c.copy_(c0)
    _C.gemm(a, b, c, bias, None, 0.75, -0.5, 1)
    assert_close(c, ref_gemm(a, b, c0, bias, 0.75, -0.5), dtype, what=f"bias {bias_kind}")


# float32 C with whole 12 x 32 tiles (updated in place by the micro-kernel, without its tile buffer, for
# alpha 1, beta 0 or 1 and a float32 unit-stride bias) next to partial ones (through the tile buffer),
# one and several K blocks; the other alpha, beta and bias kinds take the tile buffer everywhere.
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (1.0, 1.0), (0.5, 1.0), (1.0, -2.0)])
@pytest.mark.parametrize("bias_kind", [None, "float32", "strided"])
@pytest.mark.parametrize("shape", [(25, 100, 70), (24, 2 * KC + 5, 64)], ids=shape_id)
def test_gemm_whole_tiles_in_place(shape, bias_kind, alpha, beta, gen):
    M, K, N = shape
    a = make2d(M, K, "contig", torch.float32, gen)
    b = make2d(K, N, "t", torch.float32, gen)
    bias = {None: None, "float32": torch.randn(N, generator=gen),
            "strided": torch.randn(2 * N, generator=gen)[::2]}[bias_kind]
    base = randn((M, N + 5), torch.float32, gen)
    c0 = base[:, 2:N + 2]
    c = base.clone()[:, 2:N + 2]  # rows further apart than they are long
    _C.gemm(a, b, c, bias, None, alpha, beta, 2)
    assert_close(c, ref_gemm(a, b, c0, bias, alpha, beta), torch.float32,
                 what=f"alpha={alpha} beta={beta} bias {bias_kind}")


@pytest.mark.parametrize("in_dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("shape", [(7, 33, 19), (21, 1000, 45), (1, 1, 1)], ids=shape_id)
def test_gemm_float32_c_with_low_precision_inputs(shape, in_dtype, gen):
    """Low-precision inputs, float32 c: products are exact in float32, so float32 accuracy holds
    and no workspace is needed at any K."""
    M, K, N = shape
    a = make2d(M, K, "t", in_dtype, gen)
    b = make2d(K, N, "contig", in_dtype, gen)
    bias = torch.randn(N, generator=gen)
    c0 = torch.randn(M, N, generator=gen)
    c = c0.clone()
    _C.gemm(a, b, c, bias, None, 1.25, 0.5, 1)
    assert_close(c, ref_gemm(a, b, c0, bias, 1.25, 0.5), torch.float32, what="float32 c")


@pytest.mark.parametrize("c_dtype", LOW_PRECISION, ids=dtype_id)
def test_gemm_workspace_requirement(c_dtype, gen):
    M, N = 5, 6
    for K in (KC, KC + 1):  # the boundary: K == GEMM_KC is one block and needs no workspace
        a = randn((M, K), c_dtype, gen)
        b = randn((K, N), c_dtype, gen)
        c = torch.zeros(M, N, dtype=c_dtype)
        if K == KC:
            _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
            assert_close(c, ref_gemm(a, b, None, None, 1.0, 0.0), c_dtype)
            continue
        with pytest.raises(ValueError) as ei:
            _C.gemm(a, b, c, None, None, 1.0, 0.0, 1)
        names_arg(ei, "ws")
        assert torch.equal(c, torch.zeros_like(c)), "a rejected call wrote c"
        for bad_ws in (torch.empty(M * N - 1), torch.empty(M * N, dtype=c_dtype),
                       torch.empty(2 * M * N)[::2], torch.empty(M, N)):
            with pytest.raises(ValueError) as ei:
                _C.gemm(a, b, c, None, bad_ws, 1.0, 0.0, 1)
            names_arg(ei, "ws")
        ws = torch.full((M * N + 7,), NAN)  # bigger than needed is fine
        _C.gemm(a, b, c, None, ws, 1.0, 0.0, 1)
        ref = ref_gemm(a, b, None, None, 1.0, 0.0)
        assert_close(c, ref, c_dtype)
        assert_rounded_once(c, ref, c_dtype)
    # An empty c needs no workspace whatever K is.
    a = randn((0, 1000), c_dtype, gen)
    _C.gemm(a, randn((1000, N), c_dtype, gen), torch.empty(0, N, dtype=c_dtype), None, None, 1.0, 0.0, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["contig", "t", "offset"])
@pytest.mark.parametrize("trans", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(7, 33, 19), (1, 1, 5), (12, 1000, 35), (0, 5, 3), (4, 0, 6)],
                         ids=shape_id)
def test_gemm_trans_flags(shape, trans, layout, dtype, gen):
    """The optional 9th argument: bit 0 reads a as a.T, bit 1 b as b.T (views, no copies)."""
    M, K, N = shape
    a_st = make2d(K, M, layout, dtype, gen) if trans & 1 else make2d(M, K, layout, dtype, gen)
    b_st = make2d(N, K, layout, dtype, gen) if trans & 2 else make2d(K, N, layout, dtype, gen)
    a = a_st.t() if trans & 1 else a_st
    b = b_st.t() if trans & 2 else b_st
    bias = randn((N,), dtype, gen)
    c = empty2d(M, N, "contig", dtype)
    _C.gemm(a_st, b_st, c, bias, ws_for(c, K), 1.0, 0.0, 1, trans)
    ref = ref_gemm(a, b, None, bias, 1.0, 0.0)
    assert_close(c, ref, dtype, what=f"trans={trans}")
    # The same product with the transposes done by torch views gives the same bits.
    c2 = empty2d(M, N, "contig", dtype)
    _C.gemm(a, b, c2, bias, ws_for(c2, K), 1.0, 0.0, 1)
    assert torch.equal(c, c2)


@pytest.mark.parametrize("c_dtype", LOW_PRECISION, ids=dtype_id)
def test_gemm_trans_workspace_requirement(c_dtype, gen):
    """With trans & 1, K is a's dim 0: the workspace rule must follow the transposed shape."""
    M, K, N = 3, KC + 2, 4
    a_st = randn((K, M), c_dtype, gen)
    b = randn((K, N), c_dtype, gen)
    c = torch.zeros(M, N, dtype=c_dtype)
    with pytest.raises(ValueError) as ei:
        _C.gemm(a_st, b, c, None, None, 1.0, 0.0, 1, 1)
    names_arg(ei, "ws")
    _C.gemm(a_st, b, c, None, torch.empty(M * N), 1.0, 0.0, 1, 1)
    assert_rounded_once(c, ref_gemm(a_st.t(), b, None, None, 1.0, 0.0), c_dtype)
    # K small, M large: no workspace even though a's dim 1 is > GEMM_KC.
    a_st = randn((5, KC + 2), c_dtype, gen)
    c = torch.zeros(KC + 2, N, dtype=c_dtype)
    _C.gemm(a_st, randn((5, N), c_dtype, gen), c, None, None, 1.0, 0.0, 1, 1)


# (M, K, N, B's layout) big enough to run on several threads (M*N*K >= 1e6): several column blocks; fewer
# column blocks than threads (the A slivers are shared out); several K blocks; N a few blocks wide; then
# several row blocks (M > 4032) and K blocks at once with B's rows contiguous (the packed path), where
# the team meets at its own barrier between blocks (3 and 4 threads on fewer cores make some wait asleep).
THREAD_SHAPES = [(300, 500, 200, "t"), (2000, 100, 20, "t"), (150, 1000, 700, "t"), (4100, 600, 40, "contig"),
                 (8070, 37, 65, "contig"), (4033, 1100, 33, "contig")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=shape_id)
def test_gemm_thread_count_does_not_change_bits(shape, dtype, gen):
    M, K, N, b_layout = shape
    a = make2d(M, K, "contig", dtype, gen)
    b = make2d(K, N, b_layout, dtype, gen)
    bias = randn((N,), dtype, gen)
    outs = []
    for nthreads in (1, 2, 3, 4, 0):
        c = torch.full((M, N), NAN, dtype=dtype)
        _C.gemm(a, b, c, bias, ws_for(c, K), 1.0, 0.0, nthreads)
        outs.append(c)
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "results depend on the thread count"
    assert_close(outs[0], ref_gemm(a, b, None, bias, 1.0, 0.0), dtype, torch_out=a @ b + bias)


# A given transposed (a row-major A^T: dZ^T in the head's dW, a rank-r product's transpose in LoRA) with
# few rows, float32, alpha 1, no bias: read in place by broadcast, no packing. (M, K, N) across its tile
# edges (12 rows, 32 columns, 16-column halves), one and several K blocks of 128, M up to its limit.
TN_SHAPES = [(1, 64, 1), (11, 127, 17), (12, 129, 32), (13, 200, 33), (100, 1000, 31), (256, 300, 100),
             (64, 64, 770), (257, 100, 40)]


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("shape", TN_SHAPES, ids=shape_id)
def test_gemm_transposed_a_few_rows(shape, beta, gen):
    M, K, N = shape
    a = make2d(M, K, "t", torch.float32, gen)
    b = make2d(K, N, "contig", torch.float32, gen)
    base = randn((M, N + 3), torch.float32, gen)
    c0 = base[:, 1:N + 1]  # rows further apart than they are long
    outs = []
    for nthreads in (1, 2, 3):
        c = (base.clone() if beta else torch.full_like(base, NAN))[:, 1:N + 1]
        _C.gemm(a, b, c, None, None, 1.0, beta, nthreads)
        assert c.stride() == (N + 3, 1)
        outs.append(c)
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "results depend on the thread count"
    assert_close(outs[0], ref_gemm(a, b, c0, None, 1.0, beta), torch.float32, torch_out=a @ b + beta * c0,
                 what=f"transposed A {shape} beta={beta}")


# A against M^T (B given transposed: a classifier's Z = X W^T) with many rows of A and 32 to 512 columns:
# M^T packed once into 32-column slivers, A's rows read in place by broadcast, a last sliver of at most
# 12 columns as dot products. (M, K, N) across those edges: N a multiple of 32, a tail of 4 and 12
# (dot products) and 13 (a masked tile), a last block of fewer than 12 rows, and the row thresholds
# (1024 rows for N <= 128, 96 beyond).
NTR_SHAPES = [(1024, 16, 32), (1031, 17, 100), (1025, 384, 44), (1030, 65, 45), (97, 100, 129),
              (130, 33, 512), (100, 70, 300)]


@pytest.mark.parametrize("alpha,beta,with_bias", [(1.0, 0.0, True), (0.5, 1.0, False), (-2.0, 1.0, True)])
@pytest.mark.parametrize("shape", NTR_SHAPES, ids=shape_id)
def test_gemm_many_rows_against_transposed_b(shape, alpha, beta, with_bias, gen):
    M, K, N = shape
    a = make2d(M, K, "contig", torch.float32, gen)
    b = make2d(K, N, "t", torch.float32, gen)
    bias = randn((N,), torch.float32, gen) if with_bias else None
    base = randn((M, N + 3), torch.float32, gen)
    c0 = base[:, 1:N + 1]
    outs = []
    for nthreads in (1, 2, 3):
        c = (base.clone() if beta else torch.full_like(base, NAN))[:, 1:N + 1]
        _C.gemm(a, b, c, bias, None, alpha, beta, nthreads)
        outs.append(c)
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "results depend on the thread count"
    torch_out = alpha * (a @ b) + beta * c0 + (0 if bias is None else bias)
    assert_close(outs[0], ref_gemm(a, b, c0, bias, alpha, beta), torch.float32, torch_out=torch_out,
                 what=f"A M^T {shape} alpha={alpha} beta={beta}")


# Transposed operands on the packed path (a transposed A of more than 256 rows: dW = dZ^T X for a large
# C; a transposed B of more than 512 columns: Z = X W^T for a large C): A^T's rows are packed as runs
# along k, B's columns through 16 x 16 register transposes. Edges: K not a multiple of 16 and beyond one
# K block, last slivers of 32, 18, 5 and 4 columns, a last sliver of A of fewer than 12 rows, and
# views whose rows are further apart than they are long.
PACKED_T_SHAPES = [(300, 37, 530), (259, 529, 544), (70, 16, 517), (301, 600, 613)]


@pytest.mark.parametrize("la,lb", [("t", "contig"), ("contig", "t"), ("t", "t"), ("tstride", "tstride")])
@pytest.mark.parametrize("shape", PACKED_T_SHAPES, ids=shape_id)
def test_gemm_packed_transposed_operands(shape, la, lb, gen):
    M, K, N = shape
    a = make2d(M, K, la, torch.float32, gen)
    b = make2d(K, N, lb, torch.float32, gen)
    outs = []
    for nthreads in (1, 2, 3):
        c = torch.full((M, N), NAN)
        _C.gemm(a, b, c, None, None, 1.0, 0.0, nthreads)
        outs.append(c)
    for o in outs[1:]:
        assert torch.equal(o, outs[0]), "results depend on the thread count"
    assert_close(outs[0], ref_gemm(a, b, None, None, 1.0, 0.0), torch.float32, torch_out=a @ b,
                 what=f"packed transposed {shape} {la}/{lb}")


def test_gemm_large_all_blocks(gen):
    """One big product spanning several M, N and K cache blocks, on the default thread count."""
    M, K, N = 1000, 1000, 400
    a = make2d(M, K, "t", torch.float32, gen)
    b = make2d(K, N, "contig", torch.float32, gen)
    c = torch.full((M, N), NAN)
    _C.gemm(a, b, c, None, None, 1.0, 0.0, 0)
    assert_close(c, ref_gemm(a, b, None, None, 1.0, 0.0), torch.float32, torch_out=a @ b)


# ---- every SIMD path ---------------------------------------------------------------------------------

# Runs in a subprocess with TLTORCH_CPU_ISA set; prints a JSON report. Sizes straddle the tile sizes
# of every path (MR = 4/6/12, NR = 16/32) and the cache blocks.
ISA_SCRIPT = r"""
import json, sys, torch
from tltorch import _C
KC = _C.GEMM_KC
g = torch.Generator().manual_seed(int(sys.argv[1]))
def mk(r, c, dt, t):
    x = torch.randn(*((c, r) if t else (r, c)), generator=g).to(dt)
    return x.t() if t else x
cases = []
shapes = [(1, 1, 1), (5, 7, 15), (7, 3, 17), (13, 33, 33), (25, 1, 31), (12, 2, 32), (4, 9, 16),
          (6, 5, 48), (9, KC + 3, 40), (970, 50, 330)]
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for (M, K, N) in shapes:
        for ta, tb in ((False, False), (True, True), (False, True)):
            a, b = mk(M, K, dt, ta), mk(K, N, dt, tb)
            bias = torch.randn(N, generator=g).to(dt)
            c0 = torch.randn(M, N, generator=g).to(dt)
            c = c0.clone()
            ws = torch.empty(M * N) if (dt != torch.float32 and K > KC) else None
            _C.gemm(a, b, c, bias, ws, 0.5, 2.0, 1)
            ref = 0.5 * (a.double() @ b.double()) + 2.0 * c0.double() + bias.double()
            err = ((c.double() - ref).abs().max() / ref.abs().max()).item()
            if not torch.isfinite(c).all():
                err = float("inf")
            cases.append([str(dt), [M, K, N], ta, tb, err])
# bitwise independence of the thread count on this path too
a, b = mk(300, 400, torch.float32, False), mk(400, 200, torch.float32, True)
c1, c2 = torch.empty(300, 200), torch.empty(300, 200)
_C.gemm(a, b, c1, None, None, 1.0, 0.0, 1)
_C.gemm(a, b, c2, None, None, 1.0, 0.0, 2)
print(json.dumps({"isa": _C.cpu_isa(), "bf16": _C.bf16_gemm_isa(), "cases": cases,
                  "threads_equal": bool(torch.equal(c1, c2))}))
"""


def _has_avx512_bf16():
    return sys.platform == "linux" and _C.cpu_isa() == "avx512" and "avx512_bf16" in open("/proc/cpuinfo").read()


# "avx512_bf16" / "avx512_widen": the native AVX-512 level with bfloat16 GEMMs forced onto the dot-product
# micro-kernel or widened to float32 (TLTORCH_BF16_DOT; by default a measurement picks one of them)
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512_bf16", "avx512_widen"])
def test_gemm_each_simd_path(isa):
    native = _C.cpu_isa()
    if isa == "avx2" and native == "portable":
        pytest.skip("this CPU has no AVX2/FMA")
    if isa.startswith("avx512") and not _has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    # the rule off: 2 threads even on a busy machine, so that "threads_equal" compares 1 with 2
    env = dict(os.environ, OMP_NUM_THREADS="2", TLTORCH_THREADS_LOAD="off")
    env.pop("TLTORCH_CPU_ISA", None)
    env.pop("TLTORCH_BF16_DOT", None)
    if isa.startswith("avx512"):
        env["TLTORCH_BF16_DOT"] = "1" if isa == "avx512_bf16" else "0"
    else:
        env["TLTORCH_CPU_ISA"] = isa
    seed = {"portable": 11, "avx2": 12, "avx512_bf16": 13, "avx512_widen": 14}[isa]
    proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(seed)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    want = "avx512" if isa.startswith("avx512") else isa
    assert report["isa"] == want, f"{isa}: cpu_isa() reports {report['isa']}"
    assert report["bf16"] == ("avx512_bf16" if isa == "avx512_bf16" else want), report["bf16"]
    tol = {str(d): TOL[d] for d in DTYPES}
    bad = [c for c in report["cases"] if not c[4] <= tol[c[0]]]
    assert not bad, f"{isa}: cases over tolerance: {bad[:5]}"
    assert report["threads_equal"]


def test_cpu_isa_reports_a_known_path():
    assert _C.cpu_isa() in ("avx512", "avx2", "portable")
    assert isinstance(_C.default_threads(), int) and _C.default_threads() >= 1



# ---- the thread count rule (csrc/cpu/common.c) ----------------------------------------------------------

# Runs in a subprocess with TLTORCH_THREADS_LOAD set (it is read once); prints the thread counts the rule
# gives and a digest of the outputs of the GEMM's threaded paths (packed with barriers between blocks,
# the A M^T rows path, the transposed-A broadcast path), the fused head (GEMM-backed and few-class) and a
# LoRA layer, forward and backward, for 1 to 4 threads asked.
RULE_SCRIPT = r"""
import hashlib, json, sys, torch, tltorch
from tltorch import _C
g = torch.Generator().manual_seed(0)
rnd = lambda *s: torch.randn(*s, generator=g)
gemms = [(rnd(300, 500), rnd(500, 700)), (rnd(4033, 1100), rnd(1100, 33)), (rnd(1031, 65), rnd(100, 65).t()),
         (rnd(300, 100).t(), rnd(300, 200))]
heads = [(rnd(512, 96), rnd(300, 96), rnd(300), torch.randint(0, 300, (512,), generator=g)),
         (rnd(700, 64), rnd(5, 64), rnd(5), torch.randint(0, 5, (700,), generator=g))]
torch.manual_seed(0)
lora = tltorch.nn.LoRALinear(torch.nn.Linear(384, 1536), r=8, lora_alpha=16, lora_dropout=0.05)
torch.nn.init.normal_(lora.lora_B)
x, dy = rnd(640, 384), rnd(640, 1536)
default = [_C.default_threads(), _C.threads(0)]  # before set_num_threads changes the default
digests = {}
for nt in (1, 2, 3, 4) if sys.argv[1:] == ["kernels"] else ():
    torch.set_num_threads(nt)
    h = hashlib.sha256()
    for a, b in gemms:
        c = torch.empty(a.shape[0], b.shape[1])
        _C.gemm(a, b, c, None, None, 1.0, 0.0, nt)
        h.update(c.numpy().tobytes())
    for xh, w, bias, t in heads:
        w, bias = w.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = tltorch.functional.linear_cross_entropy(xh, w, t, bias)
        loss.backward()
        for o in (loss, w.grad, bias.grad):
            h.update(o.detach().numpy().tobytes())
    xl = x.clone().requires_grad_()
    lora.zero_grad()
    torch.manual_seed(1)  # the same dropout mask each time
    y = lora(xl)
    y.backward(dy)
    for o in (y, xl.grad, lora.lora_A.grad, lora.lora_B.grad):
        h.update(o.detach().numpy().tobytes())
    digests[nt] = h.hexdigest()
print(json.dumps({"threads": [_C.threads(n) for n in range(1, 9)], "default": default,
                  "big": [_C.threads(n, 4e9) for n in range(1, 9)], "small": [_C.threads(n, 3.9e9) for n in range(1, 9)],
                  "digests": digests}))
"""


def run_rule_script(setting, *args):
    env = dict(os.environ, TLTORCH_THREADS_LOAD=setting)
    proc = subprocess.run([sys.executable, "-c", RULE_SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_thread_rule_takes_the_free_cpus_and_keeps_the_bits():
    """TLTORCH_THREADS_LOAD=off: every thread asked for. All CPUs taken by others: one thread for any
    request up to the CPU count, a larger one kept, and every thread for a kernel of 4 GFLOP or more. Part
    of them taken: the rest, rounded. Each way, the kernels' outputs bitwise the same for 1-4 threads."""
    ncpu = len(os.sched_getaffinity(0))
    off, busy = run_rule_script("off", "kernels"), run_rule_script(str(ncpu), "kernels")
    assert off["threads"] == off["big"] == off["small"] == list(range(1, 9))
    assert busy["threads"] == busy["small"] == [1 if n <= ncpu else n for n in range(1, 9)]
    assert busy["big"] == list(range(1, 9))
    n0, taken = busy["default"]
    assert taken == (1 if n0 <= ncpu else n0)
    part = run_rule_script("0.6")["threads"]  # 0.6 of a CPU busy: one fewer
    assert part[:ncpu] == [min(n, max(1, ncpu - 1)) for n in range(1, ncpu + 1)]
    assert run_rule_script("0.4")["threads"][:ncpu] == list(range(1, ncpu + 1))
    assert len(off["digests"]) == 4 and off["digests"] == busy["digests"]
    assert len(set(off["digests"].values())) == 1, \
        "results depend on the thread count or on the rule"


MEASURE_SCRIPT = r"""
import json, subprocess, sys, time
from tltorch import _C
n = int(sys.argv[1])
seen = [_C.threads(n)]
spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n + 1)]
try:
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0 and seen[-1] != 1:
        time.sleep(0.1)
        seen.append(_C.threads(n))
finally:
    for p in spinners:
        p.kill()
        p.wait()
print(json.dumps(seen))
"""


def test_thread_rule_measures_other_processes():
    """With more spinning processes than CPUs, a kernel asked for every CPU takes one thread within a few
    of the rule's 0.2 s measurements."""
    ncpu = len(os.sched_getaffinity(0))
    if not 2 <= ncpu <= 8:
        pytest.skip(f"needs 2-8 CPUs to fill with spinning processes, not {ncpu}")
    env = {k: v for k, v in os.environ.items() if k != "TLTORCH_THREADS_LOAD"}
    proc = subprocess.run([sys.executable, "-c", MEASURE_SCRIPT, str(ncpu)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen[-1] == 1, f"threads asked {ncpu}, taken over time: {seen}"


# ---- colsum -------------------------------------------------------------------------------------------

COLSUM_SHAPES = [(1, 1), (7, 33), (33, 7), (1000, 3), (3, 1000), (70, 257), (0, 5), (5, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", COLSUM_SHAPES, ids=shape_id)
def test_colsum_matches_reference(shape, layout, dtype, gen):
    M, N = shape
    x = make2d(M, N, layout, dtype, gen)
    out = torch.full((N,), NAN, dtype=dtype)
    _C.colsum(x, out, 0.0, 1)
    ref = x.double().sum(0)
    if M == 0:
        assert torch.equal(out, torch.zeros(N, dtype=dtype))
    assert_close(out, ref, dtype, torch_out=x.sum(0), what=f"colsum {shape} {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("out_kind", ["same", "float32", "strided"])
@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5])
def test_colsum_beta_and_out(beta, out_kind, dtype, gen):
    M, N = 45, 300
    x = make2d(M, N, "t", dtype, gen)
    out_dtype = torch.float32 if out_kind == "float32" else dtype
    out0 = randn((N,), out_dtype, gen)
    if out_kind == "strided":
        out = torch.empty(2 * N, dtype=out_dtype)[::2]
    else:
        out = torch.empty(N, dtype=out_dtype)
    out.copy_(out0 if beta != 0 else torch.full_like(out0, NAN))
    _C.colsum(x, out, beta, 1)
    ref = x.double().sum(0) + (beta * out0.double() if beta != 0 else 0)
    assert_close(out, ref, out_dtype, what=f"colsum beta={beta} out {out_kind}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_colsum_thread_count_does_not_change_bits(dtype, gen):
    x = make2d(700, 600, "stride2", dtype, gen)  # M*N >= 65536: runs threaded
    outs = []
    for nthreads in (1, 2, 0):
        out = torch.empty(600, dtype=dtype)
        _C.colsum(x, out, 0.0, nthreads)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert_close(outs[0], x.double().sum(0), dtype)


@pytest.mark.parametrize("shape", [(1, 1), (37, 15), (37, 16), (300, 17), (300, 63), (64, 64), (5, 65),
                                   (300, 100), (129, 130), (2, 1001)], ids=shape_id)
def test_colsum_vector_path_same_bits_as_scalar(shape, gen):
    """Contiguous float32 rows take the vector path (64-column blocks, masked tails); a strided view of
    the same values takes the scalar one. Both add each column's rows in order: the same bits, and the
    same again with two threads (the 300 x 100 and 2 x 1001 cases are too small to thread; 129 x 130 is
    not, nor is the extra tall case)."""
    M, N = shape
    for rows in (M, 700):
        x = randn((rows, N), torch.float32, gen)
        spread = torch.empty(rows, 2 * N)
        spread[:, ::2] = x
        outs = []
        for src, nthreads in ((x, 1), (spread[:, ::2], 1), (x, 2)):
            out = torch.full((N,), NAN)
            _C.colsum(src, out, 0.0, nthreads)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), f"{rows} x {N}: vector and scalar column sums differ"
        assert torch.equal(outs[0], outs[2]), f"{rows} x {N}: thread count changed the bits"
        assert_close(outs[0], x.double().sum(0), torch.float32, what=f"colsum {rows} x {N}")


def test_colsum_float32_out_of_low_precision_inputs(gen):
    """bfloat16 x into a float32 out: float32 accumulation and no rounding through bfloat16."""
    x = randn((513, 40), torch.bfloat16, gen)
    out = torch.full((40,), NAN)
    _C.colsum(x, out, 0.0, 1)
    assert_close(out, x.double().sum(0), torch.float32)
