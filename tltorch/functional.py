"""Stateless functions: tltorch's kernels with torch's calling conventions and autograd."""
import numbers
import operator
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .ops.head import linear_head as _linear_head

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
        return ops.linear(x.unsqueeze(0), weight, bias).squeeze(0)
    return ops.linear(x, weight, bias)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scaling: float = 1.0, dropout: float = 0.0) -> Tensor:
    """A LoRA linear layer: ``x @ weight.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T``.

    x: (..., in_features); weight: (out_features, in_features), any strided view (a transformers Conv1D's
    (in, out) weight passed as ``weight.t()`` costs no copy); bias: (out_features,) or None; lora_A:
    (r, in_features); lora_B: (out_features, r). One dtype (float32, bfloat16 or float16) and one device.
    The low-rank product is added inside the base GEMM, forward and backward; dropout (probability
    `dropout`, in [0, 1)) keeps no mask: it is drawn from a seed taken from torch's default generator,
    and backward draws the same one. Gradients flow to x, lora_A, lora_B and bias when they require
    them, and to weight only if it does (a frozen base gets none).
    """
    _check_tensor("x", x)
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _check_tensor(name, t)
        _check_same(name, t, "x", x)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features)")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim but weight expects {d_in} "
                         f"(weight shape {tuple(weight.shape)})")
    if lora_A.shape[1] != d_in:
        raise ValueError(f"lora_A must have shape (r, {d_in}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (d_out, lora_A.shape[0]):
        raise ValueError(f"lora_B must have shape ({d_out}, {lora_A.shape[0]}) (out_features, r), got "
                         f"{tuple(lora_B.shape)}")
    if bias is not None:
        _check_tensor("bias", bias)
        _check_same("bias", bias, "x", x)
        if tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias must have shape ({d_out},), got {tuple(bias.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a number, got {type(scaling).__name__}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a number, got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    x, weight, lora_A, lora_B = x.resolve_neg(), weight.resolve_neg(), lora_A.resolve_neg(), lora_B.resolve_neg()
    bias = None if bias is None else bias.resolve_neg()
    if x.dim() == 1:
        return ops.lora_linear(x.unsqueeze(0), weight, bias, lora_A, lora_B, float(scaling),
                                float(dropout)).squeeze(0)
    return ops.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout))


def lora_dropout(x: Tensor, p: float, seed) -> Tensor:
    """What lora_linear's dropout does to a 2-D x with seed `seed` (an int, or the 0-d tensor that
    ``tltorch.ops.next_dropout_seed()`` returns): ``x * mask / (1 - p)``. For tests and inspection."""
    _check_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be a number in [0, 1), got {p!r}")
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    return ops.dropout(x.resolve_neg(), float(p), seed)


_INDEX_DTYPES = (torch.int64, torch.int32)


def check_reduction(reduction) -> int:
    """The kernels' code for reduction "mean", "sum" or "none"."""
    red = ops.REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if red is None:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return red


def check_ignore_index(ignore_index) -> int:
    """ignore_index as a Python int. Whatever torch takes for an int argument is taken (an int, a NumPy
    integer, an integer tensor of one element); a bool is refused, as torch refuses it, rather than read
    as 0 or 1."""
    if type(ignore_index) is int:
        return ignore_index
    if isinstance(ignore_index, bool) or (isinstance(ignore_index, torch.Tensor)
                                          and ignore_index.dtype is torch.bool):
        raise TypeError("ignore_index must be an int, not a bool")
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}") from None


def check_label_smoothing(label_smoothing) -> float:
    """label_smoothing as a Python float in [0, 1]: a real number (NumPy's included) or a 0-d real
    tensor, as torch takes; a bool is refused rather than read as 0 or 1."""
    t = label_smoothing
    if type(t) is not float:
        if isinstance(t, torch.Tensor):
            ok = t.dim() == 0 and t.dtype is not torch.bool and not t.is_complex()
        else:
            ok = isinstance(t, numbers.Real) and not isinstance(t, bool)
        if not ok:
            what = f"a tensor of shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) \
                else type(t).__name__
            raise TypeError(f"label_smoothing must be a number in [0, 1], got {what}")
        t = float(t)
    if not 0.0 <= t <= 1.0:  # refuses nan too
        raise ValueError(f"label_smoothing must be in [0, 1], got {t!r}")
    return t


def _check_positive(name: str, v, allow_none: bool = False) -> float:
    """v as a Python float, finite and > 0 (None allowed where allow_none, returned as 0.0: none); a bool
    or a non-real refused."""
    if v is None and allow_none:
        return 0.0
    if isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype is not torch.bool and not v.is_complex():
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number > 0{' or None' if allow_none else ''}, got {type(v).__name__}")
    v = float(v)
    if not 0.0 < v < float("inf"):  # refuses nan too
        raise ValueError(f"{name} must be a finite number > 0{' or None' if allow_none else ''}, got {v!r}")
    return v


def _check_head(x, weight, target, bias, x_name: str = "x", target_name: str = "target") -> None:
    """What the fused head needs of its tensors, each named as the caller's user knows it."""
    _check_tensor(x_name, x)
    _check_tensor("weight", weight)
    _check_same("weight", weight, x_name, x)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{target_name} must be a torch.Tensor of class indices, not {type(target).__name__}")
    if target.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{target_name} has dtype {target.dtype}; expected class indices of dtype int64 or int32")
    if target.device != x.device:
        raise ValueError(f"{target_name} is on {target.device} but {x_name} is on {x.device}")
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{x_name} must be (..., in_features) and weight (num_classes, in_features); got "
                         f"{x_name} {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight expects {weight.shape[1]} input features but {x_name} has {x.shape[-1]} "
                         f"(weight shape {tuple(weight.shape)})")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one class (row)")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{target_name} must have shape {tuple(x.shape[:-1])} ({x_name}.shape[:-1]), got "
                         f"{tuple(target.shape)}")
    if bias is not None:
        _check_tensor("bias", bias)
        _check_same("bias", bias, x_name, x)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, label_smoothing: float = 0.0,
                         class_weight: Optional[Tensor] = None, reduction: str = "mean",
                         lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                         return_lse: bool = False):
    """Cross-entropy of a linear layer's logits, without materialising them.

    Returns what ``F.cross_entropy(F.linear(x, weight, bias), target, weight=class_weight,
    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)`` returns, but the
    N x C logits are produced, used and dropped a chunk of rows at a time, so a vocabulary-sized head
    needs megabytes, not gigabytes. Forward and backward are one pass: for reduction "mean" and "sum"
    the gradients are computed with the loss and backward only scales them.

    x: (..., in_features); weight: (num_classes, in_features); target: x.shape[:-1] of class indices
    (int64 or int32), each in [0, num_classes) or equal to ignore_index; bias: (num_classes,) or None;
    class_weight: (num_classes,) or None, float32, bfloat16 or float16 (taken as float32 unless it is x's
    dtype). x, weight and bias share one dtype: float32, bfloat16 or float16 (logits and softmax are
    computed in float32). reduction: "mean", "sum" or "none". ignore_index: an int (a NumPy integer or
    a one-element integer tensor too, not a bool); label_smoothing: a number in [0, 1] (or a 0-d tensor).

    softcap: None, or c > 0: the logits become c * tanh(logits / c) before the softmax (Gemma's
    final_logit_softcapping), and the gradient flows through the tanh. lse_square_scale: the z-loss
    (PaLM), lse_square_scale * lse_i ** 2 added to each counted row's loss (lse_i: the row's log-sum-exp
    of the softcapped logits; the mean divides the whole by the same divisor, the number of counted rows
    or the sum of their class weights); its gradient 2 lse_square_scale lse_i softmax_i. return_lse:
    also return each row's lse (float32, x.shape[:-1], 0 at ignored rows, detached): (loss, lse).
    """
    _check_head(x, weight, target, bias)
    if class_weight is not None:
        _check_tensor("class_weight", class_weight)
        if class_weight.device != x.device:
            raise ValueError(f"class_weight is on {class_weight.device} but x is on {x.device}")
        if tuple(class_weight.shape) != (weight.shape[0],):
            raise ValueError(f"class_weight must have shape ({weight.shape[0]},) (one weight per class), "
                             f"got {tuple(class_weight.shape)}")
        if class_weight.dtype not in (torch.float32, x.dtype):
            class_weight = class_weight.to(torch.float32)
    red = check_reduction(reduction)
    label_smoothing = check_label_smoothing(label_smoothing)
    ignore_index = check_ignore_index(ignore_index)
    softcap = _check_positive("softcap", softcap, allow_none=True)
    if lse_square_scale != 0.0:
        lse_square_scale = _check_positive("lse_square_scale", lse_square_scale)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    # torch's lazy negation bit is not part of DLPack: materialise it (a no-op for ordinary tensors).
    x, weight = x.resolve_neg(), weight.resolve_neg()
    bias = None if bias is None else bias.resolve_neg()
    class_weight = None if class_weight is None else class_weight.resolve_neg()
    if softcap == 0.0 and lse_square_scale == 0.0 and not return_lse:
        return ops.linear_cross_entropy(x, weight, target, bias, class_weight, ignore_index, label_smoothing,
                                         red)
    loss, lse, _ = _linear_head(x, weight, target, bias, class_weight, ignore_index, label_smoothing, red, softcap,
                                1.0, float(lse_square_scale), return_lse, False)
    loss = loss.to(x.dtype)
    return (loss, lse) if return_lse else loss


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                   ignore_index: int = -100, temperature: float = 1.0, softcap: Optional[float] = None,
                   return_entropy: bool = False):
    """log p(target) of each token under a linear head, without materialising the logits.

    Returns what ``torch.log_softmax(z, -1).gather(-1, targets[..., None])[..., 0]`` returns for
    ``z = F.linear(hidden, weight, bias)``, after the logits' softcap then temperature:
    ``z = softcap * tanh(z / softcap)`` when softcap is given (Gemma's final_logit_softcapping, applied
    in the model's forward), then ``z = z / temperature`` (as TRL's GRPO and PPO trainers divide the
    model's logits). 0 at positions whose target is ignore_index. With return_entropy, also each
    token's entropy ``-(p * log p).sum(-1)`` of the same distribution: (logprobs, entropy).

    hidden: (..., in_features), float32, bfloat16 or float16; weight: (vocab, in_features) and bias
    (vocab,) or None of hidden's dtype; targets: hidden.shape[:-1], int64 or int32. The log-probs and
    entropies are float32, of targets' shape (the softmax is computed in float32 whatever the dtype).
    Backward is exact for any upstream gradient g: d/dz of sum_i g_i logp_i = g_i (onehot_i - softmax_i),
    taken back through temperature and softcap to hidden, weight and bias. The entropy is returned
    detached (no gradient), as trainers log it.
    """
    _check_head(hidden, weight, targets, bias, "hidden", "targets")
    ignore_index = check_ignore_index(ignore_index)
    temperature = _check_positive("temperature", temperature)
    softcap = _check_positive("softcap", softcap, allow_none=True)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    hidden, weight = hidden.resolve_neg(), weight.resolve_neg()
    bias = None if bias is None else bias.resolve_neg()
    nll, _, entropy = _linear_head(hidden, weight, targets, bias, None, ignore_index, 0.0, 2, softcap, temperature,
                                   0.0, False, return_entropy)
    logprobs = torch.rsub(nll, 0.0)  # 0 - nll: +0 at ignored positions
    return (logprobs, entropy) if return_entropy else logprobs


# Mask dtypes the kernels read as they are (besides hidden's own dtype); others are compared with 0.
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64)


def pool(hidden: Tensor, attention_mask: Optional[Tensor] = None, mode: str = "mean") -> Tensor:
    """One vector per sequence from a model's hidden states.

    hidden: (B, T, D), float32, bfloat16 or float16, any strides. attention_mask: (B, T) or None; a
    token counts where it is nonzero (bool, integer or float). mode: "cls" (the first token, whatever
    the mask), "mean" (the mean over the counted tokens) or "max" (their elementwise maximum); a row with
    no counted token gives zeros. Returns (B, D) in hidden's dtype, summed in float32. Meant for feature
    extraction: it passes no gradient to hidden (raises if one is required).
    """
    _check_tensor("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D (batch, tokens, features), got shape {tuple(hidden.shape)}")
    code = ops.POOL_MODES.get(mode) if isinstance(mode, str) else None
    if code is None:
        raise ValueError(f"mode must be 'cls', 'mean' or 'max', got {mode!r}")
    B, T, _ = hidden.shape
    if code == 0 and T == 0:
        raise ValueError("hidden has no tokens (hidden.shape[1] == 0); mode 'cls' takes the first one")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError("attention_mask must be a torch.Tensor or None, not "
                            f"{type(attention_mask).__name__}")
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask has dtype {attention_mask.dtype}; expected bool, integer or "
                            "float")
        if attention_mask.device != hidden.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but hidden is on {hidden.device}")
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must have shape {(B, T)} (hidden.shape[:2]), got "
                             f"{tuple(attention_mask.shape)}")
        if code == 0:
            attention_mask = None  # the first token, whatever the mask says
        elif attention_mask.dtype not in _MASK_DTYPES and attention_mask.dtype != hidden.dtype:
            attention_mask = attention_mask != 0
    if torch.is_grad_enabled() and hidden.requires_grad:
        raise RuntimeError("tltorch.functional.pool does not propagate gradients; call it under "
                           "torch.no_grad() or torch.inference_mode(), or pass hidden.detach()")
    # torch's lazy negation bit is not part of DLPack: materialise it (a no-op for ordinary tensors).
    hidden = hidden.resolve_neg()
    if attention_mask is not None:
        attention_mask = attention_mask.resolve_neg()
    return ops.pool(hidden, attention_mask, code)
