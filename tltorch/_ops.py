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


def _once_differentiable(fn):
    """torch.autograd.function.once_differentiable, without its cost on the usual path: backward runs
    with grad mode off unless create_graph=True, and only then is the wrapper (an error if the returned
    gradients are differentiated) needed."""
    slow = torch.autograd.function.once_differentiable(fn)

    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            return slow(ctx, *grads)
        return fn(ctx, *grads)
    backward.__doc__ = fn.__doc__
    return backward


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_transforms_active = torch._C._are_functorch_transforms_active


def _fast_apply(fn_cls):
    """fn_cls.apply without its Python preamble (a pytree pass over the arguments) where that preamble
    has nothing to do: no functorch transform active and no functorch-wrapped tensor among the inputs
    given to check; otherwise the ordinary apply. Saves ~4 us per call of a small head."""
    c_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, fn_cls)

    def apply(*args, check=()):
        if _transforms_active() or any(t is not None and _is_wrapped(t) for t in check):
            return fn_cls.apply(*args)
        return c_apply(*args)
    return apply


def _keep_for_backward(ctx, *tensors) -> None:
    """Keeps input tensors for a backward that may not need them (cheaper than save_for_backward on
    the per-step path of a small head), with their version counters: _kept() raises as autograd does
    if one was modified in place in between."""
    ctx.kept = tensors
    ctx.kept_versions = [None if t is None else t._version for t in tensors]


def _kept(ctx):
    kept = ctx.kept
    if [None if t is None else t._version for t in kept] != ctx.kept_versions:
        for t, v in zip(kept, ctx.kept_versions):
            if t is not None and t._version != v:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an "
                    f"inplace operation: a tensor of shape {tuple(t.shape)} is at version {t._version}, "
                    f"expected version {v}")
    return kept


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


# ---- LoRA linear -----------------------------------------------------------------------------------
# y = x W^T + bias + s * dropout(x) A^T B^T, one kernel each way (csrc/cpu/lora.c, csrc/cuda/lora.cu).
# The forward returns su = s * dropout(x) A^T (N x r) too, kept for backward. Dropout keeps no mask: the
# kernels hash each element's index with a seed drawn here from torch's default generator (a 0-d int64
# tensor, so that torch.compile traces the draw), and backward draws the same mask from the same seed.

def next_dropout_seed() -> Tensor:
    """A fresh dropout seed from torch's default CPU generator (torch.manual_seed makes it reproducible)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _lora_ws(kind: int, n: int, d_in: int, d_out: int, r: int, p: float, dtype, device, want_dx=True,
             want_da=True) -> Optional[Tensor]:
    numel = _C.lora_workspace(kind, n, d_in, d_out, r, p, dtype is torch.float32, want_dx, want_da)
    if numel == 0:
        return None
    return torch.empty(numel, dtype=torch.float32, device=device)


def dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """dropout(x) for a 2-D x, with the LoRA kernels' mask for `seed`."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.is_cuda:
        cuda_module().dropout(x, out, p, seed)
    else:
        _C.dropout(x, out, p, seed, torch.get_num_threads())
    return out


def _lora_forward_impl(x2: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor,
                       scale: float, p: float, seed: int) -> Tuple[Tensor, Tensor]:
    n, d_in = x2.shape
    d_out, r = b.shape
    y = torch.empty(n, d_out, dtype=x2.dtype, device=x2.device)
    su = torch.empty(n, r, dtype=x2.dtype, device=x2.device)
    ws = _lora_ws(0, n, d_in, d_out, r, p, x2.dtype, x2.device)
    if x2.is_cuda:
        cublas_ws = torch.empty(_CUBLAS_WS_BYTES, dtype=torch.uint8, device=x2.device)
        cuda_module().lora_forward(_cublas_ready(x2), _cublas_ready(weight), bias, _cublas_ready(a),
                                   _cublas_ready(b), scale, p, seed, y, su, ws, cublas_ws,
                                   bool(torch.backends.cuda.matmul.allow_tf32))
    else:
        _C.lora_forward(x2, weight, bias, a, b, scale, p, seed, y, su, ws, torch.get_num_threads())
    return y, su


def _lora_backward_impl(g2: Tensor, x2: Tensor, weight: Tensor, a: Tensor, b: Tensor, su: Tensor,
                        scale: float, p: float, seed: int, need_x: bool, need_a: bool, need_b: bool):
    n, d_in = x2.shape
    d_out, r = b.shape
    dev = x2.device
    dx = torch.empty(n, d_in, dtype=x2.dtype, device=dev) if need_x else None
    da = torch.empty(r, d_in, dtype=torch.float32, device=dev) if need_a else None
    db = torch.empty(d_out, r, dtype=torch.float32, device=dev) if need_b else None
    if dx is None and da is None and db is None:
        return None, None, None
    ws = _lora_ws(1, n, d_in, d_out, r, p, x2.dtype, dev, need_x, need_a)
    if x2.is_cuda:
        cublas_ws = torch.empty(_CUBLAS_WS_BYTES, dtype=torch.uint8, device=dev)
        cuda_module().lora_backward(_cublas_ready(g2), _cublas_ready(x2), _cublas_ready(weight), _cublas_ready(a),
                                    _cublas_ready(b), su, scale, p, seed, dx, da, db, ws, cublas_ws,
                                    bool(torch.backends.cuda.matmul.allow_tf32))
    else:
        _C.lora_backward(g2, x2, weight, a, b, su, scale, p, seed, dx, da, db, ws, torch.get_num_threads())
    if da is not None and a.dtype is not torch.float32:
        da = da.to(a.dtype)
    if db is not None and b.dtype is not torch.float32:
        db = db.to(b.dtype)
    return dx, da, db


def _rows(t: Tensor) -> Tensor:
    return t if t.dim() == 2 else t.reshape(t.shape[:-1].numel(), t.shape[-1])


def _seed_value(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, p, seed):
        x2 = _rows(x)
        s = _seed_value(seed)
        y, su = _lora_forward_impl(x2, weight, bias, a, b, scale, p, s)
        ctx.save_for_backward(x2, weight, a, b, su)
        ctx.args = (scale, p, s, x.shape, bias is not None)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x2, weight, a, b, su = ctx.saved_tensors
        scale, p, s, x_shape, has_bias = ctx.args
        nx, nw, nbias, na, nb = ctx.needs_input_grad[:5]
        g2 = _rows(g)
        dx, da, db = _lora_backward_impl(g2, x2, weight, a, b, su, scale, p, s, nx, na, nb)
        dw = dbias = None
        if nw or (nbias and has_bias):
            _, dw, dbias = _linear_backward_impl(g2, x2, weight, False, nw, nbias and has_bias)
        if dx is not None:
            dx = dx.view(x_shape)
        return dx, dw, dbias, da, db, None, None, None


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, scale: float,
                p: float) -> Tensor:
    seed = next_dropout_seed() if p > 0 else None
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return torch.ops.tltorch.lora_linear(x, weight, bias, a, b, scale, p, seed)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, a, b)):
        return _LoRALinear.apply(x, weight, bias, a, b, scale, p, seed)
    y, _ = _lora_forward_impl(_rows(x), weight, bias, a, b, scale, p, _seed_value(seed))
    return y.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("tltorch::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, scale: float,
                    p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    y, su = _lora_forward_impl(_rows(x), weight, bias, a, b, scale, p, _seed_value(seed))
    return y.view(*x.shape[:-1], weight.shape[0]), su


@_lora_linear_op.register_fake
def _(x, weight, bias, a, b, scale, p, seed):
    n = x.shape[:-1].numel()
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(n, a.shape[0])


@torch.library.custom_op("tltorch::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, a: Tensor, b: Tensor, su: Tensor,
                             scale: float, p: float, seed: Optional[Tensor], need_x: bool, need_a: bool,
                             need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dx, da, db = _lora_backward_impl(_rows(grad), _rows(x), weight, a, b, su, scale, p, _seed_value(seed),
                                     need_x, need_a, need_b)
    if dx is not None:
        dx = dx.view(x.shape)
    return tuple(grad.new_empty(0) if t is None else t for t in (dx, da, db))


@_lora_linear_backward_op.register_fake
def _(grad, x, weight, a, b, su, scale, p, seed, need_x, need_a, need_b):
    return (x.new_empty(x.shape) if need_x else grad.new_empty(0),
            a.new_empty(a.shape) if need_a else grad.new_empty(0),
            b.new_empty(b.shape) if need_b else grad.new_empty(0))


def _lora_setup(ctx, inputs, output):
    x, weight, bias, a, b, scale, p, seed = inputs
    ctx.save_for_backward(x, weight, a, b, output[1], seed)
    ctx.args = (scale, p, bias is not None)


def _lora_grad(ctx, grad, _grad_su):
    x, weight, a, b, su, seed = ctx.saved_tensors
    scale, p, has_bias = ctx.args
    nx, nw, nbias, na, nb = ctx.needs_input_grad[:5]
    nbias = nbias and has_bias
    dx, da, db = torch.ops.tltorch.lora_linear_backward(grad, x, weight, a, b, su, scale, p, seed, nx, na, nb)
    dw = dbias = None
    if nw or nbias:
        _, dw, dbias = torch.ops.tltorch.linear_backward(grad, x, weight, False, nw, nbias)
    return (dx if nx else None, dw if nw else None, dbias if nbias else None, da if na else None,
            db if nb else None, None, None, None)


_lora_linear_op.register_autograd(_lora_grad, setup_context=_lora_setup)


# ---- linear + cross-entropy (the fused head) -----------------------------------------------------------
# Eager: for mean/sum the forward pass computes the gradients too (one pass over the logits, a chunk of
# rows at a time) and backward only scales them by the upstream gradient; for "none" backward recomputes
# the logits with each row's upstream gradient. Under torch.compile, tltorch::linear_cross_entropy and
# its backward op (which always recomputes) stand in.

REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}
# At most this many float32 logits per chunk of rows (32 MB): the head's working memory on the CPU.
_XENT_CHUNK_FLOATS = 8 << 20
# On CUDA, the workspace's budget (64 MB; tl.h's tl_xent_cuda_workspace says how it is used).
_XENT_CUDA_FLOATS = 16 << 20
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
    db = torch.empty(c, dtype=torch.float32, device=dev) if need_bias else None
    if x2.is_cuda:
        cuda = cuda_module()
        # The whole batch at once when it fits the budget, else blocks of classes (dW then written once,
        # in W's dtype), else chunks of rows; dX's float32 accumulator (bfloat16/float16 x) comes on top.
        acc = need_x and x2.dtype != torch.float32
        wsn, narrow = cuda.xent_workspace(n, d, c, acc, _XENT_CUDA_FLOATS + (n * d if acc else 0))
        dw = torch.empty((c, d), dtype=weight.dtype if narrow else torch.float32,
                         device=dev) if need_weight else None
        ws = torch.empty(wsn, dtype=torch.float32, device=dev)
        cublas_ws = torch.empty(_CUBLAS_WS_BYTES, dtype=torch.uint8, device=dev)
        cuda.linear_xent(_cublas_ready(x2), _cublas_ready(weight), bias, t1, class_weight, ignore_index,
                         label_smoothing, red, grad_rows, loss, dx, dw, db, ws, cublas_ws,
                         bool(torch.backends.cuda.matmul.allow_tf32))
    else:
        dw = torch.empty((c, d), dtype=torch.float32, device=dev) if need_weight else None
        per_row = c + d + 1
        rows = max(1, min(n, _XENT_CHUNK_FLOATS // per_row))
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


def _scaled_(grads, g: Tensor):
    """The gradients, each scaled in place by the scalar upstream gradient g (read on the device)."""
    for t in grads:
        if t is not None:
            t.mul_(g.to(t.dtype))
    return grads


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, class_weight, ignore_index, label_smoothing, red):
        nx, nw, nb = ctx.needs_input_grad[:3]
        nb = nb and bias is not None
        x2, t1 = _flat(x, target)
        ctx.red, ctx.opts, ctx.x_shape = red, (ignore_index, label_smoothing), x.shape
        _keep_for_backward(ctx, x2, weight, bias, t1, class_weight)
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
    @_once_differentiable
    def backward(ctx, g):
        grads, ctx.grads = ctx.grads, None
        # The gradients computed with the loss are those of the inputs as they were then; an input
        # changed in place since raises, as autograd does for the tensors it saves.
        kept = _kept(ctx)
        if grads is not None and not g.is_cuda and g.item() == 1.0:
            dx, dw, db = grads  # the usual case: loss.backward()
        elif grads is not None and g.is_cuda:
            # The gradients were computed with the loss: scale them in place by the upstream gradient
            # (no host sync to look at it) and hand them over (no copy: nothing else holds them).
            dx, dw, db = _scaled_(grads, g)
        else:
            # Reduction "none", another upstream gradient, or a second backward through a retained
            # graph: recompute, exactly as the first pass would have, so repeated backward passes agree
            # bit for bit. On the CPU the upstream gradient is folded into dz; on CUDA a scalar one
            # scales the gradients afterwards, as the first pass did.
            nx, nw, nb = ctx.needs_input_grad[:3]
            x2, weight, bias, t1, class_weight = kept
            nb = nb and bias is not None
            after = g.is_cuda and ctx.red != 2
            _, dx, dw, db = _xent(x2, weight, bias, t1, class_weight, *ctx.opts, ctx.red,
                                  None if after else _upstream_rows(g, t1.shape[0]), False, nx, nw, nb)
            if after:
                dx, dw, db = _scaled_((dx, dw, db), g)
        if dx is not None and len(ctx.x_shape) != 2:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None, None, None, None, None


_lce_apply = _fast_apply(_LinearCrossEntropy)


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                         class_weight: Optional[Tensor], ignore_index: int, label_smoothing: float,
                         red: int) -> Tensor:
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return torch.ops.tltorch.linear_cross_entropy(x, weight, target, bias, class_weight, ignore_index,
                                                      label_smoothing, red)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _lce_apply(x, weight, bias, target, class_weight, ignore_index, label_smoothing, red,
                          check=(x, weight, bias, target, class_weight))
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


# ---- frozen linear (a stored weight: bfloat16, float16, or int8 with a per-output-channel scale) ------
# y = x (W * s)^T + bias and dx = dy (W * s), W read in its stored dtype and scaled as the GEMM packs it
# (no dequantised copy on the CPU). There is never a weight gradient. On CUDA the weight is converted
# to x's dtype for cuBLAS (a temporary the size of the layer's weight).

def _dequant(weight: Tensor, scale: Optional[Tensor], dtype) -> Tensor:
    w = weight.to(dtype)
    return w if scale is None else w * scale.to(dtype)[:, None]


def _qgemm(a: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor], forward: bool) -> Tensor:
    """forward: a (n, in) -> a (W*s)^T + bias; else a (n, out) -> a (W*s)."""
    n = a.shape[0]
    cols = weight.shape[0] if forward else weight.shape[1]
    c = torch.empty(n, cols, dtype=a.dtype, device=a.device)
    if a.is_cuda:
        gemm(a, _dequant(weight, scale, a.dtype), c, None if bias is None else bias.to(a.dtype),
             trans=2 if forward else 0)
        return c
    k = a.shape[1]
    ws = torch.empty(c.numel(), dtype=torch.float32) if a.dtype is not torch.float32 and k > _GEMM_KC else None
    _C.qgemm(a, weight, scale, 1 if forward else 0, c, bias, ws, torch.get_num_threads(), 2 if forward else 0)
    return c


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        ctx.x_shape = x.shape
        return _qgemm(_rows(x), weight, scale, bias, True).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        weight, scale = ctx.saved_tensors
        return _qgemm(_rows(g), weight, scale, None, False).view(ctx.x_shape), None, None, None


def frozen_linear(x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return torch.ops.tltorch.frozen_linear(x, weight, scale, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, weight, scale, bias)
    return _qgemm(_rows(x), weight, scale, bias, True).view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("tltorch::frozen_linear", mutates_args=())
def _frozen_linear_op(x: Tensor, weight: Tensor, scale: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    return _qgemm(_rows(x), weight, scale, bias, True).view(*x.shape[:-1], weight.shape[0])


@_frozen_linear_op.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("tltorch::frozen_linear_backward", mutates_args=())
def _frozen_linear_backward_op(grad: Tensor, weight: Tensor, scale: Optional[Tensor]) -> Tensor:
    return _qgemm(_rows(grad), weight, scale, None, False).view(*grad.shape[:-1], weight.shape[1])


@_frozen_linear_backward_op.register_fake
def _(grad, weight, scale):
    return grad.new_empty(*grad.shape[:-1], weight.shape[1])


def _frozen_setup(ctx, inputs, output):
    x, weight, scale, bias = inputs
    ctx.save_for_backward(weight, scale)


def _frozen_grad(ctx, grad):
    weight, scale = ctx.saved_tensors
    return torch.ops.tltorch.frozen_linear_backward(grad, weight, scale), None, None, None


_frozen_linear_op.register_autograd(_frozen_grad, setup_context=_frozen_setup)


# ---- pooling and AdamW ---------------------------------------------------------------------------------

POOL_MODES = {"cls": 0, "mean": 1, "max": 2}


def _pool_impl(h: Tensor, mask: Optional[Tensor], mode: int) -> Tensor:
    out = torch.empty(h.shape[0], h.shape[2], dtype=h.dtype, device=h.device)
    if mask is not None and mask.dtype is torch.bool:
        mask = mask.view(torch.uint8)  # DLPack's bool is not one tltorch reads; same bytes, 0 or 1
    if h.is_cuda:
        cuda_module().pool(h, mask, mode, out)
    else:
        _C.pool(h, mask, mode, out, torch.get_num_threads())
    return out


def pool(h: Tensor, mask: Optional[Tensor], mode: int) -> Tensor:
    """(B, D) from h (B, T, D): its first token (mode 0), or the mean (1) or maximum (2) over the tokens
    whose mask is nonzero (all tokens when mask is None); zeros for a row with none."""
    if torch.compiler.is_compiling() or h.device.type == "meta":
        return torch.ops.tltorch.pool(h, mask, mode)
    return _pool_impl(h, mask, mode)


@torch.library.custom_op("tltorch::pool", mutates_args=())
def _pool_op(h: Tensor, mask: Optional[Tensor], mode: int) -> Tensor:
    return _pool_impl(h, mask, mode)


@_pool_op.register_fake
def _(h, mask, mode):
    return h.new_empty(h.shape[0], h.shape[2])


def _flat_state(t: Tensor, name: str) -> Tensor:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    return t.detach().view(-1)


def adamw_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: float, beta1: float,
           beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step in place (torch.optim.AdamW's formula; `step` counts from 1): param (float32,
    bfloat16 or float16), exp_avg and exp_avg_sq (float32) contiguous, grad of param's numel in param's
    dtype or float32."""
    p = _flat_state(param, "param")
    m = _flat_state(exp_avg, "exp_avg")
    v = _flat_state(exp_avg_sq, "exp_avg_sq")
    g = grad.detach().reshape(-1)
    if p.is_cuda:
        cuda_module().adamw(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step)
    else:
        _C.adamw(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, torch.get_num_threads())
