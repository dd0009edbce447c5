"""tltorch.functional.lora_linear (csrc/cpu/lora.c): y = x W^T + b + s * dropout(x) A^T B^T and its
gradients against float64 autograd on the same (rounded) inputs, the dropout mask recovered through
tltorch.functional.lora_dropout; the torch.library ops under opcheck and torch.compile; argument errors.

Tolerances: conftest.TOL, max|out - ref| / max|ref| <= 1e-5 (float32), 2e-2 (bfloat16), 2e-3 (float16).
In bfloat16/float16 the kernel rounds the rank-r products su = s * dropout(x) A^T and sv = s * dy B to x's
dtype before the second GEMM: one more rounding on the low-rank term, about one unit roundoff of it,
well inside TOL. The weights are scaled like nn.Linear's (and B by 1/sqrt(r)) so that the base and the
low-rank term are of the same size and an error in either shows.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DTYPES, UNIT, assert_close, dropout_keep_mask, dtype_id, make2d, make_x, randn
from tltorch import ops
from tltorch.functional import lora_dropout, lora_linear


# ---- inputs and references ----------------------------------------------------------------------------

# weight layouts: "conv1d" is transformers' Conv1D, an (in, out) parameter passed as weight.t()
W_LAYOUTS = {"contig": "contig", "conv1d": "t", "strided": "stride2", "offset": "offset"}


def make_params(IN, OUT, R, dtype, gen, wl="contig", al="contig", bl="contig", bias=True):
    w = make2d(OUT, IN, W_LAYOUTS[wl], dtype, gen, scale=1.0 / math.sqrt(max(IN, 1)))
    b = randn((OUT,), dtype, gen) if bias else None
    a = make2d(R, IN, al, dtype, gen, scale=1.0 / math.sqrt(max(IN, 1)))
    bb = make2d(OUT, R, bl, dtype, gen, scale=1.0 / math.sqrt(max(R, 1)))
    return w, b, a, bb


def _leaf64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def reference(x, w, b, a, bb, s, mask=None, p=0.0):
    """The float64 formula with autograd, on fresh leaves that require grad like the inputs; `mask`
    (x's shape, 0/1) is the dropout mask. Returns (y, leaves)."""
    leaves = [_leaf64(t) for t in (x, w, b, a, bb)]
    xd, wd, bd, ad, bbd = leaves
    xdrop = xd if mask is None else xd * mask.double() / (1.0 - p)
    y = F.linear(xd, wd, bd) + s * F.linear(F.linear(xdrop, ad), bbd)
    return y, leaves


def flat_rows(x):
    return math.prod(x.shape[:-1])


def seed_for(s):
    """The dropout seed lora_linear draws right after torch.manual_seed(s) (a 0-d int64 tensor, so that
    torch.compile traces the draw)."""
    torch.manual_seed(s)
    return ops.next_dropout_seed()


def dropout_mask(seed, rows, cols, p):
    """The kernel's keep mask (bool, rows x cols) for `seed`, read off lora_dropout of ones; also checks
    that every kept element is scaled by 1/(1 - p)."""
    out = lora_dropout(torch.ones(rows, cols), p, seed)
    assert out.shape == (rows, cols) and out.dtype == torch.float32
    kept = out != 0
    if kept.any():
        vals = out[kept].double()
        # the kernel takes p as a float: allow for 1 / (1 - (float)p) and a float32 division
        scale, scale32 = 1.0 / (1.0 - p), 1.0 / (1.0 - float(np.float32(p)))
        rtol = 2.5e-7 + abs(scale32 - scale) / scale
        assert torch.allclose(vals, torch.full_like(vals, scale), rtol=rtol, atol=0), \
            f"kept elements are not scaled by 1/(1-p) = {scale}: {vals.unique()[:5]}"
    return kept


def mask_for(x, p, s):
    """The mask lora_linear applies to x when called right after torch.manual_seed(s): the mask of
    x.reshape(-1, in_features), in x's shape."""
    return dropout_mask(seed_for(s), flat_rows(x), x.shape[-1], p).reshape(x.shape)


NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def run_lora(x, w, b, a, bb, s, p, seed):
    torch.manual_seed(seed)
    return lora_linear(x, w, b, a, bb, scaling=s, dropout=p)


def check_lora(x, w, b, a, bb, s=1.0, p=0.0, g=None, seed=1234, what=""):
    """lora_linear forward (+ backward(g), random g by default, when anything requires grad) against
    the float64 formula with the kernel's own dropout mask. Inputs that do not require grad get none.
    Returns (y, mask)."""
    dtype = x.dtype
    mask = mask_for(x, p, seed) if p > 0 else None
    y = run_lora(x, w, b, a, bb, s, p, seed)
    out_f = w.shape[0]
    assert y.shape == (*x.shape[:-1], out_f) and y.dtype == dtype and y.device == x.device, \
        (y.shape, y.dtype)
    ref, leaves = reference(x, w, b, a, bb, s, mask, p)
    assert_close(y, ref, dtype, what=f"{what} y")
    ins = (x, w, b, a, bb)
    if not any(t is not None and t.requires_grad for t in ins):
        assert y.grad_fn is None and not y.requires_grad
        return y, mask
    if g is None:
        g = randn(y.shape, dtype, torch.Generator().manual_seed(seed + 1))
    y.backward(g)
    ref.backward(g.double())
    for name, t, td in zip(NAMES, ins, leaves):
        if t is None:
            continue
        if t.requires_grad:
            assert t.grad is not None, f"{what}: {name}.grad is None"
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, (name, t.grad.dtype, t.grad.shape)
            assert_close(t.grad, td.grad, dtype, what=f"{what} d{name}")
        else:
            assert t.grad is None, f"{what}: {name} does not require grad but got one"
    return y, mask


# ---- forward and gradients over shapes, layouts and dtypes ---------------------------------------------

# (lead dims of x, in, out, r, x layout, weight layout, lora_A layout, lora_B layout, bias, weight grad,
#  scaling)
CASES = [
    ((), 5, 40, 3, "contig", "contig", "contig", "contig", True, False, 2.0),  # 1-D x
    ((1,), 1, 1, 1, "contig", "conv1d", "t", "t", True, True, 0.5),
    ((7,), 40, 5, 8, "transposed", "conv1d", "t", "contig", True, False, 1.0),
    ((33,), 129, 40, 3, "strided", "strided", "stride2", "t", False, True, -1.5),
    ((3, 11), 40, 129, 8, "offset", "contig", "tstride", "stride2", True, False, 2.0),  # 3-D x
    ((3, 5), 5, 1, 1, "transposed", "conv1d", "offset", "t", False, True, 0.25),
    ((7,), 33, 5, 3, "expanded", "offset", "contig", "offset", True, True, 1.0),
    ((5,), 380, 17, 8, "contig", "conv1d", "t", "contig", True, False, 1.0),  # in <= KC < in + r
    ((6,), 17, 380, 8, "strided", "contig", "contig", "t", True, True, 1.0),  # out <= KC < out + r
    ((4,), 400, 390, 3, "transposed", "conv1d", "contig", "t", True, True, 2.0),  # in, out > KC
    ((3,), 800, 1100, 8, "contig", "conv1d", "t", "t", True, True, 1.0),  # > 2 KC
    ((2, 2), 1100, 800, 1, "offset", "strided", "t", "stride2", False, False, 0.5),
]


def _case_id(c):
    lead, i, o, r, xl, wl, al, bl, bias, wg, s = c
    return f"{'x'.join(map(str, lead)) or 'vec'}-{i}-{o}-r{r}-{xl}-{wl}-{al}-{bl}" \
           f"{'' if bias else '-nobias'}{'-wgrad' if wg else ''}"


@pytest.mark.parametrize("p", [0.0, 0.25], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_grads(case, dtype, p, gen):
    lead, IN, OUT, R, xl, wl, al, bl, bias, wgrad, s = case
    x = make_x(lead, IN, xl, dtype, gen).requires_grad_()
    w, b, a, bb = make_params(IN, OUT, R, dtype, gen, wl, al, bl, bias)
    w.requires_grad_(wgrad)
    for t in (b, a, bb):
        if t is not None:
            t.requires_grad_()
    check_lora(x, w, b, a, bb, s, p, what=_case_id(case))


GRAD_FLAGS = [  # x, weight, bias, lora_A, lora_B
    (False, False, False, True, True),  # the usual LoRA fine-tuning: only the adapters train
    (False, False, False, True, False),
    (False, False, False, False, True),
    (True, False, False, False, False),
    (False, True, False, False, False),
    (False, False, True, False, False),
    (True, True, True, False, False),
    (True, False, True, True, False),
    (False, False, False, False, False),
]


@pytest.mark.parametrize("p", [0.0, 0.3], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("flags", GRAD_FLAGS,
                         ids=lambda f: "+".join(n for n, on in zip(NAMES, f) if on) or "none")
def test_grads_each_only_when_required(flags, dtype, p, gen):
    x = make_x((4, 9), 21, "transposed", dtype, gen)
    w, b, a, bb = make_params(21, 13, 4, dtype, gen, "conv1d", "t", "contig")
    for t, on in zip((x, w, b, a, bb), flags):
        t.requires_grad_(on)
    check_lora(x, w, b, a, bb, 1.5, p, what=f"flags={flags}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_no_grad_mode_and_parameters(dtype, gen):
    """Under no_grad no graph is built, and the result is bitwise the one with autograd (same seed);
    nn.Parameters are accepted."""
    x = randn((6, 10), dtype, gen)
    w, b, a, bb = make_params(10, 7, 2, dtype, gen)
    a, bb = torch.nn.Parameter(a), torch.nn.Parameter(bb)
    with torch.no_grad():
        y0 = run_lora(x, w, b, a, bb, 2.0, 0.4, 7)
    assert y0.grad_fn is None and not y0.requires_grad
    y1 = run_lora(x, w, b, a, bb, 2.0, 0.4, 7)
    assert y1.requires_grad
    assert torch.equal(y0, y1.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("p", [0.0, 0.5], ids=lambda p: f"p{p}")
def test_scaling_zero(p, dtype, gen):
    """scaling 0: y is the base layer, and the adapters' gradients are exactly zero."""
    x = randn((5, 3, 12), dtype, gen).requires_grad_()
    w, b, a, bb = make_params(12, 9, 3, dtype, gen)
    a.requires_grad_()
    bb.requires_grad_()
    y, _ = check_lora(x, w, b, a, bb, 0.0, p, what="scaling 0")
    assert_close(y, F.linear(x.double(), w.double(), b.double()), dtype, what="base")
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(bb.grad, torch.zeros_like(bb))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_lora_term_alone(dtype, gen):
    """A zero weight and no bias: y is the low-rank term alone, held to TOL relative to itself."""
    x = make_x((9,), 70, "strided", dtype, gen).requires_grad_()
    _, _, a, bb = make_params(70, 31, 5, dtype, gen, al="t", bl="t")
    w = torch.zeros(31, 70, dtype=dtype)
    a.requires_grad_()
    bb.requires_grad_()
    check_lora(x, w, None, a, bb, 3.0, 0.2, what="lora only")


# ---- upstream gradients, repeated backward ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("p", [0.0, 0.25], ids=lambda p: f"p{p}")
def test_backward_twice_identical(p, dtype, gen):
    """backward(retain_graph=True) then again: bitwise the same gradients (the same dropout mask), so
    .grad is exactly twice the first, which is right."""
    x = randn((3, 7, 19), dtype, gen).requires_grad_()
    w, b, a, bb = make_params(19, 11, 4, dtype, gen, "conv1d")
    for t in (w, b, a, bb):
        t.requires_grad_()
    g = randn((3, 7, 11), dtype, gen)
    mask = mask_for(x, p, 99) if p > 0 else None
    y = run_lora(x, w, b, a, bb, 1.5, p, 99)
    y.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in (x, w, b, a, bb)]
    torch.rand(3)  # the generator moves on; backward must not draw a new mask
    y.backward(g)
    ref, leaves = reference(x, w, b, a, bb, 1.5, mask, p)
    ref.backward(g.double())
    for name, t, g1, td in zip(NAMES, (x, w, b, a, bb), first, leaves):
        assert_close(g1, td.grad, dtype, what=f"first d{name}")
        assert torch.equal(t.grad, 2 * g1), f"d{name}: the second backward differs from the first"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_noncontiguous_and_scaled_upstream(dtype, gen):
    """Upstream gradients from .sum() (expanded, stride 0), from a strided slice of y, and scaled."""
    x = randn((4, 6, 9), dtype, gen).requires_grad_()
    w, b, a, bb = make_params(9, 10, 3, dtype, gen)
    for t in (b, a, bb):
        t.requires_grad_()
    mask = mask_for(x, 0.3, 5)
    posts = (("sum", lambda y: y.sum()), ("slice", lambda y: y[:, ::2, 1::3].sum()),
             ("scaled", lambda y: (y * -3.5).sum()))
    for what, post in posts:
        ins = (x, b, a, bb)
        for t in ins:
            t.grad = None
        post(run_lora(x, w, b, a, bb, 2.0, 0.3, 5)).backward()
        ref, leaves = reference(x, w, b, a, bb, 2.0, mask, 0.3)
        post(ref).backward()
        for name, t, td in zip(("x", "bias", "lora_A", "lora_B"), ins, (leaves[0], *leaves[2:])):
            assert_close(t.grad, td.grad, dtype, what=f"{what}: d{name}")


def test_grad_through_a_trainable_body(gen):
    """x from a trainable layer (a non-leaf): the gradient flows through dx to the body."""
    inp = torch.randn(8, 6, generator=gen)
    body = (torch.randn(12, 6, generator=gen) * 0.4).requires_grad_()
    w, b, a, bb = make_params(12, 5, 2, torch.float32, gen)
    a.requires_grad_()
    x = torch.tanh(inp @ body.T)
    mask = mask_for(x, 0.5, 3)
    run_lora(x, w, b, a, bb, 2.0, 0.5, 3).square().sum().backward()
    bd = body.detach().double().requires_grad_()
    ad = a.detach().double().requires_grad_()
    xd = torch.tanh(inp.double() @ bd.T)
    yd = F.linear(xd, w.double(), b.double()) + 2.0 * F.linear(F.linear(xd * mask / 0.5, ad), bb.double())
    yd.square().sum().backward()
    assert_close(body.grad, bd.grad, torch.float32, what="dbody")
    assert_close(a.grad, ad.grad, torch.float32, what="dlora_A")


# ---- empty batches and rank 0 -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("p", [0.0, 0.5], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
def test_empty_batch(lead, p, dtype, gen):
    IN, OUT, R = 7, 5, 3
    x = randn((*lead, IN), dtype, gen).requires_grad_()
    w, b, a, bb = make_params(IN, OUT, R, dtype, gen)
    for t in (w, b, a, bb):
        t.requires_grad_()
    y = run_lora(x, w, b, a, bb, 2.0, p, 11)
    assert y.shape == (*lead, OUT) and y.dtype == dtype
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape
    for name, t in zip(NAMES[1:], (w, b, a, bb)):
        assert t.grad is not None and t.grad.shape == t.shape, name
        assert torch.equal(t.grad, torch.zeros_like(t)), f"d{name} of an empty batch is not zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("IN", [6, 400])
def test_rank_zero(IN, dtype, gen):
    """r == 0 (an empty adapter) is accepted: y is the base layer, the adapters' gradients are empty."""
    x = randn((4, IN), dtype, gen).requires_grad_()
    w, b, a, bb = make_params(IN, 5, 0, dtype, gen)
    for t in (b, a, bb):
        t.requires_grad_()
    y, _ = check_lora(x, w, b, a, bb, 2.0, 0.1, what="r=0")
    assert a.grad.shape == (0, IN) and bb.grad.shape == (5, 0)


# ---- dropout -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,p", [(0, 0.5), (12345, 0.1), ((1 << 64) - 1, 0.3), (0xDEADBEEF_CAFEF00D, 0.9),
                                    (7, 1e-9), (8, 0.999)])
def test_dropout_mask_is_the_header_hash(seed, p):
    """The CPU and CUDA kernels share the mask through tl_dropout_hash: the CPU one follows it exactly,
    with 64-bit seeds and element indices i * D + k of the (N, D) input."""
    assert torch.equal(dropout_mask(seed, 37, 53, p), dropout_keep_mask(seed, 37, 53, p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_kept_fraction_and_scale(p):
    seed = 0x1234_5678_9ABC
    kept = dropout_mask(seed, 1000, 1000, p)  # also checks the 1/(1-p) scale of every kept element
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 3e-3, f"kept fraction {frac:.4f}, expected {1 - p}"
    # no structure along either dim: every row and column keeps about 1 - p
    sd = math.sqrt(p * (1 - p) / 1000)
    for dim in (0, 1):
        dev = (kept.double().mean(dim) - (1 - p)).abs().max().item()
        assert dev < 6 * sd, f"a {'column' if dim == 0 else 'row'} keeps {dev:.3f} away from 1-p"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_lora_dropout_values(dtype, gen):
    """lora_dropout(x, p, seed): zeros where dropped, x / (1 - p) (one rounding) where kept; the same
    seed gives the same mask, another seed another; p == 0 is x itself."""
    p = 0.3
    x = randn((37, 29), dtype, gen)
    x = x.masked_fill(x == 0, 1.0)
    out = lora_dropout(x, p, 42)
    assert out.shape == x.shape and out.dtype == dtype
    kept = out != 0
    assert torch.equal(kept, dropout_mask(42, 37, 29, p))
    exp = x.double()[kept] / (1 - p)
    got = out.double()[kept]
    # one rounding to dtype, plus float32's in (float)p, 1 - p, 1 / (1 - p) and the product
    tol = UNIT[dtype] + 4 * UNIT[torch.float32]
    assert ((got - exp).abs() <= tol * exp.abs()).all(), "kept elements not x / (1 - p)"
    assert torch.equal(lora_dropout(x, p, 42), out)
    assert not torch.equal(lora_dropout(x, p, 43) != 0, kept), "seeds 42 and 43 give the same mask"
    assert not torch.equal(lora_dropout(x, p, 42 + (1 << 40)) != 0, kept), "the seed's high bits are ignored"
    assert torch.equal(lora_dropout(x, 0.0, 42), x)


def test_lora_dropout_independent_of_strides_and_threads(gen):
    p = 0.4
    x = randn((200, 180), torch.float32, gen)  # 36000 elements: enough for the kernel to use threads
    ref = lora_dropout(x, p, 77)
    views = (x.t().contiguous().t(), torch.empty(200, 360)[:, ::2], torch.empty(203, 185)[3:, 5:],
             torch.empty(181, 400)[1:, ::2].t())
    for v in views:
        v.copy_(x)
        assert torch.equal(lora_dropout(v, p, 77), ref), f"strides {v.stride()} change the mask"
    prev = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            assert torch.equal(lora_dropout(x, p, 77), ref), f"{nt} threads change the mask"
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dropout_reproducible_and_fresh(dtype, gen):
    """torch.manual_seed(s) makes lora_linear reproducible (outputs and gradients); without reseeding
    each call draws a new mask; and the result depends on the seed."""
    x = randn((6, 40), dtype, gen)
    w, b, a, bb = make_params(40, 9, 4, dtype, gen)
    a.requires_grad_()
    out = []
    for _ in range(2):
        a.grad = None
        y = run_lora(x, w, b, a, bb, 2.0, 0.5, 2024)
        y.sum().backward()
        out.append((y.detach(), a.grad.clone()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    torch.manual_seed(2024)
    y1 = lora_linear(x, w, b, a, bb, scaling=2.0, dropout=0.5)
    y2 = lora_linear(x, w, b, a, bb, scaling=2.0, dropout=0.5)
    assert not torch.equal(y1, y2), "two calls in a row used the same mask"
    assert not torch.equal(run_lora(x, w, b, a, bb, 2.0, 0.5, 2025), out[0][0]), \
        "seeds 2024 and 2025 give the same output"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dropout_zero_is_identity(dtype, gen):
    x = randn((3, 4, 33), dtype, gen).requires_grad_()
    w, b, a, bb = make_params(33, 12, 3, dtype, gen)
    a.requires_grad_()
    bb.requires_grad_()
    y, _ = check_lora(x, w, b, a, bb, 1.0, 0.0, what="p=0")  # against the formula without a mask
    assert torch.equal(run_lora(x, w, b, a, bb, 1.0, 0.0, 1).detach(),
                       run_lora(x, w, b, a, bb, 1.0, 0.0, 2).detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_backward_uses_the_forward_mask(dtype, gen):
    """The adapters' and x's gradients, written out with the recovered mask m (keep / (1 - p)):
    dA = s (g B)^T (x m),  dB = s g^T ((x m) A^T),  dx = g W + s ((g B A) m). The generator is moved on
    between forward and backward."""
    p, s = 0.5, 1.75
    x = randn((2, 5, 24), dtype, gen).requires_grad_()
    w, b, a, bb = make_params(24, 16, 6, dtype, gen, "conv1d", "t")
    a.requires_grad_()
    bb.requires_grad_()
    g = randn((2, 5, 16), dtype, gen)
    m = mask_for(x, p, 31).double() / (1 - p)
    y = run_lora(x, w, b, a, bb, s, p, 31)
    torch.manual_seed(0)
    torch.rand(100)
    y.backward(g)
    x2, g2, m2 = x.detach().double().reshape(-1, 24), g.double().reshape(-1, 16), m.reshape(-1, 24)
    ad, bd, wd = a.double(), bb.double(), w.double()
    assert_close(a.grad, s * (g2 @ bd).T @ (x2 * m2), dtype, what="dlora_A")
    assert_close(bb.grad, s * g2.T @ ((x2 * m2) @ ad.T), dtype, what="dlora_B")
    assert_close(x.grad.reshape(-1, 24), g2 @ wd + s * (g2 @ bd @ ad) * m2, dtype, what="dx")


@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
def test_dropout_mask_independent_of_x_strides(layout, gen):
    """The same values of x in another layout: the same mask (so the same output, up to summation order)."""
    x = make_x((12,), 50, layout, torch.float32, gen)
    xc = x.contiguous()
    w, b, a, bb = make_params(50, 8, 3, torch.float32, gen)
    for xx in (x, xc):
        xx.requires_grad_()
        a.grad = None
        a.requires_grad_()
        check_lora(xx, w, b, a, bb, 2.0, 0.5, seed=8, what=f"x {layout} {xx.stride()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_thread_count(dtype, gen):
    """1 and 2 threads: the same mask, right either way, and bitwise the same (the GEMMs sum each
    element in the same order whatever the thread count)."""
    x = randn((128, 300), dtype, gen).requires_grad_()  # enough elements for threaded dropout
    w, b, a, bb = make_params(300, 40, 8, dtype, gen)
    for t in (b, a, bb):
        t.requires_grad_()
    prev = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for t in (x, b, a, bb):
                t.grad = None
            y, _ = check_lora(x, w, b, a, bb, 2.0, 0.3, seed=5, what=f"{nt} threads")
            outs.append([y.detach()] + [t.grad for t in (x, b, a, bb)])
    finally:
        torch.set_num_threads(prev)
    for name, u, v in zip(("y", "dx", "dbias", "dlora_A", "dlora_B"), *outs):
        assert torch.equal(u, v), f"{name} differs between 1 and 2 threads"


# ---- the torch.library ops ----------------------------------------------------------------------------

def test_meta_tensors_use_the_fake_kernel():
    def e(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=True)

    x, w, b, a, bb = e(2, 3, 8), e(5, 8), e(5), e(4, 8), e(5, 4)
    y = lora_linear(x, w.detach(), b, a, bb, scaling=2.0, dropout=0.1)
    assert y.device.type == "meta" and y.shape == (2, 3, 5) and y.dtype == torch.float32
    y.backward(torch.empty_like(y))
    for t in (x, b, a, bb):
        assert t.grad.shape == t.shape and t.grad.device.type == "meta"
    y1 = lora_linear(e(8, dtype=torch.bfloat16), e(5, 8, dtype=torch.bfloat16), None,
                     e(4, 8, dtype=torch.bfloat16), e(5, 4, dtype=torch.bfloat16))
    assert y1.shape == (5,) and y1.dtype == torch.bfloat16


def test_torch_compile_fullgraph(gen):
    """One small compile (aot_eager: dynamo with fullgraph, the fake kernels, AOT autograd's joint
    graph through the backward op): outputs and gradients as eager."""
    import torch._dynamo.testing

    torch._dynamo.reset()

    def f(x, w, b, a, bb):
        return torch.relu(lora_linear(x, w, b, a, bb, scaling=2.0, dropout=0.0)) * 3.0

    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    cf = torch.compile(f, fullgraph=True, backend=backend)
    x = torch.randn(3, 7, 10, generator=gen, requires_grad=True)
    w, b, a, bb = make_params(10, 6, 2, torch.float32, gen, "conv1d")
    for t in (b, a, bb):
        t.requires_grad_()
    g = torch.randn(3, 7, 6, generator=gen)
    y = cf(x, w, b, a, bb)
    y.backward(g)
    grads = [t.grad.clone() for t in (x, b, a, bb)]
    assert backend.frame_count == 1
    targets = {n.target for n in backend.graphs[0].graph.nodes if n.op == "call_function"}
    op = torch.ops.tltorch.lora_linear
    assert op in targets or op.default in targets, targets
    ins = (x, w, b, a, bb)
    ref, leaves = reference(*ins, 2.0)
    (torch.relu(ref) * 3.0).backward(g.double())
    assert_close(y, torch.relu(ref) * 3.0, torch.float32, what="compiled y")
    for name, gr, td in zip(("x", "bias", "lora_A", "lora_B"), grads, (leaves[0], *leaves[2:])):
        assert_close(gr, td.grad, torch.float32, what=f"compiled d{name}")


def test_torch_compile_with_dropout(gen):
    """Under torch.compile with dropout the output and lora_A's gradient match the formula with the
    mask of the seed the compiled call drew."""
    import torch._dynamo.testing

    torch._dynamo.reset()

    def f(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, scaling=1.5, dropout=0.4)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 12, generator=gen)
    w, b, a, bb = make_params(12, 6, 3, torch.float32, gen)
    a.requires_grad_()
    g = torch.randn(5, 6, generator=gen)
    cf(x, w, b, a, bb)  # compile once; the next call is the one checked
    mask = mask_for(x, 0.4, 17)
    torch.manual_seed(17)
    y = cf(x, w, b, a, bb)
    y.backward(g)
    ref, leaves = reference(x, w, b, a, bb, 1.5, mask, 0.4)
    ref.backward(g.double())
    assert_close(y, ref, torch.float32, what="compiled y with dropout")
    assert_close(a.grad, leaves[3].grad, torch.float32, what="compiled dlora_A with dropout")


def _op_sample(lead, IN, OUT, R, dtype, gen, bias=True, rg=True, xl="contig", wl="contig"):
    x = make_x(lead, IN, xl, dtype, gen).requires_grad_(rg)
    w, b, a, bb = make_params(IN, OUT, R, dtype, gen, wl, "t", "contig", bias)
    for t in (b, a, bb):
        if t is not None:
            t.requires_grad_(rg)
    return x, w, b, a, bb


# (lead, in, out, r, dtype, bias, requires grad, x layout, weight layout, scaling, p)
OPCHECK_CASES = [
    ((5,), 4, 3, 2, torch.float32, True, True, "contig", "contig", 2.0, 0.0),
    ((2, 3), 6, 5, 1, torch.float32, False, True, "strided", "conv1d", 0.5, 0.3),
    ((4,), 7, 2, 3, torch.bfloat16, True, False, "transposed", "contig", 1.0, 0.5),
    ((0,), 4, 3, 2, torch.float16, True, True, "contig", "conv1d", 1.0, 0.2),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[f"case{i}" for i in range(len(OPCHECK_CASES))])
def test_opcheck_lora_linear(case, gen):
    lead, IN, OUT, R, dtype, bias, rg, xl, wl, s, p = case
    x, w, b, a, bb = _op_sample(lead, IN, OUT, R, dtype, gen, bias, rg, xl, wl)
    seed = ops.next_dropout_seed() if p > 0 else None
    torch.library.opcheck(torch.ops.tltorch.lora_linear.default, (x, w, b, a, bb, s, p, seed))


@pytest.mark.parametrize("flags,p", [((True, True, True), 0.4), ((False, True, True), 0.0),
                                     ((True, False, False), 0.4), ((False, False, True), 0.4)],
                         ids=["x+A+B-p0.4", "A+B-p0", "x-p0.4", "B-p0.4"])
def test_opcheck_lora_linear_backward(flags, p, gen):
    x, w, _, a, bb = _op_sample((2, 3), 6, 5, 2, torch.float32, gen, rg=False, wl="conv1d")
    seed = ops.next_dropout_seed() if p > 0 else None
    _, su = torch.ops.tltorch.lora_linear(x, w, None, a, bb, 1.5, p, seed)
    g = torch.randn(2, 3, 5, generator=gen)
    torch.library.opcheck(torch.ops.tltorch.lora_linear_backward.default,
                          (g, x, w, a, bb, su, 1.5, p, seed, *flags))


def test_custom_op_autograd(gen):
    """The op torch.compile sees, differentiated directly: the eager path's gradients, with the mask of
    the seed passed in."""
    x, w, b, a, bb = _op_sample((3, 4), 9, 6, 3, torch.float32, gen, wl="conv1d")
    w.requires_grad_()
    p = 0.3
    seed = seed_for(21)
    mask = dropout_mask(seed, 12, 9, p).reshape(x.shape)
    y, su = torch.ops.tltorch.lora_linear(x, w, b, a, bb, 2.0, p, seed)
    g = torch.randn(3, 4, 6, generator=gen)
    y.backward(g)
    ref, leaves = reference(x, w, b, a, bb, 2.0, mask, p)
    ref.backward(g.double())
    assert_close(y, ref, torch.float32, what="op y")
    assert_close(su, 2.0 * (x.double() * mask / (1 - p)).reshape(12, 9) @ a.double().T, torch.float32,
                 what="op su")
    for name, t, td in zip(NAMES, (x, w, b, a, bb), leaves):
        assert_close(t.grad, td.grad, torch.float32, what=f"op d{name}")


# ---- bad arguments ------------------------------------------------------------------------------------

def _bad_cases():
    x = torch.randn(4, 6)
    w = torch.randn(3, 6)
    b = torch.randn(3)
    a = torch.randn(2, 6)
    bb = torch.randn(3, 2)

    def c(what, exc, name, **kw):
        args = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb)
        args.update(kw)
        return (what, args, exc, name)

    return [
        c("list x", TypeError, "x", x=[[1.0] * 6] * 4),
        c("None x", TypeError, "x", x=None),
        c("str weight", TypeError, "weight", weight="w"),
        c("list bias", TypeError, "bias", bias=[0.0] * 3),
        c("None lora_A", TypeError, "lora_A", lora_A=None),
        c("ndarray lora_B", TypeError, "lora_B", lora_B=bb.numpy()),
        c("float64 all", TypeError, "x", x=x.double(), weight=w.double(), bias=b.double(),
          lora_A=a.double(), lora_B=bb.double()),
        c("int x", TypeError, "x", x=x.long()),
        c("float64 weight", TypeError, "weight", weight=w.double()),
        c("bf16 weight", TypeError, "weight", weight=w.bfloat16()),
        c("f16 bias", TypeError, "bias", bias=b.half()),
        c("float64 lora_A", TypeError, "lora_A", lora_A=a.double()),
        c("bf16 lora_A", TypeError, "lora_A", lora_A=a.bfloat16()),
        c("int lora_B", TypeError, "lora_B", lora_B=bb.int()),
        c("f16 lora_B", TypeError, "lora_B", lora_B=bb.half()),
        c("x features", ValueError, "x", x=torch.randn(4, 5)),
        c("x 0-D", ValueError, "x", x=torch.tensor(1.0)),
        c("weight 1-D", ValueError, "weight", weight=torch.randn(6)),
        c("weight in", ValueError, "weight", weight=torch.randn(3, 7)),
        c("bias shape", ValueError, "bias", bias=torch.randn(4)),
        c("bias 2-D", ValueError, "bias", bias=torch.randn(1, 3)),
        c("lora_A in", ValueError, "lora_A", lora_A=torch.randn(2, 5)),
        c("lora_A 1-D", ValueError, "lora_A", lora_A=torch.randn(6)),
        c("lora_A 3-D", ValueError, "lora_A", lora_A=torch.randn(1, 2, 6)),
        c("lora_B rank", ValueError, "lora_B", lora_B=torch.randn(3, 3)),
        c("lora_B out", ValueError, "lora_B", lora_B=torch.randn(4, 2)),
        c("lora_B 1-D", ValueError, "lora_B", lora_B=torch.randn(3)),
        c("scaling str", TypeError, "scaling", scaling="1.0"),
        c("scaling None", TypeError, "scaling", scaling=None),
        c("scaling complex", TypeError, "scaling", scaling=1j),
        c("dropout 1", ValueError, "dropout", dropout=1.0),
        c("dropout negative", ValueError, "dropout", dropout=-0.1),
        c("dropout 1.5", ValueError, "dropout", dropout=1.5),
        c("dropout nan", ValueError, "dropout", dropout=float("nan")),
        c("dropout str", (TypeError, ValueError), "dropout", dropout="0.1"),
        c("dropout None", (TypeError, ValueError), "dropout", dropout=None),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_arguments(case):
    _, kw, exc, name = case
    x = kw.pop("x")
    with pytest.raises(exc, match=rf"\b{name}\b"):
        lora_linear(x, **kw)


def test_lora_dropout_bad_arguments():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"\bp\b|dropout"):
        lora_dropout(x, 1.0, 0)
    with pytest.raises(ValueError, match=r"\bp\b|dropout"):
        lora_dropout(x, -0.5, 0)
    with pytest.raises(TypeError, match=r"\bx\b"):
        lora_dropout(x.double(), 0.5, 0)


def test_device_mismatch_names_argument():
    x = torch.randn(4, 6)
    w, b, a, bb = torch.randn(3, 6), torch.randn(3), torch.randn(2, 6), torch.randn(3, 2)
    meta = {"weight": torch.empty(3, 6, device="meta"), "bias": torch.empty(3, device="meta"),
            "lora_A": torch.empty(2, 6, device="meta"), "lora_B": torch.empty(3, 2, device="meta")}
    for name, t in meta.items():
        kw = dict(weight=w, bias=b, lora_A=a, lora_B=bb)
        kw[name] = t
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            lora_linear(x, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_rank_larger_than_outputs_one_k_block(dtype):
    """out + r <= 384 with r > 192 (out = 10, r = 200): the low-rank K range must share the base's K
    block. It once took a block of its own, and a float16 dx then summed partials into a workspace that
    was (rightly) not there: a crash."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 100, generator=g).to(dtype).requires_grad_()
    w = torch.randn(10, 100, generator=g).to(dtype)
    a = (torch.randn(200, 100, generator=g) / 10).to(dtype).requires_grad_()
    b = (torch.randn(10, 200, generator=g) / 10).to(dtype).requires_grad_()
    y = lora_linear(x, w, None, a, b, scaling=0.5)
    y.sum().backward()
    xr, ar, br = (t.detach().double().requires_grad_() for t in (x, a, b))
    yr = xr @ w.double().T + 0.5 * (xr @ ar.T) @ br.T
    yr.sum().backward()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for got, ref in ((y, yr), (x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < tol
