"""LoRA: y = x W^T + bias + s * dropout(x) A^T B^T, one kernel each way (csrc/cpu/lora.c, csrc/cuda/lora.cu).

The forward op returns su = s * dropout(x) A^T (N x r) too, kept for backward (not differentiable).
Dropout keeps no mask: the kernels hash each element's index with a seed drawn from torch's default
generator as a 0-d int64 tensor, in lora_linear before the op is called, so that torch.compile traces
the draw; backward draws the same mask from the same seed.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _C
from ._define import define_op
from ._device import allow_tf32, cublas_ready, cublas_workspace, cuda_module, rows
from .frozen import bf16_native
from .linear import gemm, linear_backward


def next_dropout_seed() -> Tensor:
    """A fresh dropout seed from torch's default CPU generator (torch.manual_seed makes it reproducible)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _seed_value(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


# ---- dropout(x) for a 2-D x, with the LoRA kernels' mask for an int seed ---------------------------------

def _dropout_cpu(x, p, seed):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _C.dropout(x, out, p, seed, torch.get_num_threads())
    return out


def _dropout_cuda(x, p, seed):
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cuda_module().dropout(x, out, p, seed)
    return out


dropout = define_op("dropout", "(Tensor x, float p, int seed) -> Tensor",
                    {"cpu": _dropout_cpu, "cuda": _dropout_cuda}, lambda x, p, seed: x.new_empty(x.shape))


# ---- lora_linear -------------------------------------------------------------------------------------

def _workspace(kind: int, x2: Tensor, b: Tensor, p: float, want_dx=True, want_da=True) -> Optional[Tensor]:
    n, d_in = x2.shape
    d_out, r = b.shape
    numel = _C.lora_workspace(kind, n, d_in, d_out, r, p, x2.dtype is torch.float32, want_dx, want_da)
    if numel == 0:
        return None
    return torch.empty(numel, dtype=torch.float32, device=x2.device)


def _forward_buffers(x, b, p):
    x2 = rows(x)
    n = x2.shape[0]
    y = torch.empty(n, b.shape[0], dtype=x.dtype, device=x.device)
    su = torch.empty(n, b.shape[1], dtype=x.dtype, device=x.device)
    return x2, y, su, _workspace(0, x2, b, p)


def _onednn_bf16(x, weight, bias, a):
    """x, weight, adapter (and bias) all in bfloat16 on a CPU where torch multiplies bfloat16 natively
    (oneDNN, on AMX where present): there torch's GEMMs run the layer, base and rank-r products alike,
    4-10x faster than tltorch's AVX-512 kernels (benchmarks/RESULTS.md), with the dropout mask and the
    ops' structure (su kept, no mask stored) tltorch's."""
    bf = torch.bfloat16
    return (x.dtype is bf and weight.dtype is bf and a.dtype is bf and (bias is None or bias.dtype is bf)
            and bf16_native())


def _lora_forward_cpu(x, weight, bias, a, b, scale, p, seed):
    if _onednn_bf16(x, weight, bias, a):
        x2 = rows(x)
        y = torch.nn.functional.linear(x2, weight, bias)
        su = _adapter_forward(y, _update_inputs(x2, a, p, seed), a, b, scale)
        return y.view(*x.shape[:-1], weight.shape[0]), (su,)
    x2, y, su, ws = _forward_buffers(x, b, p)
    _C.lora_forward(x2, weight, bias, a, b, scale, p, _seed_value(seed), y, su, ws, torch.get_num_threads())
    return y.view(*x.shape[:-1], weight.shape[0]), (su,)


def _lora_forward_cuda(x, weight, bias, a, b, scale, p, seed):
    x2, y, su, ws = _forward_buffers(x, b, p)
    cuda_module().lora_forward(cublas_ready(x2), cublas_ready(weight), bias, cublas_ready(a), cublas_ready(b),
                               scale, p, _seed_value(seed), y, su, ws, cublas_workspace(x.device), allow_tf32())
    return y.view(*x.shape[:-1], weight.shape[0]), (su,)


def _lora_forward_fake(x, weight, bias, a, b, scale, p, seed):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), (x.new_empty(x.shape[:-1].numel(), a.shape[0]),)


def _backward_buffers(x2, a, b, need_x, need_a, need_b):
    """dx in x's dtype, dA and dB in float32 (the kernels' accumulators), each None unless needed."""
    dev = x2.device
    return (torch.empty(x2.shape, dtype=x2.dtype, device=dev) if need_x else None,
            torch.empty(a.shape, dtype=torch.float32, device=dev) if need_a else None,
            torch.empty(b.shape, dtype=torch.float32, device=dev) if need_b else None)


def _backward_result(x, a, b, dx, da, db):
    if dx is not None:
        dx = dx.view(x.shape)
    if da is not None and a.dtype is not torch.float32:
        da = da.to(a.dtype)
    if db is not None and b.dtype is not torch.float32:
        db = db.to(b.dtype)
    return dx, da, db


def _lora_backward_onednn(grad, x, weight, a, b, su, scale, p, seed, need_x, need_a, need_b):
    """_lora_backward_cpu's work in torch's bfloat16 GEMMs (_onednn_bf16): dx's base part by torch, the
    adapter's by the same helper as lora_update's."""
    g = rows(grad)
    dx = torch.mm(g, weight) if need_x else None
    dx, da, db = _adapter_backward(g, rows(x), a, b, su, scale, p, seed, need_x, need_a, need_b, dx)
    return (None if dx is None else dx.view(x.shape)), da, db


def _lora_backward_cpu(grad, x, weight, a, b, su, scale, p, seed, need_x, need_a, need_b):
    if _onednn_bf16(x, weight, None, a):
        return _lora_backward_onednn(grad, x, weight, a, b, su, scale, p, seed, need_x, need_a, need_b)
    x2 = rows(x)
    dx, da, db = _backward_buffers(x2, a, b, need_x, need_a, need_b)
    if dx is None and da is None and db is None:
        return None, None, None
    _C.lora_backward(rows(grad), x2, weight, a, b, su, scale, p, _seed_value(seed), dx, da, db,
                     _workspace(1, x2, b, p, need_x, need_a), torch.get_num_threads())
    return _backward_result(x, a, b, dx, da, db)


def _lora_backward_cuda(grad, x, weight, a, b, su, scale, p, seed, need_x, need_a, need_b):
    x2 = rows(x)
    dx, da, db = _backward_buffers(x2, a, b, need_x, need_a, need_b)
    if dx is None and da is None and db is None:
        return None, None, None
    cuda_module().lora_backward(cublas_ready(rows(grad)), cublas_ready(x2), cublas_ready(weight), cublas_ready(a),
                                cublas_ready(b), su, scale, p, _seed_value(seed), dx, da, db,
                                _workspace(1, x2, b, p, need_x, need_a), cublas_workspace(x.device), allow_tf32())
    return _backward_result(x, a, b, dx, da, db)


def _lora_backward_fake(grad, x, weight, a, b, su, scale, p, seed, need_x, need_a, need_b):
    return (x.new_empty(x.shape) if need_x else None, a.new_empty(a.shape) if need_a else None,
            b.new_empty(b.shape) if need_b else None)


_lora_linear_backward = define_op(
    "lora_linear_backward", "(Tensor grad, Tensor x, Tensor weight, Tensor a, Tensor b, Tensor su, float scale, "
    "float p, Tensor? seed, bool need_x, bool need_a, bool need_b) -> (Tensor, Tensor, Tensor)",
    {"cpu": _lora_backward_cpu, "cuda": _lora_backward_cuda}, _lora_backward_fake)


def _lora_setup(ctx, inputs, output):
    x, weight, bias, a, b, scale, p, seed = inputs
    (su,) = output[1]
    ctx.save_for_backward(x, weight, a, b, su, seed)
    ctx.args = (scale, p, bias is not None)


def _lora_grad(ctx, grad, _grad_su):
    x, weight, a, b, su, seed = ctx.saved_tensors
    scale, p, has_bias = ctx.args
    nx, nw, nbias, na, nb = ctx.needs_input_grad[:5]
    nbias = nbias and has_bias
    dx, da, db = _lora_linear_backward(grad, x, weight, a, b, su, scale, p, seed, nx, na, nb)
    dw = dbias = None
    if nw or nbias:
        _, dw, dbias = linear_backward(grad, x, weight, False, nw, nbias)
    return (dx if nx else None, dw if nw else None, dbias if nbias else None, da if na else None,
            db if nb else None, None, None, None)


_lora_linear = define_op(
    "lora_linear", "(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, float scale, float p, "
    "Tensor? seed) -> (Tensor, Tensor)", {"cpu": _lora_forward_cpu, "cuda": _lora_forward_cuda},
    _lora_forward_fake, setup_context=_lora_setup, backward=_lora_grad,
    differentiable=("x", "weight", "bias", "a", "b"), kept_outputs=1)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, scale: float,
                p: float) -> Tensor:
    seed = next_dropout_seed() if p > 0 else None
    return _lora_linear(x, weight, bias, a, b, scale, p, seed)


# ---- lora_update: out = y + s * dropout(x) A^T B^T, the adapter over a base computed elsewhere ------------
# For a base tltorch's fused kernel cannot read (a compact FrozenLinear: int8 or bfloat16 weight, run by its own
# kernel): the base's output y plus the low-rank update, in the adapter's dtype, through _mm.
# su = s * dropout(x) A^T (tokens x r) is kept for backward; the dropout mask is recomputed from the seed.

def _update_inputs(x, a, p, seed):
    x2 = rows(x).to(a.dtype)
    return dropout(x2, p, _seed_value(seed)) if p > 0 else x2


def _mm(a, b, c, alpha, beta, trans):
    """c = alpha op(a) op(b) + beta c in place (trans 0: as they are, 1: a^T, 2: b^T), by tltorch's GEMM (which
    reads transposed operands in place; torch's CPU matmul was ~80x slower on some of these transposes in
    float32), or by torch's where c is bfloat16 on a CPU that multiplies bfloat16 natively (oneDNN, on AMX
    where present: 4-10x tltorch's GEMM on the rank-r products there, benchmarks/RESULTS.md)."""
    if c.dtype is torch.bfloat16 and c.device.type == "cpu" and bf16_native():
        c.addmm_(a.t() if trans == 1 else a, b.t() if trans == 2 else b, beta=beta, alpha=alpha)
    else:
        gemm(a, b, c, None, alpha, beta, trans)
    return c


def _adapter_forward(out, xd, a, b, scale):
    """out += s xd A^T B^T in place (out in a's dtype, xd = dropout(x) in rows); returns su = s xd A^T."""
    su = _mm(xd, a, torch.empty(xd.shape[0], a.shape[0], dtype=a.dtype, device=xd.device), scale, 0.0, 2)
    _mm(su, b, out, 1.0, 1.0, 2)
    return su


def _adapter_backward(g, x, a, b, su, scale, p, seed, need_x, need_a, need_b, dx=None):
    """The adapter's gradients from g (rows, in a's dtype): x's part (added into dx where given, in a's
    dtype), dA and dB, each None unless needed."""
    dev = g.device
    da = db = None
    if need_x or need_a:
        gsu = _mm(g, b, torch.empty(g.shape[0], a.shape[0], dtype=a.dtype, device=dev), 1.0, 0.0, 0)  # g B
        if need_a:  # s (g B)^T dropout(x)
            da = _mm(gsu, _update_inputs(x, a, p, seed), torch.empty(a.shape, dtype=a.dtype, device=dev),
                     scale, 0.0, 1)
        if need_x and dx is not None and p == 0:
            _mm(gsu, a, dx, scale, 1.0, 0)  # dx += s (g B) A
        elif need_x:  # s (g B) A, then through dropout's mask
            part = _mm(gsu, a, torch.empty(g.shape[0], a.shape[1], dtype=a.dtype, device=dev), scale, 0.0, 0)
            part = dropout(part, p, _seed_value(seed)) if p > 0 else part
            dx = part if dx is None else dx.add_(part)
    if need_b:  # g^T su
        db = _mm(g, su, torch.empty(b.shape, dtype=b.dtype, device=dev), 1.0, 0.0, 1)
    return (dx if need_x else None), da, db


def _lora_update(y, x, a, b, scale, p, seed):
    out = rows(y).to(a.dtype, copy=True)
    su = _adapter_forward(out, _update_inputs(x, a, p, seed), a, b, scale)
    return out.to(y.dtype).view(y.shape), (su,)


def _lora_update_fake(y, x, a, b, scale, p, seed):
    return y.new_empty(y.shape), (x.new_empty(x.shape[:-1].numel(), a.shape[0], dtype=a.dtype),)


def _update_setup(ctx, inputs, output):
    y, x, a, b, scale, p, seed = inputs
    (su,) = output[1]
    ctx.save_for_backward(x, a, b, su, seed)
    ctx.args = (scale, p, y.dtype)


def _update_grad(ctx, grad, _grad_su):
    x, a, b, su, seed = ctx.saved_tensors
    scale, p, y_dtype = ctx.args
    ny, nx, na, nb = ctx.needs_input_grad[:4]
    dx, da, db = _adapter_backward(rows(grad).to(a.dtype), x, a, b, su, scale, p, seed, nx, na, nb)
    if dx is not None:
        dx = dx.to(x.dtype).view(x.shape)
    return (grad if ny else None), dx, da, db, None, None, None


_lora_update_op = define_op(
    "lora_update", "(Tensor y, Tensor x, Tensor a, Tensor b, float scale, float p, Tensor? seed) -> (Tensor, Tensor)",
    {"cpu": _lora_update, "cuda": _lora_update}, _lora_update_fake, setup_context=_update_setup,
    backward=_update_grad, differentiable=("y", "x", "a", "b"), kept_outputs=1)


def lora_update(y: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:
    """y + scale * dropout(x, p) a^T b^T, with y the output of a base layer on x (any float dtypes; the update
    is computed in a's)."""
    seed = next_dropout_seed() if p > 0 else None
    return _lora_update_op(y, x, a, b, scale, p, seed)
