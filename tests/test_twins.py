"""Every tltorch op on every device present, against a float64 reference (as ggml's test-backend-ops runs
every op on every backend): test_<op> for each op registered as tltorch::<op>.

Each case draws its inputs from one generator seeded by (op, case), in float32, rounded to the dtype under
test; the same values, in the same layout, go to each device. The reference is plain torch in float64 on
the rounded inputs; for an op with an autograd formula, torch.autograd.grad of the reference gives the
reference gradients, against which the op's gradients (the eager route's autograd.Function) are checked.
Tolerances are conftest's: TOL against float64 for the output's dtype, and on CUDA, TWIN against the CPU
twin's result on the same inputs.

The cases cover odd sizes, 2-D and 3-D inputs where the op takes them, a transposed or strided view and an
empty batch. test_every_op_has_a_twin fails when an op is registered without an entry in TWINS.
"""
import importlib
import pkgutil
import zlib
from typing import Callable, Dict, NamedTuple, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch._library.custom_ops import OPDEFS

from conftest import (DTYPES, HAVE_GPU, TOL, assert_twin, dropout_keep_mask, dtype_id, make2d, make_x, randn,
                      rel_err, to_cuda)
from test_distill_rows import reference as distill_reference
from test_int8_linear import ref_int8_linear
from tltorch import _C, ops
from tltorch.ops import frozen as frozen_ops

# The family modules: every module of tltorch.ops but its helpers (tltorch.ops.linear is also the op's
# name, hence import_module).
FAMILIES = [importlib.import_module(f"tltorch.ops.{m.name}") for m in pkgutil.iter_modules(ops.__path__)
            if not m.name.startswith("_")]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not HAVE_GPU, reason="needs a CUDA GPU and tltorch._cuda")])]
KC = _C.GEMM_KC


def _defined_ops() -> Dict[str, Callable]:
    """{name: the function define_op returned} from the family modules (their code is generated, under
    the file name "<tltorch.ops: name>")."""
    found = {}
    for module in FAMILIES:
        for value in vars(module).values():
            code = getattr(value, "__code__", None)
            if code is not None and code.co_filename == f"<tltorch.ops: {value.__name__}>":
                found[value.__name__] = value
    return found


OPS = _defined_ops()


def _registry():
    """The names of the ops registered as tltorch::<name>."""
    return {name.split("::", 1)[1] for name in OPDEFS if name.startswith("tltorch::")}


class Twin(NamedTuple):
    """An op's cases and reference. make(gen, dtype, **case) gives the op's arguments (CPU tensors);
    run(op, args) calls the op and gives its outputs (for an in-place op, the tensors it writes); ref(args)
    gives the float64 outputs, from args whose floating tensors are float64 (those at `grads` with
    requires_grad). grads: the positions of the differentiable arguments, for an op with a gradient; the
    upstream gradient is random, or ones for a case with upstream_one=True."""
    cases: Dict[str, dict]
    make: Callable
    ref: Callable
    run: Callable = lambda op, args: op(*args)
    grads: Sequence[int] = ()
    # {device: why}: devices whose kernel computes other arithmetic than ref's, skipped there with the reason
    skip_on: Dict[str, str] = {}


def flat_rows(t):
    return t.reshape(-1, t.shape[-1])


# ---- linear.py: gemm, colsum, linear, linear_backward ---------------------------------------------------

def _gemm_make(gen, dtype, M, K, N, trans, bias, alpha, beta, layouts=("contig", "contig", "contig")):
    a = make2d(*((K, M) if trans & 1 else (M, K)), layouts[0], dtype, gen)
    b = make2d(*((N, K) if trans & 2 else (K, N)), layouts[1], dtype, gen)
    c = make2d(M, N, layouts[2], dtype, gen)
    if beta == 0:
        c.fill_(float("nan"))  # must be written, never read
    return [a, b, c, randn((N,), dtype, gen) if bias else None, alpha, beta, trans]


def _gemm_run(op, args):
    op(*args)
    return args[2]


def _gemm_ref(args):
    a, b, c, bias, alpha, beta, trans = args
    r = alpha * ((a.t() if trans & 1 else a) @ (b.t() if trans & 2 else b))
    if beta != 0:
        r = r + beta * c
    return r if bias is None else r + bias


def _colsum_make(gen, dtype, M, N, layout, beta, out_dtype=None):
    out = randn((N,), out_dtype or dtype, gen)
    if beta == 0:
        out.fill_(float("nan"))
    return [make2d(M, N, layout, dtype, gen), out, beta]


def _colsum_run(op, args):
    op(*args)
    return args[1]


def _colsum_ref(args):
    x, out, beta = args
    return x.sum(0) + (beta * out if beta != 0 else 0)


def _linear_make(gen, dtype, lead, K, N, layout="contig", bias=True, w_layout="contig"):
    return [make_x(lead, K, layout, dtype, gen), make2d(N, K, w_layout, dtype, gen),
            randn((N,), dtype, gen) if bias else None]


def _linear_ref(args):
    return F.linear(*args)


def _grads_of(forward, inputs, need, upstream):
    """A backward op's reference: torch.autograd.grad of forward(inputs) (float64) with the upstream
    gradient, for the inputs whose need flag is set (None for the others)."""
    inputs = [t.detach().requires_grad_(n) for t, n in zip(inputs, need)]
    wanted = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(forward(inputs), wanted, upstream) if wanted else ())
    return tuple(next(got) if t.requires_grad else None for t in inputs)


def _linear_backward_make(gen, dtype, lead, K, N, need=(True, True, True), layout="contig"):
    x, w, b = _linear_make(gen, dtype, lead, K, N, layout)
    return [randn((*lead, N), dtype, gen), x, w, *need]


def _linear_backward_ref(args):
    grad, x, w, nx, nw, nb = args
    return _grads_of(_linear_ref, [x, w, torch.zeros(w.shape[0], dtype=torch.float64)], [nx, nw, nb], grad)


# ---- lora.py: dropout, lora_linear, lora_linear_backward ------------------------------------------------

SEED = 0x5EED_1234_ABCD


def _dropout_make(gen, dtype, M, N, p, layout="contig"):
    return [make2d(M, N, layout, dtype, gen), p, SEED]


def _dropout_ref(args):
    x, p, seed = args
    return x * dropout_keep_mask(seed, *x.shape, p) / (1 - p) if p > 0 else x


def _lora_make(gen, dtype, lead, K, N, r, p, layout="contig", bias=True, w_layout="contig"):
    x, w, b = _linear_make(gen, dtype, lead, K, N, layout, bias, w_layout)
    a = randn((r, K), dtype, gen, scale=K ** -0.5)
    bb = randn((N, r), dtype, gen)
    return [x, w, b, a, bb, 1.5, p, torch.tensor(SEED) if p > 0 else None]


def _lora_ref(args):
    x, w, bias, a, b, scale, p, seed = args
    x2 = flat_rows(x)
    if p > 0:
        x2 = x2 * dropout_keep_mask(int(seed), *x2.shape, p) / (1 - p)
    y = F.linear(x, w, bias) + (scale * (x2 @ a.t()) @ b.t()).reshape(*x.shape[:-1], w.shape[0])
    return y


def _update_make(gen, dtype, lead, K, N, r, p, layout="contig"):
    """lora_update over a base output y; the adapter in float32 (as over a compact base), x and y in dtype."""
    x = make_x(lead, K, layout, dtype, gen)
    a = randn((r, K), torch.float32, gen, scale=K ** -0.5)
    b = randn((N, r), torch.float32, gen)
    return [randn((*lead, N), dtype, gen), x, a, b, 1.5, p, torch.tensor(SEED) if p > 0 else None]


def _update_ref(args):
    y, x, a, b, scale, p, seed = args
    x2 = flat_rows(x)
    if p > 0:
        x2 = x2 * dropout_keep_mask(int(seed), *x2.shape, p) / (1 - p)
    return y + (scale * (x2 @ a.t()) @ b.t()).reshape(y.shape)


def _lora_backward_make(gen, dtype, lead, K, N, r, p, need=(True, True, True)):
    x, w, _, a, b, scale, p, seed = _lora_make(gen, dtype, lead, K, N, r, p, bias=False)
    x2 = flat_rows(x.double())
    if p > 0:
        x2 = x2 * dropout_keep_mask(SEED, *x2.shape, p) / (1 - p)
    su = (scale * x2 @ a.double().t()).to(dtype)  # as the forward kept it: in x's dtype
    return [randn((*lead, N), dtype, gen), x, w, a, b, su, scale, p, seed, *need]


def _lora_backward_ref(args):
    grad, x, w, a, b, su, scale, p, seed, nx, na, nb = args

    def forward(t):
        return _lora_ref([t[0], w, None, t[1], t[2], scale, p, seed])
    return _grads_of(forward, [x, a, b], [nx, na, nb], grad)


# ---- frozen.py: qgemm, frozen_linear, frozen_linear_backward -------------------------------------------

def _stored_weight(gen, rows, cols, storage):
    """A stored weight and its scale: int8 with one float32 scale per row, or a bfloat16/float16 W."""
    if storage == "int8":
        w = torch.randint(-127, 128, (rows, cols), generator=gen, dtype=torch.int8)
        return w, torch.rand(rows, generator=gen) / 64 + 1e-3
    return randn((rows, cols), getattr(torch, storage), gen), None


def _dense(w, scale):
    w = w.double()
    return w if scale is None else w * scale.double()[:, None]


def _qgemm_make(gen, dtype, M, K, N, storage, forward, layout="contig", bias=False):
    w, scale = _stored_weight(gen, N, K, storage)
    a = make2d(M, K if forward else N, layout, dtype, gen)
    return [a, w, scale, randn((N,), torch.float32, gen) if bias else None, forward]


def _qgemm_ref(args):
    a, w, scale, bias, forward = args
    wd = _dense(w, scale)
    y = a @ wd.t() if forward else a @ wd
    return y if bias is None else y + bias


def _frozen_make(gen, dtype, lead, K, N, storage, layout="contig", bias=True):
    w, scale = _stored_weight(gen, N, K, storage)
    return [make_x(lead, K, layout, dtype, gen), w, scale, randn((N,), torch.float32, gen) if bias else None]


def _frozen_ref(args):
    x, w, scale, bias = args
    return F.linear(x, _dense(w, scale), bias)


def _frozen_backward_make(gen, dtype, lead, K, N, storage):
    w, scale = _stored_weight(gen, N, K, storage)
    return [randn((*lead, N), dtype, gen), w, scale]


def _frozen_backward_ref(args):
    grad, w, scale = args
    return grad @ _dense(w, scale)


def _int8_make(gen, dtype, lead, K, N, group=64, layout="contig", bias=True):
    w, scale = _stored_weight(gen, N, K, "int8")
    return [make_x(lead, K, layout, dtype, gen), w, scale, frozen_ops.int8_pack(w, scale, group), group,
            randn((N,), torch.float32, gen) if bias else None]


def _int8_ref(args):
    """The kernel's quantised arithmetic (x per row and group to uint8 with a zero point: test_int8_linear's
    reference) as the value; the gradient straight through, dy (W*s), as the op's backward."""
    x, w, scale, packed, group, bias = args
    q = ref_int8_linear(flat_rows(x.detach()), w, scale, group, bias).view(*x.shape[:-1], w.shape[0])
    dense = F.linear(x, _dense(w, scale), bias)
    return dense + (q - dense).detach()


def _dequant_make(gen, dtype, N, K, group, layout="contig"):
    w = torch.randint(-127, 128, (N, K) if layout == "contig" else (K + 1, 2 * N), generator=gen, dtype=torch.int8)
    if layout != "contig":  # a strided, transposed view
        w = w[1:, ::2].t()
    shape = (N,) if group is None else (N, -(-K // group))
    return [w, torch.rand(shape, generator=gen) / 64 + 1e-3, group or 1, dtype]


def _dequant_ref(args):
    w, scale, group, dtype = args
    s = scale[:, None] if scale.dim() == 1 else scale.repeat_interleave(group, dim=1)[:, :w.shape[1]]
    return w.double() * s


# ---- head.py: linear_cross_entropy, linear_cross_entropy_backward -------------------------------------

RED = {0: "mean", 1: "sum", 2: "none"}


def _lce_make(gen, dtype, lead, K, C, reduction, layout="contig", bias=True, class_weight=False, smoothing=0.0):
    x, w, b = _linear_make(gen, dtype, lead, K, C, layout, bias)
    n = x.shape[:-1].numel()
    target = torch.randint(0, C, (n,), generator=gen)
    target[1::4] = -100  # ignored rows
    cw = torch.rand(C, generator=gen) + 0.25 if class_weight else None
    return [x, w, target.reshape(lead), b, cw, -100, smoothing, reduction]


def _lce_ref(args):
    x, w, target, bias, cw, ignore_index, smoothing, reduction = args[:8]
    return F.cross_entropy(flat_rows(F.linear(x, w, bias)), target.reshape(-1),
                           weight=None if cw is None else cw.double(), ignore_index=ignore_index,
                           label_smoothing=smoothing, reduction=RED[reduction]).reshape(
        () if reduction != 2 else target.shape)


def _lce_backward_make(gen, dtype, lead, K, C, reduction, need=(True, True, True), **kw):
    args = _lce_make(gen, dtype, lead, K, C, reduction, **kw)
    grad = randn(lead, dtype, gen) if reduction == 2 else randn((1,), dtype, gen).reshape(())
    return [grad, *args, *need]


def _lce_backward_ref(args):
    grad, x, w, target, bias, cw, ii, ls, red, nx, nw, nb = args

    def forward(t):
        return _lce_ref([t[0], t[1], target, t[2], cw, ii, ls, red])
    if bias is None:
        bias, nb = torch.zeros(w.shape[0], dtype=torch.float64), False
    return _grads_of(forward, [x, w, bias], [nx, nw, nb], grad)


def _head_make(gen, dtype, lead, K, C, reduction, softcap=0.0, temperature=1.0, zs=0.0, lse=False, entropy=False,
               **kw):
    args = _lce_make(gen, dtype, lead, K, C, reduction, **kw)
    return [*args, softcap, temperature, zs, lse, entropy]


def _head_ref(args):
    """linear_head: the cross-entropy of z = (softcap tanh(z / softcap) or z) / temperature plus zs lse^2
    per counted row (the mean over torch's divisor), and each row's lse and entropy (0 where ignored)."""
    x, w, target, bias, cw, ii, ls, red, softcap, temperature, zs, want_lse, want_ent = args
    z = F.linear(x, w, bias)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    z = flat_rows(z / temperature)
    t = target.reshape(-1)
    keep = t != ii
    cwd = None if cw is None else cw.double()
    rows = F.cross_entropy(z, t, weight=cwd, ignore_index=ii, label_smoothing=ls, reduction="none")
    lse = torch.where(keep, z.logsumexp(-1), 0.0)
    rows = rows + zs * lse ** 2
    div = keep.sum() if cw is None else (cwd[t.clamp(min=0)] * keep).sum()
    loss = rows.reshape(target.shape) if red == 2 else rows.sum() / div if red == 0 else rows.sum()
    ent = torch.where(keep, -(z.log_softmax(-1).exp() * z.log_softmax(-1)).sum(-1), 0.0)
    return (loss, lse.reshape(target.shape).detach() if want_lse else None,
            ent.reshape(target.shape).detach() if want_ent else None)


def _head_backward_make(gen, dtype, lead, K, C, reduction, need=(True, True, True), **kw):
    *args, _, _ = _head_make(gen, dtype, lead, K, C, reduction, **kw)
    grad = randn(lead, dtype, gen) if reduction == 2 else randn((1,), dtype, gen).reshape(())
    return [grad, *args, *need]


def _head_backward_ref(args):
    grad, x, w, target, bias, cw, ii, ls, red, softcap, temperature, zs, nx, nw, nb = args

    def forward(t):
        return _head_ref([t[0], t[1], target, t[2], cw, ii, ls, red, softcap, temperature, zs, False, False])[0]
    if bias is None:
        bias, nb = torch.zeros(w.shape[0], dtype=torch.float64), False
    return _grads_of(forward, [x, w, bias], [nx, nw, nb], grad)


def _distill_make(gen, dtype, n, Vs, Vt, divergence, beta=0.5, temperature=2.0, alpha=0.5, targets=True,
                  layout="contig"):
    """distill_rows takes float32 logits: values of `dtype`, held in float32; "offset": rows further apart
    than they are long."""
    def logits(V):
        z = randn((n, V + 3) if layout == "offset" else (n, V), dtype, gen, scale=3.0).float()
        return z[:, 3:] if layout == "offset" else z
    s, t = logits(Vs), logits(Vt)
    y = None
    if targets:
        y = torch.randint(0, Vs, (n,), generator=gen)
        y[1::3] = -100
    return [s, t, y, -100, temperature, alpha, ops.DIVERGENCES[divergence], beta]


def _distill_run(op, args):
    return op(*args), args[0]


def _distill_ref(args):
    """Each row's loss and its gradient wrt s (what s is overwritten with): test_distill_rows's reference."""
    return distill_reference(*args)


# ---- pool.py, adamw.py ---------------------------------------------------------------------------------

def _pool_make(gen, dtype, B, T, D, mode, mask, layout="contig"):
    h = randn((B, D, T), dtype, gen).transpose(1, 2) if layout == "transposed" else randn((B, T, D), dtype, gen)
    keep = torch.rand(B, T, generator=gen) < 0.6
    if B > 1:
        keep[1] = False  # a row with no counted token
    m = None if mask is None else keep.to(mask) if mask is torch.bool else keep * torch.randint(
        1, 4, (B, T), generator=gen, dtype=mask)
    return [h, m, ops.POOL_MODES[mode]]


def _pool_ref(args):
    h, mask, mode = args
    if mode == 0:
        return h[:, 0]
    keep = torch.ones(h.shape[:2], dtype=torch.bool) if mask is None else mask != 0
    counted = keep.any(1, keepdim=True)
    if mode == 1:
        mean = torch.where(keep[..., None], h, 0.0).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        return torch.where(counted, mean, 0.0)
    if h.shape[1] == 0:
        return h.new_zeros(h.shape[0], h.shape[2])
    return torch.where(counted, h.masked_fill(~keep[..., None], float("-inf")).amax(1), 0.0)


def _adamw_make(gen, dtype, shape, step, wd, grad_f32=False, grad_layout="contig", l2sp=0.0):
    p = randn(shape, dtype, gen)
    g = randn(shape, torch.float32 if grad_f32 else dtype, gen)
    if grad_layout == "transposed":
        g = g.t().contiguous().t()
    m = randn(shape, torch.float32, gen, scale=0.1) * (step > 1)
    v = torch.rand(shape, generator=gen) * 0.01 * (step > 1)
    anchor = (p.float() + randn(shape, torch.float32, gen, scale=0.5)).to(dtype) if l2sp else None
    return [p, g, m, v, 0.05, 0.9, 0.999, 1e-8, wd, step, anchor, l2sp]


def _adamw_run(op, args):
    op(*args)
    return args[0], args[2], args[3]


def _adamw_ref(args):
    """torch.optim.AdamW's formula (decoupled weight decay; bias corrections for `step`) on the gradient
    plus that of l2sp ||p - anchor||^2."""
    p, g, m, v, lr, b1, b2, eps, wd, step, anchor, l2sp = args
    g = g.double() + (0.0 if anchor is None else 2 * l2sp * (p - anchor))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p * (1 - lr * wd) - lr / (1 - b1 ** step) * m / (v.sqrt() / (1 - b2 ** step) ** 0.5 + eps)
    return p, m, v


# ---- the table: every op, its cases and reference -------------------------------------------------------

TWINS: Dict[str, Twin] = {
    "gemm": Twin({
        "odd": dict(M=7, K=13, N=5, trans=0, bias=True, alpha=1.0, beta=0.0),
        "trans_ab_beta": dict(M=6, K=11, N=9, trans=3, bias=False, alpha=0.5, beta=0.75),
        "views": dict(M=9, K=5, N=7, trans=0, bias=True, alpha=1.0, beta=0.0, layouts=("t", "stride2", "offset")),
        "deep": dict(M=5, K=KC + 37, N=6, trans=1, bias=True, alpha=1.0, beta=0.0),
        "empty": dict(M=0, K=7, N=5, trans=0, bias=True, alpha=1.0, beta=0.0),
        "k0": dict(M=4, K=0, N=5, trans=0, bias=True, alpha=1.0, beta=0.5),
    }, _gemm_make, _gemm_ref, _gemm_run),
    "colsum": Twin({
        "odd": dict(M=7, N=13, layout="contig", beta=0.0),
        "transposed_beta": dict(M=37, N=5, layout="t", beta=0.5),
        "float32_out": dict(M=9, N=6, layout="stride2", beta=-1.0, out_dtype=torch.float32),
        "empty": dict(M=0, N=5, layout="contig", beta=0.0),
    }, _colsum_make, _colsum_ref, _colsum_run),
    "linear": Twin({
        "2d": dict(lead=(7,), K=13, N=5),
        "3d": dict(lead=(2, 3), K=11, N=6),
        "transposed": dict(lead=(2, 5), K=9, N=4, layout="transposed", bias=False),
        "strided_w": dict(lead=(5,), K=7, N=3, layout="strided", w_layout="t"),
        "empty": dict(lead=(0,), K=7, N=5),
    }, _linear_make, _linear_ref, grads=(0, 1, 2)),
    "linear_backward": Twin({
        "2d": dict(lead=(7,), K=13, N=5),
        "3d": dict(lead=(2, 3), K=11, N=6, layout="transposed"),
        "weight_only": dict(lead=(5,), K=7, N=3, need=(False, True, False)),
        "empty": dict(lead=(0,), K=7, N=5),
    }, _linear_backward_make, _linear_backward_ref),
    "dropout": Twin({
        "odd": dict(M=7, N=13, p=0.3),
        "transposed": dict(M=9, N=5, p=0.5, layout="t"),
        "p0": dict(M=3, N=4, p=0.0),
        "empty": dict(M=0, N=5, p=0.3),
    }, _dropout_make, _dropout_ref),
    "lora_update": Twin({
        "2d": dict(lead=(7,), K=13, N=5, r=3, p=0.0),
        "3d_dropout_transposed": dict(lead=(2, 5), K=9, N=6, r=2, p=0.3, layout="transposed"),
        "empty": dict(lead=(0,), K=7, N=5, r=2, p=0.0),
    }, _update_make, _update_ref, grads=(0, 1, 2, 3)),
    "lora_linear": Twin({
        "2d": dict(lead=(7,), K=13, N=5, r=3, p=0.0),
        "3d_dropout": dict(lead=(2, 3), K=11, N=6, r=2, p=0.25),
        "transposed": dict(lead=(2, 5), K=9, N=4, r=1, p=0.0, layout="transposed", bias=False, w_layout="t"),
        "empty": dict(lead=(0,), K=7, N=5, r=2, p=0.1),
    }, _lora_make, _lora_ref, grads=(0, 1, 2, 3, 4)),
    "lora_linear_backward": Twin({
        "2d": dict(lead=(7,), K=13, N=5, r=3, p=0.0),
        "3d_dropout": dict(lead=(2, 3), K=11, N=6, r=2, p=0.25),
        "b_only": dict(lead=(5,), K=6, N=4, r=2, p=0.0, need=(False, False, True)),
        "empty": dict(lead=(0,), K=7, N=5, r=2, p=0.0),
    }, _lora_backward_make, _lora_backward_ref),
    "qgemm": Twin({
        "int8": dict(M=7, K=13, N=5, storage="int8", forward=True, bias=True),
        "int8_backward": dict(M=6, K=11, N=9, storage="int8", forward=False),
        "half_transposed": dict(M=9, K=7, N=5, storage="bfloat16", forward=True, layout="t"),
        "float16_deep": dict(M=3, K=KC + 5, N=4, storage="float16", forward=True),
        "empty": dict(M=0, K=7, N=5, storage="int8", forward=True, bias=True),
    }, _qgemm_make, _qgemm_ref),
    "frozen_linear": Twin({
        "int8_2d": dict(lead=(7,), K=13, N=5, storage="int8"),
        "bfloat16_3d": dict(lead=(2, 3), K=11, N=6, storage="bfloat16", bias=False),
        "transposed": dict(lead=(2, 5), K=9, N=4, storage="float16", layout="transposed"),
        "empty": dict(lead=(0,), K=7, N=5, storage="int8"),
    }, _frozen_make, _frozen_ref, grads=(0,)),
    "frozen_linear_backward": Twin({
        "int8_2d": dict(lead=(7,), K=13, N=5, storage="int8"),
        "float16_3d": dict(lead=(2, 3), K=11, N=6, storage="float16"),
        "empty": dict(lead=(0,), K=7, N=5, storage="bfloat16"),
    }, _frozen_backward_make, _frozen_backward_ref),
    "int8_linear": Twin({
        "2d_two_groups": dict(lead=(7,), K=77, N=5),
        "3d_group32_transposed": dict(lead=(2, 5), K=40, N=6, group=32, layout="transposed", bias=False),
        "odd_k": dict(lead=(3,), K=13, N=33),
        "empty": dict(lead=(0,), K=7, N=5),
    }, _int8_make, _int8_ref, grads=(0,),
        skip_on={"cuda": "CUDA has no int8 kernel: x stays in float there (frozen_linear's path)"}),
    "int8_dequant": Twin({
        "per_channel": dict(N=7, K=13, group=None),
        "groups_ragged": dict(N=5, K=77, group=32),
        "transposed": dict(N=6, K=40, group=8, layout="transposed"),
        "empty": dict(N=0, K=7, group=4),
    }, _dequant_make, _dequant_ref),
    "linear_cross_entropy": Twin({
        "mean_2d": dict(lead=(7,), K=13, C=5, reduction=0),
        "mean_upstream_one": dict(lead=(6,), K=5, C=4, reduction=0, upstream_one=True),
        "sum_3d_weighted": dict(lead=(2, 3), K=11, C=6, reduction=1, class_weight=True, smoothing=0.1),
        "none_transposed": dict(lead=(2, 5), K=9, C=4, reduction=2, layout="transposed", bias=False),
        "many_classes": dict(lead=(9,), K=7, C=37, reduction=0, smoothing=0.2),
        "empty": dict(lead=(0,), K=7, C=5, reduction=1),
    }, _lce_make, _lce_ref, grads=(0, 1, 3)),
    "linear_cross_entropy_backward": Twin({
        "mean_2d": dict(lead=(7,), K=13, C=5, reduction=0),
        "none_3d_weighted": dict(lead=(2, 3), K=11, C=6, reduction=2, class_weight=True, smoothing=0.1),
        "weight_only_many_classes": dict(lead=(9,), K=7, C=37, reduction=1, need=(False, True, False)),
        "empty": dict(lead=(0,), K=7, C=5, reduction=2),
    }, _lce_backward_make, _lce_backward_ref),
    "linear_head": Twin({
        "none_softcap_temperature_entropy": dict(lead=(2, 5), K=9, C=37, reduction=2, softcap=3.0, temperature=0.7,
                                                 entropy=True),
        "mean_zloss_lse_few_classes": dict(lead=(7,), K=13, C=5, reduction=0, zs=0.01, lse=True),
        "sum_all_options_transposed": dict(lead=(9,), K=7, C=37, reduction=1, softcap=2.0, temperature=1.5, zs=0.02,
                                           lse=True, entropy=True, class_weight=True, smoothing=0.1,
                                           layout="transposed"),
        "empty": dict(lead=(0,), K=7, C=5, reduction=2, entropy=True),
    }, _head_make, _head_ref, grads=(0, 1, 3)),
    "linear_head_backward": Twin({
        "none_softcap": dict(lead=(2, 3), K=11, C=37, reduction=2, softcap=2.5, temperature=0.8),
        "mean_zloss_weight_only": dict(lead=(9,), K=7, C=6, reduction=0, zs=0.05, need=(False, True, False)),
        "empty": dict(lead=(0,), K=7, C=5, reduction=2),
    }, _head_backward_make, _head_backward_ref),
    "distill_rows": Twin({
        "kl_T2": dict(n=7, Vs=37, Vt=37, divergence="kl"),
        "kl_T1_bigger_student": dict(n=5, Vs=45, Vt=33, divergence="kl", temperature=1.0, alpha=1.0),
        "reverse_kl_no_targets": dict(n=6, Vs=19, Vt=40, divergence="reverse_kl", targets=False, temperature=0.7),
        "jsd_offset_rows": dict(n=9, Vs=50, Vt=41, divergence="jsd", beta=0.3, alpha=0.0, layout="offset"),
        "empty": dict(n=0, Vs=9, Vt=9, divergence="jsd"),
    }, _distill_make, _distill_ref, _distill_run),
    "pool": Twin({
        "cls": dict(B=3, T=5, D=7, mode="cls", mask=None),
        "mean_int64_mask": dict(B=4, T=9, D=5, mode="mean", mask=torch.int64),
        "max_bool_mask_transposed": dict(B=3, T=7, D=6, mode="max", mask=torch.bool, layout="transposed"),
        "mean_no_mask": dict(B=2, T=11, D=3, mode="mean", mask=None),
        "empty": dict(B=0, T=5, D=4, mode="mean", mask=torch.int64),
    }, _pool_make, _pool_ref),
    "adamw_": Twin({
        "step1": dict(shape=(37,), step=1, wd=0.0),
        "step7_2d": dict(shape=(7, 13), step=7, wd=0.1),
        "grad_f32_transposed": dict(shape=(9, 5), step=3, wd=0.01, grad_f32=True, grad_layout="transposed"),
        "empty": dict(shape=(0,), step=2, wd=0.1),
        "l2sp_step5_2d": dict(shape=(11, 9), step=5, wd=0.05, l2sp=0.4),
        "l2sp_grad_f32_step1": dict(shape=(23,), step=1, wd=0.0, grad_f32=True, l2sp=1.5),
    }, _adamw_make, _adamw_ref, _adamw_run),
}

# ---- the test -------------------------------------------------------------------------------------------

def _place(t, device):
    """A copy of t on `device` in t's layout. A dropout seed (a 0-d int64 tensor) stays on the CPU, where
    lora_linear draws it."""
    if not isinstance(t, torch.Tensor) or (t.dim() == 0 and t.dtype is torch.int64):
        return t
    if device == "cuda":
        return to_cuda(t)
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (n,), (1,))
    return flat.clone().as_strided(t.shape, t.stride(), t.storage_offset())


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _run(name, args, device, upstream):
    """The op's outputs on `device` and, for a differentiable op, the gradients of its first output
    (upstream(out) gives the upstream gradient) with respect to its differentiable arguments."""
    twin = TWINS[name]
    args = [_place(a, device) for a in args]
    for i in twin.grads:
        if args[i] is not None:
            args[i].requires_grad_(True)
    outs = _as_tuple(twin.run(OPS[name], args))
    leaves = [args[i] for i in twin.grads if args[i] is not None]
    grads = torch.autograd.grad(outs[0], leaves, _place(upstream(outs[0]), device)) if leaves else ()
    return tuple(None if o is None else o.detach() for o in outs), grads


def _reference(name, args, upstream):
    twin = TWINS[name]
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    for i in twin.grads:
        if args64[i] is not None:
            args64[i].requires_grad_(True)
    refs = _as_tuple(twin.ref(args64))
    leaves = [args64[i] for i in twin.grads if args64[i] is not None]
    grads = torch.autograd.grad(refs[0], leaves, upstream(refs[0]).double()) if leaves else ()
    return tuple(None if r is None else r.detach() for r in refs), grads


def _check(name, case, dtype, device):
    if device in TWINS[name].skip_on:
        pytest.skip(TWINS[name].skip_on[device])
    seed = zlib.crc32(f"{name}/{case}".encode())
    params = dict(TWINS[name].cases[case])
    upstream_one = params.pop("upstream_one", False)
    args = TWINS[name].make(torch.Generator().manual_seed(seed), dtype, **params)

    def upstream(out):  # the same upstream gradient on every device, in the dtype under test
        if upstream_one:
            return torch.ones(out.shape, dtype=dtype)
        return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    outs, grads = _run(name, args, device, upstream)
    refs, ref_grads = _reference(name, args, upstream)
    twin_outs, twin_grads = _run(name, args, "cpu", upstream) if device != "cpu" else (None, None)
    what = f"{name}[{case}, {dtype_id(dtype)}, {device}]"
    assert len(outs) == len(refs) and len(grads) == len(ref_grads), what
    pairs = [(f"output {i}", o, r, None if twin_outs is None else twin_outs[i])
             for i, (o, r) in enumerate(zip(outs, refs))]
    wrt = [i for i in TWINS[name].grads if args[i] is not None]
    pairs += [(f"gradient of argument {i}", g, r, None if twin_grads is None else twin_grads[j])
              for j, (i, g, r) in enumerate(zip(wrt, grads, ref_grads))]
    for part, got, ref, cpu in pairs:
        if ref is None:
            assert got is None or got.numel() == 0, f"{what}: {part} computed though not asked for"
            continue
        assert got is not None and got.device.type == device and got.dtype in TOL, f"{what}: {part}"
        assert got.shape == ref.shape, f"{what}: {part} has shape {tuple(got.shape)}, not {tuple(ref.shape)}"
        if cpu is None:
            err = rel_err(got, ref)
            assert err <= TOL[got.dtype], f"{what}: {part} relative error {err:.3g} > {TOL[got.dtype]:.3g}"
        else:
            assert_twin(got, cpu, ref, got.dtype, what=f"{what}: {part}")


def _twin_test(name):
    def test(case, dtype, device, no_tf32):
        _check(name, case, dtype, device)
    test.__name__ = test.__qualname__ = f"test_{name}"
    test.__doc__ = f"tltorch::{name} on every device against its float64 reference (and on CUDA, its CPU twin)."
    return pytest.mark.parametrize("device", DEVICES)(pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)(
        pytest.mark.parametrize("case", list(TWINS[name].cases))(test)))


for _name in TWINS:
    globals()[f"test_{_name}"] = _twin_test(_name)


def test_every_op_has_a_twin():
    """Every op registered as tltorch::<name> has a reference here (so none escapes the twin test), and
    each is reached through the function define_op returned for it."""
    registry = _registry()
    assert registry == set(TWINS), (f"ops without a twin test: {sorted(registry - set(TWINS))}; "
                                    f"twins without an op: {sorted(set(TWINS) - registry)}")
    assert set(OPS) == registry, f"define_op functions not found: {sorted(registry - set(OPS))}"
