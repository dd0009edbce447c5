"""linear_distillation_loss against the formulas on full float64 logits:

    p^T = softmax(z / T),  loss_i = (1 - alpha) T^2 D(p_t^T || p_s^T) + alpha CE(z_s, target_i)   (T^2 D alone
    without targets), the mean over counted tokens; D = KL(p_t||p_s), KL(p_s||p_t), or TRL's generalised
    JSD beta KL(p_t||m) + (1-beta) KL(p_s||m), m = beta p_t + (1-beta) p_s.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import tltorch
from tltorch import losses as TL


def pad_to(z, V):
    return z if z.shape[-1] == V else F.pad(z, (0, V - z.shape[-1]), value=float("-inf"))


def kl(lp, lq):
    """KL(p || q) per row from log-probs, 0 log 0 = 0."""
    real = torch.isfinite(lp)  # where p is 0, nothing (and no NaN gradient through the other branch)
    lp, lq = torch.where(real, lp, 0.0), torch.where(real, lq, 0.0)
    return torch.where(real, lp.exp() * (lp - lq), 0.0).sum(-1)


def ref_loss(zs, zt, targets=None, temperature=2.0, alpha=0.5, divergence="kl", beta=0.5, ignore_index=-100):
    """float64, full logits (N, Vs) and (N, Vt); the smaller vocabulary padded with -inf."""
    zs, zt, T = zs.double(), zt.double(), temperature
    V = max(zs.shape[-1], zt.shape[-1])
    ls, lt = (torch.log_softmax(pad_to(z, V) / T, -1) for z in (zs, zt))
    if divergence == "jsd" and beta == 0.0:
        divergence = "kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "kl":
        d = kl(lt, ls)
    elif divergence == "reverse_kl":
        d = kl(ls, lt)
    else:
        lm = torch.logaddexp(ls + torch.log1p(torch.tensor(-beta)), lt + torch.log(torch.tensor(beta)))
        d = beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)
    if targets is None:
        return (T * T * d).mean()
    keep = targets != ignore_index
    if not keep.any():
        return zs.sum() * 0.0
    ce = F.cross_entropy(zs, torch.where(keep, targets, 0), reduction="none")
    per = (1 - alpha) * T * T * d + alpha * ce
    return per[keep].mean()


def make(gen, lead, D, Vs, Vt, Dt=None, dtype=torch.float32, bias=True, ignored=True):
    Dt = Dt or D
    h = torch.randn(*lead, D, generator=gen)
    w = torch.randn(Vs, D, generator=gen) * D ** -0.5 * 3
    b = torch.randn(Vs, generator=gen) if bias else None
    th = torch.randn(*lead, Dt, generator=gen)
    tw = torch.randn(Vt, Dt, generator=gen) * Dt ** -0.5 * 3
    tb = torch.randn(Vt, generator=gen) if bias else None
    t = torch.randint(0, Vs, lead, generator=gen)
    if ignored:
        t[torch.rand(lead, generator=gen) < 0.3] = -100
    cast = (lambda x: None if x is None else x.to(dtype))
    return cast(h), cast(w), cast(b), cast(th), cast(tw), cast(tb), t


def full_logits(h, w, b):
    z = h.double() @ w.double().t()
    return z if b is None else z + b.double()


def ours_and_ref(h, w, b, th, tw, tb, t, **kw):
    """(loss, grads of h, w, b) of ours and of the float64 formula, on the same inputs."""
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    bb = None if b is None else b.clone().requires_grad_(True)
    loss = TL.linear_distillation_loss(hh, ww, th, tw, targets=t, student_bias=bb, teacher_bias=tb, **kw)
    mine = [loss] + list(torch.autograd.grad(loss, [x for x in (hh, ww, bb) if x is not None]))
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    b64 = None if b is None else b.double().requires_grad_(True)
    zs = full_logits(h64, w64, b64).reshape(-1, w.shape[0])
    zt = full_logits(th, tw, tb).reshape(-1, tw.shape[0])
    ref = ref_loss(zs, zt, None if t is None else t.reshape(-1), **kw)
    theirs = [ref] + list(torch.autograd.grad(ref, [x for x in (h64, w64, b64) if x is not None]))
    return mine, theirs


def close(mine, theirs, tol):
    for a, r in zip(mine, theirs):
        assert a.shape == r.shape
        err = (a.double() - r).abs().max().item()
        assert err <= tol * (1 + r.abs().max().item()), (err, r.abs().max().item())


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                             ("jsd", 0.9), ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("with_targets", [True, False])
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_against_float64(gen, divergence, beta, with_targets, T):
    h, w, b, th, tw, tb, t = make(gen, (3, 7), 16, 37, 37)
    mine, theirs = ours_and_ref(h, w, b, th, tw, tb, t if with_targets else None, temperature=T, alpha=0.3,
                                divergence=divergence, beta=beta)
    close(mine, theirs, 1e-5)


@pytest.mark.parametrize("divergence,beta,Vs,Vt", [("kl", 0.5, 45, 37), ("reverse_kl", 0.5, 37, 45),
                                                   ("jsd", 0.3, 45, 37), ("jsd", 0.7, 37, 45),
                                                   ("jsd", 0.0, 45, 37), ("jsd", 1.0, 37, 45)])
def test_vocab_sizes_differ(gen, divergence, beta, Vs, Vt):
    h, w, b, th, tw, tb, t = make(gen, (2, 9), 16, Vs, Vt, Dt=24)
    mine, theirs = ours_and_ref(h, w, b, th, tw, tb, t, temperature=1.5, divergence=divergence, beta=beta)
    close(mine, theirs, 1e-5)
    assert torch.isfinite(mine[0])


@pytest.mark.parametrize("divergence,beta,Vs,Vt", [("kl", 0.5, 37, 45), ("reverse_kl", 0.5, 45, 37),
                                                   ("jsd", 0.0, 37, 45), ("jsd", 1.0, 45, 37)])
def test_infinite_divergence_refused(gen, divergence, beta, Vs, Vt):
    h, w, b, th, tw, tb, t = make(gen, (5,), 8, Vs, Vt)
    with pytest.raises(ValueError, match="vocabulary"):
        TL.linear_distillation_loss(h, w, th, tw, divergence=divergence, beta=beta)


def test_chunking_and_2d(gen, monkeypatch):
    """Rows in many chunks (and gathered around ignored rows) give what one chunk gives."""
    h, w, b, th, tw, tb, t = make(gen, (50,), 16, 37, 40, Dt=8)
    mine, theirs = ours_and_ref(h, w, b, th, tw, tb, t, divergence="jsd")
    monkeypatch.setattr(TL, "_DISTILL_CHUNK_BYTES", 4 * 40 * 7)  # 7 rows a chunk
    assert TL._chunk_rows(40) == 7
    small, _ = ours_and_ref(h, w, b, th, tw, tb, t, divergence="jsd")
    close(small, theirs, 1e-5)
    for a, c in zip(mine, small):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence,beta,Vs,Vt", [("kl", 0.5, 45, 37), ("reverse_kl", 0.5, 37, 45),
                                                   ("jsd", 0.3, 40, 40)])
def test_torch_ops_row_kernel(gen, monkeypatch, divergence, beta, Vs, Vt):
    """The chunks through distill_rows's CUDA kernel (its formulas in torch's ops), run here on the CPU:
    the loss and gradients of the float64 formula, as with the C kernel."""
    from tltorch.ops import head as head_ops
    h, w, b, th, tw, tb, t = make(gen, (3, 7), 16, Vs, Vt)
    monkeypatch.setattr(TL.ops, "distill_rows", head_ops._distill_rows_torch)
    for T in (1.0, 2.0):
        mine, theirs = ours_and_ref(h, w, b, th, tw, tb, t, temperature=T, divergence=divergence, beta=beta)
        close(mine, theirs, 1e-5)


def test_ignored_and_all_ignored(gen):
    h, w, b, th, tw, tb, t = make(gen, (2, 6), 8, 20, 20)
    t[1] = -100
    hh = h.clone().requires_grad_(True)
    loss = TL.linear_distillation_loss(hh, w, th, tw, targets=t)
    loss.backward()
    assert (hh.grad[1] == 0).all() and (hh.grad[0] != 0).any()
    # every token ignored (a custom ignore_index): 0 and zero gradients, no NaN
    hh, ww, bb = (x.clone().requires_grad_(True) for x in (h, w, b))
    loss = TL.linear_distillation_loss(hh, ww, th, tw, targets=torch.full_like(t, -7), ignore_index=-7,
                                       student_bias=bb)
    loss.backward()
    assert loss.item() == 0.0
    assert all((g == 0).all() for g in (hh.grad, ww.grad, bb.grad))


def test_teacher_logits_route_agrees(gen):
    h, w, b, th, tw, tb, t = make(gen, (3, 5), 16, 33, 30, Dt=12)
    zt = (full_logits(th, tw, tb)).float()
    for div in ("kl", "jsd"):
        hh = [h.clone().requires_grad_(True) for _ in range(2)]
        a = TL.linear_distillation_loss(hh[0], w, th, tw, targets=t, teacher_bias=tb, divergence=div)
        c = TL.linear_distillation_loss(hh[1], w, teacher_logits=zt, targets=t, divergence=div)
        a.backward()
        c.backward()
        assert torch.allclose(a, c, rtol=1e-5) and torch.allclose(hh[0].grad, hh[1].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_teacher_logits_left_unchanged(gen, T):
    """float32 teacher_logits, every row counted (chunks are views of them): read, never written, and an
    inference-mode tensor (a teacher run under torch.inference_mode) is taken as it is."""
    h, w, _, _, _, _, _ = make(gen, (6,), 16, 30, 30, bias=False)
    with torch.inference_mode():
        zt = torch.randn(6, 30, generator=gen)
    before = zt.clone()
    for targets in (None, torch.randint(0, 30, (6,), generator=gen)):
        TL.linear_distillation_loss(h.clone().requires_grad_(True), w, teacher_logits=zt, targets=targets,
                                    temperature=T)
        assert torch.equal(zt, before)
    assert torch.allclose(TL.linear_distillation_loss(h, w, teacher_logits=zt, temperature=T).double(),
                          ref_loss(h @ w.t(), zt, temperature=T), rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_dtypes(gen, dtype, tol, divergence):
    """Half-precision inputs: the float64 formula on the same (rounded) inputs; float32 math inside."""
    h, w, b, th, tw, tb, t = make(gen, (4, 8), 32, 50, 50, dtype=dtype)
    mine, theirs = ours_and_ref(h, w, b, th, tw, tb, t, divergence=divergence)
    assert mine[0].dtype == torch.float32 and mine[1].dtype == dtype and mine[2].dtype == dtype
    close(mine, theirs, tol)


def test_non_contiguous_views(gen):
    h, w, b, th, tw, tb, t = make(gen, (6, 5), 16, 30, 30)
    hv = h.transpose(0, 1)  # (5, 6, 16), strided
    wv = w.t().contiguous().t()  # column-major weight
    thv, tv = th.transpose(0, 1), t.t()
    mine, theirs = ours_and_ref(hv, wv, b, thv, tw.t().contiguous().t(), tb, tv, divergence="jsd")
    close(mine, theirs, 1e-5)
    zt = full_logits(th, tw, tb).float().transpose(0, 1)
    a = TL.linear_distillation_loss(hv, wv, teacher_logits=zt, targets=tv, student_bias=b, divergence="jsd")
    assert torch.allclose(a, mine[0].detach(), rtol=1e-5)


def test_no_gradient_to_teacher(gen):
    h, w, b, th, tw, tb, t = make(gen, (2, 4), 8, 20, 20)
    th, tw, tb = (x.clone().requires_grad_(True) for x in (th, tw, tb))
    hh = h.clone().requires_grad_(True)
    loss = TL.linear_distillation_loss(hh, w, th, tw, targets=t, teacher_bias=tb)
    loss.backward()
    assert hh.grad is not None and th.grad is None and tw.grad is None and tb.grad is None
    zt = torch.randn(2, 4, 20, requires_grad=True)
    TL.linear_distillation_loss(h.clone().requires_grad_(True), w, teacher_logits=zt).backward()
    assert zt.grad is None


def test_upstream_gradient_scales(gen):
    h, w, b, th, tw, tb, t = make(gen, (3, 4), 8, 20, 20)
    hh = [h.clone().requires_grad_(True) for _ in range(2)]
    TL.linear_distillation_loss(hh[0], w, th, tw, targets=t).backward()
    (-2.5 * TL.linear_distillation_loss(hh[1], w, th, tw, targets=t)).backward()
    assert torch.allclose(hh[1].grad, -2.5 * hh[0].grad, rtol=1e-6, atol=1e-8)
    loss = TL.linear_distillation_loss(hh[0], w, th, tw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_against_trl_generalized_jsd(gen, beta, T):
    """TRL's GKDTrainer.generalized_jsd_loss (a staticmethod; mean over the labelled tokens) is our soft
    term divided by T^2 (TRL does not scale by T^2)."""
    from trl.experimental.gkd.gkd_trainer import GKDTrainer
    h, w, b, th, tw, tb, t = make(gen, (2, 6), 16, 30, 30)
    zs, zt = full_logits(h, w, b).float(), full_logits(th, tw, tb).float()
    theirs = GKDTrainer.generalized_jsd_loss(zs, zt, labels=t, beta=beta, temperature=T)
    ours = TL.linear_distillation_loss(h, w, th, tw, targets=t, alpha=0.0, divergence="jsd", beta=beta,
                                       temperature=T, student_bias=b, teacher_bias=tb)
    assert torch.allclose(ours / T ** 2, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(teacher_logits=torch.zeros(2, 3, 10)), ValueError, "exactly one"),
    (dict(teacher_hidden=None, teacher_weight=None), ValueError, "exactly one"),
    (dict(teacher_weight=None), ValueError, "teacher_weight"),
    (dict(teacher_hidden=torch.zeros(2, 4, 8)), ValueError, "teacher_hidden"),
    (dict(teacher_weight=torch.zeros(10, 5)), ValueError, "teacher_weight"),
    (dict(divergence="kld"), ValueError, "divergence"),
    (dict(beta=1.5), ValueError, "beta"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(alpha=True), TypeError, "alpha"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.zeros(2, 3)), TypeError, "targets"),
    (dict(targets=torch.full((2, 3), 10)), ValueError, "targets"),
    (dict(ignore_index=1.5, targets=torch.zeros(2, 3, dtype=torch.long)), TypeError, "ignore_index"),
    (dict(student_bias=torch.zeros(9)), ValueError, "student_bias"),
    (dict(student_weight=torch.zeros(10, 8, dtype=torch.float64)), TypeError, "student_weight"),
])
def test_bad_input(kwargs, exc, name):
    args = dict(student_hidden=torch.zeros(2, 3, 8), student_weight=torch.zeros(10, 8),
                teacher_hidden=torch.zeros(2, 3, 6), teacher_weight=torch.zeros(10, 6))
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        TL.linear_distillation_loss(**args)


def test_exported():
    assert tltorch.losses.linear_distillation_loss is TL.linear_distillation_loss
    assert "linear_distillation_loss" in TL.__all__


def readme_example(name):
    """The python block after README.md's `<!-- readme-example: name -->` marker."""
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = f"<!-- readme-example: {name} -->"
    assert marker in text, marker
    block = text.split(marker, 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def tiny_gpt2(n_layer, seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_positions=32, vocab_size=97)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_readme_dpo_example_runs():
    """README's DPO snippet on a tiny config-built GPT-2: a loss, the metrics TRL logs, gradients only into
    the adapters, and the reference (adapters off) equal to the policy at initialisation (B = 0)."""
    model = tiny_gpt2(2, 0)
    g = torch.Generator().manual_seed(1)
    chosen_ids, rejected_ids = (torch.randint(0, 97, (2, 10), generator=g) for _ in range(2))
    targets = []
    for ids in (chosen_ids, rejected_ids):
        t = ids[:, 1:].clone()
        t[:, :4] = -100  # the prompt
        targets.append(t)
    env = dict(model=model, chosen_ids=chosen_ids, rejected_ids=rejected_ids, chosen_targets=targets[0],
               rejected_targets=targets[1])
    exec(compile(readme_example("dpo"), "README.md:dpo", "exec"), env)
    loss, metrics = env["loss"], env["metrics"]
    assert torch.isfinite(loss) and abs(loss.item() - 0.6931) < 1e-3  # log 2: policy == reference
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(metrics)
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_readme_distill_example_runs():
    """README's distillation snippet: a 6-layer student, a 12-layer teacher (tiny widths); the loss equals
    the float64 formula on the full logits, the student gets gradients, the teacher none."""
    teacher, student = tiny_gpt2(12, 0), tiny_gpt2(6, 1)  # eval: no dropout, so the reference below agrees
    input_ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    env = dict(teacher=teacher, student=student, input_ids=input_ids)
    exec(compile(readme_example("distill"), "README.md:distill", "exec"), env)
    with torch.no_grad():
        zs = student(input_ids).logits[:, :-1].reshape(-1, 97)
        zt = teacher(input_ids).logits[:, :-1].reshape(-1, 97)
    ref = ref_loss(zs, zt, input_ids[:, 1:].reshape(-1), temperature=2.0, alpha=0.5)
    assert torch.allclose(env["loss"].double(), ref, rtol=1e-4)
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
