"""The AdamW kernel on CUDA (tltorch._cuda.adamw) against torch.optim.AdamW in float64 from the same
state (float32 params within float32 accuracy of the update, bfloat16/float16 params rounded once), and
bit for bit against its CPU twin (tltorch._C.adamw), which performs torch's float32 operations in torch's
order (as the CUDA kernel does).

Tests marked `cuda` need a GPU and skip otherwise; the argument checks at the end need only the built
extension. Kernels are reached through kernels() and inputs moved with on_device(), nothing else."""
import pytest
import torch

from conftest import (DTYPES, HAVE_GPU, INFO, LOW_PRECISION, TOL, assert_rounded_once, dtype_id, gpu_marks, host,
                      names_arg, randn, rel_err, to_cuda as on_device)
from tltorch import _C, ops

NAN = float("nan")
DEVICE = "cuda"
gpu_test = gpu_marks(HAVE_GPU)


def kernels():
    return ops.cuda_module()


def make1d(n, layout, dtype, gen, scale=1.0, positive=False):
    t = torch.rand(n * 2, generator=gen) * scale if positive else torch.randn(n * 2, generator=gen) * scale
    t = t.to(dtype)
    return t[:n].clone() if layout == "contig" else t[::2]


def torch_adamw(p0, g, m0, v0, lr, b1, b2, eps, wd, step):
    """torch.optim.AdamW (foreach=False) in float64 from state (m0, v0) after step - 1 steps."""
    p = torch.nn.Parameter(p0.double().clone())
    opt = torch.optim.AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)
    p.grad = g.double().clone()
    opt.state[p] = {"step": torch.tensor(float(step - 1)), "exp_avg": m0.double().clone(),
                    "exp_avg_sq": v0.double().clone()}
    opt.step()
    return p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("grad_f32", [False, True], ids=["grad_p", "grad_f32"])
@pytest.mark.parametrize("layout", ["contig", "stride2"])
@pytest.mark.parametrize("step,wd", [(1, 0.0), (7, 0.1), (1000, 0.01)])
@pytest.mark.parametrize("l2sp", [0.0, 0.3])
@pytest.mark.parametrize("n", [1, 4099])
def test_cuda_adamw(n, l2sp, step, wd, layout, grad_f32, dtype, gen):
    """With l2sp > 0, torch's step is taken on grad + 2 l2sp (p - anchor), the gradient of the L2-SP
    term."""
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    p0 = make1d(n, layout, dtype, gen)
    g = make1d(n, layout, torch.float32 if grad_f32 else dtype, gen)
    m0 = make1d(n, layout, torch.float32, gen, scale=0.1)
    v0 = make1d(n, layout, torch.float32, gen, scale=0.01, positive=True)
    a = (p0.float() + make1d(n, layout, torch.float32, gen, scale=0.3)).to(dtype) if l2sp else None
    if step == 1:
        m0.zero_()
        v0.zero_()
    pd, md, vd = on_device(p0), on_device(m0), on_device(v0)
    kernels().adamw(pd, on_device(g), md, vd, lr, b1, b2, eps, wd, step, None if a is None else on_device(a), l2sp)
    g_total = g.double() + 2 * l2sp * (p0.double() - a.double()) if l2sp else g
    pr, mr, vr = torch_adamw(p0, g_total, m0, v0, lr, b1, b2, eps, wd, step)
    pg, mg, vg = host(pd), host(md), host(vd)
    what = f"n={n} step={step} {layout} {dtype_id(dtype)}"
    assert rel_err(mg, mr) <= TOL[torch.float32] and rel_err(vg, vr) <= TOL[torch.float32], what
    if dtype in LOW_PRECISION:
        assert_rounded_once(pg, pr, dtype, what=what)
    else:  # the update itself (lr-sized) to float32 accuracy
        d = rel_err(pg.double() - p0.double(), pr - p0.double())
        assert d <= 2e-5, f"{what}: the update is off by {d:.3g}"
    # the CPU twin does the same float32 operations in the same order: the same bits
    pc, mc, vc = p0.clone(), m0.clone(), v0.clone()
    _C.adamw(pc, g, mc, vc, lr, b1, b2, eps, wd, step, a, l2sp, 0)
    assert torch.equal(pg, pc) and torch.equal(mg, mc) and torch.equal(vg, vc), f"{what}: cuda and cpu differ"


@gpu_test
def test_cuda_adamw_matches_torch_float32_over_steps(gen):
    """Ten steps on a float32 param against torch.optim.AdamW on the same device and dtype."""
    n = 1000
    p = randn((n,), torch.float32, gen)
    ref = torch.nn.Parameter(on_device(p).clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    pd = on_device(p)
    m, v = torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE)
    for step in range(1, 11):
        g = on_device(randn((n,), torch.float32, gen))
        ref.grad = g.clone()
        opt.step()
        kernels().adamw(pd, g, m, v, 1e-2, 0.8, 0.99, 1e-6, 0.05, step, None, 0.0)
    d = rel_err(host(pd).double() - p.double(), host(ref.detach()).double() - p.double())
    assert d <= 1e-4, f"ten steps drift from torch.optim.AdamW by {d:.3g}"
    assert rel_err(host(m), host(opt.state[ref]["exp_avg"])) <= 1e-5


@gpu_test
def test_cuda_adamw_empty_and_refusals():
    K = kernels()
    e = torch.empty(0, device=DEVICE)
    K.adamw(e, e, e, e, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, e, 0.5)
    p, m, v = (torch.zeros(4, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError) as ei:
        K.adamw(p, torch.zeros(5, device=DEVICE), m, v, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, None, 0.0)
    names_arg(ei, "grad")
    with pytest.raises(TypeError) as ei:
        K.adamw(p, p, m.to(torch.bfloat16), v, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, None, 0.0)
    names_arg(ei, "exp_avg")
    with pytest.raises(TypeError) as ei:
        K.adamw(p, torch.zeros(4, device=DEVICE), m, v, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, p.half(), 0.1)
    names_arg(ei, "anchor")


# ---- the binding's argument checks (the built extension, with or without a GPU) -------------------------

@pytest.mark.skipif(not INFO["cuda_built"], reason="tltorch._cuda is not built")
def test_cuda_adamw_arguments_checked_without_a_gpu():
    """Scalars are checked first (no GPU needed to see it), then CPU tensors are refused by name."""
    K = ops.cuda_module()
    p = torch.zeros(4)
    good = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, anchor=None, l2sp=0.0)
    for name, bad, exc in (("step", 0, ValueError), ("step", 1.5, TypeError), ("step", 2 ** 63, ValueError),
                           ("beta1", 1.0, ValueError), ("beta2", -0.1, ValueError), ("lr", NAN, ValueError),
                           ("eps", -1.0, ValueError), ("weight_decay", float("inf"), ValueError),
                           ("lr", "0.1", TypeError), ("l2sp", -0.5, ValueError), ("l2sp", NAN, ValueError),
                           ("l2sp", "0.1", TypeError)):
        kw = dict(good, **{name: bad})
        with pytest.raises(exc) as ei:
            K.adamw(p, p, p, p, *kw.values())
        names_arg(ei, name)
    with pytest.raises(ValueError) as ei:
        K.adamw(p, p, p, p, *good.values())
    names_arg(ei, "param")
    with pytest.raises(TypeError, match="positional arguments"):
        K.adamw(p, p, p, p, 0.1)
    assert torch.equal(p, torch.zeros(4))
