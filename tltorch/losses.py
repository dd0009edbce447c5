"""Sequence-level losses of preference and reward training, on the fused head's per-token log-probs.

The formulas are TRL's (trl 1.16: DPOTrainer, CPOTrainer's SimPO, ORPOTrainer's odds ratio,
RewardTrainer), each on per-sequence numbers, and each returns (loss, metrics): the loss a scalar (the
mean over the batch), the metrics 0-d detached tensors named as TRL logs them ("rewards/chosen",
"rewards/rejected", "rewards/accuracies", "rewards/margins", ...), left on the device (no host sync).

    sequence_logprobs   sum (or mean) of token_logprobs over a sequence's completion tokens
    dpo_loss            DPO and its sigmoid, hinge, ipo and robust variants, against a reference
    simpo_loss          SimPO: no reference, length-normalised log-probs and a target margin gamma
    orpo_loss           ORPO's odds-ratio term (plus the NLL when given)
    reward_loss         a reward model's Bradley-Terry loss, with margin and centering
    LinearDPOLoss       DPO from the hidden states of the chosen and rejected batches and the head,
                        without the B x T x V logits of either
    linear_distillation_loss   a student head distilled from a teacher's (DistilBERT's soft KL at a
                        temperature plus hard cross-entropy; reverse KL, generalised JSD), chunk by chunk
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .functional import _check_positive, _check_same, _check_tensor, check_ignore_index, token_logprobs

__all__ = ["sequence_logprobs", "dpo_loss", "simpo_loss", "orpo_loss", "reward_loss", "LinearDPOLoss",
           "DPO_LOSS_TYPES", "linear_distillation_loss", "DIVERGENCES"]

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def _check_seq(name: str, t, ref: Optional[Tensor] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; expected a floating-point tensor")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per sequence), got shape {tuple(t.shape)}")
    if ref is None and t.shape[0] == 0:
        raise ValueError(f"{name} is empty: the loss is a mean over the batch's pairs, and it has none")
    if ref is not None and (t.shape != ref.shape or t.device != ref.device):
        raise ValueError(f"{name} must have the shape and device of the first argument {tuple(ref.shape)} "
                         f"on {ref.device}, got {tuple(t.shape)} on {t.device}")


def _check_smoothing(label_smoothing, upper: float = 1.0, closed: bool = True) -> float:
    v = label_smoothing
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"label_smoothing must be a number, got {type(v).__name__}")
    v = float(v)
    if not (0.0 <= v <= upper if closed else 0.0 <= v < upper):
        raise ValueError(f"label_smoothing must be in [0, {upper}{']' if closed else ')'}, got {v!r}")
    return v


def _smoothed_sigmoid(logits: Tensor, eps: float) -> Tensor:
    """-(1 - eps) logsigmoid(logits) - eps logsigmoid(-logits): conservative DPO's (and CPO's) loss."""
    loss = -F.logsigmoid(logits)
    return loss if eps == 0.0 else (1 - eps) * loss - eps * F.logsigmoid(-logits)


def _reward_metrics(chosen: Tensor, rejected: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
                    ) -> Dict[str, Tensor]:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}


def sequence_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                      mask: Optional[Tensor] = None, ignore_index: int = -100, temperature: float = 1.0,
                      softcap: Optional[float] = None, average: bool = False) -> Tensor:
    """Each sequence's log-probability: the sum over its completion tokens of token_logprobs.

    hidden: (B, T, D); targets: (B, T), the next token at each position, ignore_index where a position
    does not count (the prompt, padding); mask: None or (B, T), 0 where a position does not count (bool,
    integer or float, a float mask weighting each token). average: the mean over the counted tokens
    (a sequence with none: 0), as SimPO, ORPO and TRL's IPO take them. Returns (B,) float32.
    """
    lp = token_logprobs(hidden, weight, targets, bias, ignore_index, temperature, softcap)
    if lp.dim() != 2:
        raise ValueError(f"hidden must be (batch, tokens, features), got shape {tuple(hidden.shape)}")
    counted = targets != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != targets.shape:
            raise ValueError(f"mask must be a tensor of shape {tuple(targets.shape)} (targets' shape) or None")
        counted = counted & (mask != 0)
        lp = lp * mask.to(lp.dtype)
    total = lp.sum(-1)
    return total / counted.sum(-1).clamp(min=1) if average else total


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None
             ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Direct preference optimisation on sequence log-probs (B,) of the policy and the reference.

    With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), per pair:
      sigmoid  -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)    (DPO; eps > 0: conservative DPO)
      hinge    relu(1 - beta h)                                             (SLiC)
      ipo      (h' - 1 / (2 beta))^2, h' = h with each log-ratio divided by its completion length when
               chosen_lengths and rejected_lengths are given (as TRL does), h otherwise (the paper's)
      robust   ((1 - eps)(-logsigmoid(beta h)) - eps(-logsigmoid(-beta h))) / (1 - 2 eps)   (eps < 1/2)
    eps = label_smoothing. Returns (the mean over pairs, metrics): rewards/chosen and rewards/rejected
    (beta times the log-ratios, averaged), rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected.
    """
    _check_seq("policy_chosen", policy_chosen)
    for name, t in (("policy_rejected", policy_rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        _check_seq(name, t, policy_chosen)
    beta = _check_positive("beta", beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    eps = _check_smoothing(label_smoothing, 0.5, closed=False) if loss_type == "robust" \
        else _check_smoothing(label_smoothing)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths and rejected_lengths go together: give both or neither")
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * (chosen - rejected), eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen - rejected))
    elif loss_type == "ipo":
        if chosen_lengths is not None:
            for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
                if not isinstance(t, torch.Tensor) or t.shape != policy_chosen.shape:
                    raise ValueError(f"{name} must be a tensor of shape {tuple(policy_chosen.shape)}")
            h = chosen / chosen_lengths.clamp(min=1) - rejected / rejected_lengths.clamp(min=1)
        else:
            h = chosen - rejected
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        clean = -(1 - eps) * F.logsigmoid(beta * (chosen - rejected))
        flipped = -eps * F.logsigmoid(-beta * (chosen - rejected))
        losses = (clean - flipped) / (1 - 2 * eps)
    return losses.mean(), _reward_metrics(beta * chosen, beta * rejected, policy_chosen, policy_rejected)


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> Tuple[Tensor, Dict[str, Tensor]]:
    """SimPO (no reference model) on length-normalised log-probs (B,) (sequence_logprobs(...,
    average=True)), as TRL's CPOTrainer computes it with loss_type="simpo" (its simpo_gamma is gamma):
    -(1 - eps) logsigmoid(beta (c - r) - gamma) - eps logsigmoid(-(beta (c - r) - gamma)).
    Returns (the mean, metrics): rewards/* are beta times the log-probs, as TRL logs them.
    """
    _check_seq("policy_chosen", policy_chosen)
    _check_seq("policy_rejected", policy_rejected, policy_chosen)
    beta = _check_positive("beta", beta)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise TypeError(f"gamma must be a finite number, got {gamma!r}")
    eps = _check_smoothing(label_smoothing)
    logits = (policy_chosen - policy_rejected) - gamma / beta
    losses = _smoothed_sigmoid(beta * logits, eps)
    return losses.mean(), _reward_metrics(beta * policy_chosen, beta * policy_rejected, policy_chosen,
                                          policy_rejected)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, beta: float = 0.1, nll_loss: Optional[Tensor] = None
              ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """ORPO's odds-ratio term on length-normalised log-probs (B,) (sequence_logprobs(..., average=True)),
    as TRL's ORPOTrainer: log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r)), loss = nll_loss -
    beta * mean(logsigmoid(log_odds)) (nll_loss: the chosen completions' cross-entropy, or None for the
    odds-ratio term alone). Computed in float32 at least. Metrics: rewards/* (beta times the log-probs),
    log_odds_ratio (mean logsigmoid(log_odds)), log_odds_chosen (mean log_odds), nll_loss when given.
    """
    _check_seq("policy_chosen", policy_chosen)
    _check_seq("policy_rejected", policy_rejected, policy_chosen)
    beta = _check_positive("beta", beta)
    c = policy_chosen if policy_chosen.dtype == torch.float64 else policy_chosen.float()
    r = policy_rejected if policy_rejected.dtype == torch.float64 else policy_rejected.float()
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    loss = -beta * ratio.mean()
    metrics = _reward_metrics(beta * c, beta * r, c, r)
    metrics.update({"log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()})
    if nll_loss is not None:
        if not isinstance(nll_loss, torch.Tensor) or nll_loss.numel() != 1:
            raise ValueError("nll_loss must be a one-element tensor (the chosen completions' cross-entropy) or None")
        loss = nll_loss.reshape(()) + loss
        metrics["nll_loss"] = nll_loss.detach().reshape(())
    return loss, metrics


def reward_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Optional[Tensor] = None,
                center_rewards_coefficient: Optional[float] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """A reward model's pairwise loss, as TRL's RewardTrainer: -mean(logsigmoid(r_chosen - r_rejected -
    margin)) + center_rewards_coefficient * mean((r_chosen + r_rejected)^2) (each term only when given).
    r_chosen, r_rejected: (B,) or (B, 1) scalar rewards; margin: None, a number or (B,). Metrics as
    TRL logs them: accuracy, margin (mean r_chosen - r_rejected), min_reward, mean_reward, max_reward.
    """
    rc = r_chosen.squeeze(-1) if isinstance(r_chosen, torch.Tensor) and r_chosen.dim() == 2 else r_chosen
    rr = r_rejected.squeeze(-1) if isinstance(r_rejected, torch.Tensor) and r_rejected.dim() == 2 else r_rejected
    _check_seq("r_chosen", rc)
    _check_seq("r_rejected", rr, rc)
    diff = rc - rr
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            if margin.shape not in (rc.shape, ()):
                raise ValueError(f"margin must be a number or of shape {tuple(rc.shape)}, got {tuple(margin.shape)}")
        elif isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise TypeError(f"margin must be a number, a tensor or None, got {type(margin).__name__}")
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        if isinstance(center_rewards_coefficient, bool) or not isinstance(center_rewards_coefficient, (int, float)):
            raise TypeError("center_rewards_coefficient must be a number or None")
        loss = loss + center_rewards_coefficient * torch.mean((rc + rr) ** 2)
    with torch.no_grad():
        rewards = torch.cat([rc, rr])
        metrics = {"accuracy": (rc > rr).float().mean(), "margin": (rc - rr).mean(), "min_reward": rewards.min(),
                   "mean_reward": rewards.mean(), "max_reward": rewards.max()}
    return loss, metrics


class LinearDPOLoss(torch.nn.Module):
    """DPO from hidden states and the vocabulary head, the log-probs computed by the fused head (no
    B x T x V logits, for the policy or the reference).

    LinearDPOLoss(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, ignore_index=-100,
    temperature=1.0, softcap=None)(chosen_hidden, rejected_hidden, weight, chosen_targets,
    rejected_targets, bias=None, chosen_mask=None, rejected_mask=None, *, ref_chosen_logps=None,
    ref_rejected_logps=None, ref_chosen_hidden=None, ref_rejected_hidden=None, ref_weight=None,
    ref_bias=None) -> (loss, metrics), as dpo_loss.

    hidden: (B, T, D) of the policy's last layer for each batch (the two may differ in T); targets:
    (B, T), the next token, ignore_index over the prompt and padding (or mask it). The reference: its
    sequence log-probs (B,) each (computed once, e.g. with sequence_logprobs under torch.no_grad), or its
    hidden states, whose log-probs are computed here without gradient under ref_weight and ref_bias
    (default: the policy's head). For a LoRA policy the reference is the same model with its adapters
    off: run it under ``with tltorch.disable_lora(model), torch.no_grad():`` for the reference hidden
    states. For "ipo" each log-ratio is divided by its completion length (the counted tokens), as TRL.
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 ignore_index: int = -100, temperature: float = 1.0, softcap: Optional[float] = None):
        super().__init__()
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
        self.beta = _check_positive("beta", beta)
        self.loss_type, self.label_smoothing = loss_type, label_smoothing
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}"

    def _logps(self, hidden, weight, targets, bias, mask):
        return sequence_logprobs(hidden, weight, targets, bias, mask, self.ignore_index, self.temperature,
                                 self.softcap)

    def forward(self, chosen_hidden: Tensor, rejected_hidden: Tensor, weight: Tensor, chosen_targets: Tensor,
                rejected_targets: Tensor, bias: Optional[Tensor] = None, chosen_mask: Optional[Tensor] = None,
                rejected_mask: Optional[Tensor] = None, *, ref_chosen_logps: Optional[Tensor] = None,
                ref_rejected_logps: Optional[Tensor] = None, ref_chosen_hidden: Optional[Tensor] = None,
                ref_rejected_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                ref_bias: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        by_logps = ref_chosen_logps is not None or ref_rejected_logps is not None
        by_hidden = ref_chosen_hidden is not None or ref_rejected_hidden is not None
        if by_logps == by_hidden:
            raise ValueError("give the reference as ref_chosen_logps and ref_rejected_logps, or as "
                             "ref_chosen_hidden and ref_rejected_hidden (one pair, both of it)")
        pair = (ref_chosen_logps, ref_rejected_logps) if by_logps else (ref_chosen_hidden, ref_rejected_hidden)
        if pair[0] is None or pair[1] is None:
            raise ValueError("the reference needs both its chosen and its rejected part")
        if by_hidden:  # named here: the kernel would name the targets, which have the policy's shape
            for name, ref, pol in (("ref_chosen_hidden", ref_chosen_hidden, chosen_hidden),
                                   ("ref_rejected_hidden", ref_rejected_hidden, rejected_hidden)):
                if not isinstance(ref, Tensor):
                    raise TypeError(f"{name} must be a Tensor, not {type(ref).__name__}")
                if isinstance(pol, Tensor) and ref.shape[:-1] != pol.shape[:-1]:
                    raise ValueError(f"{name} must have shape (..., hidden) with the policy's leading shape "
                                     f"{tuple(pol.shape[:-1])}, got {tuple(ref.shape)}")
        policy_chosen = self._logps(chosen_hidden, weight, chosen_targets, bias, chosen_mask)
        policy_rejected = self._logps(rejected_hidden, weight, rejected_targets, bias, rejected_mask)
        if by_hidden:
            w, b = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
            with torch.no_grad():
                ref_chosen = self._logps(ref_chosen_hidden, w.detach(), chosen_targets,
                                         None if b is None else b.detach(), chosen_mask)
                ref_rejected = self._logps(ref_rejected_hidden, w.detach(), rejected_targets,
                                           None if b is None else b.detach(), rejected_mask)
        else:
            ref_chosen, ref_rejected = (t.to(policy_chosen.dtype) for t in pair)
        lengths = {}
        if self.loss_type == "ipo":
            def count(targets, mask):
                c = targets != self.ignore_index
                return (c if mask is None else c & (mask != 0)).sum(-1)
            lengths = dict(chosen_lengths=count(chosen_targets, chosen_mask),
                           rejected_lengths=count(rejected_targets, rejected_mask))
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, self.loss_type,
                        self.label_smoothing, **lengths)


# ---- distillation ------------------------------------------------------------------------------------

DIVERGENCES = ("kl", "reverse_kl", "jsd")

# A chunk's float32 logits (of the larger vocabulary) stay under this: the student's and the teacher's
# logits of a chunk are the only buffers of its size (ops.distill_rows turns the student's into the
# gradient in place).
_DISTILL_CHUNK_BYTES = 32 << 20
_DISTILL_MAX_ROWS = 1024


def _chunk_rows(V: int) -> int:
    return max(1, min(_DISTILL_MAX_ROWS, _DISTILL_CHUNK_BYTES // (4 * max(V, 1))))


class _LinearDistillation(torch.autograd.Function):
    """loss and its gradients in one pass over chunks of rows; backward scales them by the upstream
    gradient. Rows: the student's (N, D) hidden states (only the counted ones, when `index` is given)."""

    @staticmethod
    def forward(ctx, h, w, b, th, tw, tb, tz, targets, ignore_index, index, count, T, alpha, kind, beta):
        N, Vs = h.shape[0] if index is None else index.numel(), w.shape[0]
        Vt = tz.shape[1] if tz is not None else tw.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dev = h.device
        loss = torch.zeros((), dtype=torch.float64, device=dev)
        dh = torch.zeros(h.shape, dtype=torch.float32, device=dev) if need_h else None
        dw = torch.empty(w.shape, dtype=torch.float32, device=dev) if need_w else None
        db = torch.zeros(Vs, dtype=torch.float32, device=dev) if need_b else None
        b32 = None if b is None else b.float()
        tb32 = None if tb is None else tb.float()
        scale = 1.0 / max(count, 1)
        code = ops.DIVERGENCES[kind]
        rows = _chunk_rows(max(Vs, Vt))
        # one buffer each for the chunks' logits, reused
        s_buf = torch.empty(min(rows, N), Vs, dtype=torch.float32, device=dev)
        t_buf = torch.empty(min(rows, N), Vt, dtype=torch.float32, device=dev) if tz is None else None
        for i in range(0, N, rows):
            sel = slice(i, min(i + rows, N)) if index is None else index[i:i + rows]
            hc = h[sel]
            n = hc.shape[0]
            s = s_buf[:n]
            ops.gemm(hc, w, s, b32, 1.0, 0.0, 2)
            if tz is not None:
                t = tz[sel].float()  # read, never written (distill_rows takes t as it is)
                if t.stride(1) != 1:  # the rows' logits contiguous, as distill_rows reads them
                    t = t.contiguous()
            else:
                t = t_buf[:n]
                ops.gemm(th[sel], tw, t, tb32, 1.0, 0.0, 2)
            # each row's loss, and s becomes g = dloss/ds (the soft and hard terms)
            rows_loss = ops.distill_rows(s, t, None if targets is None else targets[sel], ignore_index, T, alpha,
                                         code, beta)
            loss += rows_loss.sum(dtype=torch.float64)
            g = s
            if need_b:
                ops.colsum(g, db, 1.0)
            gw = g if w.dtype == torch.float32 else g.to(w.dtype)  # the GEMMs multiply like dtypes
            if need_h:
                if index is None:
                    ops.gemm(gw, w, dh[sel], None, scale, 0.0, 0)
                else:
                    part = torch.empty(n, h.shape[1], dtype=torch.float32, device=dev)
                    ops.gemm(gw, w, part, None, scale, 0.0, 0)
                    dh.index_copy_(0, sel, part)
            if need_w:
                ops.gemm(gw, hc, dw, None, scale, 0.0 if i == 0 else 1.0, 1)
        if need_w and N == 0:
            dw.zero_()
        if need_b:
            db.mul_(scale)
        ctx.grads = (dh, dw, db)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        return (loss * scale).float()

    @staticmethod
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError("linear_distillation_loss keeps its gradients for one backward only; "
                               "recompute the loss to differentiate it again")
        out = tuple(None if g is None else g.mul_(grad).to(dt) for g, dt in zip(ctx.grads, ctx.dtypes))
        ctx.grads = None
        return out + (None,) * 12


def _check_number(name: str, v, lo: float, hi: float) -> float:
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point():
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number in [{lo}, {hi}], got {type(v).__name__}")
    v = float(v)
    if not lo <= v <= hi:  # refuses nan too
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v!r}")
    return v


def _check_bias(model: str, bias: Optional[Tensor], hidden: Tensor, V: int) -> None:
    if bias is not None:
        _check_tensor(f"{model}_bias", bias)
        _check_same(f"{model}_bias", bias, f"{model}_hidden", hidden)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"{model}_bias must have shape ({V},), got {tuple(bias.shape)}")


def linear_distillation_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Optional[Tensor] = None,
                             teacher_weight: Optional[Tensor] = None, teacher_logits: Optional[Tensor] = None,
                             targets: Optional[Tensor] = None, temperature: float = 2.0, alpha: float = 0.5,
                             divergence: str = "kl", beta: float = 0.5, ignore_index: int = -100,
                             student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None) -> Tensor:
    """Knowledge distillation through the vocabulary heads, without the B x T x V logits of either model.

    With z_s = student_hidden @ student_weight.T + student_bias, z_t the teacher's (teacher_hidden @
    teacher_weight.T + teacher_bias, or teacher_logits), p^T = softmax(z / T), T = temperature, per
    counted token i:

        loss_i = (1 - alpha) T^2 D(p_t^T || p_s^T) + alpha (-log softmax(z_s)[target_i])   with targets
        loss_i = T^2 D(p_t^T || p_s^T)                                                     without (alpha unused)

    and the loss is the mean over the counted tokens (those whose target is not ignore_index; every
    token without targets: pass hidden[mask] to leave out padding). T^2 keeps the soft term's gradient
    on the scale of the hard one's as T changes (Hinton et al.; DistilBERT). A batch with no counted
    token gives 0 and zero gradients. D, by `divergence`:
      "kl"          KL(p_t || p_s), forward KL (DistilBERT, Hinton et al.)
      "reverse_kl"  KL(p_s || p_t)
      "jsd"         the generalised Jensen-Shannon divergence of GKD as TRL's GKDTrainer computes it:
                    beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s, with
                    beta 0 taken as "kl" and 1 as "reverse_kl" (TRL's convention); beta in [0, 1]

    student_hidden: (N, D) or (B, T, D); student_weight: (Vs, D), student_bias: (Vs,) or None, all one
    dtype (float32, bfloat16 or float16). Either teacher_hidden (hidden's leading shape, Dt features)
    with teacher_weight (Vt, Dt) and teacher_bias (Vt,) or None, in one float dtype; or teacher_logits
    (hidden's leading shape, Vt). targets: None or hidden.shape[:-1] of class indices in [0, Vs) (int64
    or int32) or ignore_index. The teacher gets no gradient (it is read detached, as under no_grad).

    Vocabularies of different sizes (a model's embedding rounded up to a multiple of 64 or 128, say) are
    aligned on their first min(Vs, Vt) classes and the smaller one padded with probability 0 (logit
    -inf): the classes it lacks are ones it can never predict, and padding rather than truncating keeps
    each model's distribution the one it defines, normalised over its own vocabulary. A zero on one side
    makes a KL infinite where the other side has mass, so "kl" needs Vs >= Vt (the student's extra
    classes are pushed to probability 0), "reverse_kl" needs Vt >= Vs, and "jsd" with 0 < beta < 1 takes
    either (m > 0 wherever either has mass); other combinations raise ValueError.

    Rows are processed in chunks whose float32 logits stay under 32 MB (at most 1024 rows): each
    chunk's student and teacher logits come from tltorch's GEMM op (tltorch.ops.gemm, which writes
    float32 logits from bfloat16/float16 inputs directly and accumulates dW in place), and its loss and
    gradient wrt the student logits are computed there and then, row by row, by tltorch.ops.distill_rows
    (on the CPU a C kernel making a few vectorised passes over each row, the gradient written over the
    student's logits), and taken back to student_hidden, student_weight and student_bias. The logits
    and the gradient are float32, the rows' sums float64 (the gradient of the logits is rounded to
    the weight's dtype for the two backward GEMMs, as torch's own backward feeds them). Returns a
    float32 scalar; its backward only scales the stored gradients, so it can be run once per call.
    """
    _check_tensor("student_hidden", student_hidden)
    _check_tensor("student_weight", student_weight)
    _check_same("student_weight", student_weight, "student_hidden", student_hidden)
    if student_hidden.dim() not in (2, 3):
        raise ValueError(f"student_hidden must be (N, D) or (B, T, D), got shape {tuple(student_hidden.shape)}")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1] or student_weight.shape[0] < 1:
        raise ValueError(f"student_weight must be (vocab, {student_hidden.shape[-1]}) (student_hidden's features), "
                         f"got shape {tuple(student_weight.shape)}")
    lead = tuple(student_hidden.shape[:-1])
    Vs = student_weight.shape[0]
    _check_bias("student", student_bias, student_hidden, Vs)
    by_hidden = teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None
    if by_hidden == (teacher_logits is not None):
        raise ValueError("give the teacher as teacher_hidden with teacher_weight (and teacher_bias), or as "
                         "teacher_logits: exactly one of the two")
    dev = student_hidden.device
    if by_hidden:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight go together: give both")
        _check_tensor("teacher_hidden", teacher_hidden)
        _check_tensor("teacher_weight", teacher_weight)
        _check_same("teacher_weight", teacher_weight, "teacher_hidden", teacher_hidden)
        if tuple(teacher_hidden.shape[:-1]) != lead or teacher_hidden.dim() != student_hidden.dim():
            raise ValueError(f"teacher_hidden must have shape {lead} + (features,) (student_hidden's tokens), got "
                             f"{tuple(teacher_hidden.shape)}")
        if teacher_hidden.device != dev:
            raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {dev}")
        if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1] or teacher_weight.shape[0] < 1:
            raise ValueError(f"teacher_weight must be (vocab, {teacher_hidden.shape[-1]}) (teacher_hidden's "
                             f"features), got shape {tuple(teacher_weight.shape)}")
        Vt = teacher_weight.shape[0]
        _check_bias("teacher", teacher_bias, teacher_hidden, Vt)
    else:
        _check_tensor("teacher_logits", teacher_logits)
        if teacher_logits.dim() != student_hidden.dim() or tuple(teacher_logits.shape[:-1]) != lead \
                or teacher_logits.shape[-1] < 1:
            raise ValueError(f"teacher_logits must have shape {lead} + (vocab,) (student_hidden's tokens), got "
                             f"{tuple(teacher_logits.shape)}")
        if teacher_logits.device != dev:
            raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_hidden is on {dev}")
        Vt = teacher_logits.shape[-1]
    T = _check_positive("temperature", temperature)
    alpha = _check_number("alpha", alpha, 0.0, 1.0)
    beta = _check_number("beta", beta, 0.0, 1.0)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    kind = divergence
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "kl" if beta == 0.0 else "reverse_kl"
    if kind == "kl" and Vt > Vs:
        raise ValueError(f"divergence {divergence!r} (forward KL) needs the student's vocabulary to cover the "
                         f"teacher's: the teacher has {Vt} classes, the student {Vs}, and KL(p_t || p_s) is "
                         "infinite where p_s is 0; use 'jsd' (0 < beta < 1) or a student head of >= the teacher's size")
    if kind == "reverse_kl" and Vs > Vt:
        raise ValueError(f"divergence {divergence!r} (reverse KL) needs the teacher's vocabulary to cover the "
                         f"student's: the student has {Vs} classes, the teacher {Vt}, and KL(p_s || p_t) is "
                         "infinite where p_t is 0; use 'kl' or 'jsd' (0 < beta < 1)")
    index = None
    h2 = student_hidden.reshape(-1, student_hidden.shape[-1])
    N = h2.shape[0]
    count = N
    t1 = None
    if targets is not None:
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a torch.Tensor of class indices or None, not {type(targets).__name__}")
        if targets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"targets has dtype {targets.dtype}; expected class indices of dtype int64 or int32")
        if tuple(targets.shape) != lead:
            raise ValueError(f"targets must have shape {lead} (student_hidden.shape[:-1]), got {tuple(targets.shape)}")
        if targets.device != dev:
            raise ValueError(f"targets is on {targets.device} but student_hidden is on {dev}")
        ignore_index = check_ignore_index(ignore_index)
        t1 = targets.reshape(-1).long()
        index = (t1 != ignore_index).nonzero()[:, 0]
        count = index.numel()
        if count and ((t1[index] < 0) | (t1[index] >= Vs)).any():
            raise ValueError(f"targets must be in [0, {Vs}) (the student's vocabulary) or ignore_index "
                             f"{ignore_index}")
        if count == N:
            index = None  # every row: chunks are views, no gather
    # tltorch's kernels read DLPack, which has no lazy negation bit.
    w = student_weight.resolve_neg()
    b = None if student_bias is None else student_bias.resolve_neg()
    if by_hidden:
        th = teacher_hidden.detach().resolve_neg().reshape(-1, teacher_hidden.shape[-1])
        tw = teacher_weight.detach().resolve_neg()
        tb = None if teacher_bias is None else teacher_bias.detach()
        tz = None
    else:
        th = tw = tb = None
        tz = teacher_logits.detach().reshape(-1, Vt)
    ignore = ignore_index if t1 is not None else -100  # checked only with targets, unused without
    return _LinearDistillation.apply(h2.resolve_neg(), w, b, th, tw, tb, tz, t1, ignore, index, count, T, alpha, kind,
                                     beta)
