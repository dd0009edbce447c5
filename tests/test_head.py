"""tltorch.functional.linear_cross_entropy and tltorch.nn.LinearCrossEntropy (csrc/cpu/head.c): the
fused classifier head against torch's F.cross_entropy(F.linear(x, weight, bias), target, ...).

Every value and gradient is compared with float64 autograd on the same (rounded) inputs; bfloat16 and
float16 results are also held to torch's own error on the same low-precision inputs (assert_close). The
reference flattens the leading dims of x: F.cross_entropy reads a 3-D input as (N, C, d1), so the
literal F.cross_entropy(F.linear(x, w), target) is only the specification for 2-D x; for (..., D) the
meaning is the per-row loss over x.shape[:-1] (reduction "none" keeps that shape).
"""
import copy
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

from conftest import (DTYPES, LOW_PRECISION, TOL, UNIT, assert_close, assert_rounded_once, dtype_id, make2d,
                      make_x, randn, rel_err)
from tltorch import ops
from tltorch.functional import linear_cross_entropy as lce
from tltorch.nn import LinearCrossEntropy

REDUCTIONS = ("mean", "sum", "none")

# The head computes logits, softmax and every sum in float32 and rounds each output to its dtype once
# (a gradient scaled by a non-unit upstream scalar: twice). So in bfloat16/float16 the loss and every
# gradient are within two unit roundoffs of the float64 value, relative to max|ref| (float32's own
# accumulation error, ~1e-6 here, is the slack) -- tighter than conftest's generic TOL, which assert_close
# applies too, along with "no worse than twice torch's own error on the same inputs".
HEAD_TOL = {torch.float32: TOL[torch.float32], torch.bfloat16: 2 * UNIT[torch.bfloat16] + 1e-5,
            torch.float16: 2 * UNIT[torch.float16] + 1e-5}


def assert_head_close(out, ref, dtype, torch_out=None, what=""):
    """bfloat16/float16: assert_close (conftest.TOL and no worse than twice torch's error plus a rounding),
    then HEAD_TOL. float32: TOL; or, given torch's own float32 result on the same inputs (ill-conditioned
    cases: logits of hundreds, confident rows, where torch misses 1e-5 too), max(TOL, twice torch's
    error + 1e-6)."""
    if dtype is torch.float32 and torch_out is not None:
        err, terr = rel_err(out, ref), rel_err(torch_out, ref)
        tol = max(TOL[dtype], 2 * terr + 1e-6)
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} (torch's float32: {terr:.3g})"
        return err
    err = assert_close(out, ref, dtype, torch_out=torch_out, what=what)
    assert err <= HEAD_TOL[dtype], f"{what}: relative error {err:.3g} > {HEAD_TOL[dtype]:.3g} " \
        f"({err / UNIT[dtype]:.2f} unit roundoffs of {dtype_id(dtype)})"
    return err


# ---- inputs and references ----------------------------------------------------------------------------

def make_w(C, D, layout, dtype, gen):
    """A (C, D) weight scaled like nn.Linear's (logits of order 1), in layout contig / t / strided."""
    return make2d(C, D, {"contig": "contig", "t": "t", "strided": "stride2"}[layout], dtype, gen,
                  scale=1.0 / math.sqrt(max(D, 1)))


def head_leaves(lead, D, C, dtype, gen, w_layout="contig"):
    """x (*lead, D), w (C, D) in `w_layout` (as make_w) and b (C,), drawn in that order, each a leaf
    that requires grad."""
    x = randn((*lead, D), dtype, gen).requires_grad_()
    w = make_w(C, D, w_layout, dtype, gen).requires_grad_()
    b = randn((C,), dtype, gen).requires_grad_()
    return x, w, b


def make_target(lead, C, gen, ignore_index=-100, ignore_every=0, dtype=torch.int64):
    """Targets in [0, C); when ignore_every, the flat rows 3, 3 + k, 3 + 2k, ... are ignore_index (so a
    batch of 1-3 rows keeps all its rows). A class-valid ignore_index may also come up as a plain draw:
    those rows are ignored just the same."""
    n = math.prod(lead)
    t = torch.randint(0, C, (n,), generator=gen)
    if ignore_every:
        t[3::ignore_every] = ignore_index
    return t.reshape(lead).to(dtype)


def make_class_weight(C, cw_dtype, x_dtype, gen):
    """Positive class weights in [0.25, 2.25), one of them 0 (a class that does not count), with values
    exact in both `cw_dtype` and x's dtype, so torch's low-precision run sees the same weights."""
    if cw_dtype is None:
        return None
    cw = (torch.rand(C, generator=gen) * 2 + 0.25).to(x_dtype).to(torch.float32)
    if C > 2:
        cw[1] = 0.0
    return cw.to(cw_dtype)


def _leaf(t, dtype):
    if t is None:
        return None
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def torch_head(x, w, b, target, cw, dtype, **opts):
    """F.cross_entropy(F.linear(x, w, b), target, ...) in `dtype` with autograd, leading dims flattened;
    returns (loss, x, w, b) with fresh leaves that require grad like the inputs."""
    xd, wd, bd = _leaf(x, dtype), _leaf(w, dtype), _leaf(b, dtype)
    cwd = None if cw is None else cw.detach().to(dtype)
    C = w.shape[0]
    logits = F.linear(xd, wd, bd)
    loss = F.cross_entropy(logits.reshape(-1, C), target.reshape(-1).long(), weight=cwd, **opts)
    if opts.get("reduction", "mean") == "none":
        loss = loss.reshape(target.shape)
    return loss, xd, wd, bd


def assert_matches(out, ref, dtype, torch_out=None, what=""):
    """assert_close, where NaNs of the reference (all targets ignored, mean) must be NaNs of `out` at the
    same places and are left out of the comparison."""
    out = out.detach().cpu()
    ref = ref.detach().cpu()
    nan = torch.isnan(ref)
    if nan.any():
        assert torch.equal(torch.isnan(out), nan), f"{what}: NaNs at other places than torch's ({out})"
        out, ref = out[~nan], ref[~nan]
        torch_out = None if torch_out is None else torch_out.detach().cpu()[~nan]
    return assert_head_close(out, ref, dtype, torch_out=torch_out, what=what)


def check_head(x, w, b, target, cw=None, grad=None, what="", f32_vs_torch=False, **opts):
    """linear_cross_entropy forward (+ backward(grad) when anything requires grad) against float64 torch
    and, in bfloat16/float16 (and in float32 with f32_vs_torch), against torch's own error on the same
    inputs (assert_head_close). Inputs that do not require grad must get none. Returns the loss."""
    dtype = x.dtype
    loss = lce(x, w, target, b, class_weight=cw, **opts)
    red = opts.get("reduction", "mean")
    assert isinstance(loss, torch.Tensor) and loss.dtype == dtype and loss.device == x.device
    assert loss.shape == (target.shape if red == "none" else ()), (loss.shape, target.shape)
    ref, xd, wd, bd = torch_head(x, w, b, target, cw, torch.float64, **opts)
    tout = xt = wt = bt = None
    if dtype in LOW_PRECISION or f32_vs_torch:
        tout, xt, wt, bt = torch_head(x, w, b, target, cw, dtype, **opts)
    assert_matches(loss, ref, dtype, tout, what=f"{what} loss")
    leaves = [("x", x, xd, xt), ("weight", w, wd, wt), ("bias", b, bd, bt)]
    if not any(t is not None and t.requires_grad for _, t, _, _ in leaves):
        assert loss.grad_fn is None and not loss.requires_grad
        return loss
    if grad is None:
        grad = torch.ones((), dtype=dtype) if red != "none" else torch.ones(target.shape, dtype=dtype)
    loss.backward(grad)
    ref.backward(grad.double())
    if tout is not None:
        tout.backward(grad)
    for name, t, td, tt in leaves:
        if t is None:
            continue
        if t.requires_grad:
            assert t.grad is not None, f"{what}: {name}.grad is None"
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, (name, t.grad.dtype, t.grad.shape)
            assert_matches(t.grad, td.grad, dtype, None if tt is None else tt.grad, what=f"{what} d{name}")
        else:
            assert t.grad is None, f"{what}: {name} does not require grad but got one"
    return loss


def _grad_out(red, target, dtype, gen, scale=1.0):
    """The upstream gradient: a random value per row for reduction "none", else the scalar `scale`."""
    if red == "none":
        return randn((target.numel(),), dtype, gen).reshape(target.shape)
    return torch.tensor(scale, dtype=dtype)


# ---- every combination of the options -----------------------------------------------------------------

# (dtype, class_weight dtype): class_weight float32 or x's dtype (the same thing for float32 x).
CW_CASES = [(d, c) for d in DTYPES for c in (None, torch.float32, d) if not (c is d is torch.float32)]


@pytest.mark.parametrize("dtype,cw_dtype", CW_CASES,
                         ids=lambda v: "nocw" if v is None else dtype_id(v))
@pytest.mark.parametrize("ignore_index", [-100, 0, 3, -1])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_options(reduction, label_smoothing, ignore_index, dtype, cw_dtype, gen):
    """Reduction x label smoothing x class weights x ignore_index (the default, a class-valid index whose
    rows must be ignored, and a negative one), with gradients for x, weight and bias."""
    N, D, C = 37, 33, 11
    x, w, b = head_leaves((N,), D, C, dtype, gen)
    target = make_target((N,), C, gen, ignore_index, ignore_every=5)
    cw = make_class_weight(C, cw_dtype, dtype, gen)
    check_head(x, w, b, target, cw, _grad_out(reduction, target, dtype, gen),
               what=f"{reduction} ls={label_smoothing} ii={ignore_index}", reduction=reduction,
               label_smoothing=label_smoothing, ignore_index=ignore_index)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_label_smoothing_one_and_ignore_index_outside_classes(reduction, dtype, gen):
    """label_smoothing = 1 (the closed end of [0, 1]); ignore_index = C and a large one, which are not
    classes, so only the rows equal to them are ignored."""
    N, D, C = 21, 9, 6
    for ii in (C, 1000):
        x = randn((N, D), dtype, gen).requires_grad_()
        w = make_w(C, D, "contig", dtype, gen).requires_grad_()
        target = make_target((N,), C, gen, ii, ignore_every=4)
        check_head(x, w, None, target, make_class_weight(C, torch.float32, dtype, gen),
                   _grad_out(reduction, target, dtype, gen), what=f"ls=1 ii={ii}", reduction=reduction,
                   label_smoothing=1.0, ignore_index=ii)


# ---- shapes ------------------------------------------------------------------------------------------

# (leading dims of x, D, C): C = 1 and 2, odd D, a large C, C > 30000 with small N and D, 3-D and 4-D x,
# a batch of many rows; C = 16 and 17 on either side of the kernel's few-classes path (_C.XENT_SKINNY_C).
SHAPES = [((1,), 1, 1), ((7,), 5, 1), ((9,), 33, 2), ((64,), 33, 5000), ((5,), 8, 32771),
          ((3, 7), 33, 17), ((2, 3, 4), 9, 5), ((1000,), 33, 50), ((40,), 20, 16), ((1000,), 65, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("options", ["plain", "all"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead,D,C", SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_shapes(lead, D, C, reduction, options, dtype, gen):
    x, w, b = head_leaves(lead, D, C, dtype, gen)
    opts = dict(reduction=reduction)
    cw = None
    if options == "all":
        opts.update(label_smoothing=0.2, ignore_index=-1)
        cw = make_class_weight(C, torch.float32, dtype, gen)
    target = make_target(lead, C, gen, opts.get("ignore_index", -100), 8 if options == "all" else 0)
    check_head(x, w, b, target, cw, _grad_out(reduction, target, dtype, gen),
               what=f"{lead} D={D} C={C} {options}", **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_row_1d_x(reduction, dtype, gen):
    """x of shape (D,) with a 0-D target (the empty '...' of (..., D)), as F.cross_entropy takes it."""
    D, C = 7, 5
    x = randn((D,), dtype, gen).requires_grad_()
    w = make_w(C, D, "contig", dtype, gen).requires_grad_()
    b = randn((C,), dtype, gen).requires_grad_()
    target = torch.tensor(3)
    check_head(x, w, b, target, None, _grad_out(reduction, target, dtype, gen), reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_large_logits(reduction, dtype, gen):
    """Logits of several hundred (exp would overflow float32 without subtracting the row max) and
    targets that are mostly not the argmax, so losses are large and the comparison meaningful."""
    N, D, C = 40, 16, 300
    x = randn((N, D), dtype, gen, scale=10.0).requires_grad_()
    w = randn((C, D), dtype, gen, scale=8.0).requires_grad_()
    b = randn((C,), dtype, gen).requires_grad_()
    target = make_target((N,), C, gen)
    loss = check_head(x, w, b, target, None, _grad_out(reduction, target, dtype, gen), what="large logits",
                      f32_vs_torch=True, reduction=reduction, label_smoothing=0.05)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_int32_target_same_as_int64(reduction, dtype, gen):
    N, D, C = 33, 17, 9
    x, w, b = head_leaves((N,), D, C, dtype, gen, "t")
    t64 = make_target((N,), C, gen, 2, ignore_every=4)
    g = _grad_out(reduction, t64, dtype, gen)
    out = {}
    for tdt in (torch.int64, torch.int32):
        x.grad = w.grad = b.grad = None
        loss = lce(x, w, t64.to(tdt), b, ignore_index=2, label_smoothing=0.1, reduction=reduction)
        loss.backward(g)
        out[tdt] = (loss.detach(), x.grad, w.grad, b.grad)
    for a, c in zip(out[torch.int64], out[torch.int32]):
        assert torch.equal(a, c)
    check_head(x.detach().requires_grad_(), w.detach().requires_grad_(), b.detach().requires_grad_(),
               t64.int(), None, g, ignore_index=2, label_smoothing=0.1, reduction=reduction)


@pytest.mark.parametrize("ignore_index", [2 ** 32 + 1, 2 ** 32 - 100, -(2 ** 32) + 2])
def test_int32_target_with_ignore_index_beyond_int32(ignore_index, gen):
    """An ignore_index that int32 targets cannot hold must not be truncated to one they do hold (2^32 + 1
    would become class 1, 2^32 - 100 the default -100)."""
    N, D, C = 12, 5, 4
    x = randn((N, D), torch.float32, gen).requires_grad_()
    w = make_w(C, D, "contig", torch.float32, gen).requires_grad_()
    target = make_target((N,), C, gen)
    target[:4] = torch.tensor([0, 1, 2, 3])
    check_head(x, w, None, target.int(), ignore_index=ignore_index)
    t_bad = target.clone()
    t_bad[5] = ignore_index - 2 ** 32 if ignore_index > 0 else ignore_index + 2 ** 32
    if not 0 <= t_bad[5] < C:  # -100 or 2: only -100 is out of range and must be rejected
        with pytest.raises(ValueError, match=r"\btarget\b"):
            lce(x, w, t_bad.int(), ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_confident_predictions_float32(reduction, gen):
    """A trained-looking head: each target logit stands ~30 above the others (p_target ~ 0.9997). The loss
    (lse - z_t) and the gradients (p - 1) are then small differences, so float32 loses accuracy here,
    torch's included, and 1e-5 is out of reach; the measure is assert_head_close's float32 rule: no worse
    than twice torch's own float32 error on the same inputs, plus 1e-6. (Rounding lse = max + log(sum) to
    float32 before lse - z_t or exp(z - lse) costs ~2^-24 * max|z| in every loss and every p; summing the
    other classes apart from the target avoids it.)"""
    N, D, C = 64, 32, 1000
    w = make_w(C, D, "contig", torch.float32, gen).requires_grad_()
    b = randn((C,), torch.float32, gen, scale=0.1).requires_grad_()
    t = make_target((N,), C, gen)
    wt = w.detach()[t]
    x = 30.0 * wt / wt.norm(dim=1, keepdim=True) ** 2 + randn((N, D), torch.float32, gen, 0.3)
    x.requires_grad_()
    g = _grad_out(reduction, t, torch.float32, gen)
    loss = lce(x, w, t, b, reduction=reduction)
    loss.backward(g)
    ref, xd, wd, bd = torch_head(x, w, b, t, None, torch.float64, reduction=reduction)
    ref.backward(g.double())
    tout, xt, wt_, bt = torch_head(x, w, b, t, None, torch.float32, reduction=reduction)
    tout.backward(g)
    with torch.no_grad():
        z = F.linear(x.double(), w.double(), b.double())
        p_t = torch.softmax(z, -1).gather(1, t[:, None]).mean().item()
    assert p_t > 0.99, p_t  # the confident regime
    errs, bad = {}, []
    for name, out, r, tr in (("loss", loss, ref, tout), ("dx", x.grad, xd.grad, xt.grad),
                             ("dweight", w.grad, wd.grad, wt_.grad), ("dbias", b.grad, bd.grad, bt.grad)):
        err, terr = rel_err(out, r), rel_err(tr, r)
        errs[name] = f"{err:.2g} (torch {terr:.2g})"
        if not err <= max(TOL[torch.float32], 2 * terr + 1e-6):  # assert_head_close's float32 rule
            bad.append(name)
    assert not bad, f"{bad} less accurate than torch's float32; relative errors: {errs}"


# ---- chunks of rows ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_many_chunks_at_the_default_chunk_size(reduction, dtype, gen):
    """C = 30000 with 600 rows: more rows than one chunk of the head's 64 MB workspace holds."""
    N, D, C = 600, 16, 30000
    x, w, b = head_leaves((N,), D, C, dtype, gen)
    target = make_target((N,), C, gen, ignore_every=11)
    check_head(x, w, b, target, None, _grad_out(reduction, target, dtype, gen), what="600 x 30000",
               reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunk_boundaries(chunk_rows, reduction, dtype, gen, monkeypatch):
    """The workspace shrunk (tltorch.ops.head._XENT_CHUNK_FLOATS) to `chunk_rows` rows: a batch of 150 rows
    in many chunks, the last one partial, with ignored rows and class weights across chunk edges."""
    N, D, C = 150, 33, 29
    monkeypatch.setattr(ops.head, "_XENT_CHUNK_FLOATS", chunk_rows * (C + D + 1))
    x = make_x((N,), D, "strided", dtype, gen).requires_grad_()
    w = make_w(C, D, "t", dtype, gen).requires_grad_()
    b = randn((C,), dtype, gen).requires_grad_()
    target = make_target((N,), C, gen, 5, ignore_every=7)
    check_head(x, w, b, target, make_class_weight(C, torch.float32, dtype, gen),
               _grad_out(reduction, target, dtype, gen), what=f"chunks of {chunk_rows}",
               reduction=reduction, ignore_index=5, label_smoothing=0.1)
    target[-1] = C  # a bad target in the last chunk only
    with pytest.raises(ValueError, match=r"\btarget\b"):
        lce(x, w, target, b, ignore_index=5, reduction=reduction)


# ---- layouts --------------------------------------------------------------------------------------------

# (leading dims, x layout, weight layout): views of bigger buffers, transposes, 3-D x.
LAYOUT_CASES = [((19,), "strided", "t"), ((19,), "transposed", "strided"), ((19,), "offset", "contig"),
                ((3, 7), "transposed", "t"), ((3, 7), "strided", "strided"), ((3, 7), "offset", "t"),
                ((19,), "expanded", "t")]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lead,xl,wl", LAYOUT_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_layouts(lead, xl, wl, dtype, gen):
    """Non-contiguous x and weight, and strided target, bias and class_weight views."""
    D, C = 33, 13
    x = make_x(lead, D, xl, dtype, gen).requires_grad_()
    w = make_w(C, D, wl, dtype, gen).requires_grad_()
    assert not x.is_contiguous() and w.is_contiguous() == (wl == "contig")
    b = randn((2 * C,), dtype, gen)[::2].requires_grad_()
    cw = make_class_weight(2 * C, torch.float32, dtype, gen)[1::2]
    target = make_target((*lead[:-1], 2 * lead[-1]), C, gen, 4, ignore_every=3)[..., ::2]
    assert not target.is_contiguous()
    for red in REDUCTIONS:
        for t in (x, w, b):
            t.grad = None
        check_head(x, w, b, target, cw, _grad_out(red, target, dtype, gen), what=f"{xl}/{wl} {red}",
                   reduction=red, ignore_index=4, label_smoothing=0.1)


# ---- all targets ignored, empty batch ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("options", ["plain", "ls", "cw+ls"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(reduction, options, dtype, gen):
    """torch: mean -> NaN, sum -> 0, none -> zeros; every gradient is zero (not NaN)."""
    N, D, C = 10, 6, 4
    x, w, b = head_leaves((N,), D, C, dtype, gen)
    opts = dict(reduction=reduction, ignore_index=2)
    if "ls" in options:
        opts["label_smoothing"] = 0.3
    cw = make_class_weight(C, torch.float32, dtype, gen) if "cw" in options else None
    target = torch.full((N,), 2)
    loss = check_head(x, w, b, target, cw, _grad_out(reduction, target, dtype, gen), **opts)
    if reduction == "mean":
        assert torch.isnan(loss)
    else:
        assert torch.equal(loss.detach(), torch.zeros_like(loss))
    for t in (x, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t)), "gradients of an all-ignored batch must be 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
def test_empty_batch(lead, reduction, ls, dtype, gen):
    """N = 0: mean -> NaN, sum -> 0, none -> an empty loss; x.grad empty, weight/bias grads zero."""
    D, C = 7, 5
    x, w, b = head_leaves(lead, D, C, dtype, gen)
    target = torch.zeros(lead, dtype=torch.int64)
    loss = check_head(x, w, b, target, make_class_weight(C, torch.float32, dtype, gen),
                      _grad_out(reduction, target, dtype, gen), reduction=reduction, label_smoothing=ls)
    if reduction == "mean":
        assert torch.isnan(loss)
    elif reduction == "sum":
        assert loss.item() == 0.0
    else:
        assert loss.shape == lead
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# ---- gradients -------------------------------------------------------------------------------------------

# (x, weight, bias requires grad, has a bias): every combination, the bias flag only with a bias.
GRAD_FLAGS = [(rx, rw, rb, hb) for rx, rw, rb, hb in itertools.product([True, False], repeat=4)
              if hb or not rb]


def _flags_id(f):
    return ("".join("xwb"[i] for i in range(3) if f[i]) or "none") + ("" if f[3] else "-nobias")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("flags", GRAD_FLAGS, ids=_flags_id)
def test_grads_each_only_when_required(flags, reduction, dtype, gen):
    """Each of dx, dweight, dbias only when required; "wb" is the frozen-body case (features without
    grad, a trainable head); "none" must build no graph at all."""
    rx, rw, rb, with_bias = flags
    N, D, C = 23, 33, 19
    x = make_x((N,), D, "strided", dtype, gen).requires_grad_(rx)
    w = make_w(C, D, "t", dtype, gen).requires_grad_(rw)
    b = randn((C,), dtype, gen).requires_grad_(rb) if with_bias else None
    target = make_target((N,), C, gen, ignore_every=6)
    check_head(x, w, b, target, None, _grad_out(reduction, target, dtype, gen), what=f"flags={flags}",
               reduction=reduction, label_smoothing=0.1)


def test_frozen_body_features(gen):
    """Features computed under no_grad from a frozen body: the head's weight and bias still train."""
    body = torch.nn.Linear(12, 20)
    for p in body.parameters():
        p.requires_grad_(False)
    inp = torch.randn(30, 12, generator=gen)
    with torch.no_grad():
        feats = torch.relu(body(inp))
    w = make_w(7, 20, "contig", torch.float32, gen).requires_grad_()
    b = torch.randn(7, generator=gen).requires_grad_()
    check_head(feats, w, b, make_target((30,), 7, gen), what="frozen body")
    assert feats.grad is None and body.weight.grad is None


def test_no_grad_mode_builds_no_graph(gen):
    x = torch.randn(8, 5, generator=gen, requires_grad=True)
    w = torch.randn(3, 5, generator=gen, requires_grad=True)
    t = make_target((8,), 3, gen)
    with torch.no_grad():
        loss = lce(x, w, t)
    assert loss.grad_fn is None and not loss.requires_grad
    assert torch.equal(loss, lce(x, w, t).detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("scale", [3.5, -0.25])
def test_scaled_grad_output(scale, reduction, dtype, gen):
    """(loss * s).backward(): the gradients scale by s."""
    N, D, C = 29, 33, 12
    x, w, b = head_leaves((N,), D, C, dtype, gen)
    target = make_target((N,), C, gen, ignore_every=7)
    cw = make_class_weight(C, torch.float32, dtype, gen)
    opts = dict(reduction=reduction, label_smoothing=0.1)
    (lce(x, w, target, b, class_weight=cw, **opts) * scale).backward()
    ref, xd, wd, bd = torch_head(x, w, b, target, cw, torch.float64, **opts)
    (ref * scale).backward()
    for name, t, td in (("x", x, xd), ("weight", w, wd), ("bias", b, bd)):
        assert_head_close(t.grad, td.grad, dtype, what=f"(loss * {scale}) d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale", [1.0, 3.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice_accumulates(reduction, scale, dtype, gen):
    """backward(retain_graph=True) then backward again: the same gradient each time (bitwise), so the
    accumulated .grad is exactly twice the first; and both are right. x comes from a trainable body
    (a non-leaf), whose weight's gradient must double the same way."""
    N, D, C = 31, 17, 10
    inp = randn((N, 12), dtype, gen)
    body = randn((D, 12), dtype, gen, scale=0.3).requires_grad_()
    w = make_w(C, D, "contig", dtype, gen).requires_grad_()
    b = randn((C,), dtype, gen).requires_grad_()
    target = make_target((N,), C, gen, ignore_every=5)
    g = _grad_out(reduction, target, dtype, gen, scale=scale)
    opts = dict(reduction=reduction, label_smoothing=0.1)
    x = inp @ body.T
    loss = lce(x, w, target, b, **opts)
    loss.backward(g, retain_graph=True)
    first = [t.grad.clone() for t in (body, w, b)]
    loss.backward(g)
    ref, xd, wd, bd = torch_head(x.requires_grad_(), w, b, target, None, torch.float64, **opts)
    ref.backward(g.double())
    dbody = xd.grad.T @ inp.double()  # x = inp @ body.T, from x's rounded values
    for name, t, g1, td in zip(("body", "weight", "bias"), (body, w, b), first, (dbody, wd.grad, bd.grad)):
        # the body's gradient also carries torch's own low-precision matmul: conftest's TOL
        (assert_close if name == "body" else assert_head_close)(g1, td, dtype, what=f"first d{name}")
        assert torch.equal(t.grad, 2 * g1), f"d{name}: second backward differs from the first"


@pytest.mark.parametrize("modified", ["weight", "x", "target"])
def test_inplace_change_before_recompute_raises(modified, gen):
    """A backward that recomputes (an upstream gradient other than 1) after an input was changed in
    place raises as autograd does, instead of differentiating the changed values."""
    N, D, C = 9, 7, 5
    x = randn((N, D), torch.float32, gen).requires_grad_()
    w = randn((C, D), torch.float32, gen).requires_grad_()
    target = make_target((N,), C, gen)
    xx = x * 1.0  # a non-leaf, so it can be changed in place
    loss = lce(xx, w, target)
    with torch.no_grad():
        {"weight": w, "x": xx, "target": target}[modified].mul_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(torch.tensor(2.0))


def _inplace_case(gen):
    """x (a non-leaf, so that it can change in place), weight, bias, target and class_weight of a small
    head."""
    N, D, C = 9, 7, 5
    x = randn((N, D), torch.float32, gen).requires_grad_() * 1.0
    w = randn((C, D), torch.float32, gen).requires_grad_()
    b = randn((C,), torch.float32, gen).requires_grad_()
    return dict(x=x, weight=w, bias=b, target=make_target((N,), C, gen), class_weight=torch.rand(C) + 0.5)


def _backward_after_change(loss, changed):
    with torch.no_grad():
        changed.mul_(1)
    (loss if loss.dim() == 0 else loss.sum()).backward()


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("modified", ["x", "weight", "bias", "target", "class_weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_change_raises(reduction, modified, path, gen):
    """An input changed in place between forward and backward raises as autograd does, whatever the
    reduction: for mean and sum too, whose gradients were computed with the loss (backward with an
    upstream gradient of 1 only hands them over), and through the torch.library op that torch.compile
    sees. torch's F.cross_entropy(F.linear(...)) raises for each of these but the bias (its logits'
    gradient needs the softmax alone); tltorch's backward recomputes with the bias, so it raises there too."""
    a = _inplace_case(gen)
    if path == "eager":
        loss = lce(a["x"], a["weight"], a["target"], a["bias"], class_weight=a["class_weight"],
                   reduction=reduction)
    else:
        loss = torch.ops.tltorch.linear_cross_entropy(a["x"], a["weight"], a["target"], a["bias"],
                                                      a["class_weight"], -100, 0.0, ops.REDUCTIONS[reduction])[0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _backward_after_change(loss, a[modified])
    if modified != "bias":
        a = _inplace_case(gen)
        ref = F.cross_entropy(F.linear(a["x"], a["weight"], a["bias"]), a["target"], weight=a["class_weight"],
                              reduction=reduction)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            _backward_after_change(ref, a[modified])


def test_inplace_change_raises_compiled(gen):
    """The same under torch.compile (one compile, mean reduction): AOT autograd's saved inputs."""
    torch._dynamo.reset()
    f = torch.compile(lambda x, w, t, b, cw: lce(x, w, t, b, class_weight=cw), fullgraph=True,
                      backend="aot_eager")
    for modified in ("x", "weight", "bias", "target", "class_weight"):
        a = _inplace_case(gen)
        loss = f(a["x"], a["weight"], a["target"], a["bias"], a["class_weight"])
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            _backward_after_change(loss, a[modified])
    # unchanged inputs: no error, and the gradients of the uncompiled head
    a = _inplace_case(gen)
    x = a["x"].detach().requires_grad_()
    f(x, a["weight"], a["target"], a["bias"], a["class_weight"]).backward()
    grads = [t.grad for t in (x, a["weight"], a["bias"])]
    x.grad = a["weight"].grad = a["bias"].grad = None
    lce(x, a["weight"], a["target"], a["bias"], class_weight=a["class_weight"]).backward()
    for name, g, t in zip(("x", "weight", "bias"), grads, (x, a["weight"], a["bias"])):
        assert_close(g, t.grad, torch.float32, what=f"compiled d{name}")


def test_create_graph_first_order_only(gen):
    """backward(create_graph=True) gives the right first-order gradients; differentiating them
    again raises (the kernel has no second derivative) rather than returning zeros."""
    N, D, C = 6, 5, 4
    x = randn((N, D), torch.float32, gen).requires_grad_()
    w = randn((C, D), torch.float32, gen).requires_grad_()
    target = make_target((N,), C, gen)
    (gx,) = torch.autograd.grad(lce(x, w, target), x, create_graph=True)
    ref, xd, wd, _ = torch_head(x, w, None, target, None, torch.float64)
    ref.backward()
    assert_head_close(gx, xd.grad, torch.float32, what="dx under create_graph")
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|twice"):
        gx.sum().backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_thread_count(reduction, dtype, gen):
    """1 and 3 threads: correct either way, and bitwise the same (csrc/cpu/head.c: "Results do not depend
    on the thread count")."""
    N, D, C = 150, 33, 70
    x, w, b = head_leaves((N,), D, C, dtype, gen)
    target = make_target((N,), C, gen, ignore_every=5)
    g = _grad_out(reduction, target, dtype, gen)
    prev = torch.get_num_threads()
    out = []
    try:
        for nt in (1, 3):
            torch.set_num_threads(nt)
            for t in (x, w, b):
                t.grad = None
            out.append([check_head(x, w, b, target, None, g, what=f"{nt} threads", reduction=reduction)
                        .detach()] + [t.grad for t in (x, w, b)])
    finally:
        torch.set_num_threads(prev)
    for name, a, c in zip(("loss", "dx", "dweight", "dbias"), *out):
        assert torch.equal(a, c), f"{name} differs between 1 and 3 threads"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_none_reduction_with_noncontiguous_upstream(dtype, gen):
    """reduction "none" followed by .sum() (an expanded, stride-0 upstream gradient) or by a strided
    slice of the losses (zeros between the rows that count), on 3-D x."""
    lead, D, C = (4, 9), 17, 11
    x, w, b = head_leaves(lead, D, C, dtype, gen)
    target = make_target(lead, C, gen, ignore_every=5)
    for name, post in (("sum", lambda l: l.sum()), ("slice", lambda l: (l[:, 1::3] * 2.0).sum())):
        for t in (x, w, b):
            t.grad = None
        post(lce(x, w, target, b, reduction="none")).backward()
        ref, xd, wd, bd = torch_head(x, w, b, target, None, torch.float64, reduction="none")
        post(ref).backward()
        for pn, t, td in (("x", x, xd), ("weight", w, wd), ("bias", b, bd)):
            assert_head_close(t.grad, td.grad, dtype, what=f"{name}: d{pn}")


# ---- every SIMD path of the row kernels ---------------------------------------------------------------

# Runs in a subprocess with TLTORCH_CPU_ISA set (the row primitives -- max, sum of exp, the gradient row,
# dot, axpy -- are chosen once per process); prints a JSON report of the cases that fail check_head. Class
# and feature counts straddle the 8- and 16-float vectors; one case has logits of several hundred (exp of
# very negative arguments must underflow to 0, not to garbage).
ISA_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
import test_head as th
from tltorch import _C
g = torch.Generator().manual_seed(int(sys.argv[1]))
fails, n = [], 0
opts = [dict(reduction="mean"), dict(reduction="sum", label_smoothing=0.1, ignore_index=2),
        dict(reduction="none", label_smoothing=0.2, ignore_index=-1)]
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for i, (N, D, C) in enumerate([(5, 1, 1), (9, 7, 3), (17, 8, 8), (13, 9, 9), (21, 33, 15), (19, 16, 16),
                                   (23, 17, 17), (11, 33, 31), (30, 31, 33), (40, 33, 100), (20, 24, 1000)]):
        for o in (opts[i % 3], opts[(i + 1) % 3]):
            x = th.randn((N, D), dt, g).requires_grad_()
            w = th.make_w(C, D, "t" if i % 2 else "contig", dt, g).requires_grad_()
            b = th.randn((C,), dt, g).requires_grad_()
            t = th.make_target((N,), C, g, o.get("ignore_index", -100), ignore_every=4)
            cw = th.make_class_weight(C, torch.float32, dt, g) if i % 2 else None
            try:
                n += 1
                th.check_head(x, w, b, t, cw, th._grad_out(o["reduction"], t, dt, g), **o)
            except AssertionError as e:
                fails.append([str(dt), [N, D, C], o, str(e)[:300]])
    x = th.randn((30, 16), dt, g, scale=10.0).requires_grad_()
    w = th.randn((40, 16), dt, g, scale=8.0).requires_grad_()
    t = th.make_target((30,), 40, g)
    try:
        n += 1
        th.check_head(x, w, None, t, None, None, f32_vs_torch=True, label_smoothing=0.05)
    except AssertionError as e:
        fails.append([str(dt), "large logits", {}, str(e)[:300]])
x, w = th.randn((300, 40), torch.float32, g), th.make_w(37, 40, "contig", torch.float32, g)
t = th.make_target((300,), 37, g)
torch.set_num_threads(1)
l1 = th.lce(x, w, t, reduction="none")
torch.set_num_threads(2)
l2 = th.lce(x, w, t, reduction="none")
# a NaN logit makes the loss NaN (as in torch), whichever class it is in
nan_ok = True
for C in (2, 17, 100):
    b = torch.zeros(C)
    b[C - 1] = float("nan")
    nan_ok &= bool(torch.isnan(th.lce(th.randn((3, 4), torch.float32, g), th.randn((C, 4), torch.float32, g),
                                      torch.zeros(3, dtype=torch.int64), b, reduction="none")).all())
# one class: log-softmax is exactly 0 (the other classes' exps, none, sum to exactly 0)
one = th.lce(th.randn((7, 5), torch.float32, g), th.randn((1, 5), torch.float32, g),
             torch.zeros(7, dtype=torch.int64), reduction="none")
print(json.dumps({"isa": _C.cpu_isa(), "cases": n, "fails": fails,
                  "threads_equal": bool(torch.equal(l1, l2)), "one_class_zero": bool((one == 0).all()), "nan_logit_nan": nan_ok}))
"""


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_each_simd_path(isa):
    from tltorch import _C
    if isa == "avx2" and _C.cpu_isa() == "portable":
        pytest.skip("this CPU has no AVX2/FMA")
    # one thread (the row primitives are per row; threads are covered in-process): a run time that does
    # not depend on what else the machine is doing
    env = dict(os.environ, TLTORCH_CPU_ISA=isa, OMP_NUM_THREADS="1")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT, {"portable": "21", "avx2": "22"}[isa], here],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["isa"] == isa, f"TLTORCH_CPU_ISA={isa} but cpu_isa() reports {report['isa']}"
    assert report["cases"] > 60
    assert not report["fails"], f"{isa}: {len(report['fails'])} cases fail: {report['fails'][:3]}"
    assert report["threads_equal"]
    assert report["one_class_zero"], f"{isa}: a one-class head's loss is not exactly 0"
    assert report["nan_logit_nan"], f"{isa}: a NaN logit did not make the loss NaN"


# ---- low precision: the loss is the float32 value rounded once -------------------------------------------

@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead,D,C", [((50,), 64, 1000), ((4, 9), 33, 70)], ids=str)
def test_low_precision_loss_rounded_once(lead, D, C, reduction, dtype, gen):
    """Logits, softmax and the reduction run in float32, so each loss is within one rounding of the float64
    value (elementwise), far tighter than torch's own bfloat16/float16 path."""
    x = randn((*lead, D), dtype, gen)
    w = make_w(C, D, "contig", dtype, gen)
    b = randn((C,), dtype, gen)
    target = make_target(lead, C, gen, ignore_every=9)
    cw = make_class_weight(C, torch.float32, dtype, gen)
    opts = dict(reduction=reduction, label_smoothing=0.1)
    loss = lce(x, w, target, b, class_weight=cw, **opts)
    ref, *_ = torch_head(x, w, b, target, cw, torch.float64, **opts)
    assert_rounded_once(loss, ref, dtype, what=f"{reduction} loss")


# ---- the torch.library op: opcheck and torch.compile ------------------------------------------------------

def _op_sample(N, D, C, dtype, gen, bias=True, cw=None, rg=True, reduction="mean", ii=-100, ls=0.0):
    x = randn((N, D), dtype, gen).requires_grad_(rg)
    w = make_w(C, D, "contig", dtype, gen).requires_grad_(rg)
    b = randn((C,), dtype, gen).requires_grad_(rg) if bias else None
    t = make_target((N,), C, gen, ii, ignore_every=4)
    return x, w, t, b, make_class_weight(C, cw, dtype, gen), reduction, ii, ls


def op_args(x, w, t, b, cw, reduction, ii, ls):
    """The positional arguments of torch.ops.tltorch.linear_cross_entropy (tltorch/ops/head.py): x, weight,
    target, bias, class_weight, ignore_index, label_smoothing, reduction (as ops.REDUCTIONS' int)."""
    return (x, w, t, b, cw, ii, ls, ops.REDUCTIONS[reduction])


OPCHECK_CASES = [
    dict(N=6, D=5, C=4, dtype=torch.float32),
    dict(N=6, D=5, C=4, dtype=torch.float32, bias=False, cw=torch.float32, reduction="none", ii=1, ls=0.2),
    dict(N=5, D=3, C=7, dtype=torch.float32, reduction="sum", rg=False),
    dict(N=6, D=5, C=4, dtype=torch.bfloat16, cw=torch.bfloat16, ls=0.1),
    dict(N=0, D=5, C=4, dtype=torch.float16, reduction="sum"),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[f"case{i}" for i in range(len(OPCHECK_CASES))])
def test_opcheck(case, gen):
    case = dict(case)
    N, D, C, dtype = case.pop("N"), case.pop("D"), case.pop("C"), case.pop("dtype")
    torch.library.opcheck(torch.ops.tltorch.linear_cross_entropy.default,
                          op_args(*_op_sample(N, D, C, dtype, gen, **case)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("flags", [(True, True, True), (False, True, True), (True, False, False)],
                         ids=lambda f: "".join("xwb"[i] for i in range(3) if f[i]))
def test_opcheck_backward(flags, reduction, gen):
    x, w, t, b, cw, _, ii, ls = _op_sample(6, 5, 4, torch.float32, gen, cw=torch.float32, rg=False, ii=2,
                                           ls=0.1)
    g = torch.randn(6 if reduction == "none" else (), generator=gen)
    torch.library.opcheck(torch.ops.tltorch.linear_cross_entropy_backward.default,
                          (g, x, w, t, b, cw, ii, ls, ops.REDUCTIONS[reduction], *flags))


def test_torch_compile_fullgraph(gen):
    """One small compile (aot_eager: dynamo with fullgraph, the fake kernel, AOT autograd's joint graph),
    forward and backward matching eager."""
    torch._dynamo.reset()

    def f(x, w, b, t, cw):
        return lce(torch.tanh(x), w, t, b, class_weight=cw, label_smoothing=0.1, ignore_index=0) * 2.0

    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    cf = torch.compile(f, fullgraph=True, backend=backend)
    x = torch.randn(3, 7, 10, generator=gen, requires_grad=True)
    w = make_w(6, 10, "contig", torch.float32, gen).requires_grad_()
    b = torch.randn(6, generator=gen, requires_grad=True)
    t = make_target((3, 7), 6, gen)
    cw = make_class_weight(6, torch.float32, torch.float32, gen)
    y = cf(x, w, b, t, cw)
    y.backward()
    grads = [p.grad.clone() for p in (x, w, b)]
    for p in (x, w, b):
        p.grad = None
    ye = f(x, w, b, t, cw)
    ye.backward()
    assert y.shape == () and y.dtype == torch.float32
    assert backend.frame_count == 1
    targets = {n.target for n in backend.graphs[0].graph.nodes if n.op == "call_function"}
    op = torch.ops.tltorch.linear_cross_entropy
    assert op in targets or op.default in targets, targets  # the custom op, opaque to the graph
    assert_close(y, ye, torch.float32, what="compiled loss")
    for g, p in zip(grads, (x, w, b)):
        assert_close(g, p.grad, torch.float32, what="compiled grad")


def test_meta_tensors_use_the_fake_kernel():
    x = torch.empty(2, 3, 8, device="meta", requires_grad=True)
    w = torch.empty(5, 8, device="meta", requires_grad=True)
    b = torch.empty(5, device="meta", requires_grad=True)
    t = torch.empty(2, 3, dtype=torch.int64, device="meta")
    loss = lce(x, w, t, b, reduction="none")
    assert loss.device.type == "meta" and loss.shape == (2, 3) and loss.dtype == torch.float32
    loss.backward(torch.empty_like(loss))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    lm = lce(x.detach().bfloat16(), w.detach().bfloat16(), t)
    assert lm.device.type == "meta" and lm.shape == () and lm.dtype == torch.bfloat16


# ---- bad arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("bad,ii,tdt,N", [
    (5, -100, torch.int64, 8),       # == C
    (-1, -100, torch.int64, 8),      # negative, not ignore_index
    (-2, -1, torch.int64, 8),        # negative next to a negative ignore_index
    (-100, -1, torch.int64, 8),      # the default ignore_index when another was given
    (2 ** 40, -100, torch.int64, 8),  # would overflow a 32-bit index
    (-(2 ** 40), -100, torch.int64, 8),
    (7, -100, torch.int32, 8),
    (5, -100, torch.int64, 3000),    # the last row of a long batch
], ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_target_out_of_range(bad, ii, tdt, N, reduction, dtype, gen):
    C, D = 5, 4
    x = randn((N, D), dtype, gen).requires_grad_()
    w = make_w(C, D, "contig", dtype, gen).requires_grad_()
    target = make_target((N,), C, gen, ii, ignore_every=3)
    target[-1] = bad
    target = target.to(tdt)
    with pytest.raises(ValueError, match=r"\btarget\b"):
        lce(x, w, target, ignore_index=ii, reduction=reduction)
    assert x.grad is None and w.grad is None


def test_target_out_of_range_with_one_class(gen):
    x = torch.randn(4, 3, generator=gen)
    w = torch.randn(1, 3, generator=gen)
    with pytest.raises(ValueError, match=r"\btarget\b"):
        lce(x, w, torch.tensor([0, 0, 1, 0]))
    assert lce(x, w, torch.tensor([0, 0, 0, 0])).item() == 0.0


@pytest.mark.parametrize("C", [2, 17, 100])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_nan_logit_gives_nan_like_torch(C, smoothing, gen):
    """A NaN logit in one class (here a NaN bias entry) makes every row's loss NaN, as in torch: the
    vector exp must not clamp a NaN argument into a finite one."""
    x = torch.randn(5, 8, generator=gen, requires_grad=True)
    w = torch.randn(C, 8, generator=gen, requires_grad=True)
    b = torch.zeros(C)
    b[C // 2] = float("nan")
    t = torch.tensor([0, 1, 0, 1, 0])
    got = lce(x, w, t, b, label_smoothing=smoothing, reduction="none")
    ref = F.cross_entropy(F.linear(x, w, b), t, label_smoothing=smoothing, reduction="none")
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and bool(torch.isnan(ref).all())
    got.sum().backward()
    assert bool(torch.isnan(x.grad).all()) and bool(torch.isnan(w.grad).all())


# Where the spec names the argument but not the exception class, either TypeError or ValueError passes.
EITHER = (TypeError, ValueError)


def _bad_cases():
    x = torch.randn(4, 6)
    w = torch.randn(3, 6)
    b = torch.randn(3)
    t = torch.tensor([0, 2, 1, 1])
    return [
        # (id, positional args, keyword args, exception, argument name)
        ("list x", ([[1.0] * 6] * 4, w, t), {}, TypeError, "x"),
        ("None x", (None, w, t), {}, TypeError, "x"),
        ("float64 x", (x.double(), w.double(), t), {}, TypeError, "x"),
        ("int x", (x.long(), w, t), {}, TypeError, "x"),
        ("x 0-D", (torch.tensor(1.0), torch.randn(3, 1), torch.tensor(0)), {}, ValueError, "x"),
        ("str weight", (x, "w", t), {}, TypeError, "weight"),
        ("x/weight dtypes", (x, w.bfloat16(), t), {}, EITHER, "weight"),
        ("x/weight dtypes bf16/f16", (x.bfloat16(), w.half(), t), {}, EITHER, "weight"),
        ("float target", (x, w, t.float()), {}, TypeError, "target"),
        ("bool target", (x, w, t.bool()), {}, TypeError, "target"),
        ("list target", (x, w, [0, 2, 1, 1]), {}, TypeError, "target"),
        ("target too long", (x, w, torch.tensor([0, 2, 1, 1, 0])), {}, ValueError, "target"),
        ("target (N, 1)", (x, w, t[:, None]), {}, ValueError, "target"),
        ("target 0-D", (x, w, torch.tensor(1)), {}, ValueError, "target"),
        ("weight in-features", (x, torch.randn(3, 5), t), {}, ValueError, "weight"),
        ("weight 1-D", (x, torch.randn(6), t), {}, ValueError, "weight"),
        ("weight 3-D", (x, torch.randn(1, 3, 6), t), {}, ValueError, "weight"),
        ("bias shape", (x, w, t, torch.randn(4)), {}, ValueError, "bias"),
        ("bias 2-D", (x, w, t, torch.randn(1, 3)), {}, ValueError, "bias"),
        ("bias dtype", (x, w, t, b.half()), {}, EITHER, "bias"),
        ("class_weight length", (x, w, t), dict(class_weight=torch.ones(4)), ValueError, "class_weight"),
        ("class_weight 2-D", (x, w, t), dict(class_weight=torch.ones(1, 3)), ValueError, "class_weight"),
        ("class_weight float64", (x, w, t), dict(class_weight=torch.ones(3, dtype=torch.float64)),
         EITHER, "class_weight"),
        ("class_weight list", (x, w, t), dict(class_weight=[1.0, 1.0, 1.0]), TypeError, "class_weight"),
        ("reduction avg", (x, w, t), dict(reduction="avg"), ValueError, "reduction"),
        ("reduction None", (x, w, t), dict(reduction=None), EITHER, "reduction"),
        ("label_smoothing < 0", (x, w, t), dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        ("label_smoothing > 1", (x, w, t), dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        ("label_smoothing nan", (x, w, t), dict(label_smoothing=float("nan")), ValueError,
         "label_smoothing"),
        # torch reads True as 1.0 here; a flag passed where a number belongs is refused
        ("label_smoothing bool", (x, w, t), dict(label_smoothing=True), TypeError, "label_smoothing"),
        ("label_smoothing str", (x, w, t), dict(label_smoothing="0.1"), TypeError, "label_smoothing"),
        ("label_smoothing 1-D", (x, w, t), dict(label_smoothing=torch.tensor([0.1])), TypeError,
         "label_smoothing"),
        ("label_smoothing complex", (x, w, t), dict(label_smoothing=0.1 + 0j), TypeError, "label_smoothing"),
        ("ignore_index bool", (x, w, t), dict(ignore_index=True), TypeError, "ignore_index"),
        ("ignore_index bool tensor", (x, w, t), dict(ignore_index=torch.tensor(True)), TypeError,
         "ignore_index"),
        ("ignore_index float", (x, w, t), dict(ignore_index=1.0), TypeError, "ignore_index"),
        ("ignore_index float tensor", (x, w, t), dict(ignore_index=torch.tensor(1.0)), TypeError,
         "ignore_index"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_arguments(case):
    _, args, kwargs, exc, name = case
    with pytest.raises(exc, match=rf"\b{name}\b"):
        lce(*args, **kwargs)


# (argument, value): values torch's F.cross_entropy and nn.CrossEntropyLoss take or refuse alike
SCALAR_ARGS = [
    ("ignore_index", np.int64(2)), ("ignore_index", np.int32(2)), ("ignore_index", torch.tensor(2)),
    ("ignore_index", torch.tensor(2, dtype=torch.int32)), ("ignore_index", True), ("ignore_index", False),
    ("ignore_index", 2.0), ("ignore_index", np.float64(2.0)), ("ignore_index", np.bool_(True)),
    ("ignore_index", torch.tensor(2.0)), ("ignore_index", "2"),
    ("label_smoothing", np.float32(0.25)), ("label_smoothing", np.float64(0.25)),
    ("label_smoothing", torch.tensor(0.25)), ("label_smoothing", torch.tensor(0.25, dtype=torch.float64)),
    ("label_smoothing", np.int64(1)), ("label_smoothing", torch.tensor(0)), ("label_smoothing", 1),
    ("label_smoothing", 2.0), ("label_smoothing", np.float32(1.5)), ("label_smoothing", "0.25"),
    ("label_smoothing", None), ("label_smoothing", torch.tensor([0.25])),
]


def _arg_id(v):
    if isinstance(v, torch.Tensor):
        return f"tensor{list(v.shape)}({v.reshape(-1)[0].item()},{dtype_id(v.dtype)})"
    return v if isinstance(v, str) and v in ("ignore_index", "label_smoothing") else repr(v)


@pytest.mark.parametrize("name,value", SCALAR_ARGS, ids=_arg_id)
def test_scalar_arguments_like_torch(name, value, gen):
    """ignore_index and label_smoothing as torch takes them: what F.cross_entropy and nn.CrossEntropyLoss
    accept (NumPy scalars, integer or real 0-d tensors) gives their loss, in the functional and in the
    module; what they refuse (a bool or a float for an int, a string, a label_smoothing outside [0, 1])
    is refused, as TypeError or ValueError naming the argument (the module: when it is built)."""
    N, D, C = 12, 6, 4
    x = randn((N, D), torch.float32, gen)
    t = make_target((N,), C, gen, 2, ignore_every=3)
    lin = torch.nn.Linear(D, C)
    try:
        ref = F.cross_entropy(lin(x), t, **{name: value})
        ref_module = torch.nn.CrossEntropyLoss(**{name: value})(lin(x), t)
    except (TypeError, RuntimeError):
        ref = None
    if ref is None:
        with pytest.raises((TypeError, ValueError), match=name):
            lce(x, lin.weight, t, lin.bias, **{name: value})
        with pytest.raises((TypeError, ValueError), match=name):
            LinearCrossEntropy(D, C, **{name: value})
        with pytest.raises((TypeError, ValueError), match=name):
            LinearCrossEntropy.from_linear(lin, **{name: value})
        return
    plain = int(value) if name == "ignore_index" else float(value)
    got = lce(x, lin.weight, t, lin.bias, **{name: value})
    assert torch.equal(got, lce(x, lin.weight, t, lin.bias, **{name: plain}))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for m in (LinearCrossEntropy.from_linear(lin, **{name: value}),
              LinearCrossEntropy(D, C, **{name: value})):
        stored = getattr(m, name)
        assert type(stored) is type(plain) and stored == plain
        m.load_state_dict(lin.state_dict())
        torch.testing.assert_close(m(x, t), ref_module, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_module_checks_options_when_built():
    """A bad option fails when the head is built, naming it, not at its first forward."""
    cases = [
        (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(num_classes=-3), ValueError, "num_classes"),
        (dict(num_classes=5.0), TypeError, "num_classes"),
        (dict(num_classes=True), TypeError, "num_classes"),
        (dict(in_features=-1), ValueError, "in_features"),
        (dict(ignore_index=True), TypeError, "ignore_index"),
        (dict(ignore_index=-1.5), TypeError, "ignore_index"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(reduction=None), ValueError, "reduction"),
        (dict(class_weight=[1.0, 2.0]), ValueError, "class_weight"),
    ]
    for changes, exc, word in cases:
        args = {"in_features": 8, "num_classes": 5, **changes}
        with pytest.raises(exc, match=word):
            LinearCrossEntropy(args.pop("in_features"), args.pop("num_classes"), **args)
    lin = torch.nn.Linear(8, 5)
    for changes, exc, word in cases:
        if "num_classes" in changes or "in_features" in changes:
            continue
        with pytest.raises(exc, match=word):
            LinearCrossEntropy.from_linear(lin, **changes)
    with pytest.raises(ValueError, match="num_classes"):
        LinearCrossEntropy.from_linear(torch.nn.Linear(8, 0))
    with pytest.raises(TypeError, match="unexpected options: bias"):
        LinearCrossEntropy.from_linear(lin, bias=False)
    # in_features = 0 stays allowed, as nn.Linear allows it
    assert LinearCrossEntropy(0, 3).weight.shape == (3, 0)


# ---- nn.LinearCrossEntropy ------------------------------------------------------------------------------

def test_module_parameters_and_init():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = LinearCrossEntropy(200, 300)
        m_nb = LinearCrossEntropy(200, 3, bias=False)
        m_bf = LinearCrossEntropy(8, 5, dtype=torch.bfloat16, device="cpu")
    assert isinstance(m.weight, torch.nn.Parameter) and m.weight.shape == (300, 200)
    assert isinstance(m.bias, torch.nn.Parameter) and m.bias.shape == (300,)
    assert m_nb.bias is None and [n for n, _ in m_nb.named_parameters()] == ["weight"]
    assert m_bf.weight.dtype == torch.bfloat16 and m_bf.bias.dtype == torch.bfloat16
    assert {n for n, _ in m.named_parameters()} == {"weight", "bias"}
    # nn.Linear's init: weight and bias uniform in +-1/sqrt(in_features)
    bound = 1 / math.sqrt(200)
    for p in (m.weight, m.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert abs(m.weight.mean().item()) < 0.01 * bound
    assert abs(m.bias.std().item() - bound / math.sqrt(3)) < 0.15 * bound
    meta = LinearCrossEntropy(4, 3, device="meta")
    assert meta.weight.device.type == "meta"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_module_forward_logits_predict(dtype, gen):
    D, C = 20, 9
    cw = make_class_weight(C, torch.float32, dtype, gen)
    opts = dict(ignore_index=2, label_smoothing=0.15, class_weight=cw, reduction="sum")
    m = LinearCrossEntropy(D, C, dtype=dtype, **opts)
    x = randn((3, 11, D), dtype, gen)
    t = make_target((3, 11), C, gen, 2, ignore_every=4)
    loss = m(x, t)
    assert torch.equal(loss, lce(x, m.weight, t, m.bias, **opts))
    ref, *_ = torch_head(x, m.weight, m.bias, t, cw, torch.float64, ignore_index=2, label_smoothing=0.15,
                         reduction="sum")
    assert_head_close(loss, ref, dtype, what="module loss")
    z = m.logits(x)
    assert z.shape == (3, 11, C) and z.dtype == dtype
    assert_close(z, F.linear(x.double(), m.weight.double(), m.bias.double()), dtype,
                 torch_out=F.linear(x, m.weight, m.bias), what="logits")
    p = m.predict(x)
    assert p.shape == (3, 11) and p.dtype == torch.int64
    assert torch.equal(p, z.argmax(-1))
    # options default to the functional's
    m2 = LinearCrossEntropy(D, C, bias=False, dtype=dtype)
    assert torch.equal(m2(x, t), lce(x, m2.weight, t))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_module_from_linear_shares_parameters(bias, gen):
    lin = torch.nn.Linear(10, 4, bias=bias)
    cw = torch.tensor([1.0, 2.0, 0.5, 1.0])
    m = LinearCrossEntropy.from_linear(lin, label_smoothing=0.1, ignore_index=3, class_weight=cw,
                                       reduction="none")
    assert m.weight is lin.weight and (m.bias is lin.bias if bias else m.bias is None)
    assert sorted(map(id, m.parameters())) == sorted(map(id, lin.parameters()))
    x = torch.randn(12, 10, generator=gen)
    t = make_target((12,), 4, gen, 3, ignore_every=4)
    loss = m(x, t)
    assert loss.shape == (12,)
    assert torch.equal(loss, lce(x, lin.weight, t, lin.bias, label_smoothing=0.1, ignore_index=3,
                                 class_weight=cw, reduction="none"))
    # training the head updates the nn.Linear, and training the nn.Linear changes the head
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    before = lin.weight.detach().clone()
    loss.sum().backward()
    opt.step()
    assert not torch.equal(lin.weight.detach(), before)
    with torch.no_grad():
        lin.weight.mul_(2.0)
    assert_close(m.logits(x), F.linear(x.double(), lin.weight.double(), None if lin.bias is None else
                                       lin.bias.double()), torch.float32, what="logits after the change")


def test_module_from_low_precision_linear(gen):
    lin = torch.nn.Linear(16, 5, dtype=torch.bfloat16)
    m = LinearCrossEntropy.from_linear(lin)
    assert m.weight is lin.weight and m.weight.dtype == torch.bfloat16
    x = randn((6, 16), torch.bfloat16, gen)
    t = make_target((6,), 5, gen)
    assert m(x, t).dtype == torch.bfloat16


def _separable(N, D, C, gen):
    centers = torch.randn(C, D, generator=gen) * 2.0
    y = torch.randint(0, C, (N,), generator=gen)
    return centers[y] + 0.5 * torch.randn(N, D, generator=gen), y


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_module_training_matches_torch(opt_name, gen):
    """A few steps of SGD (momentum) / AdamW: the loss falls, and the parameters follow nn.Linear +
    nn.CrossEntropyLoss's trajectory from the same initial weights."""
    N, D, C, steps = 256, 16, 5, 20
    x, y = _separable(N, D, C, gen)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        lin = torch.nn.Linear(D, C)
    ref = copy.deepcopy(lin)
    m = LinearCrossEntropy.from_linear(lin, label_smoothing=0.05)
    ce = torch.nn.CrossEntropyLoss(label_smoothing=0.05)

    def make(params):
        if opt_name == "sgd":
            return torch.optim.SGD(params, lr=0.05, momentum=0.9)
        return torch.optim.AdamW(params, lr=0.02, weight_decay=0.01)

    opt, opt_ref = make(m.parameters()), make(ref.parameters())
    losses = []
    for step in range(steps):
        opt.zero_grad()
        loss = m(x, y)
        loss.backward()
        opt.step()
        opt_ref.zero_grad()
        loss_ref = ce(ref(x), y)
        loss_ref.backward()
        opt_ref.step()
        losses.append(loss.item())
        assert abs(loss.item() - loss_ref.item()) <= 1e-4 * abs(loss_ref.item()), (step, loss, loss_ref)
        for p, q in ((m.weight, ref.weight), (m.bias, ref.bias)):
            d = (p - q).abs().max().item() / q.abs().max().item()
            assert d <= 1e-4, f"step {step}: parameters drifted from torch's by {d:.3g}"
    assert losses[-1] < 0.3 * losses[0], losses
    assert (m.predict(x) == y).float().mean() > 0.95


# ---- memory: rows in chunks, never the N x C logits ----------------------------------------------------

_MEM_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    import tltorch.functional
    N, D, C = 4096, 64, 30000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    w = (torch.randn(C, D, generator=g) / 8).requires_grad_()
    b = torch.zeros(C, requires_grad=True)
    t = torch.randint(0, C, (N,), generator=g)
    if sys.argv[1] == "fused":
        loss = tltorch.functional.linear_cross_entropy(x, w, t, b)
    else:
        loss = F.cross_entropy(F.linear(x, w, b), t)
    loss.backward()
    assert torch.isfinite(loss) and w.grad is not None and x.grad is not None
    # VmHWM: this process image's own peak. (ru_maxrss would not do: Linux carries it across exec, so a
    # child of a large pytest process would report its parent's size.)
    print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
""")


def _peak_rss_kib(which):
    # One thread: peak memory does not depend on it, and the run time then does not depend on what else
    # the machine is doing.
    r = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, which], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.environ.get("TLTORCH_SANITIZED") == "1",
                    reason="AddressSanitizer's quarantine keeps freed memory: RSS says nothing there")
def test_peak_memory_far_below_logits():
    """N=4096, D=64, C=30000: the logits alone are 491 MB in float32. The fused head's process must
    peak below 60% of what torch's eager F.linear + F.cross_entropy process reaches."""
    fused = _peak_rss_kib("fused")
    eager = _peak_rss_kib("eager")
    assert fused < 0.6 * eager, f"peak RSS: fused {fused / 1024:.0f} MiB, eager {eager / 1024:.0f} MiB"


def test_class_weight_of_another_float_dtype_is_converted(gen):
    """class_weight in a float dtype other than float32 and x's (float16 weights for a bfloat16 head) is
    taken as float32, where torch would refuse the mix: the loss equals the one with float32 weights."""
    x = randn((9, 7), torch.bfloat16, gen)
    w = randn((5, 7), torch.bfloat16, gen)
    t = make_target((9,), 5, gen)
    cw = torch.rand(5, generator=gen) + 0.5
    a = lce(x, w, t, class_weight=cw.half())
    b = lce(x, w, t, class_weight=cw.half().float())
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_targets_aliased_by_the_loss_output_cannot_go_out_of_bounds():
    """The kernel validates the targets once and then uses a private copy: writing row i's loss into
    memory that is also target[i+1] (aliasing) must neither crash nor change which classes are used."""
    from tltorch import _C
    buf = torch.zeros(5)
    loss, target = buf[1:], buf[:4].view(torch.int32)  # loss[i] is target[i + 1]
    x, w = torch.randn(4, 8), torch.randn(4, 8)
    ref = torch.nn.functional.cross_entropy(x.double() @ w.double().t(), torch.zeros(4, dtype=torch.long),
                                            reduction="none")
    _C.linear_xent(x, w, None, target, None, -100, 0.0, 2, None, loss, None, None, None, None, 1)
    # every row used its validated class (0), whatever was written after (float64 reference: a float32
    # one is itself off by up to ~1e-3 relative on a confident row's small loss)
    assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=0)


def test_zero_features_with_gradients():
    x = torch.empty(5, 0, requires_grad=True)
    w = torch.empty(4, 0, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 1])
    loss = lce(x, w, t)
    loss.backward()
    assert torch.allclose(loss, torch.tensor(math.log(4.0)))
    assert x.grad.shape == (5, 0) and w.grad.shape == (4, 0)
