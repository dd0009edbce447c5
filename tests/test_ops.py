"""tltorch.ops, every op on every available device: the eager routes (the device kernel, the generated
autograd.Function) and the torch.library route (torch.ops.tltorch.*) give the same outputs and
gradients, bit for bit on the CPU; each op is registered with a kernel per device and a fake kernel; the
route is chosen as ops/_define.py says (no dispatcher eagerly; the dispatcher under fake tensors and
dispatch modes); the eager backward is once differentiable."""
import importlib

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import tltorch.functional as F
from tltorch import ops
from tltorch.ops import lora as lora_ops

linear_ops = importlib.import_module("tltorch.ops.linear")  # tltorch.ops.linear is the function

HAVE_GPU = torch.cuda.is_available() and ops.cuda_built()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not HAVE_GPU, reason="needs a CUDA GPU and tltorch._cuda")])]


def _inputs(device, gen):
    def rn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    def target(*shape):
        t = torch.randint(0, 5, shape, generator=gen)
        t.view(-1)[::3] = -100
        return t.to(device)
    return rn, target


# Differentiable ops: (the eager function, its arguments, the differentiable arguments' positions, the
# upstream gradient's shape per output). The eager function takes the op's arguments, so the same
# arguments go to torch.ops.tltorch.<name>.
def _differentiable_cases(device, gen):
    rn, target = _inputs(device, gen)
    int8 = torch.randint(-127, 128, (4, 6), generator=gen, dtype=torch.int8).to(device)
    scale = rn(4).abs() + 0.01
    seed = torch.tensor(1234)
    cases = [
        ("linear", ops.linear, (rn(2, 3, 6), rn(4, 6), rn(4)), (0, 1, 2)),
        ("linear", ops.linear, (rn(5, 6, dtype=torch.bfloat16), rn(4, 6, dtype=torch.bfloat16), None), (0, 1)),
        ("lora_linear", lora_ops._lora_linear, (rn(2, 3, 6), rn(4, 6), rn(4), rn(2, 6), rn(4, 2), 1.5, 0.0, None),
         (0, 2, 3, 4)),
        ("lora_linear", lora_ops._lora_linear, (rn(5, 6, dtype=torch.bfloat16), rn(6, 4, dtype=torch.bfloat16).t(),
                                                None, rn(3, 6, dtype=torch.bfloat16), rn(4, 3, dtype=torch.bfloat16),
                                                2.0, 0.3, seed), (0, 1, 3, 4)),
        ("frozen_linear", ops.frozen_linear, (rn(2, 3, 6), int8, rn(4).abs() + 0.01, rn(4)), (0,)),
        ("frozen_linear", ops.frozen_linear, (rn(5, 6, dtype=torch.bfloat16), rn(4, 6, dtype=torch.bfloat16),
                                              None, None), (0,)),
        ("lora_update", lora_ops._lora_update_op, (rn(2, 3, 4), rn(2, 3, 6), rn(2, 6), rn(4, 2), 1.5, 0.3, seed),
         (0, 1, 2, 3)),
        ("int8_linear", ops.int8_linear, (rn(2, 3, 6), int8, scale, ops.int8_pack(int8.cpu(), scale.cpu(), 4)
                                          .to(device), 4, rn(4)), (0,)),
    ]
    for red in (0, 1, 2):
        cases.append(("linear_cross_entropy", ops.linear_cross_entropy,
                      (rn(3, 4, 6), rn(5, 6), target(3, 4), rn(5), rn(5).abs() + 0.1, -100, 0.1, red), (0, 1, 3)))
    cases.append(("linear_cross_entropy", ops.linear_cross_entropy,
                  (rn(7, 6, dtype=torch.bfloat16), rn(5, 6, dtype=torch.bfloat16), target(7), None, None, -100, 0.0,
                   0), (0, 1)))
    for red in (0, 2):
        cases.append(("linear_head", ops.head.linear_head, (rn(3, 4, 6), rn(5, 6), target(3, 4), rn(5), None, -100,
                                                            0.0, red, 2.0, 0.7, 0.01, True, True), (0, 1, 3)))
    return cases


def _assert_same(a, b, device, what):
    if device == "cpu":
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), what
    else:  # the head scales its CUDA gradients after the kernel eagerly, folds them in on the op's route
        torch.testing.assert_close(a, b, msg=what)


def _run(fn, args, diff, upstream_scale):
    args = [a.detach().clone().requires_grad_(i in diff) if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)]
    out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out  # torch.ops returns the kept outputs too
    gen = torch.Generator().manual_seed(5)
    g = (torch.randn(out.shape, generator=gen) + upstream_scale).to(device=out.device, dtype=out.dtype)
    out.backward(g)
    return out.detach(), [args[i].grad for i in diff]


@pytest.mark.parametrize("upstream", [0.0, 1.0], ids=["upstream-N(0,1)", "upstream-N(1,1)"])
@pytest.mark.parametrize("device", DEVICES)
def test_eager_and_torch_ops_agree_with_gradients(device, upstream, gen):
    """Each differentiable op through the generated Function and through torch.ops.tltorch.<name>
    (whose autograd formula is the same): outputs and gradients equal."""
    for k, (name, fn, args, diff) in enumerate(_differentiable_cases(device, gen)):
        eager = _run(fn, args, diff, upstream)
        op = _run(getattr(torch.ops.tltorch, name), args, diff, upstream)
        _assert_same(eager[0], op[0], device, f"{name} case {k}: output")
        for i, a, b in zip(diff, eager[1], op[1]):
            _assert_same(a, b, device, f"{name} case {k}: gradient of argument {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_head_unit_upstream_gradient_agrees(device, gen):
    """loss.backward() (an upstream gradient of exactly 1): eagerly the gradients computed with the loss
    are handed over; through torch.ops they are recomputed. The same bits either way."""
    rn, target = _inputs(device, gen)
    for red in (0, 1):
        args = (rn(3, 4, 6), rn(5, 6), target(3, 4), rn(5), None, -100, 0.0, red)
        results = []
        for fn in (ops.linear_cross_entropy, torch.ops.tltorch.linear_cross_entropy):
            x, w, b = (args[i].detach().clone().requires_grad_() for i in (0, 1, 3))
            out = fn(x, w, args[2], b, *args[4:])
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            results.append((loss.detach(), x.grad, w.grad, b.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b)


# Ops without gradients: (name, the eager function, a function of the device making the arguments,
# the positions of the arguments they mutate).
def _plain_cases(device, gen):
    rn, target = _inputs(device, gen)
    x, w, t = rn(7, 6), rn(5, 6), target(7)
    g = rn(7, 5)
    seed = torch.tensor(99)
    lora = (rn(2, 3, 6), rn(4, 6), None, rn(2, 6), rn(4, 2), 1.5, 0.4, seed)
    _, su = torch.ops.tltorch.lora_linear(*lora)
    return [
        ("gemm", ops.gemm, (rn(6, 5), rn(4, 5), rn(6, 4), rn(4), 0.5, 0.25, 2), (2,)),
        ("gemm", ops.gemm, (rn(5, 6), rn(5, 4), rn(6, 4), None, 1.0, 0.0, 1), (2,)),
        ("colsum", ops.colsum, (rn(9, 4), rn(4), 0.5), (1,)),
        ("dropout", ops.dropout, (rn(8, 6), 0.3, 1234), ()),
        ("int8_dequant", ops.int8_dequant, (torch.randint(-127, 128, (4, 6), generator=gen, dtype=torch.int8)
                                            .to(device), rn(4, 2).abs() + 0.01, 4, torch.bfloat16), ()),
        ("qgemm", ops.qgemm, (rn(3, 6), torch.randint(-127, 128, (4, 6), generator=gen, dtype=torch.int8).to(device),
                              rn(4).abs(), rn(4), True), ()),
        ("qgemm", ops.qgemm, (rn(3, 4, dtype=torch.bfloat16), rn(4, 6, dtype=torch.bfloat16), None, None, False), ()),
        ("pool", ops.pool, (rn(3, 5, 4), torch.tensor([[1, 1, 0, 0, 0], [1] * 5, [0] * 5], dtype=torch.bool,
                                                        device=device), 1), ()),
        ("adamw_", ops.adamw_, (rn(4, 3), rn(4, 3), rn(4, 3).abs(), rn(4, 3).abs(), 1e-2, 0.9, 0.999, 1e-8, 0.01, 3),
         (0, 2, 3)),
        ("adamw_", ops.adamw_, (rn(4, 3), rn(4, 3), rn(4, 3).abs(), rn(4, 3).abs(), 1e-2, 0.9, 0.999, 1e-8, 0.01, 3,
                                rn(4, 3), 0.25), (0, 2, 3)),
        ("linear_backward", linear_ops.linear_backward, (g, x, w, True, False, True), ()),
        ("lora_linear_backward", lora_ops._lora_linear_backward,
         (rn(2, 3, 4), *lora[:2], *lora[3:5], su, 1.5, 0.4, seed, True, True, False), ()),
        ("linear_cross_entropy_backward", ops.head._linear_cross_entropy_backward,
         (rn(7), x, w, t, rn(5), None, -100, 0.1, 2, True, True, False), ()),
        ("frozen_linear_backward", ops.frozen.frozen_linear_backward, (rn(2, 3, 5), w, None), ()),
        ("linear_head_backward", ops.head._linear_head_backward,
         (rn(7), x, w, t, rn(5), None, -100, 0.0, 2, 2.0, 0.7, 0.0, True, True, False), ()),
        ("linear_cross_entropy", ops.linear_cross_entropy, (x, w, t, None, None, -100, 0.0, 1), ()),
        ("lora_linear", lora_ops._lora_linear, lora, ()),
        ("distill_rows", ops.distill_rows, (rn(7, 5), rn(7, 4), target(7), -100, 2.0, 0.5, 2, 0.3), (0,)),
    ]


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("device", DEVICES)
def test_eager_and_torch_ops_agree_without_gradients(device, gen):
    """Each op's kernel route and torch.ops route: equal outputs and equally mutated arguments; a
    gradient not asked of a backward op is None eagerly and an empty tensor through torch.ops."""
    for name, fn, args, mutated in _plain_cases(device, gen):
        a_eager, a_op = _clone(args), _clone(args)
        eager, op = fn(*a_eager), getattr(torch.ops.tltorch, name)(*a_op)
        if name in ("linear_cross_entropy", "lora_linear"):
            op = op[0]  # and the kept outputs, which the eager function does not return
        eager_t = eager if isinstance(eager, tuple) else (eager,)
        op_t = op if isinstance(op, tuple) else (op,)
        for e, o in zip(eager_t, op_t, strict=True):
            if e is None:  # a mutating op's output, or a gradient not asked for
                assert o is None or o.numel() == 0, name
            else:
                assert torch.equal(e, o), name
        for i in mutated:
            assert torch.equal(a_eager[i], a_op[i]) and not torch.equal(a_eager[i], args[i]), (name, i)


OP_NAMES = ["gemm", "colsum", "linear", "linear_backward", "dropout", "lora_linear", "lora_linear_backward",
            "linear_cross_entropy", "linear_cross_entropy_backward", "qgemm", "frozen_linear",
            "frozen_linear_backward", "int8_linear", "int8_dequant", "pool", "adamw_", "linear_head", "linear_head_backward", "lora_update",
            "distill_rows"]
DIFFERENTIABLE = {"linear", "lora_linear", "lora_update", "linear_cross_entropy", "frozen_linear", "int8_linear", "linear_head"}


def test_every_op_is_covered():
    defined = {n for n in dir(torch.ops.tltorch)
               if isinstance(getattr(torch.ops.tltorch, n), torch._ops.OpOverloadPacket)}
    assert defined == set(OP_NAMES)
    cases = {c[0] for c in _plain_cases("cpu", torch.Generator().manual_seed(0))}
    cases |= {c[0] for c in _differentiable_cases("cpu", torch.Generator().manual_seed(0))}
    assert cases == set(OP_NAMES)


@pytest.mark.parametrize("name", OP_NAMES)
def test_registered_kernels(name):
    """A CPU and a CUDA kernel (the CUDA one loads tltorch._cuda on first use, so it is there whether or
    not it was built), a fake kernel (a Meta one too), and an autograd formula for the differentiable
    ops."""
    qualname = f"tltorch::{name}"
    for key in ("CPU", "CUDA", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), key
    assert OPDEFS[qualname]._abstract_fn is not None
    assert set(OPDEFS[qualname]._backend_fns) == {"cpu", "cuda"}
    assert (OPDEFS[qualname]._backward_fn is not None) == (name in DIFFERENTIABLE)


def _count_dispatcher_calls(monkeypatch, name):
    calls = []
    fns = OPDEFS[f"tltorch::{name}"]._backend_fns
    kernel = fns["cpu"]

    def counted(*args, **kwargs):
        calls.append(name)
        return kernel(*args, **kwargs)
    monkeypatch.setitem(fns, "cpu", counted)
    return calls


def test_eager_routes_skip_the_dispatcher(monkeypatch, gen):
    """Eagerly, with or without a gradient, forward and backward run the kernels directly; torch.ops
    goes through the dispatcher to the same kernels."""
    forward = _count_dispatcher_calls(monkeypatch, "linear")
    backward = _count_dispatcher_calls(monkeypatch, "linear_backward")
    x, w = torch.randn(3, 4, generator=gen, requires_grad=True), torch.randn(2, 4, generator=gen)
    F.linear(x, w).sum().backward()
    with torch.no_grad():
        F.linear(x, w)
    assert forward == [] and backward == []
    torch.ops.tltorch.linear(x, w, None).sum().backward()
    assert forward == ["linear"] and backward == []  # the formula's backward call is eager: no dispatcher


def test_fake_tensors_take_the_torch_ops_route():
    """Under FakeTensorMode (AOT autograd's tracing) forward and backward reach the fake kernels, never
    the device kernels (which cannot read a fake tensor's data)."""
    with FakeTensorMode():
        x = torch.randn(2, 3, 8, requires_grad=True)
        w = torch.randn(5, 8, requires_grad=True)
        t = torch.zeros(2, 3, dtype=torch.int64)
        loss = F.linear_cross_entropy(F.linear(x, w), torch.randn(4, 5, requires_grad=True), t)
        loss.backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_tltorch_ops(gen):
    """A dispatch mode (a profiler, a flop counter) sees tltorch's ops, forward and backward, with the
    numbers of the eager route."""
    x = torch.randn(3, 4, generator=gen, requires_grad=True)
    w = torch.randn(2, 4, generator=gen, requires_grad=True)
    y = F.linear(x, w)
    y.sum().backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with _Recorder() as rec:
        ym = F.linear(x, w)
        ym.sum().backward()
    assert "tltorch.linear.default" in rec.ops and "tltorch.linear_backward.default" in rec.ops
    assert torch.equal(y, ym) and torch.equal(grads[0], x.grad) and torch.equal(grads[1], w.grad)


def test_kept_outputs_are_not_differentiable(gen):
    """lora_linear's su and the head's gradients are for backward only: the eager functions return the
    loss or y alone; torch.ops returns them too, not requiring grad."""
    x = torch.randn(3, 4, generator=gen, requires_grad=True)
    w, a, b = torch.randn(2, 4, generator=gen), torch.randn(1, 4, generator=gen), torch.randn(2, 1, generator=gen)
    y = lora_ops._lora_linear(x, w, None, a, b, 1.0, 0.0, None)
    assert isinstance(y, torch.Tensor) and y.requires_grad
    y_op, su = torch.ops.tltorch.lora_linear(x, w, None, a, b, 1.0, 0.0, None)
    assert torch.equal(y, y_op) and y_op.requires_grad and not su.requires_grad
    t = torch.tensor([0, 1, 1])
    out = torch.ops.tltorch.linear_cross_entropy(x, w, t, None, None, -100, 0.0, 0, True, True, False)
    assert out[0].requires_grad and not any(g.requires_grad for g in out[1:])
    assert out[1].shape == x.shape and out[3].numel() == 0


def test_eager_backward_is_once_differentiable(gen):
    x = torch.randn(3, 4, generator=gen, requires_grad=True)
    w = torch.randn(2, 4, generator=gen, requires_grad=True)
    (gx,) = torch.autograd.grad(F.linear(x, w).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
