"""gemm and colsum (the primitives the other ops are built on), and linear: y = x W^T + b.

linear's kernels are its device's gemm and colsum, bound to one formula (functools.partial)."""
from functools import partial

import torch

from .. import _C
from ._define import define_op
from ._device import allow_tf32, cublas_ready, cublas_workspace, cuda_module, rows

GEMM_KC = _C.GEMM_KC


# ---- gemm: c = alpha * op(a) @ op(b) + beta * c + bias, in place; float32 accumulation ------------------
# op transposes a when trans & 1 and b when trans & 2 (no copy).

def gemm_cpu(a, b, c, bias, alpha, beta, trans):
    ws = None
    if c.dtype is not torch.float32 and a.shape[0 if trans & 1 else 1] > GEMM_KC and c.numel():
        ws = torch.empty(c.numel(), dtype=torch.float32)
    _C.gemm(a, b, c, bias, ws, alpha, beta, torch.get_num_threads(), trans)


def gemm_cuda(a, b, c, bias, alpha, beta, trans):
    if trans & 1:
        a = a.t()
    if trans & 2:
        b = b.t()
    cuda_module().gemm(cublas_ready(a), cublas_ready(b), c, bias, cublas_workspace(c.device), alpha, beta,
                       allow_tf32())


def _no_output(*args):
    return None


gemm = define_op(
    "gemm", "(Tensor a, Tensor b, Tensor(a!) c, Tensor? bias=None, float alpha=1.0, float beta=0.0, "
    "int trans=0) -> ()", {"cpu": gemm_cpu, "cuda": gemm_cuda}, _no_output, device_arg="c")


# ---- colsum: out = beta * out + x.sum(0), in place; float32 accumulation -------------------------------

def colsum_cpu(x, out, beta):
    _C.colsum(x, out, beta, torch.get_num_threads())


def colsum_cuda(x, out, beta):
    cuda_module().colsum(x, out, beta)


colsum = define_op("colsum", "(Tensor x, Tensor(a!) out, float beta=0.0) -> ()",
                   {"cpu": colsum_cpu, "cuda": colsum_cuda}, _no_output, device_arg="out")


# ---- linear: y = x W^T + b; dx = dy W, dW = dy^T x, db = sum of dy's rows -------------------------------

def _linear(gemm, x, weight, bias):
    if x.dim() == 2:
        y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        gemm(x, weight, y, bias, 1.0, 0.0, 2)
        return y
    x2 = rows(x)
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    gemm(x2, weight, y, bias, 1.0, 0.0, 2)
    return y.view(*x.shape[:-1], weight.shape[0])


def _linear_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_backward(gemm, colsum, grad, x, weight, need_x, need_weight, need_bias):
    g2, x2 = rows(grad), rows(x)
    dx = dw = db = None
    if need_x:
        dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        gemm(g2, weight, dx, None, 1.0, 0.0, 0)
        if x.dim() != 2:
            dx = dx.view(x.shape)
    if need_weight:
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        gemm(g2, x2, dw, None, 1.0, 0.0, 1)
    if need_bias:
        db = torch.empty(weight.shape[0], dtype=grad.dtype, device=grad.device)
        colsum(g2, db, 0.0)
    return dx, dw, db


def _linear_backward_fake(grad, x, weight, need_x, need_weight, need_bias):
    return (x.new_empty(x.shape) if need_x else None, weight.new_empty(weight.shape) if need_weight else None,
            grad.new_empty(weight.shape[0]) if need_bias else None)


linear_backward = define_op(
    "linear_backward", "(Tensor grad, Tensor x, Tensor weight, bool need_x, bool need_weight, bool need_bias) "
    "-> (Tensor, Tensor, Tensor)", {"cpu": partial(_linear_backward, gemm_cpu, colsum_cpu),
                                  "cuda": partial(_linear_backward, gemm_cuda, colsum_cuda)}, _linear_backward_fake)


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _linear_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    nx, nw, nb = ctx.needs_input_grad
    nb = nb and ctx.has_bias
    dx, dw, db = linear_backward(grad, x, weight, nx, nw, nb)
    return dx if nx else None, dw if nw else None, db if nb else None


linear = define_op("linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
                   {"cpu": partial(_linear, gemm_cpu), "cuda": partial(_linear, gemm_cuda)}, _linear_fake,
                   setup_context=_linear_setup, backward=_linear_grad, differentiable=("x", "weight", "bias"))
