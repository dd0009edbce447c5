"""tltorch.losses: DPO (sigmoid, hinge, ipo, robust), SimPO, ORPO's odds ratio and the reward model's loss
against float64 formulas written from the papers and, where TRL's own loss functions can be called on
their own (CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss), against TRL; sequence_logprobs and
LinearDPOLoss (hidden states and the head, no logits) against float64 log_softmax formulas."""
import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import tltorch
from conftest import DTYPES, TOL, dtype_id, rel_err
from tltorch import losses as L

B = 6


def seqs(gen, n=4, scale=3.0):
    """n tensors of B sequence log-probs (negative, float64)."""
    return [-(torch.rand(B, generator=gen, dtype=torch.float64) * scale + 0.05) for _ in range(n)]


def logsig(x):
    return -torch.log1p(torch.exp(-x))


def ref_dpo(pc, pr, rc, rr, beta, loss_type, eps, lc=None, lr=None):
    """The papers' per-pair losses: DPO (Rafailov et al. 2023) with conservative smoothing, SLiC's hinge,
    IPO (Azar et al. 2023, eq. 17; length-normalised log-ratios when lengths are given, as TRL), robust
    DPO (Chowdhury et al. 2024, eq. 8)."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return (-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)).mean()
    if loss_type == "hinge":
        return torch.clamp(1 - beta * h, min=0).mean()
    if loss_type == "ipo":
        if lc is not None:
            h = (pc - rc) / lc.clamp(min=1) - (pr - rr) / lr.clamp(min=1)
        return ((h - 1 / (2 * beta)) ** 2).mean()
    return (((1 - eps) * -logsig(beta * h) - eps * -logsig(-beta * h)) / (1 - 2 * eps)).mean()


@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_formulas(gen, loss_type, eps, beta):
    pc, pr, rc, rr = seqs(gen)
    pc.requires_grad_(True)
    loss, m = L.dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
    ref = ref_dpo(pc, pr, rc, rr, beta, loss_type, eps)
    assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(loss, pc)
    (rg,) = torch.autograd.grad(ref, pc)
    assert torch.allclose(g, rg, rtol=1e-10, atol=1e-12)
    c, r = beta * (pc - rc).detach(), beta * (pr - rr)
    assert torch.allclose(m["rewards/chosen"], c.mean()) and torch.allclose(m["rewards/rejected"], r.mean())
    assert torch.allclose(m["rewards/margins"], (c - r).mean())
    assert m["rewards/accuracies"].item() == (c > r).float().mean().item()
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_ipo_length_normalised(gen):
    pc, pr, rc, rr = seqs(gen)
    lc, lr = torch.randint(0, 9, (B,), generator=gen), torch.randint(1, 9, (B,), generator=gen)
    loss, _ = L.dpo_loss(pc, pr, rc, rr, 0.1, "ipo", chosen_lengths=lc, rejected_lengths=lr)
    assert torch.allclose(loss, ref_dpo(pc, pr, rc, rr, 0.1, "ipo", 0.0, lc, lr))
    assert not torch.allclose(loss, L.dpo_loss(pc, pr, rc, rr, 0.1, "ipo")[0])


def _trl(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = pytest.importorskip(f"trl.experimental.{cls.lower()[:-7]}.{cls.lower()[:-7]}_trainer")
    return getattr(module, cls)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_without_reference_is_trls_cpo(gen, loss_type):
    """With a zero reference, DPO's sigmoid, hinge and ipo are TRL's CPO losses (the same formulas)."""
    cpo = _trl("CPOTrainer")
    pc, pr, _, _ = seqs(gen)
    eps = 0.1 if loss_type == "sigmoid" else 0.0
    ns = types.SimpleNamespace(beta=0.3, label_smoothing=eps, loss_type=loss_type, simpo_gamma=0.5, alpha=0.0,
                               accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses, trl_c, trl_r = cpo.cpo_loss(ns, pc, pr)
    zero = torch.zeros(B, dtype=torch.float64)
    loss, _ = L.dpo_loss(pc, pr, zero, zero, 0.3, loss_type, eps)
    assert torch.allclose(loss, trl_losses.mean(), rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_simpo_matches_trl_and_paper(gen, eps):
    pc, pr, _, _ = seqs(gen, scale=1.5)
    loss, m = L.simpo_loss(pc, pr, beta=2.0, gamma=0.8, label_smoothing=eps)
    # SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta/|y_w| log p_w - beta/|y_l| log p_l - gamma)
    logits = 2.0 * (pc - pr) - 0.8
    assert torch.allclose(loss, (-(1 - eps) * logsig(logits) - eps * logsig(-logits)).mean(), rtol=1e-12)
    assert torch.allclose(m["rewards/chosen"], 2.0 * pc.mean())
    cpo = _trl("CPOTrainer")
    ns = types.SimpleNamespace(beta=2.0, label_smoothing=eps, loss_type="simpo", simpo_gamma=0.8, alpha=0.0,
                               accelerator=types.SimpleNamespace(device="cpu"))
    assert torch.allclose(loss, cpo.cpo_loss(ns, pc, pr)[0].mean(), rtol=1e-12)


def test_orpo_matches_trl_and_paper(gen):
    pc, pr, _, _ = seqs(gen, scale=1.5)
    nll = torch.tensor(2.5, dtype=torch.float64)
    loss, m = L.orpo_loss(pc, pr, beta=0.2, nll_loss=nll)
    # ORPO (Hong et al. 2024, eqs. 4-7): odds(p) = p / (1 - p), L_OR = -log sigmoid(log odds_w / odds_l)
    odds = lambda lp: lp.exp() / (1 - lp.exp())  # noqa: E731
    log_odds = torch.log(odds(pc) / odds(pr))
    assert torch.allclose(loss, nll - 0.2 * logsig(log_odds).mean(), rtol=1e-10)
    orpo = _trl("ORPOTrainer")
    ns = types.SimpleNamespace(beta=0.2, accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses, trl_c, trl_r, ratio, lo = orpo.odds_ratio_loss(ns, pc, pr)
    assert torch.allclose(loss, nll - trl_losses.mean(), rtol=1e-6)
    assert torch.allclose(m["log_odds_ratio"], ratio.double(), rtol=1e-6)
    assert torch.allclose(m["log_odds_chosen"], lo.double(), rtol=1e-6)
    assert torch.allclose(m["rewards/chosen"], trl_c.mean().double(), rtol=1e-6) and m["nll_loss"] == nll


@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
@pytest.mark.parametrize("coef", [None, 0.01])
@pytest.mark.parametrize("shape", [(B,), (B, 1)])
def test_reward_loss(gen, margin, coef, shape):
    rc, rr = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    if margin == "tensor":
        margin = torch.rand(B, generator=gen, dtype=torch.float64)
    loss, m = L.reward_loss(rc, rr, margin, coef)
    c, r = rc.reshape(-1), rr.reshape(-1)
    ref = -logsig(c - r - (0.0 if margin is None else margin)).mean()
    if coef is not None:
        ref = ref + coef * ((c + r) ** 2).mean()
    assert torch.allclose(loss, ref, rtol=1e-12)
    assert m["accuracy"].item() == (c > r).float().mean().item() and torch.allclose(m["margin"], (c - r).mean())
    assert m["max_reward"] == torch.cat([c, r]).max()


def test_bad_input_names_the_argument(gen):
    pc, pr, rc, rr = seqs(gen)
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        L.dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="ref_rejected"):
        L.dpo_loss(pc, pr, rc, rr[:3])
    with pytest.raises(TypeError, match="policy_chosen"):
        L.dpo_loss(pc.long(), pr, rc, rr)
    with pytest.raises(ValueError, match="chosen_lengths"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=torch.ones(B))
    with pytest.raises(ValueError, match="r_rejected"):
        L.reward_loss(pc, pr[:2])
    with pytest.raises(ValueError, match="margin"):
        L.reward_loss(pc, pr, torch.ones(3))
    with pytest.raises(ValueError, match="nll_loss"):
        L.orpo_loss(pc, pr, nll_loss=torch.ones(2))
    with pytest.raises(ValueError, match="beta"):
        L.simpo_loss(pc, pr, beta=-1.0)
    e = torch.zeros(0)
    for name, call in (("policy_chosen", lambda: L.dpo_loss(e, e, e, e)), ("policy_chosen", lambda: L.simpo_loss(e, e)),
                       ("policy_chosen", lambda: L.orpo_loss(e, e)), ("r_chosen", lambda: L.reward_loss(e, e))):
        with pytest.raises(ValueError, match=f"{name} is empty"):
            call()


# ---- from hidden states: sequence_logprobs and LinearDPOLoss --------------------------------------------

V, D = 37, 12


def ref_seq(h, w, t, mask=None, average=False, b=None):
    ls = F.linear(h.double(), w.double(), None if b is None else b.double()).log_softmax(-1)
    keep = t != -100
    if mask is not None:
        keep = keep & (mask != 0)
    lp = torch.where(keep, ls.gather(-1, t.clamp(min=0)[..., None])[..., 0], 0.0)
    return lp.sum(-1) / keep.sum(-1).clamp(min=1) if average else lp.sum(-1)


def batch(gen, T, dtype=torch.float32, prompt=3):
    h = torch.randn(B, T, D, generator=gen).to(dtype)
    t = torch.randint(0, V, (B, T), generator=gen)
    t[:, :prompt] = -100  # the prompt
    t[-1] = -100  # a sequence with no completion token
    return h, t


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs(gen, average):
    h, t = batch(gen, 9)
    w = torch.randn(V, D, generator=gen) * 0.3
    mask = (torch.rand(B, 9, generator=gen) > 0.2).long()
    got = L.sequence_logprobs(h, w, t, mask=mask, average=average)
    assert got.shape == (B,) and got[-1] == 0
    assert rel_err(got, ref_seq(h, w, t, mask, average)) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
def test_linear_dpo_matches_float64(gen, dtype, loss_type):
    """Policy hidden states (chosen and rejected batches of different lengths), the head, and the reference
    as hidden states: the loss and the gradients of the hidden states and the head against the whole
    float64 computation; the reference given as precomputed log-probs gives the same."""
    hc, tc = batch(gen, 9, dtype)
    hr, tr = batch(gen, 7, dtype, prompt=2)
    w = (torch.randn(V, D, generator=gen) * 0.3).to(dtype)
    rhc, rhr = (torch.randn(x.shape, generator=gen).to(dtype) for x in (hc, hr))
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    fn = L.LinearDPOLoss(beta=0.2, loss_type=loss_type, label_smoothing=eps)
    leaves = [x.clone().requires_grad_(True) for x in (hc, hr, w)]
    loss, m = fn(leaves[0], leaves[1], leaves[2], tc, tr, ref_chosen_hidden=rhc, ref_rejected_hidden=rhr)
    grads = torch.autograd.grad(loss, leaves)

    r = [x.double().requires_grad_(True) for x in (hc, hr, w)]
    pc, pr = ref_seq(r[0], r[2], tc), ref_seq(r[1], r[2], tr)
    rc, rr = ref_seq(rhc, w, tc), ref_seq(rhr, w, tr)
    lengths = ((tc != -100).sum(-1), (tr != -100).sum(-1)) if loss_type == "ipo" else (None, None)
    ref = ref_dpo(pc, pr, rc, rr, 0.2, loss_type, eps, *lengths)
    ref_grads = torch.autograd.grad(ref, r)
    assert rel_err(loss, ref) <= 1e-5
    for a, b, x in zip(grads, ref_grads, (hc, hr, w)):
        assert a.dtype == x.dtype and rel_err(a, b) <= TOL[dtype]
    assert torch.allclose(m["rewards/chosen"].double(), (0.2 * (pc - rc)).mean(), rtol=1e-4, atol=1e-6)

    by_logps, _ = fn(hc, hr, w, tc, tr, ref_chosen_logps=rc.float(), ref_rejected_logps=rr.float())
    assert torch.allclose(by_logps, loss, rtol=1e-6, atol=1e-7)


def test_linear_dpo_lora_model_as_its_own_reference(gen):
    """The reference as the same model with its LoRA adapters off (tltorch.disable_lora): equal to the
    frozen base model's hidden states; the adapters get gradients, the base none."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(D, D))
    base = torch.nn.Sequential(torch.nn.Linear(D, D))
    base.load_state_dict(body.state_dict())
    tltorch.add_lora(body, tltorch.LoraConfig(r=4, target_modules=["0"], lora_alpha=8))
    for name, p in body.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3, generator=gen)  # a trained adapter: the policy moved
    head = torch.randn(V, D, generator=gen) * 0.3
    xc, tc = batch(gen, 8)
    xr, tr = batch(gen, 6)
    with tltorch.disable_lora(body), torch.no_grad():
        ref_c, ref_r = body(xc), body(xr)
    fn = L.LinearDPOLoss(beta=0.1)
    loss, m = fn(body(xc), body(xr), head, tc, tr, ref_chosen_hidden=ref_c, ref_rejected_hidden=ref_r)
    with torch.no_grad():
        expect, _ = fn(body(xc), body(xr), head, tc, tr, ref_chosen_hidden=base(xc), ref_rejected_hidden=base(xr))
    assert torch.allclose(loss, expect, rtol=1e-6) and m["rewards/margins"] != 0
    loss.backward()
    lora = [p for n, p in body.named_parameters() if "lora" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in body.named_parameters() if "lora" not in n)


def test_linear_dpo_reference_arguments(gen):
    hc, tc = batch(gen, 5)
    w = torch.randn(V, D, generator=gen)
    fn = L.LinearDPOLoss()
    with pytest.raises(ValueError, match="reference"):
        fn(hc, hc, w, tc, tc)
    with pytest.raises(ValueError, match="reference"):
        fn(hc, hc, w, tc, tc, ref_chosen_logps=torch.zeros(B), ref_chosen_hidden=hc)
    with pytest.raises(ValueError, match="both"):
        fn(hc, hc, w, tc, tc, ref_chosen_logps=torch.zeros(B))
    with pytest.raises(ValueError, match="ref_chosen_hidden must have shape"):
        fn(hc, hc, w, tc, tc, ref_chosen_hidden=hc[:, :4], ref_rejected_hidden=hc)
    with pytest.raises(ValueError, match="ref_rejected_hidden must have shape"):
        fn(hc, hc, w, tc, tc, ref_chosen_hidden=hc, ref_rejected_hidden=hc[1:])
    with pytest.raises(TypeError, match="ref_rejected_hidden must be a Tensor"):
        fn(hc, hc, w, tc, tc, ref_chosen_hidden=hc, ref_rejected_hidden=hc.numpy())
    with pytest.raises(ValueError, match="loss_type"):
        L.LinearDPOLoss(loss_type="nope")
    assert math.isfinite(fn(hc, hc, w, tc, tc, ref_chosen_logps=torch.zeros(B),
                            ref_rejected_logps=torch.zeros(B))[0].item())
