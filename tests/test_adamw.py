"""tltorch.optim.AdamW and the fused AdamW kernel (tltorch._C.adamw) against torch.optim.AdamW
(foreach=False) and a float64 run of the same formula: several steps, weight decay 0 and > 0, several
parameter groups and shapes, bfloat16/float16 parameters with float32 moments, strided tensors, the
threaded path, state_dict round trips, parameters without gradients, and argument errors. The CUDA twin
is compared with the CPU at the end (marked `cuda`)."""
import copy

import numpy as np
import pytest
import torch

from conftest import LOW_PRECISION, UNIT, dtype_id, names_arg, rel_err
from tltorch import _C, ops
from tltorch.optim import AdamW

SHAPES = [(37, 19), (5,), (1,), (), (3, 1, 7)]


def randn(shape, dtype, gen, scale=1.0):
    """Random normal values drawn in float32 and rounded to `dtype`; `shape` may be () (a scalar)."""
    return (torch.randn(tuple(shape), generator=gen) * scale).to(dtype)


def make_params(dtype, gen, shapes=SHAPES):
    return [torch.nn.Parameter(randn(s, dtype, gen)) for s in shapes]


def run(opt_cls, params, grads, groups=None, **kw):
    """`len(grads)` steps of opt_cls on `params` (changed in place; given to the optimizer as `groups`
    when there are), grads[k][i] for step k, param i."""
    opt = opt_cls(params if groups is None else groups, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        opt.step()
    return opt


def draw_grads(params, steps, gen, scale=1.0):
    return [[randn(p.shape, p.dtype, gen, scale) for p in params] for _ in range(steps)]


def clone_params(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("lr,betas,eps", [(1e-2, (0.9, 0.999), 1e-8), (3e-3, (0.8, 0.95), 1e-6),
                                          (1e-2, (0.0, 0.5), 1e-3)])
def test_adamw_matches_torch_float32(lr, betas, eps, weight_decay, gen):
    """5 steps: parameters within float32 rounding of torch.optim.AdamW (rtol 1e-6, atol 1e-7), and
    within 1e-5 of the float64 run. The moments within float32 rounding (the hyperparameters reach the
    kernel as doubles and are rounded once, as torch rounds them)."""
    params = make_params(torch.float32, gen)
    grads = draw_grads(params, 5, gen)
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    ref_params, f64_params = clone_params(params), clone_params(params, torch.float64)
    ours = run(AdamW, params, grads, **kw)
    ref = run(torch.optim.AdamW, ref_params, grads, foreach=False, **kw)
    run(torch.optim.AdamW, f64_params, [[g.double() for g in gs] for gs in grads], foreach=False, **kw)
    for p, r, r64 in zip(params, ref_params, f64_params):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
        assert rel_err(p, r64) <= 1e-5
        s, t = ours.state[p], ref.state[r]
        assert s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
        assert float(s["step"]) == float(t["step"]) == 5.0
        assert rel_err(s["exp_avg"], t["exp_avg"]) <= 1e-6
        assert rel_err(s["exp_avg_sq"], t["exp_avg_sq"]) <= 1e-6


def test_adamw_float32_hyperparameters_match_torch_closely(gen):
    """With hyperparameters that float32 represents exactly, the moments too agree with torch's to
    within float32 rounding (what remains is torch's FMA in lerp: an ulp here and there)."""
    f = lambda x: float(np.float32(x))  # noqa: E731
    kw = dict(lr=f(1e-2), betas=(f(0.9), f(0.999)), eps=f(1e-8), weight_decay=f(0.01))
    params = make_params(torch.float32, gen, [(101, 13)])
    grads = draw_grads(params, 5, gen)
    ref_params = clone_params(params)
    ours = run(AdamW, params, grads, **kw)
    ref = run(torch.optim.AdamW, ref_params, grads, foreach=False, **kw)
    p, r = params[0], ref_params[0]
    torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq"):
        assert rel_err(ours.state[p][key], ref.state[r][key]) <= 1e-6, key


def ref_low_precision(p0, grads, lr, b1, b2, eps, wd):
    """The kernel's contract for a bfloat16/float16 parameter, run with float32 torch ops one at a time
    (each rounded, in the kernel's order) and the parameter rounded to its dtype once per step."""
    f = lambda x: float(np.float32(x))  # noqa: E731  (a scalar the kernel forms in double, rounded once)
    p = p0.detach().clone()
    m = torch.zeros(p.shape)
    v = torch.zeros(p.shape)
    for step, g in enumerate(grads, 1):
        g = g.float()
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        q = p.float() * f(1 - lr * wd)
        m = m + f(1 - b1) * (g - m)
        v = v * b2 + (f(1 - b2) * g) * g
        q = q + (f(-lr / bc1) * m) / (v.sqrt() / f(bc2 ** 0.5) + eps)
        p = q.to(p.dtype)
    return p, m, v


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_low_precision_params(dtype, weight_decay, gen):
    """bfloat16/float16 parameters: float32 moments, float32 math, one rounding per step. Within an ulp
    of the float32-master run rounded the same way, and the moments within float32 rounding of it."""
    kw = dict(lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    params = make_params(dtype, gen, [(41, 23), (7,)])
    p0 = [p.detach().clone() for p in params]
    grads = draw_grads(params, 5, gen)
    opt = run(AdamW, params, grads, **kw)
    for i, p in enumerate(params):
        rp, rm, rv = ref_low_precision(p0[i], [gs[i] for gs in grads], kw["lr"], *kw["betas"], kw["eps"],
                                       weight_decay)
        assert p.dtype == dtype
        diff = (p.double() - rp.double()).abs()
        assert (diff <= 2 * UNIT[dtype] * rp.double().abs() + 1e-30).all(), "more than an ulp off"
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        assert rel_err(st["exp_avg"], rm) <= 1e-6 and rel_err(st["exp_avg_sq"], rv) <= 1e-6
        # and the parameters moved as the torch optimizer would move them, to bfloat16/float16 accuracy
        assert rel_err(p, rp) <= 2 * UNIT[dtype]


def test_adamw_param_groups_and_missing_grads(gen):
    """Two groups with their own lr and weight decay; a parameter without a gradient is left alone (no
    state), as in torch; one that loses its gradient for a step skips that step."""
    a, b, c = make_params(torch.float32, gen, [(9, 4), (6,), (3, 3)])
    groups = lambda ps: [{"params": ps[:2], "lr": 3e-2}, {"params": ps[2:], "weight_decay": 0.3}]  # noqa: E731
    ra, rb, rc = clone_params([a, b, c])
    c0 = c.detach().clone()
    ga = draw_grads([a], 4, gen)
    gb = draw_grads([b], 4, gen)
    gb[2] = [None]
    grads = [[x[0], y[0], None] for x, y in zip(ga, gb)]
    ours = run(AdamW, [a, b, c], grads, groups([a, b, c]))
    ref = run(torch.optim.AdamW, [ra, rb, rc], grads, groups([ra, rb, rc]), foreach=False)
    torch.testing.assert_close(a, ra, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, rb, rtol=1e-6, atol=1e-7)
    assert torch.equal(c, c0) and len(ours.state[c]) == 0
    assert float(ours.state[b]["step"]) == float(ref.state[rb]["step"]) == 3.0


def test_adamw_noncontiguous_parameter(gen):
    """A transposed parameter is updated through a contiguous copy, like any other."""
    p = torch.nn.Parameter(randn((13, 29), torch.float32, gen).t())
    r = clone_params([p])[0]
    assert not p.is_contiguous()
    grads = draw_grads([p], 3, gen)
    run(AdamW, [p], grads, lr=1e-2)
    run(torch.optim.AdamW, [r], grads, lr=1e-2, foreach=False)
    assert not p.is_contiguous()
    torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_adamw_closure_and_zero_size(gen):
    p = torch.nn.Parameter(randn((5, 3), torch.float32, gen))
    e = torch.nn.Parameter(torch.empty(0, 4))
    opt = AdamW([p, e], lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum() + e.sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and not torch.equal(p, before) and e.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_adamw_state_dict_round_trip(dtype, gen):
    """3 steps, save, load into a fresh optimizer over copies of the parameters, 2 more steps each: the
    same bits. The moments stay float32 for bfloat16 parameters (torch's loader would cast them)."""
    params = make_params(dtype, gen, [(17, 5), (4,)])
    grads = draw_grads(params, 5, gen)
    opt = run(AdamW, params, grads[:3], lr=1e-2, weight_decay=0.02)
    sd = copy.deepcopy(opt.state_dict())
    twins = clone_params(params)
    opt2 = AdamW(twins, lr=0.5)  # the loaded groups bring their own lr
    opt2.load_state_dict(sd)
    for o, ps in ((opt, params), (opt2, twins)):
        for gs in grads[3:]:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
    for p, t in zip(params, twins):
        assert torch.equal(p, t)
        s, s2 = opt.state[p], opt2.state[t]
        assert s2["exp_avg"].dtype == torch.float32 and s2["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(s["exp_avg"], s2["exp_avg"]) and torch.equal(s["exp_avg_sq"], s2["exp_avg_sq"])
        assert float(s2["step"]) == 5.0
    # the loaded state is a copy: stepping did not touch the saved dict
    assert float(sd["state"][0]["step"]) == 3.0
    assert opt2.param_groups[0]["lr"] == 1e-2


def test_adamw_loads_torch_state_dict(gen):
    """A torch.optim.AdamW state dict (here of bfloat16 parameters: bfloat16 moments) loads, and the
    run continues as torch's would."""
    params = make_params(torch.float32, gen, [(11, 7)])
    grads = draw_grads(params, 4, gen)
    ref = run(torch.optim.AdamW, params, grads[:2], lr=1e-2, foreach=False)
    twins = clone_params(params)
    ours = AdamW(twins)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    for o, ps in ((ref, params), (ours, twins)):
        for gs in grads[2:]:
            ps[0].grad = gs[0].clone()
            o.step()
    torch.testing.assert_close(twins[0], params[0], rtol=1e-6, atol=1e-7)


# ---- the kernel directly ------------------------------------------------------------------------------

def _kernel_inputs(n, gen, pdtype=torch.float32, gdtype=None):
    p = randn((n,), pdtype, gen)
    g = randn((n,), gdtype or pdtype, gen)
    m = randn((n,), torch.float32, gen, 0.1)
    v = randn((n,), torch.float32, gen, 0.1).abs()
    return p, g, m, v


HP = (1e-2, 0.9, 0.999, 1e-8, 0.01, 7)  # lr, beta1, beta2, eps, weight_decay, step


@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
                         ids=lambda d: dtype_id(d))
def test_kernel_strided_matches_contiguous(pdtype, gdtype, gen):
    """Strided 1-D views (every tensor a different stride) give exactly the contiguous path's bits."""
    n = 1001
    p, g, m, v = _kernel_inputs(n, gen, pdtype, gdtype)
    sp, sg, sm, sv = (torch.zeros(n * k, dtype=t.dtype)[::k] for t, k in ((p, 2), (g, 3), (m, 2), (v, 5)))
    for s, t in ((sp, p), (sg, g), (sm, m), (sv, v)):
        s.copy_(t)
    _C.adamw(p, g, m, v, *HP, 1)
    _C.adamw(sp, sg, sm, sv, *HP, 1)
    for s, t in ((sp, p), (sm, m), (sv, v)):
        assert torch.equal(s, t)


@pytest.mark.parametrize("n", [65536 + 4097, 200003])
def test_kernel_threads_do_not_change_the_result(n, gen):
    base = _kernel_inputs(n, gen)
    outs = []
    for nt in (1, 2, 3):
        p, g, m, v = (t.clone() for t in base)
        _C.adamw(p, g, m, v, *HP, nt)
        outs.append((p, m, v))
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], o))
    # and one step of torch.optim.AdamW from the same state, with `step` steps behind it
    p, g, m, v = (t.clone() for t in base)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], lr=HP[0], betas=HP[1:3], eps=HP[3], weight_decay=HP[4], foreach=False)
    opt.state[ref] = {"step": torch.tensor(float(HP[5] - 1)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    ref.grad = g
    opt.step()
    torch.testing.assert_close(outs[0][0], ref.detach(), rtol=1e-6, atol=1e-7)


def test_kernel_isa_paths_agree(gen):
    """Odd lengths exercise the SIMD loop and its scalar tail together: every element gets the bits a
    scalar step would give it (element 0 alone is a scalar step)."""
    n = 37
    p, g, m, v = _kernel_inputs(n, gen)
    full = [t.clone() for t in (p, g, m, v)]
    _C.adamw(*full, *HP, 1)
    for i in (0, 15, 16, 31, 36):
        one = [t[i:i + 1].clone() for t in (p, g, m, v)]
        _C.adamw(*one, *HP, 1)
        assert all(torch.equal(a, b[i:i + 1]) for a, b in zip(one, full)), i


# ---- bad arguments ------------------------------------------------------------------------------------

def test_optimizer_bad_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    for kw in (dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)),
               dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            AdamW(p, **kw)
    for name in ("amsgrad", "maximize", "capturable", "differentiable"):
        with pytest.raises(ValueError, match=name):
            AdamW(p, **{name: True})
    opt = AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])
    opt.param_groups[0]["params"][0].grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        opt.step()
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdamW(emb.parameters()).step()


def test_ops_adamw_needs_contiguous_state():
    p, g = torch.randn(4, 6), torch.randn(4, 6)
    m, v = torch.zeros(6, 4).t(), torch.zeros(4, 6)
    with pytest.raises(ValueError, match="exp_avg"):
        ops.adamw_(p, g, m, v, *HP)
    with pytest.raises(ValueError, match="param"):
        ops.adamw_(p.t(), g.t(), v, v.clone(), *HP)


def _c_bad_cases():
    n = 6
    p, g, m, v = torch.randn(n), torch.randn(n), torch.zeros(n), torch.zeros(n)
    pb = p.bfloat16()
    hp = list(HP)

    def with_hp(i, val):
        h = list(hp)
        h[i] = val
        return h

    return [
        ("param not a tensor", ([0.0] * n, g, m, v, *hp, 1), TypeError, "param"),
        ("param 2-D", (p.view(2, 3), g, m, v, *hp, 1), ValueError, "param"),
        ("param float64", (p.double(), g, m, v, *hp, 1), TypeError, "param"),
        ("grad size", (p, torch.randn(n + 1), m, v, *hp, 1), ValueError, "grad"),
        ("grad float16 for bf16", (pb, g.half(), m, v, *hp, 1), TypeError, "grad"),
        ("exp_avg bf16", (p, g, m.bfloat16(), v, *hp, 1), TypeError, "exp_avg"),
        ("exp_avg_sq float64", (p, g, m, v.double(), *hp, 1), TypeError, "exp_avg_sq"),
        ("exp_avg_sq size", (p, g, m, torch.zeros(n - 1), *hp, 1), ValueError, "exp_avg_sq"),
        ("moments aliased", (p, g, m, m, *hp, 1), ValueError, "exp_avg"),
        ("param is grad", (p, p, m, v, *hp, 1), ValueError, "param"),
        ("exp_avg broadcast", (p, g, torch.zeros(1).expand(n), v, *hp, 1), ValueError, "exp_avg"),
        ("lr nan", (p, g, m, v, *with_hp(0, float("nan")), 1), ValueError, "lr"),
        ("lr str", (p, g, m, v, *with_hp(0, "0.1"), 1), TypeError, "lr"),
        ("beta1 1", (p, g, m, v, *with_hp(1, 1.0), 1), ValueError, "beta1"),
        ("beta2 negative", (p, g, m, v, *with_hp(2, -0.5), 1), ValueError, "beta2"),
        ("eps negative", (p, g, m, v, *with_hp(3, -1e-8), 1), ValueError, "eps"),
        ("weight_decay inf", (p, g, m, v, *with_hp(4, float("inf")), 1), ValueError, "weight_decay"),
        ("step 0", (p, g, m, v, *with_hp(5, 0), 1), ValueError, "step"),
        ("step float", (p, g, m, v, *with_hp(5, 1.0), 1), TypeError, "step"),
        ("step huge", (p, g, m, v, *with_hp(5, 1 << 70), 1), ValueError, "step"),
    ]


@pytest.mark.parametrize("case", _c_bad_cases(), ids=lambda c: c[0])
def test_c_adamw_bad_arguments(case):
    _, args, exc, name = case
    before = [a.clone() if torch.is_tensor(a) else a for a in args]
    with pytest.raises(exc) as e:
        _C.adamw(*args)
    names_arg(e, name)
    for a, b in zip(args, before):  # nothing written
        if torch.is_tensor(a):
            assert torch.equal(a, b)


def test_c_adamw_arity():
    with pytest.raises(TypeError, match="adamw"):
        _C.adamw(torch.randn(3), torch.randn(3), torch.zeros(3), torch.zeros(3), *HP)


# ---- CUDA twin ----------------------------------------------------------------------------------------

HAVE_GPU = torch.cuda.is_available() and ops.cuda_built()


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU and tltorch._cuda")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_cuda_adamw_matches_cpu(dtype, gen):
    params = make_params(dtype, gen, [(301, 7), (5,)])
    gparams = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    grads = draw_grads(params, 4, gen)
    run(AdamW, params, grads, lr=1e-2, weight_decay=0.05)
    opt = run(AdamW, gparams, [[g.cuda() for g in gs] for gs in grads], lr=1e-2, weight_decay=0.05)
    for p, q in zip(params, gparams):
        assert q.is_cuda and opt.state[q]["exp_avg"].is_cuda
        diff = (q.detach().cpu().double() - p.detach().double()).abs()
        assert (diff <= 2 * UNIT[dtype] * p.detach().double().abs() + 1e-7).all()
