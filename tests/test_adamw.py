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
    return steps(opt_cls(params if groups is None else groups, **kw), params, grads)


def steps(opt, params, grads):
    """opt.step() once per entry of grads, grads[k][i] given to params[i] (None: no gradient)."""
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
    steps(opt, params, grads[3:])
    steps(opt2, twins, grads[3:])
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


# ---- L2-SP ---------------------------------------------------------------------------------------------

def run_l2sp_reference(params, grads, groups, dtype=None, **kw):
    """torch.optim.AdamW (foreach=False) on float32 copies of `params`, each step on the gradient of
    sum(p * g) + sum over groups of l2sp * ||p - p0||^2, written out and differentiated by autograd
    (p0: the starting values). groups: [(indices into params, l2sp, the group's other options)]. With
    `dtype` (bfloat16/float16) the parameters are rounded to it after every step, as the fused kernel
    rounds them; the moments stay float32. Returns the parameters and the optimizer."""
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    p0 = [r.detach().clone() for r in ref]
    opt = torch.optim.AdamW([{"params": [ref[i] for i in idx], **gkw} for idx, _, gkw in groups], foreach=False,
                            **kw)
    for gs in grads:
        opt.zero_grad()
        loss = sum((r * g.float()).sum() for r, g in zip(ref, gs))
        for idx, lam, _ in groups:
            loss = loss + sum(lam * ((ref[i] - p0[i]) ** 2).sum() for i in idx)
        loss.backward()
        opt.step()
        if dtype is not None:
            with torch.no_grad():
                for r in ref:
                    r.copy_(r.to(dtype))
    return ref, opt


def run_l2sp(params, grads, groups, **kw):
    return steps(AdamW([{"params": [params[i] for i in idx], "l2sp": lam, **gkw} for idx, lam, gkw in groups], **kw),
                 params, grads)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("l2sp", [0.05, 0.5])
def test_l2sp_matches_torch_with_the_term_in_the_loss(l2sp, weight_decay, gen):
    """float32, 6 steps: the fused step with l2sp agrees to float32 rounding (rtol 1e-6) with
    torch.optim.AdamW on the loss plus l2sp * ||theta - theta0||^2, weight decay (decoupled) on top; and
    it is not the run without the term."""
    params = make_params(torch.float32, gen, [(37, 19), (5,), ()])
    grads = draw_grads(params, 6, gen)
    plain = clone_params(params)
    kw = dict(lr=5e-2, weight_decay=weight_decay)
    groups = [([0, 1, 2], l2sp, {})]
    ref, _ = run_l2sp_reference(params, grads, groups, **kw)
    opt = run_l2sp(params, grads, groups, **kw)
    run(AdamW, plain, grads, **kw)
    for p, r, q in zip(params, ref, plain):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
        assert opt.state[p]["l2sp_anchor"].dtype == torch.float32
    assert (params[0] - plain[0]).abs().max() > 1e-3  # the term moved the weights (10^4 x the tolerance)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_l2sp_low_precision_params(dtype, gen):
    """bfloat16/float16 parameters, 6 steps with l2sp and weight decay: within an ulp of the float32
    torch reference rounded to the dtype after each step (the kernel's contract: float32 math, one
    rounding per step), and nearly all elements equal; the anchor is kept in the parameter's dtype."""
    params = make_params(dtype, gen, [(41, 23), (7,)])
    p0 = [p.detach().clone() for p in params]
    grads = draw_grads(params, 6, gen)
    kw = dict(lr=3e-2, weight_decay=0.1)
    groups = [([0, 1], 0.4, {})]
    ref, _ = run_l2sp_reference(params, grads, groups, dtype=dtype, **kw)
    opt = run_l2sp(params, grads, groups, **kw)
    for p, r, a in zip(params, ref, p0):
        assert p.dtype == dtype
        anchor = opt.state[p]["l2sp_anchor"]
        assert anchor.dtype == dtype and torch.equal(anchor, a)
        diff = (p.double() - r.double()).abs()
        assert (diff <= 2 * UNIT[dtype] * r.double().abs() + 1e-30).all(), "more than an ulp off"
        assert (diff == 0).float().mean() >= 0.98


def test_l2sp_per_group(gen):
    """Two groups with their own l2sp (and lr, weight decay) and one with none: each group's term
    enters only its own parameters' gradients; the l2sp=0 group keeps no anchor."""
    params = make_params(torch.float32, gen, [(9, 4), (6,), (3, 3)])
    grads = draw_grads(params, 5, gen)
    groups = [([0], 0.3, {"lr": 3e-2}), ([1], 0.0, {}), ([2], 1.2, {"weight_decay": 0.2})]
    ref, _ = run_l2sp_reference(params, grads, groups, lr=1e-2)
    opt = run_l2sp(params, grads, groups, lr=1e-2)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    assert "l2sp_anchor" in opt.state[params[0]] and "l2sp_anchor" in opt.state[params[2]]
    assert "l2sp_anchor" not in opt.state[params[1]]
    assert [g["l2sp"] for g in opt.param_groups] == [0.3, 0.0, 1.2]


def test_l2sp_anchor_is_taken_when_the_group_is_added(gen):
    """theta0 is the parameters' value when the optimizer is built (or add_param_group called), not
    at the first step: a change made in between is pulled back. A group whose l2sp is raised later is
    anchored at its next step."""
    a, b = make_params(torch.float32, gen, [(5, 3), (4,)])
    a0 = a.detach().clone()
    opt = AdamW([a], lr=1e-2, l2sp=0.1, weight_decay=0.0)
    assert torch.equal(opt.state[a]["l2sp_anchor"], a0) and "step" not in opt.state[a]
    with torch.no_grad():
        a.add_(1.0)
    a.grad = torch.zeros_like(a)
    opt.step()
    assert (a < a0 + 1.0).all()  # pulled toward a0, with no data gradient
    opt.add_param_group({"params": [b], "l2sp": 0.0})
    assert "l2sp_anchor" not in opt.state[b]
    opt.param_groups[1]["l2sp"] = 0.2
    b1 = b.detach().clone()
    b.grad = torch.zeros_like(b)
    opt.step()
    assert torch.equal(opt.state[b]["l2sp_anchor"], b1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_l2sp_state_dict_round_trip(dtype, gen):
    """3 steps with l2sp, save (through torch.save), load into a fresh optimizer over copies of the
    *current* parameters (which it anchors there), 3 more steps each: the same bits, the anchor loaded
    (theta0 of the first run, in the parameter's dtype, a copy of the saved one)."""
    import io
    params = make_params(dtype, gen, [(17, 5), (4,)])
    p0 = [p.detach().clone() for p in params]
    grads = draw_grads(params, 6, gen)
    opt = run_l2sp(params, grads[:3], [([0, 1], 0.3, {})], lr=3e-2, weight_decay=0.02)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    twins = clone_params(params)
    opt2 = AdamW(twins, lr=0.5, l2sp=0.3)
    assert torch.equal(opt2.state[twins[0]]["l2sp_anchor"], twins[0])  # before loading: anchored here
    opt2.load_state_dict(sd)
    steps(opt, params, grads[3:])
    steps(opt2, twins, grads[3:])
    for p, t, a in zip(params, twins, p0):
        anchor = opt2.state[t]["l2sp_anchor"]
        assert anchor.dtype == dtype and torch.equal(anchor, a)
        assert torch.equal(p, t)
    assert sd["state"][0]["l2sp_anchor"].data_ptr() != opt2.state[twins[0]]["l2sp_anchor"].data_ptr()


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", None, True, torch.tensor(0.1)],
                         ids=["negative", "nan", "inf", "str", "None", "bool", "tensor"])
def test_l2sp_bad_values(bad):
    """A bad l2sp, given to the optimizer, to a group, to add_param_group or set in a group by hand (at
    the next step): ValueError naming l2sp, the parameters untouched."""
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="l2sp"):
        AdamW([p], l2sp=bad)
    with pytest.raises(ValueError, match="l2sp"):
        AdamW([{"params": [p], "l2sp": bad}])
    opt = AdamW([p], l2sp=0.1)
    with pytest.raises(ValueError, match="l2sp"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "l2sp": bad})
    opt.param_groups[0]["l2sp"] = bad
    p.grad = torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="l2sp"):
        opt.step()
    assert torch.equal(p, before)


def test_ops_adamw_l2sp_arguments():
    """ops.adamw_: the anchor must be contiguous; l2sp > 0 needs one."""
    p, g, m, v = torch.randn(4, 6), torch.randn(4, 6), torch.zeros(4, 6), torch.zeros(4, 6)
    with pytest.raises(ValueError, match="anchor"):
        ops.adamw_(p, g, m, v, *HP, torch.zeros(6, 4).t(), 0.1)
    with pytest.raises(ValueError, match="anchor"):
        ops.adamw_(p, g, m, v, *HP, None, 0.1)


# ---- the kernel directly ------------------------------------------------------------------------------

def _kernel_inputs(n, gen, pdtype=torch.float32, gdtype=None):
    p = randn((n,), pdtype, gen)
    g = randn((n,), gdtype or pdtype, gen)
    m = randn((n,), torch.float32, gen, 0.1)
    v = randn((n,), torch.float32, gen, 0.1).abs()
    return p, g, m, v


HP = (1e-2, 0.9, 0.999, 1e-8, 0.01, 7)  # lr, beta1, beta2, eps, weight_decay, step


def _anchor_for(p, gen, l2sp):
    """An anchor near p (as after some steps away from it), or None when l2sp is 0."""
    return None if not l2sp else (p.float() + randn(p.shape, torch.float32, gen, 0.3)).to(p.dtype)


@pytest.mark.parametrize("l2sp", [0.0, 0.3])
@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
                         ids=lambda d: dtype_id(d))
def test_kernel_strided_matches_contiguous(pdtype, gdtype, l2sp, gen):
    """Strided 1-D views (every tensor a different stride) give exactly the contiguous path's bits."""
    n = 1001
    p, g, m, v = _kernel_inputs(n, gen, pdtype, gdtype)
    a = _anchor_for(p, gen, l2sp)
    sp, sg, sm, sv = (torch.zeros(n * k, dtype=t.dtype)[::k] for t, k in ((p, 2), (g, 3), (m, 2), (v, 5)))
    for s, t in ((sp, p), (sg, g), (sm, m), (sv, v)):
        s.copy_(t)
    sa = None if a is None else torch.zeros(4 * n, dtype=a.dtype)[::4].copy_(a)
    _C.adamw(p, g, m, v, *HP, a, l2sp, 1)
    _C.adamw(sp, sg, sm, sv, *HP, sa, l2sp, 1)
    for s, t in ((sp, p), (sm, m), (sv, v)):
        assert torch.equal(s, t)


@pytest.mark.parametrize("l2sp", [0.0, 0.3])
@pytest.mark.parametrize("n", [65536 + 4097, 200003])
def test_kernel_threads_do_not_change_the_result(n, l2sp, gen):
    base = _kernel_inputs(n, gen)
    a = _anchor_for(base[0], gen, l2sp)
    outs = []
    for nt in (1, 2, 3):
        p, g, m, v = (t.clone() for t in base)
        _C.adamw(p, g, m, v, *HP, a, l2sp, nt)
        outs.append((p, m, v))
    for o in outs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(outs[0], o))
    # and one step of torch.optim.AdamW from the same state, with `step` steps behind it, on the
    # gradient of the loss with the L2-SP term written out
    p, g, m, v = (t.clone() for t in base)
    ref = torch.nn.Parameter(p.clone())
    opt = torch.optim.AdamW([ref], lr=HP[0], betas=HP[1:3], eps=HP[3], weight_decay=HP[4], foreach=False)
    opt.state[ref] = {"step": torch.tensor(float(HP[5] - 1)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    loss = (ref * g).sum() + (0.0 if a is None else l2sp * ((ref - a) ** 2).sum())
    loss.backward()
    opt.step()
    torch.testing.assert_close(outs[0][0], ref.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("l2sp", [0.0, 0.3])
def test_kernel_isa_paths_agree(l2sp, gen):
    """Odd lengths exercise the SIMD loop and its scalar tail together: every element gets the bits a
    scalar step would give it (element 0 alone is a scalar step)."""
    n = 37
    p, g, m, v = _kernel_inputs(n, gen)
    a = _anchor_for(p, gen, l2sp)
    full = [t.clone() for t in (p, g, m, v)]
    _C.adamw(*full, *HP, a, l2sp, 1)
    for i in (0, 15, 16, 31, 36):
        one = [t[i:i + 1].clone() for t in (p, g, m, v)]
        _C.adamw(*one, *HP, None if a is None else a[i:i + 1].clone(), l2sp, 1)
        assert all(torch.equal(x, y[i:i + 1]) for x, y in zip(one, full)), i


def test_kernel_l2sp_zero_ignores_the_anchor(gen):
    """l2sp = 0 with an anchor given: the plain step's bits (the anchor is not read, so not even a NaN
    in it reaches the parameter)."""
    p, g, m, v = _kernel_inputs(101, gen)
    plain = [t.clone() for t in (p, g, m, v)]
    _C.adamw(*plain, *HP, None, 0.0, 1)
    _C.adamw(p, g, m, v, *HP, torch.full_like(p, float("nan")), 0.0, 1)
    assert all(torch.equal(x, y) for x, y in zip((p, g, m, v), plain))


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
    hp = [*HP, None, 0.0]  # then anchor, l2sp
    a = torch.randn(n)

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
        ("l2sp nan", (p, g, m, v, *HP, a, float("nan"), 1), ValueError, "l2sp"),
        ("l2sp negative", (p, g, m, v, *HP, a, -0.1, 1), ValueError, "l2sp"),
        ("l2sp str", (p, g, m, v, *HP, a, "0.1", 1), TypeError, "l2sp"),
        ("l2sp without anchor", (p, g, m, v, *HP, None, 0.1, 1), ValueError, "anchor"),
        ("anchor float64", (p, g, m, v, *HP, a.double(), 0.1, 1), TypeError, "anchor"),
        ("anchor of bf16 param in float32", (pb, g, m, v, *HP, a, 0.1, 1), TypeError, "anchor"),
        ("anchor size", (p, g, m, v, *HP, torch.randn(n + 1), 0.1, 1), ValueError, "anchor"),
        ("anchor 2-D", (p, g, m, v, *HP, a.view(2, 3), 0.1, 1), ValueError, "anchor"),
        ("anchor is exp_avg", (p, g, m, v, *HP, m, 0.1, 1), ValueError, "anchor"),
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
        _C.adamw(torch.randn(3), torch.randn(3), torch.zeros(3), torch.zeros(3), *HP, 1)


# ---- CUDA twin ----------------------------------------------------------------------------------------

HAVE_GPU = torch.cuda.is_available() and ops.cuda_built()


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU and tltorch._cuda")
@pytest.mark.parametrize("l2sp", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_cuda_adamw_matches_cpu(dtype, l2sp, gen):
    params = make_params(dtype, gen, [(301, 7), (5,)])
    gparams = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    grads = draw_grads(params, 4, gen)
    run(AdamW, params, grads, lr=1e-2, weight_decay=0.05, l2sp=l2sp)
    opt = run(AdamW, gparams, [[g.cuda() for g in gs] for gs in grads], lr=1e-2, weight_decay=0.05, l2sp=l2sp)
    for p, q in zip(params, gparams):
        assert q.is_cuda and opt.state[q]["exp_avg"].is_cuda
        assert (l2sp > 0) == ("l2sp_anchor" in opt.state[q])
        diff = (q.detach().cpu().double() - p.detach().double()).abs()
        assert (diff <= 2 * UNIT[dtype] * p.detach().double().abs() + 1e-7).all()
