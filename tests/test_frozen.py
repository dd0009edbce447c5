"""tltorch.nn.FrozenLinear, tltorch._C.qgemm (a GEMM reading a stored weight) and tltorch.freeze.

FrozenLinear's outputs and input gradients are checked against float64 references built from its own
dequantized weight (the kernel's error only), and separately against the original float weight (the
storage's rounding, with a tolerance per storage).
"""
import copy
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import tltorch
from conftest import (DTYPES, LOW_PRECISION, assert_close, assert_rounded_once, dtype_id, empty2d,
                      make2d, names_arg, randn, rel_err)
from tltorch import _C
from tltorch.nn import FrozenLinear
from tltorch.ops.frozen import bf16_native

KC = _C.GEMM_KC
NAN = float("nan")
STORAGES = ("float32", "bfloat16", "float16", "int8")
# Relative Frobenius error of y = x W^T + b against the original float32 W, from storing W alone (x float32):
# bfloat16 and float16 round each weight by at most 2^-9 and 2^-12 of it (rms about a third of that);
# int8 rounds by at most absmax/254 per row (rms about 1/150 of a Gaussian row's).
STORAGE_TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-3, "int8": 2e-2}


def fro_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def make_linear(in_f, out_f, bias, gen, dtype=torch.float32):
    with warnings.catch_warnings():  # torch warns that initialising an empty weight is a no-op
        warnings.simplefilter("ignore")
        lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(randn((out_f, in_f), dtype, gen, scale=in_f ** -0.5 if in_f else 1.0))
        if bias:
            lin.bias.copy_(randn((out_f,), dtype, gen))
    return lin


def make_x(lead, k, layout, dtype, gen):
    """x of shape (*lead, k) in `layout`: contiguous, features slowest ("t", a permuted view), every
    other feature ("stride2"), or rows sliced from a larger buffer ("offset")."""
    shape = (*lead, k)
    if layout == "contig":
        return randn(shape, dtype, gen)
    if layout == "t":
        t = randn(shape[::-1], dtype, gen)
        return t.permute(*range(t.dim() - 1, -1, -1))
    if layout == "stride2":
        return randn((*lead, 2 * k), dtype, gen)[..., ::2]
    if layout == "offset":
        if not lead:
            return randn((k + 3,), dtype, gen)[3:]
        return randn((lead[0] + 2, *lead[1:], k), dtype, gen)[2:]
    raise AssertionError(layout)


def ref_linear(x, w64, bias):
    r = x.double() @ w64.t()
    return r if bias is None else r + bias.double()


def layer_bias(m, xdtype):
    """The bias m adds for x of `xdtype`: rounded to bfloat16 where bfloat16 x on a bfloat16 weight runs
    as nn.Linear in bfloat16 (torch's GEMM, on CPUs with AVX512-BF16), m.bias otherwise."""
    routed = m.storage == "bfloat16" and xdtype is torch.bfloat16 and bf16_native()
    return m.bias.to(torch.bfloat16) if routed and m.bias is not None else m.bias


# (leading dims of x, in_features, out_features, layout of x, bias): 1-D/2-D/3-D x in every layout, odd
# sizes, K over one and two GEMM blocks, no rows, no output features.
CASES = [((), 7, 5, "contig", True), ((), 12, 3, "stride2", False), ((9,), 33, 17, "t", True),
         ((9,), 33, 17, "offset", False), ((3, 5), 19, 1, "stride2", True), ((3, 5), 19, 4, "t", False),
         ((13,), KC + 37, 23, "stride2", False), ((2, 3), 2 * KC + 5, 6, "t", True),
         ((0,), 11, 6, "contig", True), ((4,), 9, 0, "offset", True), ((2, 0), 5, 3, "t", False)]


def case_id(c):
    lead, k, n, layout, bias = c
    return "x".join(map(str, (*lead, k))) + f"-{n}-{layout}" + ("-bias" if bias else "")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("xdtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("storage", STORAGES)
def test_frozen_linear_matches_reference(storage, xdtype, case, gen):
    lead, k, n, layout, bias = case
    # float activations: x (W*s)^T exactly (int8 activations: tests/test_int8_linear.py)
    m = FrozenLinear.from_linear(make_linear(k, n, bias, gen), storage, activations="float")
    w64 = m.dequantized_weight(torch.float64)
    x = make_x(lead, k, layout, xdtype, gen).requires_grad_()
    y = m(x)
    assert y.dtype == xdtype and y.shape == (*lead, n)
    ref = ref_linear(x, w64, layer_bias(m, xdtype))
    what = f"{storage} x {dtype_id(xdtype)} {case_id(case)}"
    assert_close(y, ref, xdtype, what=what)
    if xdtype in LOW_PRECISION and y.numel():
        assert_rounded_once(y, ref, xdtype, what=what)

    g = randn(y.shape, xdtype, gen)
    y.backward(g)
    assert x.grad.shape == x.shape and x.grad.dtype == xdtype
    assert_close(x.grad, g.double() @ w64, xdtype, what="dx " + what)
    assert all(t.grad is None for t in m.buffers())


@pytest.mark.parametrize("storage", STORAGES)
def test_frozen_linear_vs_original_weight(storage, gen):
    lin = make_linear(KC + 61, 48, True, gen)
    m = FrozenLinear.from_linear(lin, storage, group=None)  # group scales: tests/test_int8_linear.py
    x = randn((3, 7, KC + 61), torch.float32, gen)
    err = fro_err(m(x), ref_linear(x, lin.weight.double(), lin.bias))
    assert err <= STORAGE_TOL[storage], f"{storage}: relative error {err:.3g}"
    w = lin.weight.detach()
    wq = m.dequantized_weight()
    if storage == "int8":
        # per output channel: absmax / 127, the absmax itself kept exactly, every weight within half a step
        absmax = w.abs().amax(dim=1)
        torch.testing.assert_close(m.weight_scale, absmax / 127, rtol=1e-6, atol=0)
        assert m.weight.abs().amax(dim=1).eq(127).all()
        assert ((wq - w).abs() <= 0.5 * m.weight_scale[:, None] * (1 + 1e-5)).all()
    else:
        assert m.weight_scale is None and m.weight.dtype == getattr(torch, storage)
        assert torch.equal(wq, w.to(getattr(torch, storage)).float())


@pytest.mark.parametrize("storage", STORAGES)
def test_frozen_linear_from_half_linear(storage, gen):
    lin = make_linear(21, 9, True, gen, dtype=torch.bfloat16)
    m = FrozenLinear.from_linear(lin, storage)
    x = randn((5, 21), torch.bfloat16, gen)
    err = fro_err(m(x), ref_linear(x, lin.weight.double(), lin.bias))
    assert err <= max(STORAGE_TOL[storage], 1e-2), f"{storage}: relative error {err:.3g}"


@pytest.mark.parametrize("storage", STORAGES)
def test_frozen_linear_no_input_features(storage, gen):
    """nn.Linear(0, n) is valid torch: y is the bias (or zeros)."""
    m = FrozenLinear.from_linear(make_linear(0, 4, True, gen), storage)
    x = torch.empty(3, 0, requires_grad=True)
    y = m(x)
    assert torch.equal(y, m.bias.expand(3, 4))
    y.sum().backward()
    assert x.grad.shape == (3, 0)


@pytest.mark.parametrize("storage", STORAGES)
def test_no_weight_gradient_and_upstream_learns(storage, gen):
    frozen = FrozenLinear.from_linear(make_linear(13, 6, True, gen), storage, activations="float")
    assert list(frozen.parameters()) == []
    assert not any(t.requires_grad for t in frozen.buffers())
    first = make_linear(7, 13, True, gen)
    net = nn.Sequential(first, nn.Tanh(), frozen)
    x = randn((11, 7), torch.float32, gen)
    net(x).square().sum().backward()
    # the same network in float64 with the frozen layer's weight as a constant
    ref_first = copy.deepcopy(first).double()
    w64 = frozen.dequantized_weight(torch.float64)
    ref_linear(torch.tanh(ref_first(x.double())), w64, frozen.bias).square().sum().backward()
    assert_close(first.weight.grad, ref_first.weight.grad, torch.float32, what="upstream dweight")
    assert_close(first.bias.grad, ref_first.bias.grad, torch.float32, what="upstream dbias")
    assert all(t.grad is None for t in frozen.buffers())


def test_weight_asking_for_grad_gets_none(gen):
    m = FrozenLinear.from_linear(make_linear(8, 5, True, gen), "bfloat16")
    m.weight.requires_grad_(True)
    x = randn((4, 8), torch.float32, gen).requires_grad_()
    m(x).sum().backward()
    assert x.grad is not None and m.weight.grad is None


def test_weight_bytes():
    lin = nn.Linear(768, 3072)
    f32 = lin.weight.numel() * 4
    # int8: a byte a weight, plus a float32 scale a channel (None) or a channel and group of 32 inputs
    for storage, group, most in (("int8", None, 0.26), ("int8", 32, 0.25 + 1 / 32 + 1e-3), ("bfloat16", None, 0.5),
                                 ("float16", None, 0.5), ("float32", None, 1.0)):
        m = FrozenLinear.from_linear(lin, storage, group=group)
        stored = sum(t.numel() * t.element_size() for name, t in m.named_buffers() if name != "bias")
        assert m.weight_bytes() == stored
        assert m.weight_bytes() <= most * f32, f"{storage}: {m.weight_bytes() / f32:.4f} of float32"


@pytest.mark.parametrize("storage", STORAGES)
def test_all_zero_weight_row(storage, gen):
    lin = make_linear(37, 5, True, gen)
    with torch.no_grad():
        lin.weight[3] = 0
    m = FrozenLinear.from_linear(lin, storage, activations="float")
    if storage == "int8":
        assert torch.isfinite(m.weight_scale).all() and (m.weight_scale > 0).all()
        assert not m.weight[3].any()
    assert not m.dequantized_weight()[3].any()
    x = randn((6, 37), torch.float32, gen)
    y = m(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 3], m.bias[3].expand(6))
    assert_close(y, ref_linear(x, m.dequantized_weight(torch.float64), m.bias), torch.float32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("storage", STORAGES)
def test_state_dict_round_trip(storage, bias, gen):
    m = FrozenLinear.from_linear(make_linear(19, 7, bias, gen), storage)
    fresh = FrozenLinear(19, 7, bias=bias, storage=storage)
    x = randn((4, 19), torch.float32, gen)
    assert not torch.equal(fresh(x), m(x))
    sd = m.state_dict()
    assert set(sd) == {"weight"} | ({"weight_scale"} if storage == "int8" else set()) | ({"bias"} if bias else set())
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), m(x))
    assert fresh.weight.dtype == m.weight.dtype


@pytest.mark.parametrize("group", [None, 32])
def test_int8_state_dict_round_trip_keeps_group_scales(group, gen):
    m = FrozenLinear.from_linear(make_linear(70, 7, True, gen), "int8", group=group)
    sd = m.state_dict()
    assert sd["weight_scale"].shape == ((7,) if group is None else (7, 3))
    fresh = FrozenLinear(70, 7, storage="int8", group=group)
    fresh.load_state_dict(sd)
    x = randn((4, 70), torch.float32, gen)
    assert torch.equal(fresh(x), m(x)) and torch.equal(fresh.dequantized_weight(), m.dequantized_weight())
    if group is not None:
        with pytest.raises(RuntimeError, match="weight_scale"):  # group scales do not fit a per-channel layer
            FrozenLinear(70, 7, storage="int8", group=None).load_state_dict(sd)


@pytest.mark.parametrize("storage", ["int8", "bfloat16"])
def test_opcheck(storage, gen):
    m = FrozenLinear.from_linear(make_linear(10, 6, True, gen), storage, group=None)  # qgemm: per-channel scales
    x = randn((2, 3, 10), torch.float32, gen).requires_grad_()
    torch.library.opcheck(torch.ops.tltorch.frozen_linear.default, (x, m.weight, m.weight_scale, m.bias))
    torch.library.opcheck(torch.ops.tltorch.frozen_linear.default, (x.detach(), m.weight, m.weight_scale, None))
    g = randn((2, 3, 6), torch.float32, gen)
    torch.library.opcheck(torch.ops.tltorch.frozen_linear_backward.default, (g, m.weight, m.weight_scale))


def test_torch_compile_fullgraph(gen):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = make_linear(12, 20, True, gen)
            self.frozen = FrozenLinear.from_linear(make_linear(20, 9, True, gen), "int8")

        def forward(self, x):
            return self.frozen(torch.relu(self.lin(x)))

    net = Net()
    twin = copy.deepcopy(net)
    x = randn((3, 4, 12), torch.float32, gen)
    torch._dynamo.reset()
    y = torch.compile(net, backend="aot_eager", fullgraph=True)(x)
    y_eager = twin(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    g = randn(y.shape, torch.float32, gen)
    y.backward(g)
    y_eager.backward(g)
    torch.testing.assert_close(net.lin.weight.grad, twin.lin.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.lin.bias.grad, twin.lin.bias.grad, rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_x():
    m = FrozenLinear(5, 3, storage="int8")
    cases = [(torch.randn(4, 5, dtype=torch.float64), TypeError), (torch.randn(4, 6), ValueError),
             (torch.ones(4, 5, dtype=torch.int32), TypeError), ([[0.0] * 5], TypeError),
             (torch.tensor(1.0), ValueError)]
    for x, exc in cases:
        with pytest.raises(exc, match=r"\bx\b"):
            m(x)


def test_bad_construction():
    with pytest.raises(ValueError, match="storage"):
        FrozenLinear(4, 3, storage="int4")
    with pytest.raises(TypeError, match="nn.Linear"):
        FrozenLinear.from_linear(nn.Conv1d(3, 3, 1), "int8")


# ---- qgemm: c = op(a) @ (op(b) * scale along axis) + bias ------------------------------------------------

def ws_for(c, K):
    if c.dtype != torch.float32 and K > KC and c.numel():
        return torch.empty(c.numel(), dtype=torch.float32).fill_(NAN)
    return None


def operand(rows, cols, dtype, transposed, gen):
    """A (rows, cols) operand passed either as is or stored transposed (with trans set to read it back)."""
    if dtype is torch.int8:
        t = torch.randint(-127, 128, (cols, rows) if transposed else (rows, cols), generator=gen,
                          dtype=torch.int8)
    else:
        t = randn((cols, rows) if transposed else (rows, cols), dtype, gen)
    return t, (t.t() if transposed else t)


# (M, K, N, trans): each transposition, K over one GEMM block, empty M, K and N.
QCASES = [(7, 33, 19, 0), (7, 33, 19, 1), (7, 33, 19, 2), (7, 33, 19, 3), (5, KC + 9, 13, 2), (5, KC + 9, 13, 1),
          (0, 7, 5, 3), (6, 0, 5, 0), (4, 9, 0, 2)]


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("adtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", QCASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-trans{c[3]}")
def test_qgemm_int8_scale_axes(case, adtype, axis, gen):
    M, K, N, trans = case
    a, a_op = operand(M, K, adtype, trans & 1, gen)
    b, b_op = operand(K, N, torch.int8, trans & 2, gen)
    scale = torch.rand(K if axis == 0 else N, generator=gen) / 64 + 1e-3
    bias = randn((N,), torch.float32, gen)
    c = empty2d(M, N, "contig", adtype)
    _C.qgemm(a, b, scale, axis, c, bias, ws_for(c, K), torch.get_num_threads(), trans)
    b64 = b_op.double() * (scale.double()[:, None] if axis == 0 else scale.double()[None, :])
    ref = a_op.double() @ b64 + bias.double()
    assert_close(c, ref, adtype, what=f"qgemm int8 axis {axis} trans {trans}")


@pytest.mark.parametrize("cdtype", ["a", "float32"])
@pytest.mark.parametrize("bdtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("adtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(9, 21, 14), (3, 2 * KC + 1, 7)], ids=lambda s: "x".join(map(str, s)))
def test_qgemm_mixed_float(shape, adtype, bdtype, cdtype, gen):
    """A float weight of another dtype than x (bfloat16 weight, float32 x: no float32 copy of it)."""
    M, K, N = shape
    a = make2d(M, K, "stride2", adtype, gen)
    b = make2d(N, K, "contig", bdtype, gen)  # W (out, in), read as W^T
    cd = adtype if cdtype == "a" else torch.float32
    c = empty2d(M, N, "contig", cd)
    bias = randn((N,), cd, gen)
    _C.qgemm(a, b, None, 1, c, bias, ws_for(c, K), torch.get_num_threads(), 2)
    ref = a.double() @ b.double().t() + bias.double()
    assert_close(c, ref, cd, what=f"qgemm {dtype_id(adtype)} x {dtype_id(bdtype)} -> {dtype_id(cd)}")


@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_qgemm_half_scale(sdtype, gen):
    a = randn((6, 10), torch.float32, gen)
    b = torch.randint(-127, 128, (10, 4), generator=gen, dtype=torch.int8)
    scale = (torch.rand(4, generator=gen) + 0.5).to(sdtype)
    c = empty2d(6, 4, "contig", torch.float32)
    _C.qgemm(a, b, scale, 1, c, None, None, 1, 0)
    assert_close(c, a.double() @ (b.double() * scale.double()), torch.float32)


def test_qgemm_bad_arguments():
    a = torch.randn(3, 8)
    b = torch.randint(-127, 128, (8, 5), dtype=torch.int8)
    s = torch.rand(5)
    c = torch.empty(3, 5)
    good = [a, b, s, 1, c, None, None, 1, 0]

    def call(**changes):
        args = list(good)
        names = ["a", "b", "scale", "axis", "c", "bias", "ws", "nthreads", "trans"]
        for k, v in changes.items():
            args[names.index(k)] = v
        _C.qgemm(*args)

    call()  # the baseline is accepted
    for changes, exc, name in [
        (dict(scale=None), TypeError, "b"),                          # int8 without its scale
        (dict(scale=torch.rand(4)), ValueError, "scale"),            # one scale per column of b
        (dict(axis=0), ValueError, "scale"),                         # axis 0 wants one per row (8)
        (dict(axis=2), ValueError, "axis"),
        (dict(axis=-1), ValueError, "axis"),
        (dict(trans=4), ValueError, "trans"),
        (dict(scale=torch.rand(1, 5)), ValueError, "scale"),
        (dict(scale=torch.ones(5, dtype=torch.int32)), TypeError, "scale"),
        (dict(a=torch.ones(3, 8, dtype=torch.int8)), TypeError, "a"),
        (dict(b=torch.ones(8, 5, dtype=torch.int32)), TypeError, "b"),
        (dict(b=b[:7]), ValueError, "b"),
        (dict(c=torch.empty(3, 4)), ValueError, "c"),
        (dict(c=torch.empty(3, 5, dtype=torch.float16)), TypeError, "c"),
        (dict(bias=torch.rand(4)), ValueError, "bias"),
    ]:
        with pytest.raises(exc) as ei:
            call(**changes)
        names_arg(ei, name)
    # a bfloat16 result over several K blocks needs the float32 workspace
    a2, b2 = torch.randn(2, KC + 1, dtype=torch.bfloat16), torch.randn(KC + 1, 3, dtype=torch.bfloat16)
    with pytest.raises(ValueError) as ei:
        _C.qgemm(a2, b2, None, 1, torch.empty(2, 3, dtype=torch.bfloat16), None, None, 1, 0)
    names_arg(ei, "ws")
    with pytest.raises(TypeError, match="qgemm"):
        _C.qgemm(*good[:8])


# ---- freeze -----------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.BatchNorm1d(d)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return x + self.drop(torch.relu(self.norm(self.fc(x))))


class Net(nn.Module):
    def __init__(self, d=8, classes=3):
        super().__init__()
        self.stem = nn.Linear(5, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(3)])
        self.classifier = nn.Sequential(nn.Dropout(0.3), nn.Linear(d, classes))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


def make_net(gen):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (), generator=gen)))
    net = Net()
    with torch.no_grad():  # pretrained-looking BatchNorm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def params_under(model, *prefixes):
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize("except_,kept", [
    ((), ()),
    ("classifier", ("classifier.",)),
    (["classifier", "blocks.1"], ("classifier.", "blocks.1.")),
    ("blocks.1.fc", ("blocks.1.fc.",)),
    ("blocks.*", ("blocks.",)),
    ("*.norm", ("blocks.0.norm.", "blocks.1.norm.", "blocks.2.norm.")),
    ("blocks.[02]", ("blocks.0.", "blocks.2.")),  # a glob naming modules keeps their whole subtrees
    (("stem", "classifier.1"), ("stem.", "classifier.1.")),
], ids=str)
def test_freeze_leaves_only_except_trainable(except_, kept, gen):
    net = make_net(gen)
    assert trainable(net) == {n for n, _ in net.named_parameters()}
    assert tltorch.freeze(net, except_=except_) is net
    assert trainable(net) == params_under(net, *kept)


def test_frozen_modules_stay_in_eval(gen):
    net = make_net(gen)
    x = randn((16, 5), torch.float32, gen)
    expected = copy.deepcopy(net).eval()(x)
    tltorch.freeze(net, except_="classifier.1")
    stats = {n: b.clone() for n, b in net.named_buffers()}
    net.train()
    y1, y2 = net(x), net(x)
    # dropout off (the classifier's too: only its Linear is trainable), BatchNorm on its running statistics
    torch.testing.assert_close(y1, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(y1, y2)
    for n, b in net.named_buffers():
        assert torch.equal(b, stats[n]), f"{n} changed in train mode"
    for name, m in net.named_modules():
        if name.startswith(("stem", "blocks.", "classifier.0")):  # (ModuleList has no forward)
            assert not m.training, f"{name} is in train mode"
    assert net.classifier[1].training


def test_except_modules_switch_to_train(gen):
    net = make_net(gen)
    tltorch.freeze(net, except_="blocks.1")
    before0 = net.blocks[0].norm.running_mean.clone()
    before1 = net.blocks[1].norm.running_mean.clone()
    net.train()
    x = randn((16, 5), torch.float32, gen)
    net(x)
    assert net.blocks[1].training and net.blocks[1].norm.training and net.blocks[1].drop.training
    assert not net.blocks[0].norm.training and not net.blocks[2].drop.training
    assert not torch.equal(net.blocks[1].norm.running_mean, before1)
    assert torch.equal(net.blocks[0].norm.running_mean, before0)
    net.eval()
    assert not net.blocks[1].training


@pytest.mark.parametrize("storage", ["bfloat16", "float16", "int8"])
def test_freeze_storage_replaces_frozen_linears(storage, gen):
    net = make_net(gen)
    x = randn((10, 5), torch.float32, gen)
    ref = copy.deepcopy(net).eval()(x)
    classifier_linear = net.classifier[1]
    tltorch.freeze(net, except_="classifier.1", storage=storage)
    assert isinstance(net.stem, FrozenLinear) and net.stem.storage == storage
    assert all(isinstance(b.fc, FrozenLinear) for b in net.blocks)
    assert net.classifier[1] is classifier_linear and classifier_linear.weight.requires_grad
    assert trainable(net) == params_under(net, "classifier.1.")
    net.train()
    y = net(x)
    err = fro_err(y, ref)
    assert err <= STORAGE_TOL[storage], f"{storage}: {err:.3g}"
    y.square().sum().backward()
    assert classifier_linear.weight.grad is not None


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_gradient_flows_through_frozen_linears(storage, gen):
    """A trainable layer below FrozenLinear layers receives the gradient of the network as it computes."""
    orig = make_net(gen)
    net = tltorch.freeze(copy.deepcopy(orig), except_="stem", storage=storage, activations="float")
    assert isinstance(net.stem, nn.Linear) and not isinstance(net.stem, FrozenLinear)
    x = randn((12, 5), torch.float32, gen)
    net.train()
    net(x).square().sum().backward()
    # the reference: the original network holding the dequantized weights, in float64, eval mode
    ref = copy.deepcopy(orig)
    with torch.no_grad():
        for block, rblock in zip(net.blocks, ref.blocks):
            rblock.fc.weight.copy_(block.fc.dequantized_weight())
        ref.classifier[1].weight.copy_(net.classifier[1].dequantized_weight())
    ref = ref.double().eval()
    torch.testing.assert_close(ref(x.double()), net(x).double(), rtol=0, atol=1e-4)
    ref(x.double()).square().sum().backward()
    err = rel_err(net.stem.weight.grad, ref.stem.weight.grad)
    assert err <= 1e-4, f"stem dweight relative error {err:.3g}"
    assert rel_err(net.stem.bias.grad, ref.stem.bias.grad) <= 1e-4


def test_freeze_bad_arguments(gen):
    net = make_net(gen)
    with pytest.raises(ValueError, match="head"):
        tltorch.freeze(net, except_="head")
    with pytest.raises(ValueError, match="blocks.7"):
        tltorch.freeze(net, except_=["classifier", "blocks.7"])
    for storage in ("int4", "float32", "fp16"):
        with pytest.raises(ValueError, match="storage"):
            tltorch.freeze(net, storage=storage)
    with pytest.raises(TypeError, match="except_"):
        tltorch.freeze(net, except_=[1])
    with pytest.raises(TypeError, match="model"):
        tltorch.freeze("net")
    # a rejected call changed nothing
    assert trainable(net) == {n for n, _ in net.named_parameters()}


@pytest.mark.parametrize("first, second", [("int8", "bfloat16"), ("bfloat16", "int8"), ("bfloat16", "float16")])
def test_freeze_again_with_another_storage_is_refused(first, second, gen):
    net = tltorch.freeze(make_net(gen), except_="classifier", storage=first)
    before = {n: t.clone() for n, t in net.state_dict().items()}
    types, grads = [type(m) for m in net.modules()], trainable(net)
    with pytest.raises(ValueError, match=f"already frozen with storage='{first}'"):
        tltorch.freeze(net, except_="classifier", storage=second)
    if first == "int8":
        with pytest.raises(ValueError, match="group=32"):
            tltorch.freeze(net, except_="classifier", storage="int8", group=64)
        with pytest.raises(ValueError, match="activations='int8'"):
            tltorch.freeze(net, except_="classifier", storage="int8", activations="float")
    # refused before anything changed
    assert [type(m) for m in net.modules()] == types and trainable(net) == grads
    assert all(torch.equal(t, before[n]) for n, t in net.state_dict().items())
    # None keeps the storage as it is; the same storage again is a no-op
    tltorch.freeze(net, except_="classifier")
    tltorch.freeze(net, except_="classifier", storage=first)
    assert [type(m) for m in net.modules()] == types


@pytest.mark.parametrize("storage", [None, "bfloat16", "float16"])
def test_freeze_group_needs_int8_storage(storage, gen):
    net = make_net(gen)
    for group in (64, None):
        with pytest.raises(ValueError, match="group applies to storage='int8' only"):
            tltorch.freeze(net, storage=storage, group=group)
    assert trainable(net) == {n for n, _ in net.named_parameters()}


@pytest.mark.parametrize("storage", [None, "int8"])
def test_freeze_is_idempotent(storage, gen):
    net = make_net(gen)
    twice = copy.deepcopy(net)
    assert tltorch.freeze(net, except_="classifier", storage=storage) is net
    tltorch.freeze(tltorch.freeze(twice, except_="classifier", storage=storage), except_="classifier",
                   storage=storage)
    assert trainable(twice) == trainable(net) == params_under(net, "classifier.")
    assert [type(m) for m in twice.modules()] == [type(m) for m in net.modules()]
    for m in twice.modules():
        assert len(m._forward_pre_hooks) <= 1
    x = randn((6, 5), torch.float32, gen)
    net.eval(), twice.eval()
    assert torch.equal(net(x), twice(x))


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_freeze_storage_multihead_attention(storage):
    """nn.MultiheadAttention reads out_proj.weight itself (out_proj is an nn.Linear subclass), as in
    nn.TransformerEncoderLayer and torchvision's ViT: freezing with storage= must leave it working."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    ref = layer(x)
    frozen = tltorch.freeze(copy.deepcopy(layer), storage=storage)
    err = fro_err(frozen(x), ref)
    assert err <= STORAGE_TOL[storage], f"{storage}: {err:.3g}"


def test_bert_layer_relative_error():
    """The relative error of a frozen BERT layer's output per storage (quoted in the README). With random
    weights the residual stream carries most of last_hidden_state, so the error is also measured against
    what the layer adds to its input (last_hidden_state - hidden_states[0]), the part the weights compute."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    ref, update = out.last_hidden_state, out.last_hidden_state - out.hidden_states[0]
    bounds = {"bfloat16": (1e-2, 1e-2), "float16": (1e-3, 1e-3), "int8": (5e-2, 2e-2)}
    report = []
    for storage, (bound_out, bound_update) in bounds.items():
        frozen = tltorch.freeze(copy.deepcopy(model), storage=storage)
        assert trainable(frozen) == set()
        assert sum(isinstance(m, FrozenLinear) for m in frozen.modules()) == 7  # q, k, v, 3 dense, pooler
        with torch.no_grad():
            diff = (frozen(ids).last_hidden_state - ref).norm()
        err_out, err_update = (diff / ref.norm()).item(), (diff / update.norm()).item()
        assert err_out <= bound_out and err_update <= bound_update, f"{storage}: {err_out:.3g}, {err_update:.3g}"
        report.append(f"{storage} {err_out:.2e} (of the layer's update: {err_update:.2e})")
    print("BERT layer (hidden 64), relative error of last_hidden_state:", ", ".join(report))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_rejects_non_finite_weights(bad, gen):
    """int8 cannot hold NaN or inf: from_linear raises instead of storing a finite, wrong row."""
    lin = make_linear(4, 3, True, gen)
    with torch.no_grad():
        lin.weight[1, 2] = bad
    with pytest.raises(ValueError, match=r"weight.*int8"):
        FrozenLinear.from_linear(lin, "int8")
    out = FrozenLinear.from_linear(lin, "bfloat16")(torch.ones(1, 4))  # representable there
    assert not bool(torch.isfinite(out[0, 1]))


# ---- bfloat16 x on a bfloat16 weight -------------------------------------------------------------------

needs_bf16 = pytest.mark.skipif(not bf16_native(), reason="this CPU has no AVX512-BF16")


@needs_bf16
def test_bf16_route_is_torch_bf16_linear(gen):
    """On a CPU with AVX512-BF16 the layer is nn.Linear in bfloat16: bitwise torch's result, which is the
    float32 sum of the bf16 x, W and bf16-rounded bias rounded once."""
    m = FrozenLinear.from_linear(make_linear(96, 40, True, gen), "bfloat16")
    x = randn((3, 21, 96), torch.bfloat16, gen)
    y = m(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, torch.nn.functional.linear(x, m.weight, m.bias.to(torch.bfloat16)))
    ref = ref_linear(x, m.dequantized_weight(torch.float64), m.bias.to(torch.bfloat16))
    assert_rounded_once(y, ref, torch.bfloat16, what="bf16 route")


ISA_SCRIPT = r"""
import json, torch
from tltorch.nn import FrozenLinear
from tltorch.ops.frozen import bf16_native
g = torch.Generator().manual_seed(5)
lin = torch.nn.Linear(96, 40)
with torch.no_grad():
    lin.weight.copy_(torch.randn(40, 96, generator=g) / 96 ** 0.5)
    lin.bias.copy_(torch.randn(40, generator=g))
m = FrozenLinear.from_linear(lin, "bfloat16")
w64 = m.dequantized_weight(torch.float64)
out = {"native": bf16_native()}
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(63, 96, generator=g).to(dt)
    y = m(x)
    ref = x.double() @ w64.t() + m.bias.double()
    out[str(dt)] = {"err": ((y.double() - ref).abs().max() / ref.abs().max()).item(),
                    "once": bool(((y.double() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-5 * ref.abs().max()).all()),
                    "torch_equal": bool(torch.equal(y, torch.nn.functional.linear(x.bfloat16(), m.weight,
                                                                                  m.bias.bfloat16()).to(dt)))}
print(json.dumps(out))
"""


def test_bf16_route_only_with_avx512():
    """TLTORCH_CPU_ISA=avx2 keeps tltorch's own kernel: float32 x stays float32 (float32 accuracy), bf16 x
    gets the float32 sum with the float32 bias rounded once."""
    env = dict(os.environ, TLTORCH_CPU_ISA="avx2")
    proc = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["native"] is False
    assert report["torch.float32"]["err"] <= 1e-5, report
    assert report["torch.bfloat16"]["once"] and not report["torch.bfloat16"]["torch_equal"], report


@pytest.mark.parametrize("storage", ["bfloat16", "float16", "int8"])
def test_frozen_linear_under_autocast(storage, gen):
    """Under autocast to bfloat16 (or to the weight's own dtype) a float32 x is cast to it first, as
    nn.Linear's would be; autocast to float16 leaves x as it is on other storages."""
    m = FrozenLinear.from_linear(make_linear(33, 17, True, gen), storage)
    x = randn((4, 33), torch.float32, gen).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, m(x.detach().to(torch.bfloat16)))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.shape == x.shape
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        y = m(x)
    cast = storage == "float16"
    assert y.dtype == (torch.float16 if cast else torch.float32)
    assert torch.equal(y, m(x.detach().half()) if cast else m(x.detach()))


# ---- extract_features(compute_dtype=...) -----------------------------------------------------------------

def bf16_body(gen):
    """A small token-wise body frozen with bfloat16 storage: (B, T, 24) -> (B, T, 8)."""
    body = nn.Sequential(make_linear(24, 40, True, gen), nn.GELU(), nn.LayerNorm(40), make_linear(40, 8, True, gen))
    return tltorch.freeze(body, storage="bfloat16")


def test_extract_compute_dtype_runs_body_under_autocast(gen):
    body = bf16_body(gen)
    x = randn((10, 7, 24), torch.float32, gen)
    mask = (torch.arange(7) < torch.tensor([7, 3, 1, 5, 7, 2, 6, 4, 7, 1])[:, None]).long()
    data = [{"x": x[:6], "attention_mask": mask[:6]}, {"x": x[6:], "attention_mask": mask[6:]}]

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = body

        def forward(self, x, attention_mask=None):
            return self.inner(x)

    wrapped = Body()
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    feats = tltorch.extract_features(wrapped, data, pooling="mean", compute_dtype=torch.bfloat16, progress=False)
    assert feats.dtype == torch.float32 and feats.shape == (10, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = body(x)
    assert h.dtype == torch.bfloat16  # the last FrozenLinear ran in bf16
    ref = tltorch.functional.pool(h.float(), mask, "mean")
    assert torch.equal(feats, ref)
    plain = tltorch.extract_features(wrapped, data, pooling="mean", progress=False)
    assert not torch.equal(feats, plain)
    assert torch.nn.functional.cosine_similarity(feats, plain).min() > 0.999
    after = wrapped.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    half = tltorch.extract_features(wrapped, data, pooling="mean", dtype=torch.bfloat16,
                                    compute_dtype=torch.bfloat16, progress=False)
    assert half.dtype == torch.bfloat16 and torch.equal(half, feats.to(torch.bfloat16))


@pytest.mark.parametrize("bad", [torch.float32, torch.float64, "bfloat16", torch.int8])
def test_extract_compute_dtype_bad(bad, gen):
    with pytest.raises(ValueError, match="compute_dtype"):
        tltorch.extract_features(bf16_body(gen), torch.zeros(2, 3, 24), pooling="mean", compute_dtype=bad,
                                 progress=False)


def test_extract_compute_dtype_makes_cache_stale(tmp_path, gen):
    body = bf16_body(gen)
    x = randn((6, 5, 24), torch.float32, gen)
    plain = tltorch.extract_features(body, x, pooling="mean", cache=tmp_path, progress=False)
    with pytest.warns(tltorch.extract.StaleCacheWarning, match="compute_dtype differs") as got:
        fast = tltorch.extract_features(body, x, pooling="mean", compute_dtype=torch.bfloat16, cache=tmp_path,
                                        progress=False)
    assert not any("body" in str(w.message) for w in got)  # the body is the same: only compute_dtype is named
    assert not torch.equal(fast, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tltorch.extract.StaleCacheWarning)
        again = tltorch.extract_features(body, x, pooling="mean", compute_dtype=torch.bfloat16, cache=tmp_path,
                                         progress=False)
    assert torch.equal(again, fast)
