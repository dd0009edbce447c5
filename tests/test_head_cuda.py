"""The fused linear + cross-entropy head on CUDA against its CPU twin (the same random inputs in the same
layouts, copied with to_cuda) and the float64 reference; plus a vocabulary-sized bfloat16 case and the
CUDA head's memory. Every test here is marked `cuda` and skips without a GPU and tltorch._cuda."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DTYPES, HAVE_GPU, assert_close, assert_twin, dtype_id, make_x, randn, to_cuda
from test_head import (REDUCTIONS, _grad_out, head_leaves, make_class_weight, make_target, make_w,
                       torch_head)
from tltorch.functional import linear_cross_entropy as lce
from tltorch.nn import LinearCrossEntropy

# Full float32 products on the GPU throughout (no_tf32), as in test_gemm_cuda.py.
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU and tltorch._cuda"),
              pytest.mark.usefixtures("no_tf32")]


def run_head(x, w, b, target, cw, grad, flags=None, **opts):
    """linear_cross_entropy on fresh leaves of x, w, b, which require grad as `flags` says (default: as
    the tensors themselves do); backward(grad) when any does. Returns (loss, dx, dweight, dbias), None for
    a gradient not asked for."""
    ts = (x, w, b)
    flags = flags or [t is not None and t.requires_grad for t in ts]
    leaves = [None if t is None else t.detach().requires_grad_(f) for t, f in zip(ts, flags)]
    loss = lce(leaves[0], leaves[1], target, leaves[2], class_weight=cw, **opts)
    if any(flags):
        loss.backward(grad)
    return (loss.detach(),) + tuple(None if t is None else t.grad for t in leaves)


def check_twins(x, w, b, target, cw, grad, what="", **opts):
    """The same call on the CPU and on CUDA (inputs copied in their layouts): CUDA within TOL of float64
    and within TWIN of the CPU result, for the loss and each gradient; NaNs (all targets ignored, mean)
    at the same places."""
    dtype = x.dtype
    flags = [t is not None and t.requires_grad for t in (x, w, b)]
    cpu = run_head(x, w, b, target, cw, grad, **opts)
    gpu = run_head(to_cuda(x), to_cuda(w), to_cuda(b), to_cuda(target), to_cuda(cw), to_cuda(grad), flags,
                   **opts)
    ref, xd, wd, bd = torch_head(x, w, b, target, cw, torch.float64, **opts)
    if any(flags):
        ref.backward(grad.double())
    refs = (ref, xd.grad, wd.grad, None if bd is None else bd.grad)
    assert gpu[0].is_cuda and gpu[0].dtype == dtype and gpu[0].shape == cpu[0].shape
    for name, g, c, r in zip(("loss", "dx", "dweight", "dbias"), gpu, cpu, refs):
        if r is None:
            assert g is None and c is None, f"{what}: {name} computed but not required"
            continue
        assert g is not None and g.dtype == c.dtype and g.shape == c.shape, f"{what}: {name}"
        nan = torch.isnan(r)
        assert torch.equal(torch.isnan(g).cpu(), nan) and torch.equal(torch.isnan(c), nan), \
            f"{what}: {name} NaNs differ from torch's"
        assert_twin(g[~nan.cuda()] if nan.any() else g, c[~nan] if nan.any() else c,
                    r[~nan] if nan.any() else r, dtype, what=f"{what} {name}")
    return cpu, gpu


# ---- options, shapes, layouts -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("ls,cw_dtype,ii", [(0.0, None, -100), (0.1, torch.float32, 3), (0.2, "x", -1),
                                            (1.0, torch.float32, 0)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_head_options(reduction, ls, cw_dtype, ii, dtype, gen):
    N, D, C = 37, 33, 11
    x, w, b = head_leaves((N,), D, C, dtype, gen)
    target = make_target((N,), C, gen, ii, ignore_every=5)
    cw = make_class_weight(C, dtype if cw_dtype == "x" else cw_dtype, dtype, gen)
    check_twins(x, w, b, target, cw, _grad_out(reduction, target, dtype, gen), what=f"{reduction} ls={ls}",
                reduction=reduction, label_smoothing=ls, ignore_index=ii)


CUDA_SHAPES = [((1,), 1, 1), ((9,), 33, 2), ((64,), 33, 5000), ((5,), 8, 32771), ((3, 7), 33, 17),
               ((1000,), 33, 50), ((0,), 7, 5), ((2, 0), 7, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead,D,C", CUDA_SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_cuda_head_shapes(lead, D, C, reduction, dtype, gen):
    x, w, b = head_leaves(lead, D, C, dtype, gen)
    target = make_target(lead, C, gen, -1, ignore_every=8)
    check_twins(x, w, b, target, make_class_weight(C, torch.float32, dtype, gen),
                _grad_out(reduction, target, dtype, gen), what=f"{lead} D={D} C={C}", reduction=reduction,
                label_smoothing=0.1, ignore_index=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_head_all_targets_ignored(reduction, dtype, gen):
    N, D, C = 10, 6, 4
    x, w, b = head_leaves((N,), D, C, dtype, gen)
    target = torch.full((N,), 2)
    _, gpu = check_twins(x, w, b, target, make_class_weight(C, torch.float32, dtype, gen),
                         _grad_out(reduction, target, dtype, gen), reduction=reduction, ignore_index=2,
                         label_smoothing=0.3)
    for g in gpu[1:]:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lead,xl,wl", [((19,), "strided", "t"), ((19,), "transposed", "strided"),
                                        ((3, 7), "offset", "t"), ((19,), "expanded", "contig")],
                         ids=lambda v: str(v).replace(" ", ""))
def test_cuda_head_layouts(lead, xl, wl, dtype, gen):
    D, C = 33, 13
    x = make_x(lead, D, xl, dtype, gen).requires_grad_()
    w = make_w(C, D, wl, dtype, gen).requires_grad_()
    b = randn((2 * C,), dtype, gen)[::2].requires_grad_()
    cw = make_class_weight(2 * C, torch.float32, dtype, gen)[1::2]
    target = make_target((*lead[:-1], 2 * lead[-1]), C, gen, 4, ignore_every=3)[..., ::2]
    for red in REDUCTIONS:
        check_twins(x, w, b, target, cw, _grad_out(red, target, dtype, gen), what=f"{xl}/{wl} {red}",
                    reduction=red, ignore_index=4, label_smoothing=0.1)


@pytest.mark.parametrize("flags", [(True, True, True), (False, True, True), (True, False, False),
                                   (False, False, True), (False, False, False)],
                         ids=lambda f: "".join("xwb"[i] for i in range(3) if f[i]) or "none")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_head_grads_only_when_required(flags, reduction, gen):
    rx, rw, rb = flags
    N, D, C = 23, 33, 19
    x = make_x((N,), D, "strided", torch.float32, gen).requires_grad_(rx)
    w = make_w(C, D, "t", torch.float32, gen).requires_grad_(rw)
    b = randn((C,), torch.float32, gen).requires_grad_(rb)
    target = make_target((N,), C, gen, ignore_every=6)
    check_twins(x, w, b, target, None, _grad_out(reduction, target, torch.float32, gen),
                reduction=reduction, label_smoothing=0.1)


def test_cuda_head_scaled_and_twice(gen):
    """(loss * 3.5).backward(retain_graph=True) twice: the CPU twin's gradients, doubled exactly."""
    x = torch.randn(31, 17, generator=gen).cuda().requires_grad_()
    w = make_w(10, 17, "contig", torch.float32, gen).cuda().requires_grad_()
    t = make_target((31,), 10, gen, ignore_every=5).cuda()
    loss = lce(x, w, t, label_smoothing=0.1) * 3.5
    loss.backward(retain_graph=True)
    first = [x.grad.clone(), w.grad.clone()]
    loss.backward()
    ref, xd, wd, _ = torch_head(x, w, None, t, None, torch.float64, label_smoothing=0.1)
    (ref * 3.5).backward()
    for g1, t_, td in zip(first, (x, w), (xd, wd)):
        assert_close(g1, td.grad, torch.float32)
        assert torch.equal(t_.grad, 2 * g1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("plan", ["classes", "rows"])
def test_cuda_head_plans(plan, reduction, dtype, gen, monkeypatch):
    """The CUDA workspace's budget (tltorch.ops.head._XENT_CUDA_FLOATS) shrunk so that 150 rows x 200
    classes go by blocks of classes (64, 64, 64 and 8: two passes, dW written per block in W's dtype, dX
    accumulated over blocks) or by chunks of a few rows (dW float32, added up over chunks): the CPU
    twin's results."""
    from tltorch import ops
    N, D, C = 150, 33, 200
    budget = 1300 + N * 64 if plan == "classes" else 64 + 5 * (C + D + 1)
    monkeypatch.setattr(ops.head, "_XENT_CUDA_FLOATS", budget)
    acc = dtype is not torch.float32
    floats, narrow = ops.cuda_module().xent_workspace(N, D, C, acc, budget + (N * D if acc else 0))
    assert floats < 64 + N * (C + D + 1) and narrow == (plan == "classes")
    x = make_x((N,), D, "strided", dtype, gen).requires_grad_()
    w = make_w(C, D, "t", dtype, gen).requires_grad_()
    b = randn((C,), dtype, gen).requires_grad_()
    target = make_target((N,), C, gen, -1, ignore_every=7)
    check_twins(x, w, b, target, make_class_weight(C, torch.float32, dtype, gen),
                _grad_out(reduction, target, dtype, gen), what=plan, reduction=reduction,
                label_smoothing=0.1, ignore_index=-1)
    check_twins(x, w, None, target, None, _grad_out(reduction, target, dtype, gen), what=plan + " plain",
                reduction=reduction, ignore_index=-1)


# ---- a vocabulary-sized bfloat16 head ----------------------------------------------------------------------

def test_cuda_head_bf16_vocabulary(gen):
    """bfloat16, N=512, D=256, C=32000: CUDA vs the CPU twin and float64 (computed on the GPU)."""
    N, D, C = 512, 256, 32000
    x = randn((N, D), torch.bfloat16, gen).requires_grad_()
    w = make_w(C, D, "contig", torch.bfloat16, gen).requires_grad_()
    b = randn((C,), torch.bfloat16, gen, scale=0.1).requires_grad_()
    target = make_target((N,), C, gen, ignore_every=17)
    cpu = run_head(x, w, b, target, None, torch.tensor(1.0, dtype=torch.bfloat16), label_smoothing=0.1)
    xg, wg, bg, tg = to_cuda(x).requires_grad_(), to_cuda(w).requires_grad_(), to_cuda(b).requires_grad_(), \
        to_cuda(target)
    gpu = run_head(xg, wg, bg, tg, None, torch.tensor(1.0, dtype=torch.bfloat16, device="cuda"),
                   label_smoothing=0.1)
    ref, xd, wd, bd = torch_head(xg, wg, bg, tg, None, torch.float64, label_smoothing=0.1)
    ref.backward()
    for name, g, c, r in zip(("loss", "dx", "dweight", "dbias"), gpu, cpu, (ref, xd.grad, wd.grad, bd.grad)):
        assert_twin(g, c, r.cpu(), torch.bfloat16, what=f"vocab {name}")


def test_cuda_head_memory(gen):
    """N=4096, D=64, C=30000 on the GPU: the fused head's peak allocation above its inputs stays below
    60% of torch's eager F.linear + F.cross_entropy (whose logits alone are 491 MB)."""
    N, D, C = 4096, 64, 30000
    x = torch.randn(N, D, device="cuda", requires_grad=True)
    w = (torch.randn(C, D, device="cuda") / 8).requires_grad_()
    t = torch.randint(0, C, (N,), device="cuda")
    peaks = {}
    for name, f in (("fused", lambda: lce(x, w, t)), ("eager", lambda: F.cross_entropy(F.linear(x, w), t))):
        x.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        f().backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    assert peaks["fused"] < 0.6 * peaks["eager"], peaks


# ---- errors and the module ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [5, -1, 2 ** 40])
def test_cuda_head_target_out_of_range(bad, gen):
    x = torch.randn(8, 4, device="cuda")
    w = torch.randn(5, 4, device="cuda")
    t = torch.randint(0, 5, (8,), generator=gen)
    t[-1] = bad
    with pytest.raises(ValueError, match=r"\btarget\b"):
        lce(x, w, t.cuda())
        torch.cuda.synchronize()


def test_cuda_head_device_mismatch(gen):
    x = torch.randn(8, 4, device="cuda")
    w = torch.randn(5, 4, device="cuda")
    t = torch.randint(0, 5, (8,), generator=gen)
    with pytest.raises(ValueError, match=r"\btarget\b"):
        lce(x, w, t)
    with pytest.raises(ValueError, match=r"\bweight\b"):
        lce(x, w.cpu(), t.cuda())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_module(dtype, gen):
    cw = make_class_weight(9, torch.float32, dtype, gen)
    m = LinearCrossEntropy(20, 9, device="cuda", dtype=dtype, class_weight=cw, label_smoothing=0.1)
    assert m.weight.is_cuda and m.weight.dtype == dtype
    m_cpu = LinearCrossEntropy(20, 9, dtype=dtype, class_weight=cw, label_smoothing=0.1)
    with torch.no_grad():
        m_cpu.weight.copy_(m.weight.cpu())
        m_cpu.bias.copy_(m.bias.cpu())
    x = randn((3, 11, 20), dtype, gen)
    t = make_target((3, 11), 9, gen)
    loss, loss_cpu = m(x.cuda(), t.cuda()), m_cpu(x, t)
    ref, _, wd, bd = torch_head(x, m_cpu.weight, m_cpu.bias, t, cw, torch.float64, label_smoothing=0.1)
    assert_twin(loss, loss_cpu, ref, dtype, what="module loss")
    loss.backward()
    loss_cpu.backward()
    ref.backward()
    assert_twin(m.weight.grad, m_cpu.weight.grad, wd.grad, dtype, what="module dweight")
    assert_twin(m.bias.grad, m_cpu.bias.grad, bd.grad, dtype, what="module dbias")
    assert torch.equal(m.predict(x.cuda()), m.logits(x.cuda()).argmax(-1))
