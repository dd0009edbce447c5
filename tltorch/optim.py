"""Optimizers whose update is one fused tltorch kernel per parameter."""
import math
from itertools import chain

import torch
from torch import Tensor

from . import ops

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")
ANCHOR = "l2sp_anchor"


def _check_l2sp(l2sp) -> float:
    if isinstance(l2sp, bool) or not isinstance(l2sp, (int, float)) or not (math.isfinite(l2sp) and l2sp >= 0):
        raise ValueError(f"l2sp must be a finite number >= 0 (the L2-SP strength), got {l2sp!r}")
    return float(l2sp)


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW, with each parameter's update done in one pass by tltorch's kernel.

    Same arguments, defaults and formula as torch.optim.AdamW (decoupled weight decay, bias-corrected
    moments); float32 parameters agree with torch's foreach=False path to float32 rounding. The moments
    (state "exp_avg" and "exp_avg_sq") are float32 whatever the parameter's dtype, so a bfloat16 or
    float16 parameter is updated in float32 and rounded once per step. "step" is a float32 tensor, as in
    torch, so state dicts load in either direction. foreach and fused are accepted and ignored (the
    update is always fused); amsgrad, maximize, capturable and differentiable are not supported.
    Parameters: float32, bfloat16 or float16, on the CPU or CUDA; dense gradients.

    l2sp (also per param group, default 0): L2-SP, fine-tuning's pull toward the starting weights
    rather than toward zero. The loss becomes loss + l2sp * ||theta - theta0||^2, theta0 being the
    parameters' values when the optimizer was built (or their group added): the kernel adds that
    term's gradient, 2 l2sp (theta - theta0), to the gradient before the moments (coupled: exactly
    what autograd would add, so the run agrees with torch.optim.AdamW on the loss with the term
    written out). weight_decay still applies, decoupled, toward zero; the two compose. theta0 is
    kept as state "l2sp_anchor" in the parameter's dtype (the parameter's own values: nothing is
    lost), saved and loaded with the state dict; groups with l2sp=0 keep none. A group whose l2sp
    is raised above 0 later is anchored at its parameters' values at its next step.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, l2sp=0.0):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("lr as a Tensor must have a single element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        for name, flag in zip(_UNSUPPORTED, (amsgrad, maximize, capturable, differentiable)):
            if flag:
                raise ValueError(f"tltorch.optim.AdamW does not support {name}=True; use torch.optim.AdamW")
        # The keys torch.optim.AdamW's groups carry (and l2sp), so that either optimizer loads the other's
        # state; a group without l2sp (torch's) has none.
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False,
                        foreach=None, capturable=False, differentiable=False, fused=None, l2sp=_check_l2sp(l2sp))
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        """torch's add_param_group; with l2sp > 0, the group's parameters are anchored (theta0) here."""
        if isinstance(param_group, dict) and "l2sp" in param_group:
            _check_l2sp(param_group["l2sp"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["l2sp"]:
            for p in group["params"]:
                self._anchor(p)

    @torch.no_grad()
    def _anchor(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if ANCHOR not in state:
            state[ANCHOR] = p.detach().clone(memory_format=torch.contiguous_format)
        return state[ANCHOR]

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on every parameter that has a gradient; returns closure()'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for name in _UNSUPPORTED:
                if group.get(name):
                    raise ValueError(f"tltorch.optim.AdamW does not support {name}=True (set in a param "
                                     "group); use torch.optim.AdamW")
            beta1, beta2 = (float(b) for b in group["betas"])
            lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            l2sp = _check_l2sp(group.get("l2sp", 0.0))
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, lr, beta1, beta2, eps, wd, l2sp)
        return loss

    def _update(self, p: Tensor, lr: float, beta1: float, beta2: float, eps: float, wd: float, l2sp: float) -> None:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError("tltorch.optim.AdamW does not support sparse gradients; consider "
                               "torch.optim.SparseAdam")
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"tltorch.optim.AdamW updates float32, bfloat16 and float16 parameters, got one "
                            f"of dtype {p.dtype} (shape {tuple(p.shape)}); use torch.optim.AdamW for it")
        if g.shape != p.shape:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has a gradient of shape {tuple(g.shape)}")
        if g.dtype not in (p.dtype, torch.float32):
            g = g.float()
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        for key in ("exp_avg", "exp_avg_sq"):  # state set by hand: make it what the kernel takes
            s = state[key]
            if s.dtype is not torch.float32 or not s.is_contiguous() or s.device != p.device:
                state[key] = s.to(device=p.device, dtype=torch.float32).contiguous()
        anchor = None
        if l2sp:
            anchor = self._anchor(p)
            if anchor.shape != p.shape:
                raise ValueError(f"state '{ANCHOR}' of shape {tuple(anchor.shape)} does not fit a parameter of "
                                 f"shape {tuple(p.shape)}")
            if anchor.dtype is not p.dtype or not anchor.is_contiguous() or anchor.device != p.device:
                anchor = state[ANCHOR] = anchor.to(device=p.device, dtype=p.dtype).contiguous()
        step = state["step"]
        if torch.is_tensor(step):
            step.add_(1)
            n = int(step.item())
        else:
            state["step"] = n = int(step) + 1
        target = p if p.is_contiguous() else p.contiguous()
        ops.adamw_(target, g, state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2, eps, wd, n, anchor, l2sp)
        if target is not p:
            p.copy_(target)

    def load_state_dict(self, state_dict):
        """torch's load_state_dict, except that the moments stay float32 (torch's would cast them to
        each parameter's dtype, losing precision for bfloat16 and float16 parameters)."""
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, params))
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        for k, s in saved.items():
            p = id_map.get(k)
            if p is None or not isinstance(s, dict):
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if torch.is_tensor(s.get(key)):
                    self.state[p][key] = s[key].to(device=p.device, dtype=torch.float32, copy=True)
            if torch.is_tensor(s.get("step")):  # stepped in place: not the caller's tensor
                self.state[p]["step"] = s["step"].clone()
            if torch.is_tensor(s.get(ANCHOR)):  # the parameter's dtype, as torch's loader casts it, but a copy
                self.state[p][ANCHOR] = s[ANCHOR].to(device=p.device, dtype=p.dtype, copy=True)
