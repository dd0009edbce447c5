"""fit_head: train a linear head on extracted features with tltorch's kernels and the fused AdamW: a
classifier (cross-entropy), a regression head (mean squared error) or a pairwise reward head (the reward
model loss of tltorch.losses.reward_loss)."""
import math
import time
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import ops
from .functional import check_label_smoothing
from .losses import reward_loss
from .nn.head import LinearCrossEntropy
from .optim import _check_l2sp

SCHEDULES = ("constant", "cosine", "onecycle")
TASKS = ("classification", "regression", "pairwise")
SOLVERS = ("adamw", "closed_form")
_ACC_SAMPLE = 8192  # training rows (pairs) whose accuracy or R^2 is reported each epoch
_CHUNK = 16384  # rows per evaluation chunk
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
# Batches are gathered with index_select: on the CPU ~8x faster than x[idx] for a few hundred rows.

# Per task: the metric's key, the loss axis' label, the metric panel's title and axis label, the word the
# legends use for the metric, and what a training example is.
_PLOT = {
    "classification": ("acc", "cross-entropy loss", "accuracy", "accuracy (fraction correct)", "accuracy", "rows"),
    "regression": ("r2", "mean squared error (targets' units squared)", "R²",
                   "R² (1 - SS_res / SS_tot, mean over outputs)", "R²", "rows"),
    "pairwise": ("acc", "pairwise loss, -log sigmoid(r_chosen - r_rejected)", "pairwise accuracy",
                 "pairwise accuracy (fraction with r_chosen > r_rejected)", "accuracy", "pairs"),
}


def _pyplot(who: str, path, title):
    """matplotlib.pyplot, with a non-interactive backend when the figure goes to a file."""
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str or None, not {type(title).__name__}")
    try:
        import matplotlib
        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"{who} needs matplotlib: pip install matplotlib") from e
    return plt


class History(dict):
    """Per-epoch records of fit_head: lists under "train_loss", "val_loss", "lr" (at the epoch's end) and
    "time" (seconds since the start), and the task's metric: "train_acc", "val_acc" (classification:
    accuracy; pairwise: the fraction of pairs with r_chosen > r_rejected) or "train_r2", "val_r2"
    (regression: R^2 per output, averaged); "task"; "best_epoch" (with early stopping: the epoch whose
    weights the head kept). Also readable as attributes. ``plot()`` draws the curves."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def plot(self, path: Optional[str] = None, title: Optional[str] = None):
        """Loss and the task's metric (accuracy, R^2 or pairwise accuracy) per epoch in two panels: the
        training curves and, when fit_head had validation data, the validation ones (the held-out rows,
        scored after each epoch); with early stopping, the epoch kept. `title` heads the figure (say
        what was trained on what). Saved to `path` when given. Needs matplotlib (an optional
        dependency). Returns the figure."""
        plt = _pyplot("History.plot", path, title)
        key, loss_label, metric_title, metric_label, word, examples = _PLOT[self.get("task", "classification")]
        epochs = range(1, len(self["train_loss"]) + 1)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
        ax1.plot(epochs, self["train_loss"], marker=".", label="train loss (mean over the epoch's batches)")
        ax2.plot(epochs, self[f"train_{key}"], marker=".",
                 label=f"train {word} (up to {_ACC_SAMPLE} training {examples})")
        if self["val_loss"]:
            ax1.plot(epochs, self["val_loss"], marker=".", label="validation loss (held-out split)")
            ax2.plot(epochs, self[f"val_{key}"], marker=".", label=f"validation {word} (held-out split)")
        if self.get("best_epoch") is not None:
            for ax in (ax1, ax2):
                ax.axvline(self["best_epoch"], color="k", ls=":", lw=1, label="epoch kept (lowest validation loss)")
        ax1.set(title="loss", xlabel="epoch", ylabel=loss_label)
        ax2.set(title=metric_title, xlabel="epoch", ylabel=metric_label)
        for ax in (ax1, ax2):  # below the panel, where it hides no curve
            ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        if title is not None:
            fig.suptitle(title)
        if path is not None:
            fig.savefig(path)
        return fig


class RegressionHead(nn.Linear):
    """The head fit_head returns for task="regression" and "pairwise": an ``nn.Linear(in_features,
    out_features)`` (its state_dict loads into a plain nn.Linear) whose output drops its last dim when
    squeeze_output: a head trained on 1-D targets, or a reward head, predicts shape (N,), as the labels
    were. ``predict(x)``: the output without autograd."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, squeeze_output: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if squeeze_output and out_features != 1:
            raise ValueError(f"squeeze_output needs out_features == 1, got {out_features}")
        self.squeeze_output = bool(squeeze_output)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y.squeeze(-1) if self.squeeze_output else y

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", squeeze_output=True" if self.squeeze_output else "")


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


def _weight_grads(dout: Tensor, x: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """dW = dout^T x and db = the sum of dout's rows, by tltorch's GEMM and column sum."""
    dw = torch.empty_like(w)
    ops.gemm(dout, x, dw, None, 1.0, 0.0, 1)
    db = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
    ops.colsum(dout, db, 0.0)
    return dw, db


# ---- the tasks: each holds its data and trained tensors (w, b), gives one batch's loss and gradients, and
# ---- scores a split -------------------------------------------------------------------------------------

class _Classification:
    key = "acc"
    train_bias = True

    def __init__(self, x, y, head: LinearCrossEntropy):
        self.x, self.y, self.head, self.n = x, y, head, x.shape[0]
        self.w, self.b = head.weight, head.bias

    def subset(self, idx):
        return (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])

    def grads(self, idx):
        xb = self.x.index_select(0, idx)
        if xb.dtype is not self.w.dtype:
            xb = xb.to(self.w.dtype)
        h = self.head
        # one pass: the loss and the head's gradients, no logits kept, no autograd graph
        loss, (_, dw, db) = ops.xent(xb, self.w.detach(), self.y.index_select(0, idx), self.b.detach(),
                                     h.class_weight, -100, h.label_smoothing, 0, None, True, False, True, True)
        return loss, dw, db

    @torch.no_grad()
    def evaluate(self, data) -> Tuple[float, float]:
        """Mean loss (with the head's options) and accuracy over (x, y), in chunks of rows."""
        x, y = data
        h = self.head
        loss_sum = weight_sum = 0.0
        correct = 0
        for i in range(0, x.shape[0], _CHUNK):
            xb, yb = x[i:i + _CHUNK].to(h.weight.dtype), y[i:i + _CHUNK]
            loss_sum += float(ops.linear_cross_entropy(xb, h.weight, yb, h.bias, h.class_weight, h.ignore_index,
                                                       h.label_smoothing, 1))
            weight_sum += float(yb.numel() if h.class_weight is None else h.class_weight[yb].sum())
            correct += int((h.logits(xb).argmax(-1) == yb).sum())
        n = x.shape[0]
        return (loss_sum / weight_sum if weight_sum else float("nan")), (correct / n if n else float("nan"))

    def result(self):
        return self.head


class _Regression:
    """Trained on standardised targets (y - mean) / std per output, so that lr means the same whatever
    the targets' scale; the returned head predicts in the targets' units. The objective, per output j,
    is std_j^2 times the standardised one (the penalties included), so both have the same minimiser."""
    key = "r2"
    train_bias = True

    def __init__(self, x, y, init):
        n, d = x.shape
        self.x, self.n, self.squeeze = x, n, y.dim() == 1
        self.y = y.reshape(n, -1).float()
        yd = self.y.double()
        mean, std = yd.mean(0), yd.std(0, correction=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        self.mean, self.std, self.var = mean.float(), std.float(), std.square().float()
        self.ys = ((yd - mean) / std).float()
        k = self.y.shape[1]
        if init is None:  # zeros: the first prediction is the mean (the loss is convex; no draw needed)
            self.w = torch.zeros(k, d, device=x.device)
            self.b = torch.zeros(k, device=x.device)
        else:
            w0, b0 = init
            self.w = (w0.double() / std[:, None]).float()
            self.b = ((b0.double() - mean) / std).float()

    def subset(self, idx):
        return (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])

    def grads(self, idx):
        xb = self.x.index_select(0, idx)
        if xb.dtype is not torch.float32:
            xb = xb.float()
        r = ops.linear(xb, self.w, self.b) - self.ys.index_select(0, idx)
        loss = (r.square() * self.var).mean()  # in the targets' units
        return (loss, *_weight_grads(r * (2.0 / r.numel()), xb, self.w))

    @torch.no_grad()
    def evaluate(self, data) -> Tuple[float, float]:
        """Mean squared error over rows and outputs (targets' units), and R^2 per output, averaged (an
        output with constant targets: 1 if predicted exactly, else 0, as scikit-learn's r2_score)."""
        x, y = data
        ss_res = torch.zeros(y.shape[1], dtype=torch.float64, device=y.device)
        for i in range(0, x.shape[0], _CHUNK):
            pred = ops.linear(x[i:i + _CHUNK].float(), self.w, self.b) * self.std + self.mean
            ss_res += (pred - y[i:i + _CHUNK]).double().square().sum(0)
        if not y.numel():
            return float("nan"), float("nan")
        yd = y.double()
        ss_tot = (yd - yd.mean(0)).square().sum(0)
        r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), (ss_res == 0).double())
        return float(ss_res.sum() / y.numel()), float(r2.mean())

    def result(self):
        k, d = self.w.shape
        head = RegressionHead(d, k, squeeze_output=self.squeeze, device=self.w.device)
        with torch.no_grad():
            head.weight.copy_(self.w * self.std[:, None])
            head.bias.copy_(self.b * self.std + self.mean)
        return head


class _Pairwise:
    """Pairs as (chosen rows, map or None, rejected rows, map or None, margins or None): row i of a pair
    is rows[map[i]] (rows[i] without a map). The bias cancels in r_chosen - r_rejected: only the
    centring term sees it, so without one it is not trained (Adam would turn the rounding noise of its
    zero gradient into lr-sized steps)."""
    key = "acc"

    def __init__(self, pairs, init, center, device):
        self.pairs, self.center = pairs, center
        self.train_bias = bool(center)
        self.n = _pair_count(pairs)
        d = pairs[0].shape[1]
        if init is None:
            self.w, self.b = torch.zeros(1, d, device=device), torch.zeros(1, device=device)
        else:
            self.w, self.b = init

    def subset(self, idx):
        if idx is None:
            return self.pairs
        c, mc, r, mr, margin = self.pairs
        pick = lambda t, m: (t, m[idx]) if m is not None else (t[idx], None)  # noqa: E731
        return (*pick(c, mc), *pick(r, mr), None if margin is None else margin[idx])

    @staticmethod
    def _rows(pairs, idx):
        """The chosen rows of pairs idx, then their rejected rows, float32, and their margins."""
        c, mc, r, mr, margin = pairs
        xc = c.index_select(0, idx if mc is None else mc[idx])
        xr = r.index_select(0, idx if mr is None else mr[idx])
        return torch.cat([xc, xr]).float(), None if margin is None else margin[idx]

    def grads(self, idx):
        x2, margin = self._rows(self.pairs, idx)
        # reward_loss on the rewards (chosen, then rejected), differentiated with respect to them alone
        r = ops.linear(x2, self.w, self.b)[:, 0].requires_grad_()
        with torch.enable_grad():
            loss, _ = reward_loss(r[:idx.numel()], r[idx.numel():], margin, self.center)
            (dr,) = torch.autograd.grad(loss, r)
        return (loss.detach(), *_weight_grads(dr[:, None], x2, self.w))

    @torch.no_grad()
    def evaluate(self, pairs) -> Tuple[float, float]:
        """reward_loss's mean over the pairs (its margins and centring) and the fraction of pairs with
        r_chosen > r_rejected."""
        n = _pair_count(pairs)
        if n == 0:
            return float("nan"), float("nan")
        rc, rr = [], []
        for i in range(0, n, _CHUNK):
            x2, _ = self._rows(pairs, torch.arange(i, min(i + _CHUNK, n), device=self.w.device))
            r = ops.linear(x2, self.w, self.b)[:, 0]
            rc.append(r[:r.shape[0] // 2])
            rr.append(r[r.shape[0] // 2:])
        loss, metrics = reward_loss(torch.cat(rc), torch.cat(rr), pairs[4], self.center)
        return float(loss), float(metrics["accuracy"])

    def result(self):
        head = RegressionHead(self.w.shape[1], 1, squeeze_output=True, device=self.w.device)
        with torch.no_grad():
            head.weight.copy_(self.w)
            head.bias.copy_(self.b)
        return head


def _pair_count(pairs) -> int:
    c, mc = pairs[0], pairs[1]
    return c.shape[0] if mc is None else mc.shape[0]


# ---- argument checks ------------------------------------------------------------------------------------

def _as_pair(name: str, val):
    if not (isinstance(val, Sequence) and len(val) == 2):
        raise TypeError(f"{name} must be a (features, labels) pair")
    return val[0], val[1]


def _check_features(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, not {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    # the first row with a NaN or an infinity, in slices of rows (no mask of the features' size)
    step = max(1, (1 << 22) // max(1, x.shape[1]))
    for i in range(0, x.shape[0], step):
        bad = ~torch.isfinite(x[i:i + step]).all(1)
        if bool(bad.any()):
            row = i + int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} hold a NaN or an infinity (row {row}); a head fitted on them would be NaN")


def _check_xy(name: str, x, y) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: features and labels must be torch.Tensors")
    _check_features(f"{name}: features", x)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: labels must be 1-D with one label per row ({x.shape[0]}), got shape "
                         f"{tuple(y.shape)}")
    if y.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: labels must be integer class indices, got {y.dtype} (for float targets "
                        "use task='regression')")


def _check_targets(name: str, x, y, like=None) -> None:
    """Regression: float targets (N,) or (N, k), finite; `like`: the training targets val must match."""
    _check_features(f"{name}: features", x)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: labels must be a torch.Tensor of targets, not {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(f"{name}: labels must be floating point for task='regression' (the targets), got "
                        f"{y.dtype}; pass labels.float() if the integers are values to regress, or use "
                        "task='classification' for class indices")
    if y.dim() not in (1, 2) or y.shape[0] != x.shape[0] or (y.dim() == 2 and y.shape[1] == 0):
        raise ValueError(f"{name}: labels must be (N,) or (N, k) targets with one row per feature row "
                         f"({x.shape[0]}), got shape {tuple(y.shape)}")
    if like is not None and y.shape[1:] != like.shape[1:]:
        raise ValueError(f"{name}: labels have shape {tuple(y.shape)}; the training labels' are "
                         f"{tuple(like.shape)} (the same outputs per row)")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name}: labels contain NaN or infinite targets")


def _check_pairs(name: str, features, labels, device):
    """task='pairwise' data, moved to `device`: features a (chosen, rejected) pair of (N, D) tensors with
    labels None or (N,) margins; or (M, D) rows with labels (P, 2) index pairs (chosen row, rejected
    row). Returns the pairs as _Pairwise keeps them."""
    if isinstance(features, torch.Tensor):
        _check_features(f"{name}: features", features)
        m = features.shape[0]
        if not isinstance(labels, torch.Tensor) or labels.dtype not in _INT_DTYPES:
            raise TypeError(f"{name}: with one features tensor, task='pairwise' needs labels: (P, 2) integer "
                            "index pairs (chosen row, rejected row); or pass features as (chosen, rejected)")
        if labels.dim() != 2 or labels.shape[1] != 2:
            raise ValueError(f"{name}: labels must be (P, 2) index pairs (chosen row, rejected row), got shape "
                             f"{tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= m):
            raise ValueError(f"{name}: labels (index pairs) must be rows of features, in [0, {m}), got values "
                             f"in [{int(labels.min())}, {int(labels.max())}]")
        x = features.to(device)
        idx = labels.to(device=x.device, dtype=torch.int64)
        return (x, idx[:, 0], x, idx[:, 1], None)
    if not (isinstance(features, Sequence) and len(features) == 2):
        raise TypeError(f"{name}: features for task='pairwise' must be a (chosen, rejected) pair of (N, D) "
                        "tensors, or one (M, D) tensor with labels of (P, 2) index pairs")
    chosen, rejected = features
    _check_features(f"{name}: chosen features", chosen)
    _check_features(f"{name}: rejected features", rejected)
    if chosen.shape != rejected.shape:
        raise ValueError(f"{name}: chosen and rejected features must have the same shape (one rejected row per "
                         f"chosen row), got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or not labels.is_floating_point():
            raise TypeError(f"{name}: labels for (chosen, rejected) pairs must be None or (N,) float margins, "
                            f"got {labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.shape != (chosen.shape[0],):
            raise ValueError(f"{name}: margins (labels) must have shape ({chosen.shape[0]},), one per pair, got "
                             f"{tuple(labels.shape)}")
    chosen = chosen.to(device)
    margin = None if labels is None else labels.to(device=chosen.device, dtype=torch.float32)
    return (chosen, None, rejected.to(chosen.device), None, margin)


def _check_init(init, out: int, d: int, device) -> Optional[Tuple[Tensor, Tensor]]:
    """init's weight and bias (zeros without one), float32 copies on `device`."""
    if init is None:
        return None
    if not isinstance(init, (nn.Linear, LinearCrossEntropy)):
        raise TypeError(f"init must be an nn.Linear (or a LinearCrossEntropy) to start from, not "
                        f"{type(init).__name__}")
    w = init.weight
    if tuple(w.shape) != (out, d):
        raise ValueError(f"init has a weight of shape {tuple(w.shape)}; this head needs ({out}, {d}) "
                         "(outputs x features)")
    b = init.bias
    w = w.detach().to(device=device, dtype=torch.float32, copy=True)
    b = torch.zeros(out, device=device) if b is None else b.detach().to(device=device, dtype=torch.float32,
                                                                         copy=True)
    return w, b


def _check_number(name: str, v, least: float = 0.0, strict: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or v < least or (strict and v == least):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {least}, got {v!r}")
    return float(v)


def _ridge(task: _Regression, lam: float, l2sp: float, init) -> None:
    """The exact minimiser of fit_head's regression objective, into task.w and task.b: with the bias
    free, W^T = (Xc^T Xc + (lam + l2sp) N k I)^-1 (Xc^T Yc + l2sp N k W0^T), b = mean(y) - W mean(x)
    (Xc, Yc centred), in float64, the Gram matrix accumulated in chunks of rows."""
    x, y = task.x, task.y
    (n, d), k = x.shape, y.shape[1]
    x_mean = sum(x[i:i + _CHUNK].double().sum(0) for i in range(0, n, _CHUNK)) / n
    yd = y.double()
    y_mean = yd.mean(0)
    gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    rhs = torch.zeros(d, k, dtype=torch.float64, device=x.device)
    for i in range(0, n, _CHUNK):
        xc = x[i:i + _CHUNK].double() - x_mean
        gram += xc.T @ xc
        rhs += xc.T @ (yd[i:i + _CHUNK] - y_mean)
    scale = (lam + l2sp) * n * k
    if init is not None and l2sp:
        rhs += (l2sp * n * k) * init[0].double().T
    if scale > 0:
        wt = torch.linalg.solve(gram + scale * torch.eye(d, dtype=torch.float64, device=x.device), rhs)
    else:  # least squares: the minimum-norm solution where X is rank-deficient
        wt = torch.linalg.pinv(gram, hermitian=True) @ rhs
    bias = y_mean - x_mean @ wt
    task.w = (wt.T / task.std.double()[:, None]).float()
    task.b = ((bias - task.mean.double()) / task.std.double()).float()


def _build_task(task, features, labels, num_classes, val, device, init, seed, label_smoothing, class_weight,
                center):
    """The task's object (its data on `device`, default: the features'), the validation data in its
    form, and init's weight and bias (None without init), after the data's checks."""
    if task == "pairwise":
        pairs = _check_pairs("features/labels", features, labels, device)
        device = pairs[0].device
        vdata = None if val is None else _check_pairs("val", *_as_pair("val", val), device)
        d = pairs[0].shape[1]
        if vdata is not None and vdata[0].shape[1] != d:
            raise ValueError(f"val features have {vdata[0].shape[1]} columns but features have {d}")
        n = _pair_count(pairs)
    else:
        if task == "classification":
            _check_xy("features/labels", features, labels)
        else:
            _check_targets("features/labels", features, labels)
        if val is not None:
            vx, vy = _as_pair("val", val)
            if task == "classification":
                _check_xy("val", vx, vy)
            else:
                _check_targets("val", vx, vy, like=labels)
            if vx.shape[1] != features.shape[1]:
                raise ValueError(f"val features have {vx.shape[1]} columns but features have {features.shape[1]}")
        n, d = features.shape
        device = device or features.device
    if n == 0:
        raise ValueError("features has no rows (no pairs)" if task == "pairwise" else "features has no rows")

    if task == "classification":
        x = features.to(device)
        y = labels.to(device=device, dtype=torch.int64)
        if num_classes is None:
            num_classes = int(y.max()) + 1 if init is None else init.weight.shape[0]
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]")
        if val is not None:
            vx = vx.to(device)
            vy = vy.to(device=device, dtype=torch.int64)
            if vy.numel() and (vy.min() < 0 or vy.max() >= num_classes):
                raise ValueError(f"val labels must be in [0, {num_classes})")
        start = _check_init(init, num_classes, d, device)

        def make_head():
            return LinearCrossEntropy(d, num_classes, label_smoothing=label_smoothing, class_weight=class_weight,
                                      device=device)
        if seed is None:
            head = make_head()
        else:  # the initial weights too, not only the shuffling; torch's global generator left as it was
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = make_head()
        if start is not None:
            with torch.no_grad():
                head.weight.copy_(start[0])
                head.bias.copy_(start[1])
        t = _Classification(x, y, head)
        vdata = None if val is None else (vx, vy)
    elif task == "regression":
        y = labels.to(device)
        start = _check_init(init, 1 if labels.dim() == 1 else labels.shape[1], d, device)
        t = _Regression(features.to(device), y, start)
        vdata = None if val is None else (vx.to(device), vy.to(device=device, dtype=torch.float32).reshape(
            vx.shape[0], -1))
    else:
        start = _check_init(init, 1, d, device)
        t = _Pairwise(pairs, start, center, device)
    return t, vdata, start


def fit_head(features, labels: Optional[Tensor] = None, num_classes: Optional[int] = None, *,
             task: str = "classification", val=None, epochs: int = 20, lr: float = 1e-3, weight_decay: float = 1e-2,
             batch_size: int = 256, schedule: str = "cosine", label_smoothing: float = 0.0, class_weight=None,
             early_stopping: Optional[int] = None, device=None, progress: bool = True, seed: Optional[int] = None,
             init: Optional[nn.Module] = None, l2sp: float = 0.0, center_rewards_coefficient: Optional[float] = None,
             solver: str = "adamw"):
    """Train a linear head on fixed features; returns ``(head, history)``.

    Trained with AdamW on shuffled mini-batches, each step a few tltorch kernel calls and no autograd
    graph over the features: the head's loss and gradients, then the fused AdamW kernel
    (``tltorch.optim.AdamW``'s) on the weight and the bias. ``weight_decay`` applies to the weight only.

    task="classification" (default): features (N, D) float; labels (N,) class indices in
    [0, num_classes) (num_classes defaults to labels.max() + 1). The head is a
    ``tltorch.nn.LinearCrossEntropy(D, num_classes)``, its loss and gradients from the fused linear +
    cross-entropy kernel. weight_decay is AdamW's decoupled decay (p <- p (1 - lr wd) each step).
    class_weight: None or (num_classes,) weights, label_smoothing, as in F.cross_entropy.

    task="regression": labels float targets (N,) or (N, k). The loss is the mean squared error over rows
    and outputs plus weight_decay * ||W||^2 (in the loss: coupled), so the minimiser is ridge regression
    with the bias free: W^T = (Xc^T Xc + weight_decay * N * k * I)^-1 Xc^T Yc (Xc, Yc centred), i.e.
    scikit-learn's Ridge(alpha=weight_decay * N * k). The head is a ``RegressionHead`` (an
    nn.Linear(D, k); with 1-D labels it predicts shape (N,)), in the targets' units (training runs on
    standardised targets). solver="closed_form" solves that minimiser directly in float64 (one record in
    the history; epochs, lr, batch_size, schedule and seed unused) rather than by AdamW.

    task="pairwise" (a reward head): features a (chosen, rejected) pair of (N, D) tensors, labels None or
    (N,) float margins; or features (M, D) rows and labels (P, 2) integer index pairs (chosen row,
    rejected row). val takes the same form: ``val=((chosen, rejected), margins_or_None)`` or
    ``val=(rows, pairs)``. A scalar head r(x) = w.x + b trained with ``tltorch.losses.reward_loss(r_chosen,
    r_rejected, margin, center_rewards_coefficient)`` (TRL's RewardTrainer loss) plus weight_decay *
    ||w||^2 (coupled, as in regression); a RegressionHead(D, 1) returning rewards of shape (N,). The
    bias cancels in r_chosen - r_rejected: it stays at 0 (init's) unless center_rewards_coefficient is
    given. The accuracy recorded is the fraction of pairs with r_chosen > r_rejected.

    init: an nn.Linear (or LinearCrossEntropy) of the head's shape to start from (copied; default: a
    fresh classifier, zeros for regression and pairwise). l2sp (with init): adds l2sp * ||W - W0||^2 to
    the loss, W0 init's weight (L2-SP: a pull toward the starting head; the bias is free, as with
    weight_decay); done by the fused AdamW kernel (the gradient added before the moments).

    val: optional validation data (the training data's form) scored after every epoch. schedule:
    "constant", "cosine" (to zero over all steps) or "onecycle" (torch's OneCycleLR shape, peak lr).
    early_stopping: None or a patience in epochs: training stops when the validation loss has not
    improved for that many epochs and the head keeps the best epoch's weights (needs val). device:
    where to train (default: the features' device); float16/bfloat16 features are widened per batch.
    seed: seeds the initial weights and the shuffling, so that a run repeats exactly (default: torch's
    global generator). On small datasets (a few thousand rows) raise lr (1e-2) or epochs: 20 epochs of
    batch 256 are few steps. The history's training metric is measured on up to 8192 fixed training
    rows (pairs). Classification's "val_loss" is ``nn.CrossEntropyLoss(weight=class_weight,
    label_smoothing=label_smoothing)``'s on the head after each epoch (with class weights, the weighted
    sum divided by the sum of the rows' target classes' weights); regression's is the mean squared
    error in the targets' units; pairwise's is reward_loss's. The penalties are not part of the
    recorded losses.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "closed_form" and task != "regression":
        raise ValueError(f"solver='closed_form' is for task='regression' (ridge regression), not task={task!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    l2sp = _check_l2sp(l2sp)
    if l2sp and init is None:
        raise ValueError("l2sp pulls the weight toward a starting head: it needs init= (an nn.Linear)")
    label_smoothing = check_label_smoothing(label_smoothing)
    if task != "classification":
        for name, given in (("num_classes", num_classes is not None), ("label_smoothing", label_smoothing != 0.0),
                            ("class_weight", class_weight is not None)):
            if given:
                raise ValueError(f"{name} is for task='classification', not task={task!r}")
    if center_rewards_coefficient is not None:
        if task != "pairwise":
            raise ValueError(f"center_rewards_coefficient is for task='pairwise', not task={task!r}")
        center_rewards_coefficient = _check_number("center_rewards_coefficient", center_rewards_coefficient)
    if early_stopping is not None:
        if isinstance(early_stopping, bool) or not isinstance(early_stopping, int) or early_stopping < 1:
            raise ValueError(f"early_stopping must be None or a patience >= 1 (epochs), got {early_stopping!r}")
        if val is None:
            raise ValueError("early_stopping needs validation data (val=(features, labels))")
        if solver == "closed_form":
            raise ValueError("early_stopping has no epochs to stop with solver='closed_form'")
    device = torch.device(device) if device is not None else None
    t, vdata, start = _build_task(task, features, labels, num_classes, val, device, init, seed, label_smoothing,
                                  class_weight, center_rewards_coefficient)
    n, device = t.n, t.w.device

    history = History(train_loss=[], val_loss=[], lr=[], time=[], best_epoch=None, task=task)
    history[f"train_{t.key}"], history[f"val_{t.key}"] = [], []
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
    sample = t.subset(torch.randperm(n, generator=gen)[:_ACC_SAMPLE].to(device) if n > _ACC_SAMPLE else None)
    t0 = time.perf_counter()

    def record(train_loss, step_lr):
        history["train_loss"].append(train_loss)
        history[f"train_{t.key}"].append(t.evaluate(sample)[1])
        history["lr"].append(step_lr)
        if vdata is not None:
            vl, vm = t.evaluate(vdata)
            history["val_loss"].append(vl)
            history[f"val_{t.key}"].append(vm)
        history["time"].append(time.perf_counter() - t0)

    if solver == "closed_form":
        _ridge(t, float(weight_decay), l2sp, start)
        record(t.evaluate(t.subset(None))[0], None)
        return t.result(), history

    w, b = t.w, t.b
    # The penalties on the weight, through the kernel's L2-SP term (a strength and an anchor). w starts
    # at W0, init's weight (standardised for regression), or at zeros. Classification: weight_decay
    # decoupled (AdamW's), l2sp's pull toward W0 in the loss. Regression and pairwise: both in the loss,
    # where wd ||W||^2 + l2sp ||W - W0||^2 has the gradient 2 (wd + l2sp) (W - l2sp / (wd + l2sp) W0).
    if task == "classification":
        decoupled, pull = float(weight_decay), l2sp
        anchor = w.detach().clone() if pull else None
    else:
        decoupled, pull = 0.0, float(weight_decay) + l2sp
        anchor = w.detach() * (l2sp / pull) if pull else None
    # tltorch.optim.AdamW's update, called directly: the optimizer class's per-step bookkeeping would
    # cost more than the kernels on small heads.
    states = [(w, torch.zeros_like(w, dtype=torch.float32), torch.zeros_like(w, dtype=torch.float32), decoupled,
               anchor, pull)]
    if t.train_bias:
        states.append((b, torch.zeros_like(b), torch.zeros_like(b), 0.0, None, 0.0))
    betas, eps = (0.9, 0.999), 1e-8
    steps_per_epoch = (n + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    best = (math.inf, None)
    bad_epochs = 0
    step = 0
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
                loss, dw, db = t.grads(idx)
                step_lr = lr * _lr_factor(schedule, step, total)
                step += 1
                for (p, m, v, wd, a, pl), g in zip(states, (dw, db)):
                    ops.adamw_(p, g, m, v, step_lr, betas[0], betas[1], eps, wd, step, a, pl)
                loss_sum += float(loss) * idx.numel()
            record(loss_sum / n, step_lr)
            if bar is not None:
                post = {"loss": f"{history['train_loss'][-1]:.4f}", t.key: f"{history[f'train_{t.key}'][-1]:.3f}"}
                if vdata is not None:
                    post.update({"val_loss": f"{history['val_loss'][-1]:.4f}",
                                 f"val_{t.key}": f"{history[f'val_{t.key}'][-1]:.3f}"})
                bar.set_postfix(post)
                bar.update(1)
            if early_stopping is not None:
                if history["val_loss"][-1] < best[0]:
                    best = (history["val_loss"][-1], (w.detach().clone(), b.detach().clone()))
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
        with torch.no_grad():
            w.copy_(best[1][0])
            b.copy_(best[1][1])
    return t.result(), history

