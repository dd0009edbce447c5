"""tltorch.fit_head: a linear head trained on fixed features with the fused head and the fused AdamW.

The reference is a plain torch loop (F.cross_entropy + torch.optim.AdamW) that draws the same
initialisation and the same shuffles; fit_head must follow it step for step.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tltorch
from tltorch.nn import LinearCrossEntropy

ACC_SAMPLE = 8192  # fit_head measures train accuracy on this many fixed rows (one extra randperm)


def blobs(n, d, c, gen, spread=1.0, labels=None):
    """n points around c well-separated centres in d dims (a fixed generator: the same centres per test)."""
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.randint(0, c, (n,), generator=gen) if labels is None else labels
    return centres[y] + spread * torch.randn(n, d, generator=gen), y


def fit(x, y, num_classes=None, *, init_seed=0, **kw):
    """fit_head with torch's global RNG (the head's initialisation) seeded, quiet."""
    torch.manual_seed(init_seed)
    kw.setdefault("progress", False)
    return tltorch.fit_head(x, y, num_classes, **kw)


def lr_factor(schedule, step, total):
    """The documented schedules: constant; cosine from 1 to 0 over all steps; onecycle as torch's
    OneCycleLR's defaults (30% cosine warm-up from 1/25, cosine annealing to 1/25e4)."""
    t = step / total
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return (1 + math.cos(math.pi * t)) / 2
    lo, end = 1 / 25, 1 / 25e4
    if t < 0.3:
        return lo + (1 - lo) * (1 - math.cos(math.pi * t / 0.3)) / 2
    return end + (1 - end) * (1 + math.cos(math.pi * (t - 0.3) / 0.7)) / 2


def torch_loop(opt, n, step_loss, *, epochs, lr, batch_size, schedule, seed, **_):
    """fit_head's loop with a torch optimizer: the same seeded shuffles (after the accuracy sample's draw
    when n > 8192), lr scheduled per step; step_loss(idx) -> (the objective minimised, the loss
    recorded). Returns the epochs' recorded losses (means over rows)."""
    g = torch.Generator().manual_seed(seed)
    if n > ACC_SAMPLE:
        torch.randperm(n, generator=g)
    total, step, losses = epochs * -(-n // batch_size), 0, []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        loss_sum = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(schedule, step, total)
            step += 1
            objective, recorded = step_loss(idx)
            opt.zero_grad()
            objective.backward()
            opt.step()
            loss_sum += float(recorded) * idx.numel()
        losses.append(loss_sum / n)
    return losses


def reference_fit(x, y, num_classes, *, epochs, lr, weight_decay, batch_size, schedule, seed,
                  label_smoothing=0.0, class_weight=None):
    n, d = x.shape
    torch.manual_seed(seed)
    head = LinearCrossEntropy(d, num_classes)  # draws the initialisation as fit_head does with seed=
    w = head.weight.detach().clone().requires_grad_()
    b = head.bias.detach().clone().requires_grad_()
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": weight_decay}, {"params": [b], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    cw = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)

    def step_loss(idx):
        loss = F.cross_entropy(x[idx].float() @ w.t() + b, y[idx].long(), weight=cw, label_smoothing=label_smoothing)
        return loss, loss.detach()
    losses = torch_loop(opt, n, step_loss, epochs=epochs, lr=lr, batch_size=batch_size, schedule=schedule, seed=seed)
    return w.detach(), b.detach(), losses


@pytest.mark.parametrize("n,batch_size,epochs,schedule,options", [
    (300, 64, 2, "cosine", {}),
    (301, 50, 2, "onecycle", {"label_smoothing": 0.1}),
    (257, 256, 3, "constant", {"class_weight": [0.5, 2.0, 1.0, 1.5]}),
    (ACC_SAMPLE + 7, 2048, 1, "cosine", {"label_smoothing": 0.2, "class_weight": [1.0, 0.3, 2.0, 1.0]}),
], ids=["cosine", "onecycle-smoothing", "constant-weights", "acc-sample"])
def test_matches_torch_adamw_loop(n, batch_size, epochs, schedule, options, gen):
    d, c, lr, wd = 12, 4, 3e-2, 0.1
    x, y = blobs(n, d, c, gen, spread=3.0)
    head, hist = fit(x, y, c, epochs=epochs, lr=lr, weight_decay=wd, batch_size=batch_size, schedule=schedule,
                     seed=7, **options)
    w, b, losses = reference_fit(x, y, c, epochs=epochs, lr=lr, weight_decay=wd, batch_size=batch_size,
                                 schedule=schedule, seed=7, **options)
    # float32: a few ulps of each update (lr) per step, never a step's worth
    torch.testing.assert_close(head.weight.detach(), w, rtol=1e-5, atol=1e-6 * lr * epochs * -(-n // batch_size))
    torch.testing.assert_close(head.bias.detach(), b, rtol=1e-5, atol=1e-6 * lr * epochs * -(-n // batch_size))
    torch.testing.assert_close(torch.tensor(hist.train_loss), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert hist.lr[-1] == pytest.approx(lr * lr_factor(schedule, epochs * -(-n // batch_size) - 1,
                                                         epochs * -(-n // batch_size)), rel=1e-9)


def test_separable_features_accuracy(gen):
    x, y = blobs(2000, 16, 5, gen)
    vx, vy = blobs(500, 16, 5, gen)
    # the defaults (20 epochs, cosine, batch 256, num_classes from the labels) but lr: 160 steps of 1e-3
    # are too few for 2000 rows
    head, hist = fit(x, y, val=(vx, vy), lr=1e-2)
    assert isinstance(head, LinearCrossEntropy) and head.num_classes == 5 and head.in_features == 16
    assert hist.train_acc[-1] > 0.95 and hist.val_acc[-1] > 0.95
    assert (head.predict(vx) == vy).float().mean() > 0.95
    assert len(hist.train_loss) == len(hist.val_loss) == len(hist.lr) == len(hist.time) == 20
    assert hist.train_loss[-1] < hist.train_loss[0] and hist.val_loss[-1] < hist.val_loss[0]
    assert hist.best_epoch is None and hist["best_epoch"] is None
    # val_loss and val_acc are those of the head after each epoch: the last one is the returned head's
    with torch.no_grad():
        assert hist.val_loss[-1] == pytest.approx(F.cross_entropy(head.logits(vx), vy).item(), rel=1e-5)
    assert hist.val_acc[-1] == (head.predict(vx) == vy).float().mean().item()


def test_progress_bar_runs(gen, capsys):
    x, y = blobs(64, 4, 3, gen)
    torch.manual_seed(0)
    tltorch.fit_head(x, y, epochs=2)
    assert "fit_head" in capsys.readouterr().err


def test_schedules_lr_history(gen):
    x, y = blobs(100, 6, 3, gen)
    lr, epochs = 1e-2, 10  # 4 steps an epoch
    hists = {s: fit(x, y, epochs=epochs, lr=lr, batch_size=25, schedule=s, seed=0)[1].lr
             for s in ("constant", "cosine", "onecycle")}
    assert hists["constant"] == [lr] * epochs
    cos = hists["cosine"]
    assert all(a > b for a, b in zip(cos, cos[1:])) and cos[0] > 0.9 * lr and cos[-1] < 0.01 * lr
    one = hists["onecycle"]
    peak = max(range(epochs), key=one.__getitem__)
    assert 1 <= peak <= 4  # the warm-up is the first 30% of the steps
    assert all(a < b for a, b in zip(one[:peak], one[1:peak + 1]))
    assert all(a > b for a, b in zip(one[peak:], one[peak + 1:]))
    assert one[peak] > 0.9 * lr and one[0] < 0.3 * lr and one[-1] < 0.01 * lr


def test_weight_decay_on_weight_not_bias(gen):
    """With all-zero features the weight's gradient is exactly zero, so its only change is AdamW's decay,
    and the bias sees the same gradients with or without decay."""
    n, d, c, lr, wd, epochs, bs = 90, 5, 3, 5e-2, 0.5, 3, 32
    x = torch.zeros(n, d)
    y = torch.randint(0, c, (n,), generator=gen)
    torch.manual_seed(1)  # fit_head's seed= seeds the initial weights too
    w0 = LinearCrossEntropy(d, c).weight.detach().clone()
    plain, _ = fit(x, y, c, epochs=epochs, lr=lr, weight_decay=0.0, batch_size=bs, seed=1)
    decayed, hist = fit(x, y, c, epochs=epochs, lr=lr, weight_decay=wd, batch_size=bs, seed=1)
    assert torch.equal(plain.weight, w0)
    assert torch.equal(plain.bias, decayed.bias)
    total = epochs * -(-n // bs)
    shrink = math.prod(1 - lr * lr_factor("cosine", s, total) * wd for s in range(total))
    torch.testing.assert_close(decayed.weight.detach(), w0 * shrink, rtol=1e-5, atol=0)
    # and on real features: a smaller weight, a bias left free
    x, y = blobs(200, 8, 3, gen)
    small, _ = fit(x, y, epochs=10, lr=5e-2, weight_decay=1.0, seed=2)
    large, _ = fit(x, y, epochs=10, lr=5e-2, weight_decay=0.0, seed=2)
    assert small.weight.norm() < 0.9 * large.weight.norm()


def test_label_smoothing_and_class_weight_change_the_head(gen):
    x, y = blobs(200, 8, 3, gen, spread=2.0)
    kw = dict(epochs=3, lr=1e-2, seed=3)
    base = fit(x, y, **kw)[0].weight
    smooth = fit(x, y, label_smoothing=0.3, **kw)[0].weight
    weighted = fit(x, y, class_weight=torch.tensor([1.0, 5.0, 0.2]), **kw)[0].weight
    assert not torch.equal(base, smooth) and not torch.equal(base, weighted)
    # unit class weights are no weights (the weighted mean is the mean)
    torch.testing.assert_close(fit(x, y, class_weight=[1.0, 1.0, 1.0], **kw)[0].weight, base, rtol=1e-5, atol=1e-6)


def test_early_stopping_restores_best_epoch(gen):
    """Random labels on few rows and many features: the head memorises them, the validation loss rises."""
    d, c, epochs, patience = 64, 2, 60, 3
    x = torch.randn(40, d, generator=gen)
    y = torch.randint(0, c, (40,), generator=gen)
    vx = torch.randn(200, d, generator=gen)
    vy = torch.randint(0, c, (200,), generator=gen)
    kw = dict(num_classes=c, lr=1e-2, weight_decay=0.0, batch_size=16, schedule="constant", seed=4)
    head, hist = fit(x, y, val=(vx, vy), epochs=epochs, early_stopping=patience, **kw)
    n_run = len(hist.train_loss)
    assert n_run < epochs and len(hist.val_loss) == n_run
    best = hist.best_epoch
    assert best == min(range(n_run), key=hist.val_loss.__getitem__) + 1
    assert n_run == best + patience
    assert hist.train_acc[-1] > hist.train_acc[best - 1] or hist.train_loss[-1] < hist.train_loss[best - 1]
    with torch.no_grad():
        assert F.cross_entropy(head.logits(vx), vy).item() == pytest.approx(hist.val_loss[best - 1], rel=1e-5)
    # the kept head is the one a run of exactly `best` epochs ends with (constant lr: the same steps)
    again, _ = fit(x, y, epochs=best, **kw)
    assert torch.equal(head.weight, again.weight) and torch.equal(head.bias, again.bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_features(dtype, gen):
    x, y = blobs(600, 16, 4, gen)
    vx, vy = blobs(200, 16, 4, gen)
    xh, vxh = x.to(dtype), vx.to(dtype)
    head, hist = fit(xh, y, val=(vxh, vy), epochs=8, lr=1e-2, batch_size=64, seed=5)
    assert head.weight.dtype == torch.float32
    assert hist.train_acc[-1] > 0.95 and hist.val_acc[-1] > 0.95
    # the features are widened to float32 per batch: the same run as on the widened cache
    same, _ = fit(xh.float(), y, val=(vxh.float(), vy), epochs=8, lr=1e-2, batch_size=64, seed=5)
    assert torch.equal(head.weight, same.weight) and torch.equal(head.bias, same.bias)


def test_seeded_runs_are_reproducible(gen):
    x, y = blobs(150, 8, 3, gen, spread=2.0)
    kw = dict(epochs=3, lr=1e-2, batch_size=32)
    a, ha = fit(x, y, init_seed=11, seed=5, **kw)
    b, hb = fit(x, y, init_seed=11, seed=5, **kw)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert ha.train_loss == hb.train_loss
    # seed= alone fixes the whole run, whatever torch's global generator holds
    e, he = fit(x, y, init_seed=99, seed=5, **kw)
    assert torch.equal(a.weight, e.weight) and ha.train_loss == he.train_loss
    other, _ = fit(x, y, init_seed=11, seed=6, **kw)  # other initial weights and shuffles
    assert not torch.equal(a.weight, other.weight)
    # without seed=, the shuffles come from torch's global generator
    c, _ = fit(x, y, init_seed=12, **kw)
    d, _ = fit(x, y, init_seed=12, **kw)
    assert torch.equal(c.weight, d.weight)


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_history_plot(gen, tmp_path):
    """The saved figure says what it shows: the title asked for, axis labels, and legends naming the
    training curves and the validation ones with their metric."""
    x, y = blobs(80, 4, 3, gen)
    vx, vy = blobs(40, 4, 3, gen)
    _, hist = fit(x, y, val=(vx, vy), epochs=3)
    assert isinstance(hist, tltorch.History) and hist.train_loss is hist["train_loss"]
    with pytest.raises(AttributeError):
        hist.no_such_record
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    path = tmp_path / "history.png"
    fig = hist.plot(str(path), title="a head on blobs")
    try:
        assert path.stat().st_size > 1000
        assert fig.get_suptitle() == "a head on blobs"
        (loss_ax, acc_ax) = fig.axes
        assert all(len(ax.lines) == 2 for ax in fig.axes)  # train and validation
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            assert ax.get_xlabel() == "epoch" and metric in ax.get_ylabel()
            train, val = _legend_texts(ax)
            assert train.startswith(f"train {metric}")
            assert val == f"validation {metric} (held-out split)"
    finally:
        plt.close(fig)
    with pytest.raises(TypeError, match="title"):
        hist.plot(title=3)
    # no validation data: the training curves alone, no title unless asked for
    _, hist = fit(x, y, epochs=2)
    fig = hist.plot()
    try:
        assert fig.get_suptitle() == ""
        assert [len(_legend_texts(ax)) for ax in fig.axes] == [1, 1]
    finally:
        plt.close(fig)


def test_history_plot_marks_the_epoch_kept(gen):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    x = torch.randn(40, 64, generator=gen)
    y = torch.randint(0, 2, (40,), generator=gen)
    vx, vy = torch.randn(200, 64, generator=gen), torch.randint(0, 2, (200,), generator=gen)
    _, hist = fit(x, y, 2, val=(vx, vy), epochs=40, lr=1e-2, weight_decay=0.0, batch_size=16,
                  schedule="constant", early_stopping=3, seed=4)
    assert hist.best_epoch is not None
    fig = hist.plot()
    try:
        for ax in fig.axes:
            assert "epoch kept (lowest validation loss)" in _legend_texts(ax)
            assert any(list(line.get_xdata()) == [hist.best_epoch] * 2 for line in ax.lines)
    finally:
        plt.close(fig)


def test_demo_fit_head_figure(gen, tmp_path):
    """The demo's fit_head.png: titled with what was trained on what, legends naming its curves."""
    pytest.importorskip("matplotlib")
    from tltorch import demo
    x, y = blobs(60, 4, 3, gen)
    vx, vy = blobs(20, 4, 3, gen)
    _, hist = fit(x, y, val=(vx, vy), epochs=2)
    path = tmp_path / "fit_head.png"
    fig = demo.plot_fit_head(hist, str(path), 60, 20)
    assert path.stat().st_size > 1000
    title = fig.get_suptitle()
    for words in ("fit_head", "linear head", "all-MiniLM-L6-v2", "product reviews", "60 training",
                  "20 validation"):
        assert words in title, title
    assert _legend_texts(fig.axes[0])[1] == "validation loss (held-out split)"


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_val_loss_is_torch_class_weighted_mean(label_smoothing, gen):
    """History's validation loss is nn.CrossEntropyLoss(weight=class_weight)'s on the final head: the sum
    of the rows' weighted losses divided by the sum of their target classes' weights (not by the row
    count). The validation labels are skewed towards the heaviest class, so the two divisors differ by
    a factor of about 2."""
    cw = torch.tensor([0.25, 3.0, 1.0, 0.5])
    x, y = blobs(200, 6, 4, gen, spread=3.0)
    vy = torch.tensor([1] * 30 + [0, 2, 3] * 4)
    vx, _ = blobs(len(vy), 6, 4, gen, spread=3.0, labels=vy)
    head, hist = fit(x, y, 4, val=(vx, vy), epochs=3, lr=1e-2, class_weight=cw, label_smoothing=label_smoothing,
                     seed=1)
    ce = torch.nn.CrossEntropyLoss(weight=cw, label_smoothing=label_smoothing)
    with torch.no_grad():
        logits = head.logits(vx)
        ref = ce(logits, vy).item()
        summed = torch.nn.CrossEntropyLoss(weight=cw, reduction="sum", label_smoothing=label_smoothing)
        per_row = summed(logits, vy).item() / len(vy)
    assert abs(per_row - ref) > 0.1 * ref  # the test tells the two apart
    assert hist.val_loss[-1] == pytest.approx(ref, rel=1e-5)


def test_label_smoothing_as_torch_takes_it(gen):
    """label_smoothing as a NumPy scalar or a 0-d tensor trains the same head as the Python float; a bool,
    a string or a 1-D tensor is refused before any work."""
    x, y = blobs(120, 6, 3, gen, spread=2.0)
    vx, vy = blobs(30, 6, 3, gen, spread=2.0)
    kw = dict(epochs=2, lr=1e-2, seed=3, val=(vx, vy))
    base, hbase = fit(x, y, label_smoothing=float(np.float32(0.2)), **kw)
    for value in (np.float32(0.2), torch.tensor(0.2)):
        head, hist = fit(x, y, label_smoothing=value, **kw)
        assert type(head.label_smoothing) is float
        assert torch.equal(head.weight, base.weight) and hist.val_loss == hbase.val_loss
    for value, exc in ((True, TypeError), ("0.2", TypeError), (torch.tensor([0.2]), TypeError),
                       (float("nan"), ValueError), (-0.1, ValueError)):
        with pytest.raises(exc, match="label_smoothing"):
            fit(x, y, label_smoothing=value, **kw)


def test_bad_arguments(gen):
    x, y = blobs(30, 4, 3, gen)
    vx, vy = blobs(10, 4, 3, gen)
    cases = [
        (dict(labels=torch.full((30,), 3), num_classes=3), ValueError, "labels"),
        (dict(labels=y - 1), ValueError, "labels"),
        (dict(num_classes=2), ValueError, "labels"),
        (dict(val=(vx, vy + 3), num_classes=3), ValueError, "val labels"),
        (dict(features=x[0]), ValueError, "features"),
        (dict(labels=y[:, None]), ValueError, "labels"),
        (dict(labels=y[:29]), ValueError, "labels"),
        (dict(features=x.long()), TypeError, "features"),
        (dict(labels=y.float()), TypeError, "labels"),
        (dict(features=x[:0], labels=y[:0]), ValueError, "rows"),
        (dict(val=vx), TypeError, "val"),
        (dict(val=(vx[:, :3], vy)), ValueError, "val"),
        (dict(schedule="linear"), ValueError, "schedule"),
        (dict(early_stopping=2), ValueError, "early_stopping"),
        (dict(val=(vx, vy), early_stopping=0), ValueError, "early_stopping"),
        (dict(val=(vx, vy), early_stopping=True), ValueError, "early_stopping"),
        (dict(epochs=0), ValueError, "epochs"),
        (dict(epochs=2.0), ValueError, "epochs"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(weight_decay=-1e-3), ValueError, "weight_decay"),
        (dict(class_weight=[1.0, 2.0]), ValueError, "class_weight"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(features=torch.where(torch.arange(30)[:, None] == 7, float("nan"), x)), ValueError,
         "features/labels: features hold a NaN or an infinity \\(row 7\\)"),
        (dict(val=(torch.where(torch.arange(10)[:, None] == 9, float("inf"), vx), vy)), ValueError,
         "val: features hold a NaN or an infinity \\(row 9\\)"),
    ]
    for changes, exc, word in cases:
        args = {"features": x, "labels": y, "epochs": 1, "progress": False, **changes}
        with pytest.raises(exc, match=word):
            tltorch.fit_head(args.pop("features"), args.pop("labels"), **args)


# ---- init and l2sp (classification) ----------------------------------------------------------------------

def test_classification_l2sp_matches_torch_loop(gen):
    """init= starts from a given head (copied, not changed); l2sp adds l2sp * ||W - W0||^2 to the loss
    (the bias free): the torch loop with that term written out and torch.optim.AdamW's decoupled weight
    decay, step for step. A strong pull keeps the weight nearer W0 than no pull."""
    n, d, c, lr, wd, lam, epochs, bs = 300, 12, 4, 3e-2, 0.1, 0.5, 3, 64
    x, y = blobs(n, d, c, gen, spread=3.0)
    init = torch.nn.Linear(d, c)
    w0, b0 = init.weight.detach().clone(), init.bias.detach().clone()
    kw = dict(epochs=epochs, lr=lr, weight_decay=wd, batch_size=bs, schedule="cosine", seed=7)
    head, hist = fit(x, y, c, init=init, l2sp=lam, **kw)
    assert torch.equal(init.weight, w0) and torch.equal(init.bias, b0)
    w = w0.clone().requires_grad_()
    b = b0.clone().requires_grad_()
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}], lr=lr,
                            foreach=False)

    def step_loss(idx):
        loss = F.cross_entropy(x[idx] @ w.t() + b, y[idx])
        return loss + lam * ((w - w0) ** 2).sum(), loss.detach()
    torch_loop(opt, n, step_loss, **kw)
    atol = 1e-6 * lr * epochs * -(-n // bs)
    torch.testing.assert_close(head.weight.detach(), w.detach(), rtol=1e-5, atol=atol)
    torch.testing.assert_close(head.bias.detach(), b.detach(), rtol=1e-5, atol=atol)
    free, _ = fit(x, y, c, init=init, **kw)
    assert (head.weight - w0).norm() < 0.9 * (free.weight - w0).norm()


# ---- regression --------------------------------------------------------------------------------------------

def linear_data(n, d, k, gen, noise=0.3, scale=1.0, offset=0.0):
    """Features with unequal scales and a non-zero mean; targets a noisy linear function of them."""
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.5, 2.0, d) + 0.5
    w = torch.randn(k, d, generator=torch.Generator().manual_seed(99))
    y = (x @ w.t() + noise * torch.randn(n, k, generator=gen)) * scale + offset
    return x, y


def ridge(x, y, alpha, w0=None, beta=0.0):
    """argmin ||Xc W^T - Yc||^2 + alpha ||W||^2 + beta ||W - w0||^2, the bias free, in float64."""
    x, y = x.double(), y.double().reshape(x.shape[0], -1)
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    rhs = xc.t() @ yc + (0 if w0 is None else beta * w0.double().t())
    w = torch.linalg.solve(xc.t() @ xc + (alpha + beta) * torch.eye(x.shape[1], dtype=torch.float64), rhs).t()
    return w, ym - w @ xm


def r2_score(pred, y):
    """scikit-learn's r2_score, multioutput="uniform_average"."""
    pred, y = pred.double().reshape(y.shape[0], -1), y.double().reshape(y.shape[0], -1)
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return float((1 - ss_res / ss_tot).mean())


def reference_regression(x, y, *, epochs, lr, weight_decay, batch_size, schedule, seed, init=None, l2sp=0.0):
    """The documented objective, trained the documented way with torch's ops: targets standardised per
    output (population std), W and b from zeros (or init, standardised), torch.optim.AdamW without
    decay on mean((x W^T + b - y_std)^2) + weight_decay ||W||^2 + l2sp ||W - W0||^2. Returns the head in
    the targets' units and the epochs' losses (mean squared error in the targets' units)."""
    n, d = x.shape
    y2 = y.reshape(n, -1).float()
    mean, std = y2.double().mean(0), y2.double().std(0, correction=0)
    ys = ((y2.double() - mean) / std).float()
    var = std.square().float()
    if init is None:
        w0, b0 = torch.zeros(y2.shape[1], d), torch.zeros(y2.shape[1])
    else:
        w0 = (init.weight.detach().double() / std[:, None]).float()
        b0 = ((init.bias.detach().double() - mean) / std).float()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=0.0, foreach=False)

    def step_loss(idx):
        r = x[idx].float() @ w.t() + b - ys[idx]
        objective = (r ** 2).mean() + weight_decay * (w ** 2).sum() + l2sp * ((w - w0) ** 2).sum()
        return objective, ((r.detach() ** 2) * var).mean()
    losses = torch_loop(opt, n, step_loss, epochs=epochs, lr=lr, batch_size=batch_size, schedule=schedule, seed=seed)
    return (w.detach() * std.float()[:, None]), (b.detach() * std.float() + mean.float()), losses


@pytest.mark.parametrize("k,batch_size,schedule,l2sp", [(1, 64, "cosine", 0.0), (3, 50, "onecycle", 0.0),
                                                        (2, 128, "constant", 0.3)],
                         ids=["1-D", "multi-output", "init-l2sp"])
def test_regression_matches_torch_loop(k, batch_size, schedule, l2sp, gen):
    """Mini-batches, step for step: fit_head(task="regression") is the torch loop on the documented
    objective (weight_decay as lambda ||W||^2 in the loss, l2sp toward init's weight)."""
    n, d, lr, wd, epochs = 301, 9, 3e-2, 0.05, 3
    x, y = linear_data(n, d, k, gen, scale=5.0, offset=-2.0)
    if k == 1:
        y = y[:, 0]
    init = torch.nn.Linear(d, k) if l2sp else None
    kw = dict(epochs=epochs, lr=lr, weight_decay=wd, batch_size=batch_size, schedule=schedule, seed=3)
    head, hist = fit(x, y, task="regression", init=init, l2sp=l2sp, **kw)
    w, b, losses = reference_regression(x, y, init=init, l2sp=l2sp, **kw)
    atol = 1e-5 * lr * epochs * -(-n // batch_size) * 5.0  # the targets' scale
    torch.testing.assert_close(head.weight.detach(), w, rtol=1e-5, atol=atol)
    torch.testing.assert_close(head.bias.detach(), b, rtol=1e-5, atol=atol)
    torch.testing.assert_close(torch.tensor(hist.train_loss), torch.tensor(losses), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_regression_converges_to_ridge(k, gen):
    """Full batch, cosine to zero over 600 epochs: the gradient path's head is the ridge solution
    (X^T X + lambda N k I)^-1 X^T y with the bias free (Xc, Yc centred) to 1e-5 of max|W|, where
    weight_decay = lambda. Another mapping (lambda, lambda N k / 2, lambda N) lands elsewhere;
    solver="closed_form" gives the same head to float32 rounding."""
    n, d, lam = 300, 10, 0.05
    x, y = linear_data(n, d, k, gen, offset=4.0)
    if k == 1:
        y = y[:, 0]
    w, b = ridge(x, y, lam * n * k)
    head, hist = fit(x, y, task="regression", weight_decay=lam, epochs=600, lr=0.05, batch_size=n, seed=0)
    err = lambda h, w, b: max(float((h.weight.detach().double() - w).abs().max() / w.abs().max()),  # noqa: E731
                              float((h.bias.detach().double() - b).abs().max() / b.abs().max()))
    assert err(head, w, b) < 1e-5
    for alpha in [lam, lam * n * k / 2] + ([lam * n] if k > 1 else []):
        assert err(head, *ridge(x, y, alpha)) > 1e-3
    exact, ehist = fit(x, y, task="regression", weight_decay=lam, solver="closed_form")
    assert err(exact, w, b) < 1e-6
    assert len(ehist.train_loss) == 1 and ehist.train_loss[0] == pytest.approx(hist.train_loss[-1], rel=1e-4)


def test_regression_l2sp_converges_to_its_minimiser(gen):
    """weight_decay and l2sp together (one anchor in the kernel): full batch, the gradient path and
    solver="closed_form" reach argmin MSE + wd ||W||^2 + l2sp ||W - W0||^2."""
    n, d, k, wd, lam = 200, 6, 2, 0.02, 0.3
    x, y = linear_data(n, d, k, gen)
    init = torch.nn.Linear(d, k)
    with torch.no_grad():
        init.weight.mul_(5)
    w, b = ridge(x, y, wd * n * k, init.weight.detach(), lam * n * k)
    for kw in (dict(epochs=600, lr=0.05, batch_size=n, seed=0), dict(solver="closed_form")):
        head, _ = fit(x, y, task="regression", weight_decay=wd, init=init, l2sp=lam, **kw)
        assert float((head.weight.detach().double() - w).abs().max() / w.abs().max()) < 1e-5, kw
        assert float((head.bias.detach().double() - b).abs().max() / b.abs().max()) < 1e-5, kw
    plain = ridge(x, y, wd * n * k)[0]
    assert float((plain - w).abs().max() / w.abs().max()) > 1e-2  # the pull shows


def test_regression_head_history_and_units(gen):
    """Targets in large units: the head predicts in them (an nn.Linear(D, k); 1-D labels give (N,)
    predictions), and the history's losses and R^2 are the returned head's on the data (mean squared
    error in the targets' units, R^2 per output averaged)."""
    x, y = linear_data(2000, 8, 2, gen, scale=1000.0, offset=5e4)
    vx, vy = linear_data(500, 8, 2, gen, scale=1000.0, offset=5e4)
    head, hist = fit(x, y, task="regression", val=(vx, vy), epochs=30, lr=3e-2, weight_decay=0.0, seed=1)
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (8, 2)
    assert set(hist) >= {"train_loss", "val_loss", "train_r2", "val_r2", "lr", "time"} and hist.task == "regression"
    assert "train_acc" not in hist
    with torch.no_grad():
        pred = head(vx)
    assert pred.shape == vy.shape
    assert hist.val_loss[-1] == pytest.approx(float(((pred.double() - vy.double()) ** 2).mean()), rel=1e-4)
    assert hist.val_r2[-1] == pytest.approx(r2_score(pred, vy), abs=1e-5)
    assert hist.val_r2[-1] > 0.95 and hist.train_r2[-1] > 0.95
    plain = torch.nn.Linear(8, 2)
    plain.load_state_dict(head.state_dict())
    torch.testing.assert_close(plain(vx), pred)
    one, h1 = fit(x, y[:, 0], task="regression", val=(vx, vy[:, 0]), epochs=2, lr=3e-2, seed=1)
    assert one.out_features == 1 and one(vx).shape == (500,) and one.predict(vx).shape == (500,)
    assert not one.predict(vx).requires_grad


def test_regression_early_stopping_and_half_features(gen):
    x, y = linear_data(40, 64, 1, gen, noise=3.0)
    vx, vy = linear_data(200, 64, 1, gen, noise=3.0)
    kw = dict(task="regression", weight_decay=0.0, lr=3e-2, batch_size=8, schedule="constant", seed=4)
    head, hist = fit(x, y, val=(vx, vy), epochs=80, early_stopping=3, **kw)
    best = hist.best_epoch
    assert best is not None and len(hist.train_loss) == best + 3
    with torch.no_grad():
        assert float(((head(vx) - vy) ** 2).mean()) == pytest.approx(hist.val_loss[best - 1], rel=1e-4)
    again, _ = fit(x, y, epochs=best, **kw)
    assert torch.equal(head.weight, again.weight) and torch.equal(head.bias, again.bias)
    half, _ = fit(x.bfloat16(), y, epochs=3, **kw)
    same, _ = fit(x.bfloat16().float(), y, epochs=3, **kw)
    assert torch.equal(half.weight, same.weight)


# ---- pairwise (reward head) --------------------------------------------------------------------------------

def preference_data(n, d, gen, noise=0.5):
    """Pairs (chosen, rejected) ranked by a hidden linear score plus noise."""
    a, b = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    u = torch.randn(d, generator=torch.Generator().manual_seed(77))
    swap = (a @ u + noise * torch.randn(n, generator=gen)) < (b @ u)
    chosen = torch.where(swap[:, None], b, a)
    rejected = torch.where(swap[:, None], a, b)
    return chosen, rejected


def reference_pairwise(c, r, margin, *, epochs, lr, weight_decay, batch_size, schedule, seed, center=None,
                       init=None):
    """torch's ops: r(x) = x w^T + b from zeros (or init), tltorch.losses.reward_loss + weight_decay
    ||w||^2, torch.optim.AdamW without decay; the bias trained only with centring (the loss cannot see
    it)."""
    n, d = c.shape
    w = torch.zeros(1, d) if init is None else init.weight.detach().clone()
    b = torch.zeros(1) if init is None else init.bias.detach().clone()
    w.requires_grad_()
    b.requires_grad_(center is not None)
    opt = torch.optim.AdamW([w, b] if center is not None else [w], lr=lr, weight_decay=0.0, foreach=False)

    def step_loss(idx):
        loss, _ = tltorch.losses.reward_loss((c[idx] @ w.t() + b)[:, 0], (r[idx] @ w.t() + b)[:, 0],
                                             None if margin is None else margin[idx], center)
        return loss + weight_decay * (w ** 2).sum(), loss.detach()
    losses = torch_loop(opt, n, step_loss, epochs=epochs, lr=lr, batch_size=batch_size, schedule=schedule, seed=seed)
    return w.detach(), b.detach(), losses


@pytest.mark.parametrize("margin,center", [(False, None), (True, 0.01)], ids=["plain", "margin-centring"])
def test_pairwise_matches_torch_loop(margin, center, gen):
    """fit_head((chosen, rejected), margins, task="pairwise"): tltorch.losses.reward_loss with its
    margins and centring plus weight_decay ||w||^2, step for step with a torch loop; without centring
    the bias stays 0. (With centring the run starts from a random head: from zeros the bias's first
    gradient is 0 up to rounding, which Adam turns into a step of lr in an arbitrary direction.)"""
    n, d, lr, wd, epochs, bs = 257, 7, 3e-2, 0.05, 3, 64
    c, r = preference_data(n, d, gen)
    m = torch.rand(n, generator=gen) if margin else None
    init = torch.nn.Linear(d, 1) if center else None
    kw = dict(epochs=epochs, lr=lr, weight_decay=wd, batch_size=bs, schedule="cosine", seed=5)
    head, hist = fit((c, r), m, task="pairwise", center_rewards_coefficient=center, init=init, **kw)
    w, b, losses = reference_pairwise(c, r, m, center=center, init=init, **kw)
    atol = 1e-6 * lr * epochs * -(-n // bs)
    torch.testing.assert_close(head.weight.detach(), w, rtol=1e-5, atol=atol)
    torch.testing.assert_close(head.bias.detach(), b, rtol=1e-5, atol=atol)
    if center is None:
        assert float(head.bias.detach()) == 0.0
    torch.testing.assert_close(torch.tensor(hist.train_loss), torch.tensor(losses), rtol=1e-5, atol=1e-6)


def test_pairwise_accuracy_index_pairs_and_history(gen):
    """Separable preferences: pairwise accuracy near 1 on held-out pairs, recorded as the returned
    head's (r_chosen > r_rejected); rewards of shape (N,). The same pairs given as rows and (P, 2) index
    pairs train the same head, bit for bit, under torch.no_grad too."""
    c, r = preference_data(3000, 16, gen, noise=0.1)
    vc, vr = preference_data(600, 16, gen, noise=0.1)
    kw = dict(task="pairwise", epochs=10, lr=1e-2, seed=2)
    head, hist = fit((c, r), None, val=((vc, vr), None), **kw)
    with torch.no_grad():
        rc, rr = head(vc), head(vr)
    assert rc.shape == (600,) and hist.task == "pairwise"
    assert hist.val_acc[-1] == pytest.approx(float((rc > rr).float().mean()))
    assert hist.val_loss[-1] == pytest.approx(float(-F.logsigmoid(rc - rr).mean()), rel=1e-5)
    assert hist.val_acc[-1] > 0.9 and hist.train_acc[-1] > 0.9
    assert hist.train_loss[-1] < hist.train_loss[0]
    rows = torch.cat([c, r])
    pairs = torch.stack([torch.arange(3000), torch.arange(3000, 6000)], 1)
    vrows = torch.cat([vc, vr])
    vpairs = torch.stack([torch.arange(600), torch.arange(600, 1200)], 1)
    with torch.no_grad():  # the rewards' gradient is taken inside, whatever the caller's grad mode
        same, shist = fit(rows, pairs, val=(vrows, vpairs), **kw)
    assert torch.equal(same.weight, head.weight) and shist.val_acc == hist.val_acc


def test_history_plot_regression_and_pairwise(gen):
    """The metric panel names the task's metric on its axis and in its legends."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    x, y = linear_data(80, 4, 1, gen)
    _, hist = fit(x, y[:, 0], task="regression", val=(x[:20], y[:20, 0]), epochs=2)
    c, r = preference_data(80, 4, gen)
    _, phist = fit((c, r), None, task="pairwise", val=((c[:20], r[:20]), None), epochs=2)
    for h, loss_words, metric_words, legend in (
            (hist, "mean squared error", "R²",
             ["train R² (up to 8192 training rows)", "validation R² (held-out split)"]),
            (phist, "-log sigmoid(r_chosen - r_rejected)", "r_chosen > r_rejected",
             ["train accuracy (up to 8192 training pairs)", "validation accuracy (held-out split)"])):
        fig = h.plot()
        try:
            loss_ax, metric_ax = fig.axes
            assert loss_words in loss_ax.get_ylabel() and metric_words in metric_ax.get_ylabel()
            assert loss_ax.get_xlabel() == metric_ax.get_xlabel() == "epoch"
            assert _legend_texts(metric_ax) == legend
        finally:
            plt.close(fig)


def test_task_bad_arguments(gen):
    x, y = linear_data(30, 4, 2, gen)
    c, r = preference_data(30, 4, gen)
    cls_y = torch.randint(0, 3, (30,), generator=gen)
    cases = [
        (dict(task="ranking"), ValueError, "task"),
        (dict(labels=y[:, 0].long(), task="regression"), TypeError, "labels must be floating point"),
        (dict(labels=y[:, 0], task="classification"), TypeError, "task='regression'"),
        (dict(labels=y[:29], task="regression"), ValueError, "labels"),
        (dict(labels=y[:, :, None], task="regression"), ValueError, "labels"),
        (dict(labels=torch.full((30,), float("nan")), task="regression"), ValueError, "NaN"),
        (dict(features=torch.where(torch.arange(30)[:, None] == 0, float("-inf"), x), task="regression"), ValueError,
         "features hold a NaN or an infinity \\(row 0\\)"),
        (dict(features=(c, torch.where(torch.arange(30)[:, None] == 29, float("nan"), r)), labels=None,
              task="pairwise"), ValueError, "rejected features hold a NaN"),
        (dict(task="regression", num_classes=3), ValueError, "num_classes"),
        (dict(task="regression", class_weight=[1.0, 2.0]), ValueError, "class_weight"),
        (dict(task="regression", label_smoothing=0.1), ValueError, "label_smoothing"),
        (dict(task="regression", val=(x, y[:, 0])), ValueError, "val"),
        (dict(task="regression", solver="lbfgs"), ValueError, "solver"),
        (dict(labels=cls_y, solver="closed_form"), ValueError, "solver"),
        (dict(task="regression", solver="closed_form", val=(x, y), early_stopping=2), ValueError, "early_stopping"),
        (dict(task="regression", center_rewards_coefficient=0.1), ValueError, "center_rewards_coefficient"),
        (dict(task="regression", l2sp=0.1), ValueError, "init"),
        (dict(task="regression", init=torch.nn.Linear(4, 3)), ValueError, "init"),
        (dict(task="regression", init=torch.nn.Conv1d(4, 2, 1)), TypeError, "init"),
        (dict(task="regression", init=torch.nn.Linear(4, 2), l2sp=-1.0), ValueError, "l2sp"),
        (dict(task="regression", init=torch.nn.Linear(4, 2), l2sp=float("nan")), ValueError, "l2sp"),
        (dict(features=(c, r[:, :3]), labels=None, task="pairwise"), ValueError, "chosen and rejected"),
        (dict(features=(c, r[:29]), labels=None, task="pairwise"), ValueError, "chosen and rejected"),
        (dict(features=(c, r, c), labels=None, task="pairwise"), TypeError, "features"),
        (dict(features=(c, r.long()), labels=None, task="pairwise"), TypeError, "rejected"),
        (dict(features=(c, r), labels=torch.ones(29), task="pairwise"), ValueError, "margins"),
        (dict(features=(c, r), labels=torch.ones(30, dtype=torch.long), task="pairwise"), TypeError, "margins"),
        (dict(features=c, labels=None, task="pairwise"), TypeError, "index pairs"),
        (dict(features=c, labels=torch.tensor([[0, 30]]), task="pairwise"), ValueError, "index pairs"),
        (dict(features=c, labels=torch.tensor([0, 1]), task="pairwise"), ValueError, "index pairs"),
        (dict(features=(c, r), labels=None, task="pairwise", val=((c[:, :3], r[:, :3]), None)), ValueError, "val"),
        (dict(features=(c, r), labels=None, task="pairwise", center_rewards_coefficient="0.1"), TypeError,
         "center_rewards_coefficient"),
        (dict(features=(c, r), labels=None, task="pairwise", init=torch.nn.Linear(4, 2)), ValueError, "init"),
        (dict(labels=cls_y, l2sp=0.1), ValueError, "init"),
        (dict(labels=cls_y, num_classes=3, init=torch.nn.Linear(5, 3)), ValueError, "init"),
    ]
    for changes, exc, words in cases:
        args = {"features": x, "labels": y, "epochs": 1, "progress": False, **changes}
        with pytest.raises(exc, match=words):
            tltorch.fit_head(args.pop("features"), args.pop("labels"), **args)
