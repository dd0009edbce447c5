"""Stateless functions: tltorch's kernels with torch's calling conventions and autograd."""
from typing import Optional

import torch
from torch import Tensor

from . import _ops

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected float32, "
                        "bfloat16 or float16")


def _check_same(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ weight.T + bias, like torch.nn.functional.linear.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None.
    float32, bfloat16 or float16 (all the same dtype), on the CPU (tltorch's C GEMM) or CUDA (cuBLAS);
    float32 accumulation. Gradients flow to each input that requires them.
    """
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_same("weight", weight, "x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight expects "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    if bias is not None:
        _check_tensor("bias", bias)
        _check_same("bias", bias, "x", x)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dim() == 1:
        return _ops.linear(x.unsqueeze(0), weight, bias).squeeze(0)
    return _ops.linear(x, weight, bias)
