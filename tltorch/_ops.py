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
         beta: float = 0.0) -> None:
    """c = alpha * a @ b + beta * c + bias, in place; float32 accumulation."""
    if c.is_cuda:
        ws = torch.empty(_CUBLAS_WS_BYTES, dtype=torch.uint8, device=c.device)
        cuda_module().gemm(_cublas_ready(a), _cublas_ready(b), c, bias, ws, alpha, beta,
                           bool(torch.backends.cuda.matmul.allow_tf32))
        return
    ws = None
    if c.dtype != torch.float32 and a.shape[1] > _C.GEMM_KC and c.numel():
        ws = torch.empty(c.numel(), dtype=torch.float32)
    _C.gemm(a, b, c, bias, ws, alpha, beta, torch.get_num_threads())


def colsum(x: Tensor, out: Tensor, beta: float = 0.0) -> None:
    """out = beta * out + x.sum(0), in place; float32 accumulation."""
    if out.is_cuda:
        cuda_module().colsum(x, out, beta)
    else:
        _C.colsum(x, out, beta, torch.get_num_threads())


# ---- tltorch::linear --------------------------------------------------------------------------------

@torch.library.custom_op("tltorch::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    gemm(x2, weight.t(), y, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("tltorch::linear_backward", mutates_args=())
def linear_backward(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_weight: bool,
                    need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    empty = grad.new_empty(0)
    dx = dw = db = empty
    if need_x:
        dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        gemm(g2, weight, dx)
        dx = dx.view(x.shape)
    if need_weight:
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        gemm(g2.t(), x2, dw)
    if need_bias:
        db = torch.empty(weight.shape[0], dtype=grad.dtype, device=grad.device)
        colsum(g2, db)
    return dx, dw, db


@linear_backward.register_fake
def _(grad, x, weight, need_x, need_weight, need_bias):
    e = grad.new_empty(0)
    return (x.new_empty(x.shape) if need_x else e,
            weight.new_empty(weight.shape) if need_weight else e,
            grad.new_empty(weight.shape[0]) if need_bias else e)


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad
    dx, dw, db = torch.ops.tltorch.linear_backward(grad, x, weight, nx, nw, nb and ctx.has_bias)
    return (dx if nx else None, dw if nw else None, db if (nb and ctx.has_bias) else None)


linear.register_autograd(_linear_grad, setup_context=_linear_setup)
