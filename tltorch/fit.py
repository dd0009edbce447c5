"""fit_head: train a classifier head on extracted features, with the fused head and the fused AdamW."""
import copy
import math
import time
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops
from .functional import check_label_smoothing
from .nn.head import LinearCrossEntropy

SCHEDULES = ("constant", "cosine", "onecycle")
_ACC_SAMPLE = 8192  # training rows whose accuracy is reported each epoch


class History(dict):
    """Per-epoch records of fit_head: lists under "train_loss", "train_acc", "val_loss", "val_acc", "lr"
    (at the epoch's end) and "time" (seconds since the start), also readable as attributes; "best_epoch"
    (with early stopping: the epoch whose weights the head kept). ``plot()`` draws the curves."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def plot(self, path: Optional[str] = None, title: Optional[str] = None):
        """Loss and accuracy per epoch in two panels: the training curves and, when fit_head had
        validation data, the validation ones (the held-out rows, scored after each epoch); with early
        stopping, the epoch kept. `title` heads the figure (say what was trained on what). Saved to
        `path` when given. Needs matplotlib (an optional dependency). Returns the figure."""
        if title is not None and not isinstance(title, str):
            raise TypeError(f"title must be a str or None, not {type(title).__name__}")
        try:
            import matplotlib
            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("History.plot needs matplotlib: pip install matplotlib") from e
        epochs = range(1, len(self["train_loss"]) + 1)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
        ax1.plot(epochs, self["train_loss"], marker=".", label="train loss (mean over the epoch's batches)")
        ax2.plot(epochs, self["train_acc"], marker=".", label=f"train accuracy (up to {_ACC_SAMPLE} training rows)")
        if self["val_loss"]:
            ax1.plot(epochs, self["val_loss"], marker=".", label="validation loss (held-out split)")
            ax2.plot(epochs, self["val_acc"], marker=".", label="validation accuracy (held-out split)")
        if self.get("best_epoch") is not None:
            for ax in (ax1, ax2):
                ax.axvline(self["best_epoch"], color="k", ls=":", lw=1, label="epoch kept (lowest validation loss)")
        ax1.set(title="loss", xlabel="epoch", ylabel="cross-entropy loss")
        ax2.set(title="accuracy", xlabel="epoch", ylabel="accuracy (fraction correct)")
        for ax in (ax1, ax2):  # below the panel, where it hides no curve
            ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        if title is not None:
            fig.suptitle(title)
        if path is not None:
            fig.savefig(path)
        return fig


def _lr_factor(schedule: str, step: int, total: int) -> float:
    t = step / max(total, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "onecycle":  # torch's OneCycleLR defaults: 30% warm-up from lr/25, cosine to lr/25e4
        lo, end, warm = 1 / 25, 1 / 25e4, 0.3
        if t < warm:
            return lo + (1 - lo) * 0.5 * (1 - math.cos(math.pi * t / warm))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (1 - warm)))
    return 1.0


@torch.no_grad()
def _evaluate(head: LinearCrossEntropy, x: Tensor, y: Tensor, chunk: int = 16384) -> Tuple[float, float]:
    """Mean loss (with the head's options) and accuracy over (x, y), in chunks of rows."""
    loss_sum = 0.0
    weight_sum = 0.0
    correct = 0
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk].to(head.weight.dtype)
        yb = y[i:i + chunk]
        loss_sum += float(ops.linear_cross_entropy(xb, head.weight, yb, head.bias, head.class_weight,
                                                   head.ignore_index, head.label_smoothing, 1))
        weight_sum += float(yb.numel() if head.class_weight is None else head.class_weight[yb].sum())
        correct += int((head.logits(xb).argmax(-1) == yb).sum())
    n = x.shape[0]
    return (loss_sum / weight_sum if weight_sum else float("nan")), (correct / n if n else float("nan"))


def _as_pair(name: str, val):
    if not (isinstance(val, Sequence) and len(val) == 2):
        raise TypeError(f"{name} must be a (features, labels) pair")
    return val[0], val[1]


def _check_xy(name: str, x, y) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: features and labels must be torch.Tensors")
    if x.dim() != 2:
        raise ValueError(f"{name}: features must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: features must be floating point, got {x.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: labels must be 1-D with one label per row ({x.shape[0]}), got shape "
                         f"{tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name}: labels must be integer class indices, got {y.dtype}")


def fit_head(features: Tensor, labels: Tensor, num_classes: Optional[int] = None, *, val=None, epochs: int = 20,
             lr: float = 1e-3, weight_decay: float = 1e-2, batch_size: int = 256, schedule: str = "cosine",
             label_smoothing: float = 0.0, class_weight=None, early_stopping: Optional[int] = None, device=None,
             progress: bool = True, seed: Optional[int] = None):
    """Train a linear classifier head on fixed features; returns ``(head, history)``.

    The head is a ``tltorch.nn.LinearCrossEntropy(D, num_classes)`` (float32), trained with AdamW on
    shuffled mini-batches. Each step is three kernel calls and no autograd graph: the fused
    linear + cross-entropy kernel gives the loss and the head's gradients in one pass, and the fused
    AdamW kernel (``tltorch.optim.AdamW``'s) updates the weight and the bias. ``weight_decay`` applies to the
    weight only (the regularisation term of the classic logistic-regression loss), not the bias.

    features: (N, D) float tensor (float16/bfloat16 caches are widened per batch); labels: (N,) class
    indices in [0, num_classes) (num_classes defaults to labels.max() + 1). val: optional
    (features, labels) pair evaluated after every epoch. schedule: "constant", "cosine" (to zero over
    all steps) or "onecycle" (torch's OneCycleLR shape, peak lr). early_stopping: None or a patience in
    epochs: training stops when the validation loss has not improved for that many epochs and the head
    keeps the best epoch's weights (needs val). class_weight: None or (num_classes,) weights, as in
    F.cross_entropy. device: where to train (default: the features' device). seed: seeds the initial
    weights and the shuffling, so that a run repeats exactly (default: torch's global generator). On
    small datasets (a few thousand rows) raise lr (1e-2) or epochs: 20 epochs of batch 256 are few steps.
    The history's "train_acc" is measured on up to 8192 fixed training rows (all of them for smaller
    sets). Its "val_loss" is the validation loss as ``nn.CrossEntropyLoss(weight=class_weight,
    label_smoothing=label_smoothing)`` computes it on the head after each epoch: with class weights, the
    weighted sum over the rows divided by the sum of their target classes' weights.
    """
    _check_xy("features/labels", features, labels)
    if val is not None:
        vx, vy = _as_pair("val", val)
        _check_xy("val", vx, vy)
        if vx.shape[1] != features.shape[1]:
            raise ValueError(f"val features have {vx.shape[1]} columns but features have {features.shape[1]}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    label_smoothing = check_label_smoothing(label_smoothing)
    if early_stopping is not None:
        if isinstance(early_stopping, bool) or not isinstance(early_stopping, int) or early_stopping < 1:
            raise ValueError(f"early_stopping must be None or a patience >= 1 (epochs), got {early_stopping!r}")
        if val is None:
            raise ValueError("early_stopping needs validation data (val=(features, labels))")
    n, d = features.shape
    if n == 0:
        raise ValueError("features has no rows")
    device = torch.device(device) if device is not None else features.device
    x = features.to(device)
    y = labels.to(device=device, dtype=torch.int64)
    if num_classes is None:
        num_classes = int(y.max()) + 1
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]")
    if val is not None:
        vx = vx.to(device)
        vy = vy.to(device=device, dtype=torch.int64)
        if vy.numel() and (vy.min() < 0 or vy.max() >= num_classes):
            raise ValueError(f"val labels must be in [0, {num_classes})")

    def make_head():
        return LinearCrossEntropy(d, num_classes, label_smoothing=label_smoothing, class_weight=class_weight,
                                  device=device)
    if seed is None:
        head = make_head()
    else:  # the initial weights too, not only the shuffling; torch's global generator left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = make_head()
    w, b = head.weight, head.bias
    # tltorch.optim.AdamW's update, called directly: the optimizer class's per-step bookkeeping would
    # cost more than the kernels on small heads.
    states = [(w, torch.zeros_like(w, dtype=torch.float32), torch.zeros_like(w, dtype=torch.float32), weight_decay),
              (b, torch.zeros_like(b, dtype=torch.float32), torch.zeros_like(b, dtype=torch.float32), 0.0)]
    betas, eps = (0.9, 0.999), 1e-8
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
    acc_idx = torch.randperm(n, generator=gen)[:_ACC_SAMPLE].to(device) if n > _ACC_SAMPLE else None
    acc_x = x if acc_idx is None else x[acc_idx]
    acc_y = y if acc_idx is None else y[acc_idx]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    history = History(train_loss=[], train_acc=[], val_loss=[], val_acc=[], lr=[], time=[], best_epoch=None)
    best = (math.inf, None)
    bad_epochs = 0
    cw = head.class_weight
    red = 0  # mean
    step = 0
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, desc="fit_head", unit="epoch")
    try:
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            loss_sum = 0.0
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                xb = x[idx]
                if xb.dtype is not w.dtype:
                    xb = xb.to(w.dtype)
                yb = y[idx]
                # one pass: the loss and the head's gradients, no logits kept, no autograd graph
                loss, (_, dw, db) = ops.xent(xb, w.detach(), yb, b.detach(), cw, -100, label_smoothing, red,
                                             None, True, False, True, True)
                step_lr = lr * _lr_factor(schedule, step, total)
                step += 1
                for (p, m, v, wd), g in zip(states, (dw, db)):
                    ops.adamw_(p, g, m, v, step_lr, betas[0], betas[1], eps, wd, step)
                loss_sum += float(loss) * idx.numel()
            history["train_loss"].append(loss_sum / n)
            history["train_acc"].append(_evaluate(head, acc_x, acc_y)[1])
            history["lr"].append(step_lr)
            if val is not None:
                vl, va = _evaluate(head, vx, vy)
                history["val_loss"].append(vl)
                history["val_acc"].append(va)
            history["time"].append(time.perf_counter() - t0)
            if bar is not None:
                post = {"loss": f"{history['train_loss'][-1]:.4f}", "acc": f"{history['train_acc'][-1]:.3f}"}
                if val is not None:
                    post.update(val_loss=f"{history['val_loss'][-1]:.4f}", val_acc=f"{history['val_acc'][-1]:.3f}")
                bar.set_postfix(post)
                bar.update(1)
            if early_stopping is not None:
                if history["val_loss"][-1] < best[0]:
                    best = (history["val_loss"][-1], copy.deepcopy(head.state_dict()))
                    history["best_epoch"] = epoch + 1
                    bad_epochs = 0
                else:
                    bad_epochs += 1
                    if bad_epochs >= early_stopping:
                        break
    finally:
        if bar is not None:
            bar.close()
    if early_stopping is not None and best[1] is not None:
        head.load_state_dict(best[1])
    return head, history
