"""The one module that calls the extensions (tltorch._C, tltorch._cuda).

It registers tltorch's kernels as torch.library custom ops, with fake (meta) kernels and autograd
formulas, so that autograd, torch.compile and DistributedDataParallel see ordinary torch ops. Outputs
and workspaces are allocated here with torch.empty on the inputs' device, so torch's allocator owns all
memory; CUDA kernels run on torch's current stream (the extension asks torch for it through DLPack).
"""

import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C

_cuda_mod = None
_cuda_error: Optional[str] = None


def cuda_module():
    """tltorch._cuda, imported on first use; RuntimeError naming the reason when it is unavailable."""
    global _cuda_mod, _cuda_error
    if _cuda_mod is not None:
        return _cuda_mod
    if _cuda_error is None:
        try:
            _cuda_mod = importlib.import_module("tltorch._cuda")
            return _cuda_mod
        except ImportError as e:
            _cuda_error = str(e)
    raise RuntimeError(
        "tltorch was built without CUDA kernels (tltorch._cuda could not be imported: "
        f"{_cuda_error}); reinstall with nvcc and cuBLAS available, or keep tensors on the CPU")


def cuda_built() -> bool:
    try:
        cuda_module()
        return True
    except RuntimeError:
        return False


# ---- primitives -------------------------------------------------------------------------------------

_CUBLAS_WS_BYTES = 4 << 20
_GEMM_KC = _C.GEMM_KC


def _cublas_ready(t: Tensor) -> Tensor:
    """A 2-D view cuBLAS can read: one unit stride and a leading dimension covering the other."""
    r, c = t.shape
    s0, s1 = t.stride()
    if (s1 == 1 or c == 1) and s0 >= max(1, c):
        return t
    if (s0 == 1 or r == 1) and s1 >= max(1, r):
        return t
    return t.contiguous()


def gemm(a: Tensor, b: Tensor, c: Tensor, bias: Optional[Tensor] = None, alpha: float = 1.0,
         beta: float = 0.0, trans: int = 0) -> None:
    """c = alpha * op(a) @ op(b) + beta * c + bias, in place; float32 accumulation.

    op transposes a when trans & 1 and b when trans & 2 (no copy)."""
    if c.is_cuda:
        if trans & 1:
            a = a.t()
        if trans & 2:
            b = b.t()
        ws = torch.empty(_CUBLAS_WS_BYTES, dtype=torch.uint8, device=c.device)
        cuda_module().gemm(_cublas_ready(a), _cublas_ready(b), c, bias, ws, alpha, beta,
                           bool(torch.backends.cuda.matmul.allow_tf32))
        return
    ws = None
    if c.dtype is not torch.float32 and a.shape[0 if trans & 1 else 1] > _GEMM_KC and c.numel():
        ws = torch.empty(c.numel(), dtype=torch.float32)
    _C.gemm(a, b, c, bias, ws, alpha, beta, torch.get_num_threads(), trans)


def colsum(x: Tensor, out: Tensor, beta: float = 0.0) -> None:
    """out = beta * out + x.sum(0), in place; float32 accumulation."""
    if out.is_cuda:
        cuda_module().colsum(x, out, beta)
    else:
        _C.colsum(x, out, beta, torch.get_num_threads())


# ---- linear -----------------------------------------------------------------------------------------
# One implementation, reached two ways: eagerly through a thin autograd.Function (a few microseconds),
# and, while torch.compile traces or on meta tensors, through the torch.library op tltorch::linear,
# whose fake kernel and autograd formula make it an ordinary op to the compiler.

def _linear_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if x.dim() == 2:
        y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        gemm(x, weight, y, bias, trans=2)
        return y
    x2 = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # not -1: in_features may be 0
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    gemm(x2, weight, y, bias, trans=2)
    return y.view(*x.shape[:-1], weight.shape[0])


def _linear_backward_impl(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_weight: bool,
                          need_bias: bool):
    g2 = grad if grad.dim() == 2 else grad.reshape(grad.shape[:-1].numel(), grad.shape[-1])
    x2 = x if x.dim() == 2 else x.reshape(x.shape[:-1].numel(), x.shape[-1])
    dx = dw = db = None
    if need_x:
        dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        gemm(g2, weight, dx)
        if x.dim() != 2:
            dx = dx.view(x.shape)
    if need_weight:
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        gemm(g2, x2, dw, trans=1)
    if need_bias:
        db = torch.empty(weight.shape[0], dtype=grad.dtype, device=grad.device)
        colsum(g2, db)
    return dx, dw, db


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear_impl(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad
        return _linear_backward_impl(grad, x, weight, nx, nw, nb and ctx.has_bias)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return torch.ops.tltorch.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _Linear.apply(x, weight, bias)
    return _linear_impl(x, weight, bias)


@torch.library.custom_op("tltorch::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _linear_impl(x, weight, bias)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("tltorch::linear_backward", mutates_args=())
def _linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_weight: bool,
                        need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _linear_backward_impl(grad, x, weight, need_x, need_weight, need_bias)
    # A custom op returns tensors: "not needed" is an empty one, a distinct one for each output
    # (outputs of a custom op may not alias each other).
    return tuple(grad.new_empty(0) if t is None else t for t in (dx, dw, db))


@_linear_backward_op.register_fake
def _(grad, x, weight, need_x, need_weight, need_bias):
    return (x.new_empty(x.shape) if need_x else grad.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else grad.new_empty(0),
            grad.new_empty(weight.shape[0]) if need_bias else grad.new_empty(0))


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad
    nb = nb and ctx.has_bias
    dx, dw, db = torch.ops.tltorch.linear_backward(grad, x, weight, nx, nw, nb)
    return (dx if nx else None, dw if nw else None, db if nb else None)


_linear_op.register_autograd(_linear_grad, setup_context=_linear_setup)
