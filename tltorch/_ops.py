"""The one module that calls the extensions (tltorch._C, tltorch._cuda).

It registers tltorch's kernels as torch.library custom ops, with fake (meta) kernels and autograd
formulas, so that autograd, torch.compile and DistributedDataParallel see ordinary torch ops. Outputs
and workspaces are allocated here with torch.empty on the inputs' device, so torch's allocator owns all
memory; CUDA kernels run on torch's current stream (the extension asks torch for it through DLPack).
"""

import importlib
import threading
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


# ---- linear + cross-entropy (the fused head) -----------------------------------------------------------
# Eager: for mean/sum the forward pass computes the gradients too (one pass over the logits, a chunk of
# rows at a time) and backward only scales them by the upstream gradient; for "none" backward recomputes
# the logits with each row's upstream gradient. Under torch.compile, tltorch::linear_cross_entropy and
# its backward op (which always recomputes) stand in.

REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
# At most this many float32 logits per chunk of rows (32 MB): the head's working memory.
_XENT_CHUNK_FLOATS = 8 << 20
_XENT_SKINNY_C = _C.XENT_SKINNY_C


_tls = threading.local()


def _cpu_workspace(numel: int) -> Tensor:
    """A float32 scratch of at least `numel` elements, kept per thread between calls: torch has no
    caching allocator on the CPU, and a fresh multi-megabyte buffer costs a page fault per 4 KiB on
    every call. It never grows beyond one chunk of logits (32 MB)."""
    ws = getattr(_tls, "ws", None)
    if ws is None or ws.numel() < numel:
        ws = _tls.ws = None  # drop the old one before allocating the larger
        ws = _tls.ws = torch.empty(numel, dtype=torch.float32)
    return ws


def _xent(x2: Tensor, weight: Tensor, bias: Optional[Tensor], t1: Tensor, class_weight: Optional[Tensor],
          ignore_index: int, label_smoothing: float, red: int, grad_rows: Optional[Tensor], want_loss: bool,
          need_x: bool, need_weight: bool, need_bias: bool):
    """One call of the fused kernel: (loss, dx, dweight, dbias), each None unless asked for."""
    n, d = x2.shape
    c = weight.shape[0]
    dev = x2.device
    loss = torch.empty((n,) if red == 2 else (), dtype=x2.dtype, device=dev) if want_loss else None
    dx = torch.empty((n, d), dtype=x2.dtype, device=dev) if need_x else None
    dw = torch.empty((c, d), dtype=torch.float32, device=dev) if need_weight else None
    db = torch.empty(c, dtype=torch.float32, device=dev) if need_bias else None
    per_row = c + d + 1
    rows = max(1, min(n, _XENT_CHUNK_FLOATS // per_row))
    if x2.is_cuda:
        cuda = cuda_module()
        ws = torch.empty(cuda.XENT_WS_EXTRA + rows * per_row, dtype=torch.float32, device=dev)
        cublas_ws = torch.empty(_CUBLAS_WS_BYTES, dtype=torch.uint8, device=dev)
        cuda.linear_xent(_cublas_ready(x2), _cublas_ready(weight), bias, t1, class_weight, ignore_index,
                         label_smoothing, red, grad_rows, loss, dx, dw, db, ws, cublas_ws,
                         bool(torch.backends.cuda.matmul.allow_tf32))
    else:
        # With few classes the CPU kernel takes a single pass that needs no workspace.
        ws = _cpu_workspace(rows * per_row) if c > _XENT_SKINNY_C else None
        _C.linear_xent(x2, weight, bias, t1, class_weight, ignore_index, label_smoothing, red, grad_rows,
                       loss, dx, dw, db, ws, torch.get_num_threads())
    if dw is not None and weight.dtype is not torch.float32:
        dw = dw.to(weight.dtype)
    if db is not None and bias.dtype is not torch.float32:
        db = db.to(bias.dtype)
    return loss, dx, dw, db


def _flat(x: Tensor, target: Tensor):
    n = target.numel()
    x2 = x if x.dim() == 2 else x.reshape(n, x.shape[-1])
    t1 = target if target.dim() == 1 else target.reshape(n)
    return x2, t1


def _upstream_rows(g: Tensor, n: int) -> Tensor:
    """The upstream gradient as one value per row (a broadcast view for a scalar)."""
    return g.reshape(-1).expand(n) if g.dim() == 0 else g.reshape(n)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, ignore_index, label_smoothing, red):
        nx, nw, nb = ctx.needs_input_grad[:3]
        nb = nb and bias is not None
        x2, t1 = _flat(x, target)
        ctx.red, ctx.opts, ctx.x_shape = red, (ignore_index, label_smoothing), x.shape
        ctx.save_for_backward(x2, weight, bias, t1, class_weight)
        ctx.grads = None
        if red == 2:
            loss = _xent(x2, weight, bias, t1, class_weight, ignore_index, label_smoothing, red, None, True,
                         False, False, False)[0]
            return loss.view(target.shape)
        loss, dx, dw, db = _xent(x2, weight, bias, t1, class_weight, ignore_index, label_smoothing, red, None,
                                 True, nx, nw, nb)
        ctx.grads = (dx, dw, db)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        nx, nw, nb = ctx.needs_input_grad[:3]
        x2, weight, bias, t1, class_weight = ctx.saved_tensors
        nb = nb and bias is not None
        grads, ctx.grads = ctx.grads, None
        if grads is not None and g.is_cuda:
            # The gradients were computed with the loss: scale them in place by the upstream gradient
            # (no host sync to look at it) and hand them over (no copy: nothing else holds them).
            dx, dw, db = grads
            for t in (dx, dw, db):
                if t is not None:
                    t.mul_(g.to(t.dtype))
        elif grads is not None and g.item() == 1.0:
            dx, dw, db = grads  # the usual case: loss.backward()
        else:
            # Reduction "none", another upstream gradient, or a second backward through a retained
            # graph: recompute with the upstream gradient folded into dz, exactly as the first pass
            # would have (so repeated backward passes agree bit for bit).
            _, dx, dw, db = _xent(x2, weight, bias, t1, class_weight, *ctx.opts, ctx.red,
                                  _upstream_rows(g, t1.shape[0]), False, nx, nw, nb)
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return dx if nx else None, dw if nw else None, db if nb else None, None, None, None, None, None


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                         class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                         red: int) -> Tensor:
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return torch.ops.tltorch.linear_cross_entropy(x, weight, target, bias, class_weight, ignore_index,
                                                      label_smoothing, red)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _LinearCrossEntropy.apply(x, weight, bias, target, class_weight, ignore_index,
                                         label_smoothing, red)
    x2, t1 = _flat(x, target)
    loss = _xent(x2, weight, bias, t1, class_weight, ignore_index, label_smoothing, red, None, True,
                 False, False, False)[0]
    return loss.view(target.shape) if red == 2 else loss


@torch.library.custom_op("tltorch::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                             class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                             reduction: int) -> Tensor:
    x2, t1 = _flat(x, target)
    loss = _xent(x2, weight, bias, t1, class_weight, ignore_index, label_smoothing, reduction, None, True,
                 False, False, False)[0]
    return loss.view(target.shape) if reduction == 2 else loss


@_linear_cross_entropy_op.register_fake
def _(x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction):
    return x.new_empty(target.shape if reduction == 2 else ())


@torch.library.custom_op("tltorch::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(grad: Tensor, x: Tensor, weight: Tensor, target: Tensor,
                                      bias: Optional[Tensor], class_weight: Optional[Tensor],
                                      ignore_index: int, label_smoothing: float, reduction: int,
                                      need_x: bool, need_weight: bool,
                                      need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    x2, t1 = _flat(x, target)
    _, dx, dw, db = _xent(x2, weight, bias, t1, class_weight, ignore_index, label_smoothing, reduction,
                          _upstream_rows(grad, t1.shape[0]), False, need_x, need_weight, need_bias)
    if dx is not None:
        dx = dx.view(x.shape)
    return tuple(grad.new_empty(0) if t is None else t for t in (dx, dw, db))


@_linear_cross_entropy_backward_op.register_fake
def _(grad, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction, need_x,
      need_weight, need_bias):
    return (x.new_empty(x.shape) if need_x else grad.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else grad.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_bias else grad.new_empty(0))


def _lce_setup(ctx, inputs, output):
    x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction = inputs
    ctx.save_for_backward(x, weight, target, bias, class_weight)
    ctx.opts = (ignore_index, label_smoothing, reduction)
    ctx.has_bias = bias is not None


def _lce_grad(ctx, grad):
    x, weight, target, bias, class_weight = ctx.saved_tensors
    nx, nw, _, nb = ctx.needs_input_grad[:4]
    nb = nb and ctx.has_bias
    dx, dw, db = torch.ops.tltorch.linear_cross_entropy_backward(grad, x, weight, target, bias, class_weight,
                                                                 *ctx.opts, nx, nw, nb)
    return dx if nx else None, dw if nw else None, None, db if nb else None, None, None, None, None


_linear_cross_entropy_op.register_autograd(_lce_grad, setup_context=_lce_setup)
