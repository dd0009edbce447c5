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
    # torch's lazy negation bit is not part of DLPack: materialise it (a no-op for ordinary tensors).
    x, weight = x.resolve_neg(), weight.resolve_neg()
    bias = None if bias is None else bias.resolve_neg()
    if x.dim() == 1:
        return _ops.linear(x.unsqueeze(0), weight, bias).squeeze(0)
    return _ops.linear(x, weight, bias)


_INDEX_DTYPES = (torch.int64, torch.int32)


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         class_weight: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Cross-entropy of a linear layer's logits, without materialising them.

    Returns what ``F.cross_entropy(F.linear(x, weight, bias), target, weight=class_weight,
    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)`` returns, but the
    N x C logits are produced, used and dropped a chunk of rows at a time, so a vocabulary-sized head
    needs megabytes, not gigabytes. Forward and backward are one pass: for reduction "mean" and "sum"
    the gradients are computed with the loss and backward only scales them.

    x: (..., in_features); weight: (num_classes, in_features); target: x.shape[:-1] of class indices
    (int64 or int32), each in [0, num_classes) or equal to ignore_index; bias: (num_classes,) or None;
    class_weight: (num_classes,) or None, float32, x's dtype, or another float dtype (taken as float32). x, weight and bias share one dtype: float32, bfloat16 or
    float16 (logits and softmax are computed in float32). reduction: "mean", "sum" or "none".
    """
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_same("weight", weight, "x", x)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, not {type(target).__name__}")
    if target.dtype not in _INDEX_DTYPES:
        raise TypeError(f"target has dtype {target.dtype}; expected class indices of dtype int64 or int32")
    if target.device != x.device:
        raise ValueError(f"target is on {target.device} but x is on {x.device}")
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"x must be (..., in_features) and weight (num_classes, in_features); got "
                         f"x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight expects {weight.shape[1]} input features but x has {x.shape[-1]} "
                         f"(weight shape {tuple(weight.shape)})")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one class (row)")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(x.shape[:-1])} (x.shape[:-1]), got "
                         f"{tuple(target.shape)}")
    if bias is not None:
        _check_tensor("bias", bias)
        _check_same("bias", bias, "x", x)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if class_weight is not None:
        _check_tensor("class_weight", class_weight)
        if class_weight.device != x.device:
            raise ValueError(f"class_weight is on {class_weight.device} but x is on {x.device}")
        if tuple(class_weight.shape) != (weight.shape[0],):
            raise ValueError(f"class_weight must have shape ({weight.shape[0]},) (one weight per class), "
                             f"got {tuple(class_weight.shape)}")
        if class_weight.dtype not in (torch.float32, x.dtype):
            class_weight = class_weight.to(torch.float32)
    red = _ops.REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # torch's lazy negation bit is not part of DLPack: materialise it (a no-op for ordinary tensors).
    x, weight = x.resolve_neg(), weight.resolve_neg()
    bias = None if bias is None else bias.resolve_neg()
    class_weight = None if class_weight is None else class_weight.resolve_neg()
    return _ops.linear_cross_entropy(x, weight, target, bias, class_weight, ignore_index,
                                     float(label_smoothing), red)
