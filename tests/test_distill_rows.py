"""tltorch.ops.distill_rows (csrc/cpu/head_distill.c; on CUDA the same formulas in torch's ops): a chunk of a
student's logits s (n, Vs) and a teacher's t (n, Vt) -> each row's distillation loss, s overwritten with its
gradient, against the formulas in float64 with torch.autograd:

    loss_i = (1 - alpha) T^2 D(softmax(t / T) || softmax(s / T)) + alpha CE(s_i, y_i)   (T^2 D without targets)
    s_i <- dloss_i / ds_i;   a row whose target is ignore_index: 0 and 0

the smaller vocabulary padded with probability 0. Both kernels (the C one and the torch-ops one CUDA runs,
here on the CPU), every divergence, temperatures 1 and not, alpha 0 / 0.5 / 1, vocabularies of different
sizes both ways, vector tails, empty chunks, large logits and -inf teacher logits, thread counts, bad input.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from tltorch import ops
from tltorch.ops import head as head_ops

KERNELS = {"c": ops.distill_rows, "torch": head_ops._distill_rows_torch}
DIV = ops.DIVERGENCES


def _kl(lp, lq):
    """KL(p || q) per row from log-probs, 0 log 0 = 0."""
    real = torch.isfinite(lp)
    lp, lq = torch.where(real, lp, 0.0), torch.where(real, lq, 0.0)
    return torch.where(real, lp.exp() * (lp - lq), 0.0).sum(-1)


def reference(s, t, target, ignore_index, T, alpha, divergence, beta):
    """(each row's loss, dloss/ds) in float64."""
    s = s.detach().double().requires_grad_(True)
    V = max(s.shape[1], t.shape[1])
    ls, lt = (torch.log_softmax(F.pad(z.double(), (0, V - z.shape[1]), value=-math.inf) / T, -1) for z in (s, t))
    kind = divergence if divergence != 2 or 0 < beta < 1 else 0 if beta == 0 else 1
    if kind == 0:
        d = _kl(lt, ls)
    elif kind == 1:
        d = _kl(ls, lt)
    else:
        lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
        d = beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    if target is None:
        loss = T * T * d
    else:
        keep = target != ignore_index
        ce = F.cross_entropy(s, torch.where(keep, target, 0).long(), reduction="none")
        loss = torch.where(keep, (1 - alpha) * T * T * d + alpha * ce, 0.0)
    (g,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), g


def make(gen, n, Vs, Vt, scale=3.0, targets=True, ignored=True):
    s = torch.randn(n, Vs, generator=gen) * scale
    t = torch.randn(n, Vt, generator=gen) * scale
    y = None
    if targets:
        y = torch.randint(0, Vs, (n,), generator=gen)
        if ignored:
            y[1::3] = -100
    return s, t, y


def run(kernel, s, t, y, *opts):
    s = s.clone()
    loss = KERNELS[kernel](s, t, y, -100, *opts)
    return loss, s


def assert_close(loss, g, ref, tol=1e-5):
    rl, rg = ref
    assert loss.dtype == torch.float32 and g.dtype == torch.float32
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    err_l = (loss.double() - rl).abs().max().item() if rl.numel() else 0.0
    err_g = (g.double() - rg).abs().max().item() if rg.numel() else 0.0
    assert err_l <= tol * (1 + rl.abs().max().item()), err_l
    assert err_g <= tol * max(rg.abs().max().item(), 1e-30), err_g


CASES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_against_float64(gen, kernel, divergence, beta, T, alpha):
    """Targets with ignored rows and without targets; a vocabulary of 37 classes (two 16-lane vectors and
    a tail)."""
    for targets in (True, False):
        s, t, y = make(gen, 7, 37, 37, targets=targets)
        opts = (T, alpha, DIV[divergence], beta)
        assert_close(*run(kernel, s, t, y, *opts), reference(s, t, y, -100, *opts))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("divergence,beta,Vs,Vt", [
    ("kl", 0.5, 45, 37), ("kl", 0.5, 100, 17), ("reverse_kl", 0.5, 37, 45), ("reverse_kl", 0.5, 16, 33),
    ("jsd", 0.3, 45, 37), ("jsd", 0.7, 37, 45), ("jsd", 0.5, 1, 20), ("jsd", 0.5, 20, 1),
    ("jsd", 0.0, 45, 37), ("jsd", 1.0, 37, 45)])
@pytest.mark.parametrize("T", [1.0, 1.5])
def test_vocabularies_of_different_sizes(gen, kernel, divergence, beta, Vs, Vt, T):
    s, t, y = make(gen, 5, Vs, Vt)
    opts = (T, 0.5, DIV[divergence], beta)
    assert_close(*run(kernel, s, t, y, *opts), reference(s, t, y, -100, *opts))


@pytest.mark.parametrize("V", [1, 2, 15, 16, 17, 31, 33, 64, 1000])
def test_vector_tails(gen, V):
    """Row lengths around the 16- and 8-lane vectors (the AVX2 and portable paths: TLTORCH_CPU_ISA reruns)."""
    for divergence, beta in CASES:
        s, t, y = make(gen, 3, V, V)
        opts = (2.0, 0.5, DIV[divergence], beta)
        assert_close(*run("c", s, t, y, *opts), reference(s, t, y, -100, *opts))


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_with_a_stride(gen, kernel):
    """Rows further apart than they are long (a slice of a wider buffer): only each row's own logits are
    read and written."""
    s, t, y = make(gen, 6, 40, 40)
    sw, tw = torch.randn(6, 47, generator=gen), torch.randn(6, 45, generator=gen)
    sw[:, :40], tw[:, 3:43] = s, t
    s_view, t_view = sw[:, :40], tw[:, 3:43]
    beyond = sw[:, 40:].clone()
    opts = (2.0, 0.5, DIV["jsd"], 0.4)
    loss = KERNELS[kernel](s_view, t_view, y, -100, *opts)
    assert_close(loss, s_view, reference(s, t, y, -100, *opts))
    assert torch.equal(sw[:, 40:], beyond)


@pytest.mark.parametrize("kernel", KERNELS)
def test_ignored_rows_and_empty_chunk(gen, kernel):
    s, t, y = make(gen, 4, 20, 20)
    y[:] = -7
    s2 = s.clone()
    loss = KERNELS[kernel](s2, t, y, -7, 2.0, 0.5, DIV["kl"], 0.5)
    assert torch.equal(loss, torch.zeros(4)) and torch.equal(s2, torch.zeros(4, 20))
    for y0 in (None, torch.zeros(0, dtype=torch.int64)):
        e = torch.empty(0, 20)
        loss = KERNELS[kernel](e, torch.empty(0, 30), y0, -100, 2.0, 0.5, DIV["jsd"], 0.5)
        assert loss.shape == (0,) and loss.dtype == torch.float32


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("divergence,beta", CASES)
def test_large_logits(gen, kernel, divergence, beta):
    """Logits of magnitude 1e4 (softmaxes of one class, the rest underflowing): finite, and the float64
    values; confident rows (the target class far ahead) give a gradient without NaN."""
    s, t, y = make(gen, 5, 50, 50, scale=1e4)
    opts = (2.0, 0.5, DIV[divergence], beta)
    assert_close(*run(kernel, s, t, y, *opts), reference(s, t, y, -100, *opts))
    s, t, y = make(gen, 5, 50, 50, scale=1.0, ignored=False)
    s[torch.arange(5), y] += 3e4
    t[torch.arange(5), y] += 3e4
    loss, g = run(kernel, s, t, y, *opts)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("jsd", 0.5), ("jsd", 0.0)])
def test_teacher_logits_minus_inf(gen, kernel, divergence, beta):
    """A teacher that masks classes out (logit -inf, probability 0): their terms are 0 log 0 = 0, not NaN."""
    s, t, y = make(gen, 4, 40, 40)
    t[:, ::3] = -math.inf
    opts = (2.0, 0.3, DIV[divergence], beta)
    assert_close(*run(kernel, s, t, y, *opts), reference(s, t, y, -100, *opts))


def test_kernels_agree_and_threads_do_not_matter(gen):
    """The C kernel with 1 and 2 threads: the same bits; the torch-ops kernel within float32 rounding."""
    s, t, y = make(gen, 67, 300, 280)
    opts = (2.0, 0.5, DIV["jsd"], 0.3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("c", s, t, y, *opts)
        torch.set_num_threads(2)
        two = run("c", s, t, y, *opts)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    other = run("torch", s, t, y, *opts)
    for a, b in zip(one, other):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_nothing_written_on_a_bad_target(gen):
    s, t, y = make(gen, 4, 20, 20)
    y[2] = 20
    s2 = s.clone()
    with pytest.raises(ValueError, match="target holds class index 20"):
        ops.distill_rows(s2, t, y, -100, 2.0, 0.5, 0, 0.5)
    assert torch.equal(s2, s)
    with pytest.raises(ValueError, match="target holds class index 20"):
        head_ops._distill_rows_torch(s2, t, y, -100, 2.0, 0.5, 0, 0.5)
    assert torch.equal(s2, s)


def _bad(**kw):
    s, t = torch.zeros(3, 10), torch.zeros(3, 10)
    args = dict(s=s, t=t, target=torch.zeros(3, dtype=torch.int64), ignore_index=-100, temperature=2.0, alpha=0.5,
                divergence=0, beta=0.5)
    args.update(kw)
    return args


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(s=torch.zeros(3, 10, dtype=torch.float64)), TypeError, "'s'"),
    (dict(t=torch.zeros(3, 10, dtype=torch.bfloat16)), TypeError, "'t'"),
    (dict(t=torch.zeros(4, 10)), ValueError, "'t'"),
    (dict(s=torch.zeros(3, 0)), ValueError, "'s'"),
    (dict(t=torch.zeros(3, 12)), ValueError, "'t' has more classes"),
    (dict(t=torch.zeros(3, 8), divergence=1), ValueError, "'s' has more classes"),
    (dict(t=torch.zeros(3, 12), divergence=2, beta=0.0), ValueError, "'t' has more classes"),
    (dict(target=torch.zeros(3)), TypeError, "'target'"),
    (dict(target=torch.zeros(4, dtype=torch.int64)), ValueError, "'target'"),
    (dict(divergence=3), ValueError, "'divergence'"),
    (dict(temperature=0.0), ValueError, "'temperature'"),
    (dict(temperature=math.inf), ValueError, "'temperature'"),
    (dict(alpha=1.5), ValueError, "'alpha'"),
    (dict(beta=-0.1), ValueError, "'beta'"),
])
def test_bad_input(kernel, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        KERNELS[kernel](**_bad(**kwargs))


@pytest.mark.parametrize("kwargs,match", [
    (dict(s=torch.zeros(10, 3).t()), "argument 's' must have unit stride in dim 1"),
    (dict(t=torch.zeros(10, 3).t()), "argument 't' must have unit stride in dim 1"),
    (dict(target=torch.zeros(3, dtype=torch.uint8)), "argument 'target' has dtype uint8"),
    (dict(loss=torch.zeros(3, dtype=torch.float64)), "argument 'loss' must be float32"),
])
def test_bad_input_c(kwargs, match):
    """What the C binding alone sees: the rows' layout, the target's dtype, the loss buffer; s and t in the
    same memory."""
    from tltorch import _C
    args = _bad(**kwargs)
    loss = kwargs.get("loss", torch.zeros(3))
    with pytest.raises((TypeError, ValueError), match=match):
        _C.distill_rows(args["s"], args["t"], args["target"], -100, 2.0, 0.5, 0, 0.5, loss, 1)
    z = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="argument 's' overlaps argument 't'"):
        _C.distill_rows(z, z, None, -100, 2.0, 0.5, 0, 0.5, torch.zeros(3), 1)
