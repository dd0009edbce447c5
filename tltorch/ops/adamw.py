"""adamw_: one AdamW step in place (torch.optim.AdamW's formula; `step` counts from 1), with an optional
L2-SP term: anchor (None or param's twin) and l2sp > 0 add 2 l2sp (param - anchor), the gradient of
l2sp * ||param - anchor||^2, to the gradient before the moments.

param (float32, bfloat16 or float16), exp_avg and exp_avg_sq (float32) and anchor (param's dtype)
contiguous, grad of param's numel in param's dtype or float32. The kernels see them flat.
"""
import torch

from .. import _C
from ._define import define_op
from ._device import cuda_module


def _flat_state(t, name: str):
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    return t.detach().view(-1)


def _flat(param, grad, exp_avg, exp_avg_sq, anchor):
    return (_flat_state(param, "param"), grad.detach().reshape(-1), _flat_state(exp_avg, "exp_avg"),
            _flat_state(exp_avg_sq, "exp_avg_sq"), None if anchor is None else _flat_state(anchor, "anchor"))


def _adamw_cpu(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, anchor, l2sp):
    p, g, m, v, a = _flat(param, grad, exp_avg, exp_avg_sq, anchor)
    _C.adamw(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, a, l2sp, torch.get_num_threads())


def _adamw_cuda(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, anchor, l2sp):
    p, g, m, v, a = _flat(param, grad, exp_avg, exp_avg_sq, anchor)
    cuda_module().adamw(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, a, l2sp)


adamw_ = define_op(
    "adamw_", "(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, float beta1, "
    "float beta2, float eps, float weight_decay, int step, Tensor? anchor=None, float l2sp=0.0) -> ()",
    {"cpu": _adamw_cpu, "cuda": _adamw_cuda}, lambda *args: None)
