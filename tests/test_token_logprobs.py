"""tltorch.functional.token_logprobs (the fused head's per-token log-probabilities and entropies) and
linear_cross_entropy's z-loss, softcap and lse, against float64 torch formulas on the same rounded inputs:

    z = F.linear(h, W, b);  z = c tanh(z / c) (softcap c);  z = z / T (temperature)
    logp_i = log_softmax(z_i)[t_i] (0 where t_i == ignore_index),  H_i = -(p_i log p_i).sum()
    cross-entropy_i + lse_square_scale * logsumexp(z_i) ** 2   (the z-loss)

Gradients are checked for arbitrary upstream gradients (reduction "none": each row's own g_i), against
torch.autograd on the float64 formula."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import DTYPES, TOL, dtype_id, make2d, make_x, rel_err
from tltorch import functional as TF
from tltorch.ops import head

# Classes: the few-classes single pass (<= 16) and the chunked GEMM path.
CLASSES = (11, 67)


def ref_logprobs(h, w, t, b=None, ignore_index=-100, temperature=1.0, softcap=None):
    """(logp, entropy) in float64 from the formulas above (entropy 0 at ignored positions)."""
    z = F.linear(h.double(), w.double(), None if b is None else b.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    ls = z.log_softmax(-1)
    keep = t != ignore_index
    logp = ls.gather(-1, torch.where(keep, t, 0)[..., None])[..., 0]
    ent = -(ls.exp() * ls).sum(-1)
    return torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0)


def make(gen, lead, D, C, dtype, layout="contig", ignored=True, bias=True):
    h = make_x(lead, D, layout, dtype, gen)
    w = (torch.randn(C, D, generator=gen) * 0.5).to(dtype)
    b = (torch.randn(C, generator=gen) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, C, lead, generator=gen)
    if ignored:
        t.view(-1)[1::3] = -100
    return h, w, b, t


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("lead", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("opts", [{}, {"temperature": 0.7}, {"softcap": 2.5}, {"temperature": 1.3, "softcap": 4.0}],
                         ids=["plain", "temperature", "softcap", "both"])
def test_matches_float64_with_any_upstream_gradient(gen, dtype, C, lead, opts):
    h, w, b, t = make(gen, lead, 13, C, dtype)
    g = torch.randn(lead, generator=gen)  # arbitrary upstream gradient, signs and all
    hh, ww, bb = (x.detach().requires_grad_(True) for x in (h, w, b))
    lp, ent = TF.token_logprobs(hh, ww, t, bb, return_entropy=True, **opts)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == t.shape
    assert not ent.requires_grad
    got = torch.autograd.grad(lp, [hh, ww, bb], g)
    rh, rw, rb = (x.detach().double().requires_grad_(True) for x in (h, w, b))
    ref_lp, ref_ent = ref_logprobs(rh, rw, t, rb, **opts)
    ref = torch.autograd.grad(ref_lp, [rh, rw, rb], g.double())
    assert rel_err(lp, ref_lp) <= 1e-5 and rel_err(ent, ref_ent) <= 1e-5
    for name, a, r, x in zip(("hidden", "weight", "bias"), got, ref, (h, w, b)):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        assert rel_err(a, r) <= TOL[dtype], f"d{name}: {rel_err(a, r):.3g}"


@pytest.mark.parametrize("C", CLASSES)
def test_ignored_and_all_ignored(gen, C):
    h, w, b, t = make(gen, (3, 4), 9, C, torch.float32)
    t[1] = -100  # a whole sequence ignored
    t[0, 2] = 5
    h.requires_grad_(True)
    lp, ent = TF.token_logprobs(h, w, t, b, return_entropy=True)
    ign = t == -100
    assert (lp[ign] == 0).all() and (ent[ign] == 0).all() and not torch.signbit(lp[ign]).any()
    (dh,) = torch.autograd.grad(lp, h, torch.randn(3, 4, generator=gen))
    assert (dh[ign] == 0).all() and (dh[~ign] != 0).any()
    # every position ignored: zeros and zero gradients, no NaN
    hh, ww = h.detach().requires_grad_(True), w.clone().requires_grad_(True)
    lp = TF.token_logprobs(hh, ww, torch.full_like(t, -7), ignore_index=-7)
    assert (lp == 0).all()
    dh, dw = torch.autograd.grad(lp.sum(), [hh, ww])
    assert (dh == 0).all() and (dw == 0).all()


@pytest.mark.parametrize("layout", ["strided", "transposed", "offset"])
def test_non_contiguous_views(gen, layout):
    h, _, b, t = make(gen, (3, 6), 10, 40, torch.float32, layout=layout)
    w = make2d(40, 10, "t", torch.float32, gen, 0.5)
    tt = torch.randint(0, 40, (6, 3), generator=gen).t()  # targets as a transposed view
    tt[0, 0] = -100
    g = torch.randn(6, 3, generator=gen).t()
    hh, ww = h.requires_grad_(True), w.requires_grad_(True)
    lp = TF.token_logprobs(hh, ww, tt, b, temperature=0.9)
    dh, dw = torch.autograd.grad(lp, [hh, ww], g)
    rh, rw = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref, _ = ref_logprobs(rh, rw, tt, b, temperature=0.9)
    rdh, rdw = torch.autograd.grad(ref, [rh, rw], g.double())
    assert rel_err(lp, ref) <= 1e-5 and rel_err(dh, rdh) <= 1e-5 and rel_err(dw, rdw) <= 1e-5


def test_chunks_and_frozen_weight_agree(gen, monkeypatch):
    """Many chunks of rows give the chunked result; the gradient of hidden is the same whether the
    weight is frozen (computed in the forward pass, scaled by g in backward) or trained (recomputed with
    g folded in), through repeated backward passes."""
    h, w, b, t = make(gen, (4, 9), 16, 70, torch.float32)
    g = torch.randn(4, 9, generator=gen)

    def dh(weight_grad, retain=1):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(weight_grad)
        lp = TF.token_logprobs(hh, ww, t, b, softcap=3.0)
        out = [torch.autograd.grad(lp, hh, g * (k + 1), retain_graph=True)[0] / (k + 1) for k in range(retain)]
        return lp, out
    lp, (frozen, again) = dh(False, retain=2)
    _, (trained,) = dh(True)
    monkeypatch.setattr(head, "_XENT_CHUNK_FLOATS", 3 * (70 + 70 + 16 + 1))  # 3 rows a chunk
    lp_chunked, (chunked,) = dh(False)
    assert torch.allclose(lp, lp_chunked, rtol=1e-6, atol=1e-6)
    for other in (again, trained, chunked):
        assert torch.allclose(frozen, other, rtol=1e-5, atol=1e-6)


def test_compiles_without_graph_breaks(gen):
    h, w, b, t = make(gen, (2, 5), 8, 30, torch.float32)
    g = torch.randn(2, 5, generator=gen)

    def f(h, w):
        lp, ent = TF.token_logprobs(h, w, t, b, temperature=0.8, return_entropy=True)
        return (lp * g).sum(), ent
    hh = h.clone().requires_grad_(True)
    loss, ent = torch.compile(f, fullgraph=True, backend="aot_eager")(hh, w)
    (dh,) = torch.autograd.grad(loss, hh)
    he = h.clone().requires_grad_(True)
    loss_e, ent_e = f(he, w)
    (dh_e,) = torch.autograd.grad(loss_e, he)
    assert torch.allclose(loss, loss_e) and torch.allclose(ent, ent_e) and torch.allclose(dh, dh_e, atol=1e-6)


ISA_SCRIPT = """
import sys, torch
from tltorch import functional as TF, _C
torch.manual_seed(0)
out = []
for C in (11, 67):
    h = torch.randn(5, 23, requires_grad=True); w = torch.randn(C, 23); t = torch.randint(0, C, (5,)); t[2] = -100
    lp, ent = TF.token_logprobs(h, w, t, temperature=0.8, softcap=2.0, return_entropy=True)
    zz = (2.0 * torch.tanh(h.double() @ w.double().T / 2.0) / 0.8).log_softmax(-1)
    ref = torch.where(t != -100, zz.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    rent = torch.where(t != -100, -(zz.exp() * zz).sum(-1), 0.0)
    out.append(max((lp.double() - ref).abs().max().item(), (ent.double() - rent).abs().max().item()))
print(_C.cpu_isa(), max(out))
"""


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_each_simd_path(isa):
    env = dict(os.environ, TLTORCH_CPU_ISA=isa, OMP_NUM_THREADS="1")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got_isa, err = r.stdout.split()
    assert got_isa == isa and float(err) < 1e-5


@pytest.mark.parametrize("kw, exc, words", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(return_entropy=1), TypeError, "return_entropy"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_bad_options(gen, kw, exc, words):
    h, w, b, t = make(gen, (4,), 5, 20, torch.float32)
    with pytest.raises(exc, match=words):
        TF.token_logprobs(h, w, t, b, **kw)


def test_bad_tensors(gen):
    h, w, b, t = make(gen, (2, 3), 5, 20, torch.float32)
    with pytest.raises(TypeError, match="hidden"):
        TF.token_logprobs(h.double(), w, t)
    with pytest.raises(TypeError, match="targets"):
        TF.token_logprobs(h, w, t.float())
    with pytest.raises(ValueError, match="targets must have shape"):
        TF.token_logprobs(h, w, t[:, :2])
    with pytest.raises(ValueError, match="weight expects 5 input features but hidden has 4"):
        TF.token_logprobs(h[..., :4], w, t)
    with pytest.raises(TypeError, match="weight has dtype"):
        TF.token_logprobs(h, w.half(), t)
    with pytest.raises(ValueError, match="bias must have shape"):
        TF.token_logprobs(h, w, t, b[:3])
    t[0, 0] = 20
    with pytest.raises(ValueError, match="target holds class index 20"):
        TF.token_logprobs(h, w, t)


# ---- linear_cross_entropy: z-loss, softcap, lse ----------------------------------------------------------

def ref_xent(x, w, t, b, cw, smoothing, reduction, zs, softcap):
    """(loss, lse) in float64: torch's cross-entropy of the softcapped logits plus zs * lse ** 2 on each
    counted row, the mean dividing by torch's own divisor (the counted rows' class weights)."""
    z = F.linear(x, w, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    keep = t != -100
    lse = torch.where(keep, z.logsumexp(-1), 0.0)
    ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1), weight=cw, label_smoothing=smoothing,
                         reduction="none").reshape(t.shape)
    rows = ce + zs * lse ** 2
    if reduction == "none":
        return rows, lse
    div = (cw[t.clamp(min=0)] * keep).sum() if cw is not None else keep.sum()
    return (rows.sum() / div if reduction == "mean" else rows.sum()), lse


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("zs, softcap, weighted", [(1e-2, None, False), (0.0, 3.0, False), (5e-3, 2.0, True)])
def test_cross_entropy_zloss_softcap_lse(gen, dtype, C, reduction, zs, softcap, weighted):
    x, w, b, t = make(gen, (2, 5), 12, C, dtype)
    cw = torch.rand(C, generator=gen) + 0.5 if weighted else None
    smoothing = 0.1 if weighted else 0.0
    up = torch.randn(t.shape if reduction == "none" else (), generator=gen)
    xx, ww, bb = (a.detach().requires_grad_(True) for a in (x, w, b))
    loss, lse = TF.linear_cross_entropy(xx, ww, t, bb, class_weight=cw, label_smoothing=smoothing,
                                        reduction=reduction, lse_square_scale=zs, softcap=softcap, return_lse=True)
    assert loss.dtype == dtype and lse.dtype == torch.float32 and lse.shape == t.shape and not lse.requires_grad
    got = torch.autograd.grad(loss, [xx, ww, bb], up.to(dtype))
    rx, rw, rb = (a.detach().double().requires_grad_(True) for a in (x, w, b))
    ref, ref_lse = ref_xent(rx, rw, t, rb, None if cw is None else cw.double(), smoothing, reduction, zs, softcap)
    ref_grads = torch.autograd.grad(ref, [rx, rw, rb], up.to(dtype).double())
    assert rel_err(loss, ref) <= TOL[dtype] and rel_err(lse, ref_lse) <= 1e-5
    for name, a, r in zip(("x", "weight", "bias"), got, ref_grads):
        assert rel_err(a, r) <= TOL[dtype], f"d{name}: {rel_err(a, r):.3g}"


def test_cross_entropy_options_checked(gen):
    x, w, b, t = make(gen, (4,), 5, 20, torch.float32)
    with pytest.raises(ValueError, match="lse_square_scale"):
        TF.linear_cross_entropy(x, w, t, lse_square_scale=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        TF.linear_cross_entropy(x, w, t, softcap=0.0)
    with pytest.raises(TypeError, match="return_lse"):
        TF.linear_cross_entropy(x, w, t, return_lse="yes")
    # the default options take the plain op: the same loss as before, a tensor, not a tuple
    assert isinstance(TF.linear_cross_entropy(x, w, t), torch.Tensor)
