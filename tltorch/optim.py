"""Optimizers whose update is one fused tltorch kernel per parameter."""
from itertools import chain

import torch
from torch import Tensor

from . import ops

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW, with each parameter's update done in one pass by tltorch's kernel.

    Same arguments, defaults and formula as torch.optim.AdamW (decoupled weight decay, bias-corrected
    moments); float32 parameters agree with torch's foreach=False path to float32 rounding. The moments
    (state "exp_avg" and "exp_avg_sq") are float32 whatever the parameter's dtype, so a bfloat16 or
    float16 parameter is updated in float32 and rounded once per step. "step" is a float32 tensor, as in
    torch, so state dicts load in either direction. foreach and fused are accepted and ignored (the
    update is always fused); amsgrad, maximize, capturable and differentiable are not supported.
    Parameters: float32, bfloat16 or float16, on the CPU or CUDA; dense gradients.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
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
        # The keys torch.optim.AdamW's groups carry, so that either optimizer loads the other's state.
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False,
                        foreach=None, capturable=False, differentiable=False, fused=None)
        super().__init__(params, defaults)

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
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, lr, beta1, beta2, eps, wd)
        return loss

    def _update(self, p: Tensor, lr: float, beta1: float, beta2: float, eps: float, wd: float) -> None:
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
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        for key in ("exp_avg", "exp_avg_sq"):  # state set by hand: make it what the kernel takes
            s = state[key]
            if s.dtype is not torch.float32 or not s.is_contiguous() or s.device != p.device:
                state[key] = s.to(device=p.device, dtype=torch.float32).contiguous()
        step = state["step"]
        if torch.is_tensor(step):
            step.add_(1)
            n = int(step.item())
        else:
            state["step"] = n = int(step) + 1
        target = p if p.is_contiguous() else p.contiguous()
        ops.adamw_(target, g, state["exp_avg"], state["exp_avg_sq"], lr, beta1, beta2, eps, wd, n)
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
