"""The LoRA kernels on CUDA (tltorch._cuda.dropout, lora_forward, lora_backward) against float64 references
and their CPU twins (tltorch._C, the same inputs in the same layouts).

dropout: the mask is tl.h's hash of (seed, i*D + k), element for element: checked against a rewrite of the
hash (conftest.dropout_keep_mask) and against the CPU kernel, bit for bit; a kept element is
x * (float)(1 / (1 - p)), rounded once.
LoRA: y, su and dx, da, db against float64 autograd of
    y = x W^T + bias + scale * (x * mask / (1 - p)) A^T B^T
with the kernel's own mask (so dx carries the mask on its low-rank term), the dropped x, su and sv held in
x's dtype as tl.h specifies, for float32, bfloat16 and float16 (conftest.TOL by x's dtype: da and db are
float32 but come from 16-bit products), and within conftest.TWIN of the CPU twin.

Tests marked `cuda` need a GPU and skip otherwise; the argument checks at the end need only the built
extension. Kernels are reached through kernels() and inputs moved with on_device(), nothing else, so that
the same tests can drive any build of the module."""
import math

import numpy as np
import pytest
import torch

from conftest import (DTYPES, HAVE_GPU, INFO, TOL, TWIN, dropout_keep_mask, dtype_id, empty2d, gpu_marks, host, make2d,
                      names_arg, randn, rel_err, to_cuda as on_device)
from tltorch import _C, ops

NAN = float("nan")
DEVICE = "cuda"
gpu_test = gpu_marks(HAVE_GPU, "no_tf32")  # full float32 products (no TF32)


def kernels():
    return ops.cuda_module()


def keep_scale(p):
    """The kernels' 1.0f / (1.0f - p), in float32."""
    one = np.float32(1.0)
    return float(one / (one - np.float32(p)))


def nonzero_randn(shape, dtype, gen):
    """Values of magnitude in [0.5, 1.5) and random sign: a zero in the output means dropped."""
    mag = torch.rand(*shape, generator=gen) + 0.5
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (mag * sign).to(dtype)


# ---- dropout ------------------------------------------------------------------------------------------

@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("out_f32", [False, True], ids=["out_x", "out_f32"])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("xl,ol", [("contig", "contig"), ("t", "t"), ("offset", "contig"), ("tstride", "offset")])
def test_cuda_dropout_mask_and_values(xl, ol, p, out_f32, dtype, gen):
    N, D = 37, 65
    seed = int(torch.randint(0, 2 ** 62, (), generator=gen)) * 4 + 3  # some above 2**63
    x = nonzero_randn((N, D), dtype, gen)
    if xl != "contig":
        buf = make2d(N, D, xl, dtype, gen)
        buf.copy_(x)
        x = buf
    odt = torch.float32 if out_f32 else dtype
    out = on_device(empty2d(N, D, ol, odt))
    kernels().dropout(on_device(x), out, p, seed)
    keep = dropout_keep_mask(seed, N, D, p)
    expect = torch.where(keep, (x.float() * keep_scale(p)).to(odt), torch.zeros((), dtype=odt))
    assert torch.equal(host(out) != 0, keep), "the mask is not tl.h's hash of (seed, i*D + k)"
    assert torch.equal(host(out), expect), "kept elements are not x * (float)(1/(1-p)) rounded once"
    # the CPU kernel drops the same elements and gives the same values
    out_cpu = empty2d(N, D, ol, odt)
    _C.dropout(x, out_cpu, p, seed, 0)
    assert torch.equal(host(out), out_cpu)


@gpu_test
@pytest.mark.parametrize("shape", [(1, 1), (0, 5), (5, 0), (1, 300), (300, 1), (64, 2048)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_dropout_shapes(shape, gen):
    N, D = shape
    p, seed = 0.5, (1 << 64) - 1
    x = nonzero_randn((N, D), torch.float32, gen)
    out = on_device(empty2d(N, D, "contig", torch.float32))
    kernels().dropout(on_device(x), out, p, seed)
    assert torch.equal(host(out) != 0, dropout_keep_mask(seed, N, D, p))
    if N * D >= 10000:  # no structure: about half kept, in every half of the matrix
        kept = (host(out) != 0).double()
        assert abs(kept.mean().item() - 0.5) < 0.01
        assert abs(kept[:, : D // 2].mean().item() - kept[:, D // 2:].mean().item()) < 0.02


# ---- LoRA forward and backward --------------------------------------------------------------------------

def fwd_ws(N, IN, p):
    """The workspace lora.cu uses in forward: the dropped x (float32 room for N x in), when p > 0."""
    return N * IN if p > 0 and N * IN > 0 else 0


def bwd_ws(N, IN, R, p, want_dx, want_da):
    """The workspace lora.cu uses in backward: sv (N x r) when dx or da is wanted, and the dropped x for da."""
    return (N * R if want_dx or want_da else 0) + (N * IN if want_da and p > 0 and N * IN > 0 else 0)


def dev_ws(numel):
    return None if numel == 0 else torch.full((numel,), NAN, device=DEVICE)


def make_layer(N, IN, OUT, R, layouts, dtype, gen, bias=True):
    """x, w, bias, a, b (scaled like nn.Linear's, b by 1/sqrt(r), so that the base and the low-rank term
    are of one size) and dy, in the given layouts."""
    xl, wl, al, bl = layouts
    x = make2d(N, IN, xl, dtype, gen)
    w = make2d(OUT, IN, wl, dtype, gen, scale=1.0 / math.sqrt(max(IN, 1)))
    a = make2d(R, IN, al, dtype, gen, scale=1.0 / math.sqrt(max(IN, 1)))
    b = make2d(OUT, R, bl, dtype, gen, scale=1.0 / math.sqrt(max(R, 1)))
    bias = randn((OUT,), dtype, gen) if bias else None
    dy = make2d(N, OUT, "contig" if xl == "contig" else "t", dtype, gen)
    return x, w, bias, a, b, dy


def _round(t, dtype):
    """t rounded to dtype in the forward pass; the gradient passes unchanged."""
    return t + (t.to(dtype).double() - t).detach()


class _RoundGrad(torch.autograd.Function):
    """The identity in the forward pass; the gradient is rounded to dtype on its way back."""

    @staticmethod
    def forward(ctx, t, dtype):
        ctx.dtype = dtype
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).double(), None


def reference(x, w, bias, a, b, scale, p, keep, dy):
    """float64 autograd of the layer with mask `keep`: (y, su, dx, da, db). Like both kernels, it holds the
    dropped x, su = scale * dropout(x) A^T and sv = scale * dy B in x's dtype (tl.h), so that a test
    measures the kernels' accumulation and final rounding, not those documented roundings (which, in a
    row or a rank-r product that cancels, can exceed TOL relative to the result)."""
    dt = x.dtype
    xd, wd, ad, bd = (t.detach().double().requires_grad_() for t in (x, w, a, b))
    dropped = _round(xd * keep.double() * keep_scale(p), dt) if p > 0 else xd
    su = _round(scale * _RoundGrad.apply(dropped @ ad.t(), dt), dt)  # its gradient there is sv
    y = xd @ wd.t() + su @ bd.t()
    if bias is not None:
        y = y + bias.double()
    y.backward(dy.double())
    return y.detach(), su.detach(), xd.grad, ad.grad, bd.grad


def run_cuda(x, w, bias, a, b, dy, scale, p, seed, out_layout, want=("dx", "da", "db"), ws_extra=0,
             cublas_ws=None):
    """forward then backward through kernels(): (y, su, dx, da, db) on the host (None: not wanted)."""
    N, IN, OUT, R = x.shape[0], x.shape[1], w.shape[0], a.shape[0]
    dt = x.dtype
    xd, wd, ad, bd, dyd = (on_device(t) for t in (x, w, a, b, dy))
    y = on_device(empty2d(N, OUT, out_layout, dt))
    su = on_device(empty2d(N, R, out_layout, dt))
    K = kernels()
    n = fwd_ws(N, IN, p)
    K.lora_forward(xd, wd, on_device(bias), ad, bd, scale, p, seed, y, su, dev_ws(n + ws_extra if n else 0),
                   cublas_ws, False)
    dx = on_device(empty2d(N, IN, out_layout, dt)) if "dx" in want else None
    da = torch.full((R, IN), NAN, device=DEVICE) if "da" in want else None
    db = torch.full((OUT, R), NAN, device=DEVICE) if "db" in want else None
    n = bwd_ws(N, IN, R, p, dx is not None, da is not None)
    K.lora_backward(dyd, xd, wd, ad, bd, su, scale, p, seed, dx, da, db, dev_ws(n + ws_extra if n else 0),
                    cublas_ws, False)
    return tuple(host(t) for t in (y, su, dx, da, db))


def run_cpu(x, w, bias, a, b, dy, scale, p, seed):
    """The CPU twin (tltorch._C) on the same inputs: (y, su, dx, da, db)."""
    N, IN, OUT, R = x.shape[0], x.shape[1], w.shape[0], a.shape[0]
    f32 = x.dtype is torch.float32

    def ws(kind):
        n = _C.lora_workspace(kind, N, IN, OUT, R, p, f32, True, True)
        return torch.empty(n) if n else None

    y, su = torch.empty(N, OUT, dtype=x.dtype), torch.empty(N, R, dtype=x.dtype)
    _C.lora_forward(x, w, bias, a, b, scale, p, seed, y, su, ws(0), 0)
    dx, da, db = torch.empty(N, IN, dtype=x.dtype), torch.empty(R, IN), torch.empty(OUT, R)
    _C.lora_backward(dy, x, w, a, b, su, scale, p, seed, dx, da, db, ws(1), 0)
    return y, su, dx, da, db


NAMES = ("y", "su", "dx", "da", "db")


def check(got, ref, dtype, what, cpu=None):
    """Each result within TOL[dtype] of float64 and, when `cpu` is given, within TWIN[dtype] of the twin."""
    for name, g, r, c in zip(NAMES, got, ref, cpu or (None,) * 5):
        if g is None:
            continue
        assert g.shape == r.shape, f"{what} {name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}"
        err = rel_err(g, r)
        assert err <= TOL[dtype], f"{what} {name}: relative error {err:.3g} > {TOL[dtype]:.3g} ({dtype_id(dtype)})"
        if c is not None and r.numel():
            d = (g.double() - c.double()).abs().max().item() / (r.abs().max().item() or 1.0)
            assert d <= TWIN[dtype], f"{what} {name}: cuda and cpu differ by {d:.3g} > {TWIN[dtype]:.3g}"


# (N, in, out, r, (x, w, a, b layouts), output layout, bias, scale)
CASES = [
    (1, 5, 3, 1, ("contig", "contig", "contig", "contig"), "contig", True, 1.0),
    (37, 65, 40, 8, ("contig", "contig", "contig", "contig"), "contig", True, 2.0),
    (33, 40, 17, 3, ("t", "t", "t", "t"), "offset", False, -1.5),
    (20, 33, 65, 4, ("offset", "offset", "tstride", "t"), "contig", True, 0.5),
    (9, 400, 390, 3, ("tstride", "contig", "t", "contig"), "offset", True, 1.0),  # in, out > GEMM_KC
    (0, 7, 5, 2, ("contig", "t", "contig", "contig"), "contig", True, 1.0),  # empty batch
    (6, 0, 5, 2, ("contig", "contig", "contig", "contig"), "contig", True, 1.0),  # no features
    (6, 7, 5, 0, ("t", "contig", "contig", "contig"), "contig", True, 1.0),  # rank 0
]


def case_id(c):
    N, i, o, r, lay, ol, bias, s = c
    return f"{N}-{i}-{o}-r{r}-{'/'.join(lay)}-{ol}{'' if bias else '-nobias'}"


@gpu_test
@pytest.mark.parametrize("p", [0.0, 0.3], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_lora_forward_backward(case, dtype, p, gen):
    N, IN, OUT, R, layouts, ol, with_bias, scale = case
    x, w, bias, a, b, dy = make_layer(N, IN, OUT, R, layouts, dtype, gen, with_bias)
    seed = int(torch.randint(0, 2 ** 62, (), generator=gen))
    got = run_cuda(x, w, bias, a, b, dy, scale, p, seed, ol)
    ref = reference(x, w, bias, a, b, scale, p, dropout_keep_mask(seed, N, IN, p), dy)
    check(got, ref, dtype, case_id(case), cpu=run_cpu(x, w, bias, a, b, dy, scale, p, seed))


@gpu_test
@pytest.mark.parametrize("want", [("dx",), ("da",), ("db",), ("dx", "db"), ("da", "db"), ("dx", "da"), ()],
                         ids=lambda w: "+".join(w) or "none")
def test_cuda_lora_grads_only_when_wanted(want, gen):
    """Each of dx, da, db may be None: the others are still right, with the smallest workspace (None when
    only db is wanted)."""
    dtype, p, N, IN, OUT, R = torch.bfloat16, 0.25, 23, 45, 31, 5
    x, w, bias, a, b, dy = make_layer(N, IN, OUT, R, ("t", "contig", "t", "contig"), dtype, gen)
    got = run_cuda(x, w, bias, a, b, dy, 1.5, p, 77, "contig", want)
    ref = reference(x, w, bias, a, b, 1.5, p, dropout_keep_mask(77, N, IN, p), dy)
    for name, g in zip(NAMES[2:], got[2:]):
        assert (g is None) == (name not in want), name
    check(got, ref, dtype, "+".join(want))


@gpu_test
def test_cuda_lora_workspaces_and_determinism(gen):
    """A larger workspace (the CPU's size, or more) and cuBLAS's own workspace change nothing, bit for bit;
    the same seed gives the same bits again, another seed another mask."""
    dtype, p, N, IN, OUT, R = torch.float16, 0.4, 17, 70, 24, 6
    x, w, bias, a, b, dy = make_layer(N, IN, OUT, R, ("contig", "t", "contig", "t"), dtype, gen)
    base = run_cuda(x, w, bias, a, b, dy, 2.0, p, 5, "contig")
    buf = torch.empty((4 << 20) + 256, dtype=torch.uint8, device=DEVICE)
    off = (-buf.data_ptr()) % 256
    for kw in (dict(ws_extra=1000), dict(cublas_ws=buf[off:off + (4 << 20)]), {}):
        again = run_cuda(x, w, bias, a, b, dy, 2.0, p, 5, "contig", **kw)
        for name, g, h in zip(NAMES, base, again):
            assert torch.equal(g, h), f"{name} changed with {list(kw) or 'a second call'}"
    other = run_cuda(x, w, bias, a, b, dy, 2.0, p, 6, "contig")
    assert not torch.equal(base[1], other[1]), "seeds 5 and 6 gave the same su"


@gpu_test
def test_cuda_lora_refuses_before_writing(gen):
    """A workspace too small or missing, and an x cuBLAS cannot read (no unit stride), raise ValueError
    naming the problem; the outputs are left untouched."""
    dtype, p, N, IN, OUT, R = torch.float32, 0.2, 8, 12, 10, 3
    x, w, bias, a, b, dy = make_layer(N, IN, OUT, R, ("contig",) * 4, dtype, gen)
    K = kernels()
    xd, wd, bd_, ad, bd = (on_device(t) for t in (x, w, bias, a, b))
    y, su = torch.full((N, OUT), NAN, device=DEVICE), torch.full((N, R), NAN, device=DEVICE)
    for ws in (None, dev_ws(N * IN - 1)):
        with pytest.raises(ValueError) as ei:
            K.lora_forward(xd, wd, bd_, ad, bd, 1.0, p, 1, y, su, ws, None, False)
        names_arg(ei, "ws")
    with pytest.raises(ValueError, match="layout"):
        K.lora_forward(on_device(make2d(N, IN, "stride2", dtype, gen)), wd, bd_, ad, bd, 1.0, p, 1, y, su,
                       dev_ws(N * IN), None, False)
    dx, da = torch.full((N, IN), NAN, device=DEVICE), torch.full((R, IN), NAN, device=DEVICE)
    with pytest.raises(ValueError) as ei:
        K.lora_backward(on_device(dy), xd, wd, ad, bd, su, 1.0, p, 1, dx, da, None, dev_ws(N * R), None, False)
    names_arg(ei, "ws")
    for t in (y, su, dx, da):
        assert torch.isnan(host(t)).all()



# ---- the binding's argument checks (the built extension, with or without a GPU) -------------------------

@pytest.mark.skipif(not INFO["cuda_built"], reason="tltorch._cuda is not built")
def test_cuda_lora_arguments_checked_without_a_gpu():
    """Scalars are checked first (no GPU needed to see it), then CPU tensors are refused by name."""
    K = ops.cuda_module()
    x, out = torch.randn(4, 3), torch.zeros(4, 3)
    w, a, b = torch.randn(5, 3), torch.randn(2, 3), torch.randn(5, 2)
    y, su = torch.zeros(4, 5), torch.zeros(4, 2)
    for p in (1.0, -0.1, NAN):
        with pytest.raises(ValueError) as ei:
            K.dropout(x, out, p, 0)
        names_arg(ei, "p")
    for seed in (-1, 2 ** 64):
        with pytest.raises(ValueError) as ei:
            K.dropout(x, out, 0.1, seed)
        names_arg(ei, "seed")
    with pytest.raises(TypeError) as ei:
        K.dropout(x, out, 0.1, 1.5)
    names_arg(ei, "seed")
    with pytest.raises(ValueError) as ei:
        K.dropout(x, out, 0.1, 2 ** 64 - 1)
    names_arg(ei, "x")
    with pytest.raises(TypeError, match="positional arguments"):
        K.lora_forward(x, w, None, a, b, 1.0, 0.0, 0, y, su, None, None)
    with pytest.raises(TypeError) as ei:
        K.lora_forward(x, w, None, a, b, "2", 0.0, 0, y, su, None, None, False)
    names_arg(ei, "scale")
    with pytest.raises(ValueError) as ei:
        K.lora_forward(x, w, None, a, b, 1.0, 0.0, 0, y, su, None, None, False)
    names_arg(ei, "x")
    with pytest.raises(ValueError) as ei:
        K.lora_backward(y, x, w, a, b, su, 1.0, 1.0, 0, None, None, None, None, None, False)
    names_arg(ei, "p")
    with pytest.raises(ValueError) as ei:
        K.lora_backward(y, x, w, a, b, su, 1.0, 0.5, 0, None, None, None, None, None, False)
    names_arg(ei, "x")
    assert torch.equal(out, torch.zeros(4, 3)) and torch.equal(y, torch.zeros(4, 5))
