"""linear + cross-entropy (the fused head): the loss of x W^T + b without materialising the logits.

One kernel call (xent) gives any of the loss, dx, dW and db, a chunk of rows at a time (csrc/cpu/head.c,
csrc/cuda/head.cu). On the eager autograd route, for reduction mean and sum, the forward op computes the
gradients with the loss in the same pass (its need_* flags, set there from requires_grad; an upstream
gradient of 1) and returns them as extra outputs, which backward hands over or scales. For "none", and on
the torch.ops route (torch.compile, whose graph can neither look at the upstream gradient nor let an op
hand over tensors it was given), the flags are off and backward recomputes the logits with each row's
upstream gradient folded in (the backward op).
"""
import math
import threading
from functools import partial

import torch
from torch import Tensor

from .. import _C
from ._define import DeviceTable, by_device, define_op
from ._device import allow_tf32, cublas_ready, cublas_workspace, cuda_module

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


# ---- xent: one call of the fused kernel ----------------------------------------------------------------

# (softcap, temperature, lse_square_scale) of plain cross-entropy
PLAIN = (0.0, 1.0, 0.0)


def _launch_cpu(x2, weight, bias, t1, class_weight, opts, head, grad_rows, loss, lse, ent, dx, db, need_weight):
    """The CPU kernel on 2-D x2 and 1-D t1, into loss, lse, ent, dx and db; returns dW (float32), when
    needed. opts: (ignore_index, label_smoothing, reduction); head: (softcap, temperature,
    lse_square_scale)."""
    n, d = x2.shape
    c = weight.shape[0]
    dw = torch.empty((c, d), dtype=torch.float32, device=x2.device) if need_weight else None
    per_row = c + d + 1 + (c if head[0] > 0 else 0)  # with a softcap, the tanh of each logit too
    chunk = max(1, min(n, _XENT_CHUNK_FLOATS // per_row))
    # With few classes the CPU kernel takes a single pass that needs no workspace.
    ws = _cpu_workspace(chunk * per_row) if c > _XENT_SKINNY_C else None
    if head == PLAIN and lse is None and ent is None:
        _C.linear_xent(x2, weight, bias, t1, class_weight, *opts, grad_rows, loss, dx, dw, db, ws,
                       torch.get_num_threads())
    else:
        _C.linear_head(x2, weight, bias, t1, class_weight, *opts, *head, grad_rows, loss, lse, ent, dx, dw, db, ws,
                       torch.get_num_threads())
    return dw


def _launch_cuda(x2, weight, bias, t1, class_weight, opts, head, grad_rows, loss, lse, ent, dx, db, need_weight):
    """The CUDA kernel, likewise; dW in W's dtype when written by blocks of classes, else float32."""
    n, d = x2.shape
    c = weight.shape[0]
    cuda = cuda_module()
    # The whole batch at once when it fits the budget, else blocks of classes (dW then written once, in
    # W's dtype), else chunks of rows; dX's float32 accumulator (bfloat16/float16 x) comes on top.
    acc = dx is not None and x2.dtype != torch.float32
    wsn, narrow = cuda.xent_workspace(n, d, c, acc, _XENT_CUDA_FLOATS + (n * d if acc else 0))
    dw = torch.empty((c, d), dtype=weight.dtype if narrow else torch.float32,
                     device=x2.device) if need_weight else None
    ws = torch.empty(wsn, dtype=torch.float32, device=x2.device)
    cuda.linear_head(cublas_ready(x2), cublas_ready(weight), bias, t1, class_weight, *opts, *head, grad_rows, loss,
                     lse, ent, dx, dw, db, ws, cublas_workspace(x2.device), allow_tf32())
    return dw


def _head(launch, x, weight, target, bias, class_weight, opts, head, grad_rows, want, need_x, need_weight,
          need_bias):
    """One call of the fused kernel (launch: a device's) on x and target of any leading shape, flattened
    to rows: ((loss, lse, entropy), (dx, dw, db)), each None unless asked for; want: (the loss's dtype or
    None, lse, entropy), lse and entropy float32 of n rows; dx in x's shape, dw and db in weight's and
    bias's dtypes. grad_rows: the upstream gradient per row, or None for 1."""
    n = target.numel()
    x2 = x if x.dim() == 2 else x.reshape(n, x.shape[-1])
    t1 = target if target.dim() == 1 else target.reshape(n)
    dev = x.device
    loss_dtype, want_lse, want_ent = want
    loss = None if loss_dtype is None else torch.empty((n,) if opts[2] == 2 else (), dtype=loss_dtype, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev) if want_lse else None
    ent = torch.empty(n, dtype=torch.float32, device=dev) if want_ent else None
    dx = torch.empty((n, x2.shape[1]), dtype=x.dtype, device=dev) if need_x else None
    db = torch.empty(weight.shape[0], dtype=torch.float32, device=dev) if need_bias else None
    dw = launch(x2, weight, bias, t1, class_weight, opts, head, grad_rows, loss, lse, ent, dx, db, need_weight)
    if dw is not None and weight.dtype is not torch.float32:
        dw = dw.to(weight.dtype)
    if db is not None and bias.dtype is not torch.float32:
        db = db.to(bias.dtype)
    if dx is not None and x.dim() != 2:
        dx = dx.view(x.shape)
    return (loss, lse, ent), (dx, dw, db)


def _xent(launch, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction, grad_rows,
          want_loss, need_x, need_weight, need_bias):
    """_head for plain cross-entropy: (loss, (dx, dw, db)), the loss in x's dtype."""
    outs, grads = _head(launch, x, weight, target, bias, class_weight, (ignore_index, label_smoothing, reduction),
                        PLAIN, grad_rows, (x.dtype if want_loss else None, False, False), need_x, need_weight,
                        need_bias)
    return outs[0], grads


xent = by_device({"cpu": partial(_xent, _launch_cpu), "cuda": partial(_xent, _launch_cuda)})


# ---- the ops ---------------------------------------------------------------------------------------

def _forward(launch, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction, need_x,
             need_weight, need_bias):
    """The loss and, for mean and sum, the gradients the need_* flags ask for (upstream gradient 1)."""
    scalar = reduction != 2
    loss, grads = _xent(launch, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
                        None, True, need_x and scalar, need_weight and scalar, need_bias and scalar)
    return loss if scalar else loss.view(target.shape), grads


def _forward_fake(x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction, need_x,
                  need_weight, need_bias):
    scalar = reduction != 2
    return x.new_empty(() if scalar else target.shape), (
        x.new_empty(x.shape) if need_x and scalar else None,
        weight.new_empty(weight.shape) if need_weight and scalar else None,
        bias.new_empty(bias.shape) if need_bias and scalar else None)


def _upstream_rows(g: Tensor, n: int) -> Tensor:
    """The upstream gradient as one value per row (a broadcast view for a scalar)."""
    return g.reshape(-1).expand(n) if g.dim() == 0 else g.reshape(n)


def _backward(launch, grad, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
              need_x, need_weight, need_bias):
    """The gradients, recomputed with each row's upstream gradient folded into dz."""
    return _xent(launch, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
                 _upstream_rows(grad, target.numel()), False, need_x, need_weight, need_bias)[1]


def _backward_fake(grad, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
                   need_x, need_weight, need_bias):
    return (x.new_empty(x.shape) if need_x else None, weight.new_empty(weight.shape) if need_weight else None,
            weight.new_empty(weight.shape[0]) if need_bias else None)


_linear_cross_entropy_backward = define_op(
    "linear_cross_entropy_backward", "(Tensor grad, Tensor x, Tensor weight, Tensor target, Tensor? bias, "
    "Tensor? class_weight, SymInt ignore_index, float label_smoothing, SymInt reduction, bool need_x, "
    "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)",
    {"cpu": partial(_backward, _launch_cpu), "cuda": partial(_backward, _launch_cuda)}, _backward_fake)


# ---- the autograd formula --------------------------------------------------------------------------

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


def _scaled_(grads, g: Tensor):
    """The gradients, each scaled in place by the scalar upstream gradient g (read on the device)."""
    for t in grads:
        if t is not None:
            t.mul_(g.to(t.dtype))
    return grads


def _reuse_cpu(g, grads, ctx, need):
    """Reading the upstream gradient costs nothing here: when it is 1 (the usual loss.backward()) the
    forward's gradients are the answer; otherwise None, and backward recomputes with it folded in, as a
    first pass with that upstream gradient would have, so that repeated backward passes agree bit for
    bit."""
    return grads if grads is not None and g.item() == 1.0 else None


def _reuse_cuda(g, grads, ctx, need):
    """No host sync to look at the upstream gradient: the forward's gradients scaled by it in place and
    handed over (no copy: nothing else holds them). After a first backward through a retained graph
    took them, the forward's gradients again, scaled alike, so repeated backward passes agree bit for
    bit."""
    if grads is None:
        x, weight, bias, target, class_weight = ctx.kept
        grads = _xent(_launch_cuda, x, weight, target, bias, class_weight, *ctx.opts, None, False, *need)[1]
    return _scaled_(grads, g)


_reuse = DeviceTable({"cpu": _reuse_cpu, "cuda": _reuse_cuda})


def _setup(ctx, inputs, output):
    x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction, nx, nw, nb = inputs
    ctx.opts = (ignore_index, label_smoothing, reduction)
    _keep_for_backward(ctx, x, weight, bias, target, class_weight)
    ctx.reuse = reduction != 2 and (nx or nw or nb)  # the forward computed gradients with the loss
    ctx.grads = output[1] if ctx.reuse else None


def _grad(ctx, g, *_unread):
    # The gradients computed with the loss are those of the inputs as they were then; an input changed
    # in place since raises, as autograd does for the tensors it saves.
    x, weight, bias, target, class_weight = _kept(ctx)
    nx, nw, _, nb = ctx.needs_input_grad[:4]
    nb = nb and bias is not None
    grads, ctx.grads = ctx.grads, None
    if ctx.reuse:
        grads = _reuse[g.device](g, grads, ctx, (nx, nw, nb))
    if grads is None:
        grads = _linear_cross_entropy_backward(g, x, weight, target, bias, class_weight, *ctx.opts, nx, nw, nb)
    dx, dw, db = grads
    return dx if nx else None, dw if nw else None, None, db if nb else None, *(None,) * 7


# linear_cross_entropy(x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction)
# returns the loss; reduction is a REDUCTIONS code. The need_* flags are the eager autograd route's (set
# there from requires_grad): passed True to torch.ops under torch.compile, backward would have to read the
# upstream gradient, which a traced graph cannot.
linear_cross_entropy = define_op(
    "linear_cross_entropy", "(Tensor x, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
    "SymInt ignore_index, float label_smoothing, SymInt reduction, bool need_x=False, bool need_weight=False, "
    "bool need_bias=False) -> (Tensor, Tensor, Tensor, Tensor)",
    {"cpu": partial(_forward, _launch_cpu), "cuda": partial(_forward, _launch_cuda)}, _forward_fake,
    setup_context=_setup, backward=_grad, differentiable=("x", "weight", "bias"), kept_outputs=3,
    grad_flags={"need_x": "x", "need_weight": "weight", "need_bias": "bias"})


# ---- linear_head: the head with softcap, temperature, z-loss, and each row's lse and entropy -------------
# Its loss is float32 whatever x's dtype; lse and entropy are float32, of target's shape, not
# differentiable (as logged, not trained on). On the eager autograd route the forward computes, with an
# upstream gradient of 1, the gradients that the upstream gradient only scales: for mean and sum every
# one asked for, for "none" dx alone (row i of x reaches loss i alone, so its gradient is g_i times the
# row's own); backward scales them and recomputes the rest (dW, db for "none") with g folded into dz,
# as it does on the torch.ops route, where the forward computes no gradient.

def _head_forward(launch, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction, softcap,
                  temperature, lse_square_scale, want_lse, want_entropy, need_x, need_weight, need_bias):
    scalar = reduction != 2
    (loss, lse, ent), grads = _head(
        launch, x, weight, target, bias, class_weight, (ignore_index, label_smoothing, reduction),
        (softcap, temperature, lse_square_scale), None, (torch.float32, want_lse, want_entropy), need_x,
        need_weight and scalar, need_bias and scalar)
    shape = target.shape
    return (loss if scalar else loss.view(shape), None if lse is None else lse.view(shape),
            None if ent is None else ent.view(shape), grads)


def _head_forward_fake(x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction, softcap,
                       temperature, lse_square_scale, want_lse, want_entropy, need_x, need_weight, need_bias):
    scalar = reduction != 2
    f32 = partial(x.new_empty, dtype=torch.float32)
    return (f32(() if scalar else target.shape), f32(target.shape) if want_lse else None,
            f32(target.shape) if want_entropy else None,
            (x.new_empty(x.shape) if need_x else None,
             weight.new_empty(weight.shape) if need_weight and scalar else None,
             bias.new_empty(bias.shape) if need_bias and scalar else None))


def _scale_(grads, g, need):
    """Gradients computed with an upstream gradient of 1, those needed scaled in place by g (a scalar, or
    one per row of x for dx: a row of x reaches its own row's loss alone); None for the others."""
    rows = g if g.dim() == 0 else g.unsqueeze(-1)
    return tuple(t.mul_((rows if k == 0 else g).to(t.dtype)) if n and t is not None else None
                 for k, (t, n) in enumerate(zip(grads, need)))


def _head_backward(launch, grad, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
                   softcap, temperature, lse_square_scale, need_x, need_weight, need_bias):
    """The gradients as the eager route gets them, bit for bit: those the upstream gradient scales (all for
    mean and sum, dx for "none") computed with an upstream gradient of 1 and scaled; dW and db for
    "none" recomputed with each row's upstream gradient folded into dz."""
    call = partial(_head, launch, x, weight, target, bias, class_weight, (ignore_index, label_smoothing, reduction),
                   (softcap, temperature, lse_square_scale))
    scalar = reduction != 2
    ones = (need_x, need_weight and scalar, need_bias and scalar)
    folded = (False, need_weight and not scalar, need_bias and not scalar)
    dx, dw, db = _scale_(call(None, (None, False, False), *ones)[1], grad, ones) if any(ones) else (None,) * 3
    if any(folded):
        _, dw, db = call(_upstream_rows(grad, target.numel()), (None, False, False), *folded)[1]
    return dx, dw, db


def _head_backward_fake(grad, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
                        softcap, temperature, lse_square_scale, need_x, need_weight, need_bias):
    return _backward_fake(grad, x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction,
                          need_x, need_weight, need_bias)


_linear_head_backward = define_op(
    "linear_head_backward", "(Tensor grad, Tensor x, Tensor weight, Tensor target, Tensor? bias, "
    "Tensor? class_weight, SymInt ignore_index, float label_smoothing, SymInt reduction, float softcap, "
    "float temperature, float lse_square_scale, bool need_x, bool need_weight, bool need_bias) "
    "-> (Tensor, Tensor, Tensor)",
    {"cpu": partial(_head_backward, _launch_cpu), "cuda": partial(_head_backward, _launch_cuda)},
    _head_backward_fake)


def _head_setup(ctx, inputs, output):
    x, weight, target, bias, class_weight, *opts = inputs[:11]
    ctx.opts = tuple(opts)
    _keep_for_backward(ctx, x, weight, bias, target, class_weight)
    ctx.grads = output[3]
    ctx.mark_non_differentiable(*(t for t in output[1:3] if t is not None))


def _head_grad(ctx, g, *_unread):
    x, weight, bias, target, class_weight = _kept(ctx)
    nx, nw, _, nb = ctx.needs_input_grad[:4]
    nb = nb and bias is not None
    grads, ctx.grads = ctx.grads, None
    if g is None:
        return (None,) * 16
    # The forward's gradients (nothing else holds them; on the torch.ops route one not computed is an
    # empty tensor), scaled as the backward op scales its own.
    grads = tuple(t if t is not None and ref is not None and t.shape == ref.shape else None
                  for t, ref in zip(grads or (None,) * 3, (x, weight, bias)))
    dx, dw, db = _scale_(grads, g, (nx, nw, nb))
    missing = (nx and dx is None, nw and dw is None, nb and db is None)
    if any(missing):
        rx, rw, rb = _linear_head_backward(g, x, weight, target, bias, class_weight, *ctx.opts, *missing)
        dx, dw, db = rx if missing[0] else dx, rw if missing[1] else dw, rb if missing[2] else db
    return dx, dw, None, db, *(None,) * 12


# linear_head(x, weight, target, bias, class_weight, ignore_index, label_smoothing, reduction, softcap,
# temperature, lse_square_scale, want_lse, want_entropy) returns (loss, lse, entropy), loss float32, lse and
# entropy None unless wanted; reduction is a REDUCTIONS code.
linear_head = define_op(
    "linear_head", "(Tensor x, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
    "SymInt ignore_index, float label_smoothing, SymInt reduction, float softcap, float temperature, "
    "float lse_square_scale, bool want_lse, bool want_entropy, bool need_x=False, bool need_weight=False, "
    "bool need_bias=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    {"cpu": partial(_head_forward, _launch_cpu), "cuda": partial(_head_forward, _launch_cuda)}, _head_forward_fake,
    setup_context=_head_setup, backward=_head_grad, differentiable=("x", "weight", "bias"), kept_outputs=3,
    grad_flags={"need_x": "x", "need_weight": "weight", "need_bias": "bias"})


# ---- distill_rows: knowledge distillation's per-row math on a chunk of logits ---------------------------
# distill_rows(s, t, target, ignore_index, temperature, alpha, divergence, beta) -> each row's loss (float32),
# s (float32 student logits, rows contiguous) overwritten with each row's gradient; t: the teacher's float32
# logits; divergence: a DIVERGENCES code. The math is tl.h's tl_distill_rows_cpu (csrc/cpu/head_distill.c);
# on CUDA the same formulas in torch's ops, chunk-sized tensors at a time.

DIVERGENCES = {"kl": 0, "reverse_kl": 1, "jsd": 2}


def _distill_rows_cpu(s, t, target, ignore_index, temperature, alpha, divergence, beta):
    loss = torch.empty(s.shape[0], dtype=torch.float32)
    _C.distill_rows(s, t, target, ignore_index, temperature, alpha, divergence, beta, loss, torch.get_num_threads())
    return loss


def _log_softmax_(z: Tensor) -> Tensor:
    """z - logsumexp(z) in place, per row."""
    return z.sub_(torch.logsumexp(z, -1, keepdim=True))


def _divergence(ls: Tensor, lt: Tensor, kind: int, beta: float):
    """Per row, D(p_t || p_s) and dD/du (u = s / T, over the student's Vs classes), from the float32
    log-probs ls (n, Vs) and lt (n, Vt) at temperature T (both overwritten). Classes beyond a model's own
    vocabulary have probability 0 on its side (log-prob -inf), written out below rather than padded:
      kl          D = sum_c p_t (lt - ls)                  dD/du = p_s - p_t
      reverse_kl  D = sum_c p_s (ls - lt)                  dD/du = p_s (ls - lt - D)
      jsd         m = b p_t + (1-b) p_s,  D = b KL(p_t||m) + (1-b) KL(p_s||m),
                  dD/du = (1-b) p_s (ls - lm - KL(p_s||m))   (d/dp_s of the b KL(p_t||m) part cancels
                  against the p_s/m part of the other: dD/dp_s = (1-b)(ls - lm))"""
    Vs, Vt = ls.shape[1], lt.shape[1]
    V0 = min(Vs, Vt)
    ps = ls.exp()
    if kind == 0:
        pt = lt.exp()
        d = torch.where(pt > 0, pt * lt.sub_(ls[:, :Vt]), 0.0).sum(-1)  # 0 log 0 = 0 where t's logit is -inf
        ps[:, :Vt].sub_(pt)
        return d, ps
    if kind == 1:
        r = ls - lt[:, :Vs]
        d = torch.mul(ps, r).sum(-1)
        return d, r.sub_(d[:, None]).mul_(ps)
    lb, l1b = math.log(beta), math.log1p(-beta)
    lm = ls + l1b  # log m on the student's classes; beyond the teacher's vocabulary m = (1-b) p_s
    torch.logaddexp(lm[:, :V0], lt[:, :V0] + lb, out=lm[:, :V0])
    r = ls - lm
    kls = torch.mul(ps, r).sum(-1)
    pt = lt[:, :V0].exp()
    klt = torch.where(pt > 0, pt * lt[:, :V0].sub_(lm[:, :V0]), 0.0).sum(-1)
    if Vt > Vs:  # beyond the student's vocabulary m = b p_t: each term p_t log(1/b)
        klt.sub_(lt[:, Vs:].exp().sum(-1) * lb)
    d = beta * klt + (1 - beta) * kls
    return d, r.sub_(kls[:, None]).mul_(ps).mul_(1 - beta)


def _check_distill_rows(s, t, target, temperature, alpha, divergence, beta):
    """tl_check_distill_rows's requirements (csrc/check.c), for the kernel written in torch's ops."""
    if not (0.0 < temperature < math.inf):
        raise ValueError("argument 'temperature' must be a finite number > 0")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"argument '{name}' must be in [0, 1]")
    if divergence not in (0, 1, 2):
        raise ValueError("argument 'divergence' must be 0 (kl), 1 (reverse_kl) or 2 (jsd)")
    for name, z in (("s", s), ("t", t)):
        if z.dtype != torch.float32:
            raise TypeError(f"argument '{name}' has dtype {z.dtype}; expected float32")
        if z.dim() != 2 or z.shape[0] != s.shape[0] or z.shape[1] < 1:
            raise ValueError(f"argument '{name}' must be (s.shape[0], classes >= 1), got shape {tuple(z.shape)}")
    kind = divergence if divergence != 2 or 0.0 < beta < 1.0 else 0 if beta == 0.0 else 1
    if kind == 0 and t.shape[1] > s.shape[1]:
        raise ValueError("argument 't' has more classes than s: KL(p_t || p_s) is infinite where s has no class")
    if kind == 1 and s.shape[1] > t.shape[1]:
        raise ValueError("argument 's' has more classes than t: KL(p_s || p_t) is infinite where t has no class")
    if target is not None and target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"argument 'target' has dtype {target.dtype}; expected int64 or int32 class indices")
    if target is not None and target.shape != s.shape[:1]:
        raise ValueError(f"argument 'target' must have shape ({s.shape[0]},) (s.shape[0]), got {tuple(target.shape)}")
    return kind


def _distill_rows_torch(s, t, target, ignore_index, temperature, alpha, divergence, beta):
    """distill_rows in torch's ops, on any device: the float32 formulas over whole (n, V) tensors."""
    kind = _check_distill_rows(s, t, target, temperature, alpha, divergence, beta)
    n, T = s.shape[0], temperature
    loss = torch.zeros(n, dtype=torch.float32, device=s.device)
    if n == 0:
        return loss
    hard = target is not None and alpha != 0.0
    soft = T if target is None else (1.0 - alpha) * T  # T^2 (1 - alpha) dD/du / T
    rows = torch.arange(n, device=s.device)
    keep = None if target is None else target != ignore_index
    if keep is not None:
        y = torch.where(keep, target, 0).long()
        if bool(((y < 0) | (y >= s.shape[1])).any()):
            bad = target[keep & ((target < 0) | (target >= s.shape[1]))][0].item()
            raise ValueError(f"target holds class index {bad}, outside [0, {s.shape[1]}) (s's classes) and not "
                             f"ignore_index ({ignore_index})")
    g_hard = None
    if hard:  # alpha (softmax(s) - onehot(y)), the softmax at temperature 1
        lh = torch.log_softmax(s, -1)
        loss += alpha * -lh[rows, y]
        g_hard = lh.exp_()
        g_hard[rows, y] -= 1.0
        g_hard.mul_(alpha)
    ls, lt = _log_softmax_(s.div(T)), _log_softmax_(t.div(T))
    d, g = _divergence(ls, lt, kind, beta)
    loss += (soft * T) * d
    g.mul_(soft)
    if g_hard is not None:
        g.add_(g_hard)
    if keep is not None:
        g.masked_fill_(~keep[:, None], 0.0)
        loss.masked_fill_(~keep, 0.0)
    s.copy_(g)
    return loss


distill_rows = define_op(
    "distill_rows", "(Tensor(a!) s, Tensor t, Tensor? target, SymInt ignore_index, float temperature, float alpha, "
    "SymInt divergence, float beta) -> Tensor",
    {"cpu": _distill_rows_cpu, "cuda": _distill_rows_torch},
    lambda s, t, target, ignore_index, temperature, alpha, divergence, beta: s.new_empty(s.shape[0]))
