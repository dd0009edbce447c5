"""Frozen linear: y = x (W * s)^T + bias and dx = dy (W * s), with a stored weight W (bfloat16, float16, or
int8 with a per-output-channel scale s).

On the CPU the GEMM reads W in its stored dtype and scales it as it packs it (no dequantised copy); on
CUDA the weight is converted to x's dtype for cuBLAS (a temporary the size of the layer's weight).
There is never a weight gradient. int8_linear (below) quantises x to 8 bits as well, for the int8 kernel
(CPU inference).
"""
from functools import lru_cache, partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _C
from ._define import define_op
from ._device import cuda_module, rows
from .linear import GEMM_KC, gemm_cuda


def dequant(weight: Tensor, scale: Optional[Tensor], dtype, group: Optional[int] = None) -> Tensor:
    """W * s as a dense tensor of `dtype`; s (out,) one scale a channel, or (out, ceil(in / group)) one a
    channel and group of `group` consecutive inputs (None: W in `dtype`)."""
    if scale is None:
        return weight.to(dtype)
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return int8_dequant(weight, scale, group or max(1, weight.shape[1]), dtype)
    s = scale.to(dtype)  # float64, for references
    return weight.to(dtype) * (s[:, None] if s.dim() == 1 else s.repeat_interleave(group, dim=1)[:, :weight.shape[1]])


# ---- int8_dequant: the int8 weight times its scales, in one pass (csrc/cpu/qlinear_int8.c, csrc/cuda/dequant.cu)

def _int8_dequant_out(weight, dtype):
    return weight.new_empty(weight.shape, dtype=dtype)


def _int8_dequant_cpu(weight, scale, group, dtype):
    out = _int8_dequant_out(weight, dtype)
    _C.int8_dequant(weight, scale, group, out, torch.get_num_threads())
    return out


def _int8_dequant_cuda(weight, scale, group, dtype):
    out = _int8_dequant_out(weight, dtype)
    cuda_module().int8_dequant(weight, scale, group, out)
    return out


int8_dequant = define_op("int8_dequant", "(Tensor weight, Tensor scale, int group, ScalarType dtype) -> Tensor",
                         {"cpu": _int8_dequant_cpu, "cuda": _int8_dequant_cuda},
                         lambda weight, scale, group, dtype: _int8_dequant_out(weight, dtype))


# ---- qgemm: forward: a (n, in) -> a (W*s)^T + bias; else a (n, out) -> a (W*s) ---------------------------

def _qgemm_output(a, weight, forward):
    return torch.empty(a.shape[0], weight.shape[0] if forward else weight.shape[1], dtype=a.dtype,
                       device=a.device)


@lru_cache(maxsize=None)
def bf16_native() -> bool:
    """Whether bfloat16 x times a bfloat16 weight runs on torch's bfloat16 GEMM (oneDNN) on this CPU: it
    has AVX512-BF16 (and AMX where present) and tltorch's CPU ISA is avx512 (TLTORCH_CPU_ISA=avx2 or
    portable keeps tltorch's own kernel)."""
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return _C.cpu_isa().startswith("avx512") and has_bf16 is not None and bool(has_bf16())


_INT8_FAST = _C.int8_isa() != "portable"  # fixed at import, as the CPU kernels' ISA is


def int8_fast() -> bool:
    """Whether the int8 kernel has a SIMD path on this CPU (AMX or AVX512-VNNI): its portable C path is
    ~30x slower than the float GEMM, so FrozenLinear keeps x in float where it is all there is."""
    return _INT8_FAST


@lru_cache(maxsize=None)
def _onednn_linear():
    """oneDNN's linear with the bias fused into the GEMM (the op torch.compile's CPU backend emits), or
    None where this torch lacks it."""
    try:
        return torch.ops.mkldnn._linear_pointwise.default if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def _bf16_linear(a, weight, bias):
    """a W^T + bias as nn.Linear in bfloat16 computes it: the bias rounded to bfloat16 and added to the
    float32 sum, rounded once. With AMX 5-7x tltorch's AVX512-BF16 kernel (itself no faster than its
    float32 one); oneDNN's fused bias saves F.linear's separate pass over the output (1.05-1.25x)."""
    b = None if bias is None else bias.to(torch.bfloat16)
    fused = _onednn_linear()
    if fused is not None and a.shape[1] > 0 and weight.is_contiguous():
        return fused(a, weight, b, "none", [], "")
    return F.linear(a, weight, b)


def _qgemm_cpu(a, weight, scale, bias, forward):
    if a.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and bf16_native():
        return _bf16_linear(a, weight, bias) if forward else torch.mm(a, weight)  # oneDNN's (AMX) GEMM
    c = _qgemm_output(a, weight, forward)
    ws = torch.empty(c.numel(), dtype=torch.float32) if a.dtype is not torch.float32 and a.shape[1] > GEMM_KC \
        else None
    _C.qgemm(a, weight, scale, 1 if forward else 0, c, bias, ws, torch.get_num_threads(), 2 if forward else 0)
    return c


def _qgemm_cuda(a, weight, scale, bias, forward):
    c = _qgemm_output(a, weight, forward)
    gemm_cuda(a, dequant(weight, scale, a.dtype), c, None if bias is None else bias.to(a.dtype), 1.0, 0.0,
               2 if forward else 0)
    return c


def _qgemm_fake(a, weight, scale, bias, forward):
    return a.new_empty(a.shape[0], weight.shape[0] if forward else weight.shape[1])


qgemm = define_op("qgemm", "(Tensor a, Tensor weight, Tensor? scale, Tensor? bias, bool forward) -> Tensor",
                  {"cpu": _qgemm_cpu, "cuda": _qgemm_cuda}, _qgemm_fake)


# ---- frozen_linear ------------------------------------------------------------------------------------

def _frozen_linear(qgemm, x, weight, scale, bias):
    return qgemm(rows(x), weight, scale, bias, True).view(*x.shape[:-1], weight.shape[0])


def _frozen_linear_fake(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _frozen_linear_backward(qgemm, grad, weight, scale):
    return qgemm(rows(grad), weight, scale, None, False).view(*grad.shape[:-1], weight.shape[1])


def _frozen_linear_backward_fake(grad, weight, scale):
    return grad.new_empty(*grad.shape[:-1], weight.shape[1])


frozen_linear_backward = define_op("frozen_linear_backward", "(Tensor grad, Tensor weight, Tensor? scale) -> Tensor",
                                   {"cpu": partial(_frozen_linear_backward, _qgemm_cpu),
                                    "cuda": partial(_frozen_linear_backward, _qgemm_cuda)},
                                   _frozen_linear_backward_fake)


def _frozen_setup(ctx, inputs, output):
    x, weight, scale, bias = inputs
    ctx.save_for_backward(weight, scale)


def _frozen_grad(ctx, grad):
    weight, scale = ctx.saved_tensors
    return frozen_linear_backward(grad, weight, scale), None, None, None


frozen_linear = define_op("frozen_linear", "(Tensor x, Tensor weight, Tensor? scale, Tensor? bias) -> Tensor",
                          {"cpu": partial(_frozen_linear, _qgemm_cpu), "cuda": partial(_frozen_linear, _qgemm_cuda)},
                          _frozen_linear_fake, setup_context=_frozen_setup, backward=_frozen_grad,
                          differentiable=("x",))


# ---- int8_linear: x quantised to 8 bits too, the int8 weight packed (CPU inference) ------------------------
#
# y = x (W*s)^T + bias with x quantised per row and group of `group` inputs to uint8 (csrc/cpu/qlinear_int8.c
# says how); dx = dy (W*s) through qgemm, as frozen_linear's (the quantisation passes the gradient straight
# through). packed: int8_pack(weight, scale, group), built once when the layer is frozen. scale: (out,), or
# (out, ceil(in / group)), one a channel and group of the same inputs x is quantised in; qgemm scales per
# channel only, so with group scales dx and the CUDA product go through the dequantised weight (a float32
# copy of the layer's weight for the call).

def _grouped(weight, scale, group, dtype):
    """weight and scale as qgemm takes them: per-channel as they are, per-group scales dequantised."""
    return (weight, scale) if scale.dim() == 1 else (dequant(weight, scale, dtype, group), None)

def int8_pack(weight: Tensor, scale: Tensor, group: int) -> Tensor:
    """The int8 weight (out, in) and its float32 scales, (out,) or (out, ceil(in / group)), in the int8
    kernel's layout: a uint8 buffer."""
    packed = torch.empty(_C.int8_bytes(weight.shape[0], weight.shape[1], group, True), dtype=torch.uint8)
    _C.int8_pack(weight, scale, group, packed, 1)
    return packed


def _int8_linear_cpu(x, weight, scale, packed, group, bias):
    a = rows(x)
    y = torch.empty(a.shape[0], weight.shape[0], dtype=x.dtype)
    ws = torch.empty(_C.int8_bytes(a.shape[0], a.shape[1], group, False), dtype=torch.uint8)
    _C.int8_linear(a, packed, bias, y, ws, torch.get_num_threads())
    return y.view(*x.shape[:-1], weight.shape[0])


def _int8_linear_cuda(x, weight, scale, packed, group, bias):
    """No int8 kernel on CUDA: x stays in float (frozen_linear's)."""
    return _frozen_linear(_qgemm_cuda, x, *_grouped(weight, scale, group, x.dtype), bias)


def _int8_linear_fake(x, weight, scale, packed, group, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _int8_setup(ctx, inputs, output):
    x, weight, scale, packed, group, bias = inputs
    ctx.save_for_backward(weight, scale)
    ctx.group = group


def _int8_grad(ctx, grad):
    weight, scale = ctx.saved_tensors
    dx = frozen_linear_backward(grad, *_grouped(weight, scale, ctx.group, torch.float32))
    return dx, None, None, None, None, None


int8_linear = define_op("int8_linear", "(Tensor x, Tensor weight, Tensor scale, Tensor packed, int group, "
                        "Tensor? bias) -> Tensor", {"cpu": _int8_linear_cpu, "cuda": _int8_linear_cuda},
                        _int8_linear_fake, setup_context=_int8_setup, backward=_int8_grad, differentiable=("x",))
