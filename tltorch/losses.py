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
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import _check_positive, token_logprobs

__all__ = ["sequence_logprobs", "dpo_loss", "simpo_loss", "orpo_loss", "reward_loss", "LinearDPOLoss",
           "DPO_LOSS_TYPES"]

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def _check_seq(name: str, t, ref: Optional[Tensor] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; expected a floating-point tensor")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per sequence), got shape {tuple(t.shape)}")
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
