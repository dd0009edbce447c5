"""fine_tune: ULMFiT / fastai-style fine-tuning of a whole model, body and head: layer groups,
discriminative learning rates, gradual unfreezing, slanted-triangular and one-cycle schedules, and the
LR range test (lr_find), on tltorch.optim.AdamW."""
import inspect
import math
import time
import warnings
from collections.abc import Mapping
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .fit import History, _pyplot
from .lora import _unwrap
from .optim import AdamW

SCHEDULES = ("slanted_triangular", "one_cycle", "constant")
UNFREEZE = ("gradual", "all")

Group = List[Tuple[str, nn.Parameter]]


# ---- schedules: fractions of each group's base learning rate, as functions of the step ----------------

def slanted_triangular(step: int, total: int, cut_frac: float = 0.1, ratio: float = 32.0) -> float:
    """ULMFiT's slanted triangular learning rate (Howard & Ruder 2018, eq. 3) as a fraction of the peak.

    With T = total steps and cut = floor(T * cut_frac):
        p = t / cut                                    for t < cut
        p = 1 - (t - cut) / (cut * (1 / cut_frac - 1))  otherwise
        lr_t / lr_max = (1 + p * (ratio - 1)) / ratio
    so the rate climbs linearly from lr_max / ratio to lr_max over the first cut_frac of the steps, then
    falls linearly back. cut is at least 1 (runs shorter than 1 / cut_frac steps warm up for one step),
    and p stops at 0: where T is not a multiple of 1 / cut_frac the paper's line reaches 0 before T.
    """
    _check_step(step, total)
    if not 0.0 < cut_frac < 1.0:
        raise ValueError(f"cut_frac must be in (0, 1), got {cut_frac!r}")
    if not ratio >= 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio!r}")
    cut = max(math.floor(total * cut_frac), 1)
    if step < cut:
        p = step / cut
    else:
        p = max(1.0 - (step - cut) / (cut * (1.0 / cut_frac - 1.0)), 0.0)
    return (1.0 + p * (ratio - 1.0)) / ratio


def one_cycle(step: int, total: int, pct_start: float = 0.25, div: float = 25.0, final_div: float = 1e5) -> float:
    """fastai's fit_one_cycle learning rate (its defaults) as a fraction of the peak.

    With pos = step / total and cos_anneal(a, b, q) = a + (b - a) * (1 - cos(pi * q)) / 2:
    cos_anneal(1 / div, 1, pos / pct_start) while pos < pct_start, then
    cos_anneal(1, 1 / final_div, (pos - pct_start) / (1 - pct_start)).
    """
    _check_step(step, total)
    if not 0.0 <= pct_start < 1.0:
        raise ValueError(f"pct_start must be in [0, 1), got {pct_start!r}")
    if not (div > 0 and final_div > 0):
        raise ValueError(f"div and final_div must be positive, got {div!r} and {final_div!r}")
    pos = step / total
    if pos < pct_start:
        return _cos_anneal(1.0 / div, 1.0, pos / pct_start)
    return _cos_anneal(1.0, 1.0 / final_div, (pos - pct_start) / (1.0 - pct_start))


def _cos_anneal(a: float, b: float, q: float) -> float:
    return a + (b - a) * (1.0 - math.cos(math.pi * q)) / 2.0


def _check_step(step, total) -> None:
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be a positive int, got {total!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total:
        raise ValueError(f"step must be an int in [0, total], got {step!r}")


def _schedule(name: str) -> Callable[[int, int], float]:
    return {"slanted_triangular": slanted_triangular, "one_cycle": one_cycle,
            "constant": lambda step, total: 1.0}[name]


# ---- layer groups --------------------------------------------------------------------------------------

def _block_lists(model: nn.Module) -> List[Tuple[str, nn.ModuleList]]:
    """The outermost nn.ModuleLists of repeated blocks (children of one type) that hold parameters."""
    found = []
    for name, m in model.named_modules():
        if any(not f or name.startswith(f + ".") for f, _ in found):
            continue
        if (isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1
                and next(m.parameters(), None) is not None):
            found.append((name, m))
    return found


def _span(lo: int, hi: int) -> str:
    return f"layer {lo}" if lo == hi else f"layers {lo}-{hi}"


def _auto_groups(model: nn.Module, n: Optional[int], arg: str = "n") -> Tuple[List[str], List[Group]]:
    """(labels, groups): [embeddings, the blocks (one group each, or n - 2 chunks), head], empty ones left out.

    The blocks are the model's one nn.ModuleList of repeated blocks; the parameters registered before it
    are the embeddings group and those after it (final norm, pooler, classifier, LM head) the head group.
    Parameters shared between modules (a tied LM head) count once, where they first appear."""
    lists = _block_lists(model)
    if len(lists) != 1:
        found = "none" if not lists else "several: " + ", ".join(repr(p or "<the model>") for p, _ in lists)
        raise ValueError(
            f"cannot tell the layer groups of {type(model).__name__}: tltorch looks for one nn.ModuleList of "
            f"repeated blocks (BERT's encoder.layer, GPT-2's h, Llama's layers, T5's encoder.block) and found "
            f"{found}; pass groups= (a list of modules or of lists of parameter names, lowest first)")
    path, blocks = lists[0]
    prefixes = [f"{path}.{i}." if path else f"{i}." for i in range(len(blocks))]
    before: Group = []
    layers: List[Group] = [[] for _ in blocks]
    after: Group = []
    for name, p in model.named_parameters():
        i = next((i for i, pre in enumerate(prefixes) if name.startswith(pre)), None)
        if i is not None:
            layers[i].append((name, p))
        else:
            (after if any(layers) else before).append((name, p))
    spans = [(i, i) for i, g in enumerate(layers) if g]
    extra = bool(before) + bool(after)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not extra + 1 <= n <= extra + len(spans):
            raise ValueError(f"{arg} must be None or an int in [{extra + 1}, {extra + len(spans)}] for "
                             f"{type(model).__name__} ({len(spans)} blocks{' + embeddings' if before else ''}"
                             f"{' + head' if after else ''}), got {n!r}")
        chunks = n - extra
        sizes = [len(spans) // chunks + (k < len(spans) % chunks) for k in range(chunks)]
        starts = [sum(sizes[:k]) for k in range(chunks)]
        spans = [(spans[s][0], spans[s + k - 1][1]) for s, k in zip(starts, sizes)]
    parts = [("embeddings", before)] + [(_span(lo, hi), sum(layers[lo:hi + 1], [])) for lo, hi in spans] + [
        ("head", after)]
    parts = [(label, g) for label, g in parts if g]
    return [label for label, _ in parts], [g for _, g in parts]


def _given_groups(model: Optional[nn.Module], groups) -> Tuple[List[str], List[Group]]:
    """groups= as the user wrote it (modules, lists of parameter names, parameters or (name, parameter)
    pairs), checked: every parameter the model's, none in two groups, no group empty."""
    if not isinstance(groups, (list, tuple)) or not groups:
        raise TypeError("groups must be a non-empty list: modules, or lists of parameter names, lowest first")
    named = dict(model.named_parameters()) if model is not None else {}
    name_of = {id(p): n for n, p in named.items()}
    module_name = {id(m): n for n, m in model.named_modules()} if model is not None else {}
    labels, out, seen = [], [], {}
    for i, g in enumerate(groups):
        if isinstance(g, nn.Module):
            items = list(g.parameters())
            labels.append(module_name.get(id(g)) or f"group {i} ({type(g).__name__})")
        elif isinstance(g, (list, tuple)):
            items = list(g)
            labels.append(f"group {i}")
        else:
            raise TypeError(f"groups[{i}] must be an nn.Module or a list of parameter names, not {type(g).__name__}")
        group: Group = []
        for j, it in enumerate(items):
            if isinstance(it, tuple) and len(it) == 2 and isinstance(it[1], torch.Tensor):
                it = it[1]  # layer_groups' (name, parameter) pairs
            if isinstance(it, str):
                if model is None:
                    raise TypeError(f"groups[{i}] names parameters; pass the model to look them up")
                if it not in named:
                    raise ValueError(f"groups[{i}] names {it!r}, which is not a parameter of the model")
                it = named[it]
            elif not isinstance(it, torch.Tensor):
                raise TypeError(f"groups[{i}][{j}] must be a parameter name or a parameter, not {type(it).__name__}")
            elif model is not None and id(it) not in name_of:
                raise ValueError(f"groups[{i}] holds a parameter that is not the model's")
            if id(it) in seen:
                if seen[id(it)] == i:
                    continue
                raise ValueError(f"groups[{seen[id(it)]}] and groups[{i}] share a parameter "
                                 f"({name_of.get(id(it), 'unnamed')}); each parameter belongs to one group")
            seen[id(it)] = i
            group.append((name_of.get(id(it), f"groups[{i}][{j}]"), it))
        if not group:
            raise ValueError(f"groups[{i}] holds no parameters")
        out.append(group)
    return labels, out


def _resolve_groups(model: nn.Module, groups) -> Tuple[List[str], List[Group]]:
    if groups is None:
        return _auto_groups(model, None)
    if isinstance(groups, int) and not isinstance(groups, bool):
        return _auto_groups(model, groups, "groups")
    return _given_groups(model, groups)


def layer_groups(model: nn.Module, n: Optional[int] = None) -> List[Group]:
    """The model's layer groups, lowest first, each a list of (parameter name, parameter).

    [embeddings, block 0, ..., block L-1, head] for models built of one nn.ModuleList of repeated blocks
    (transformers' BERT and MiniLM, GPT-2, Llama, T5's encoder, ...): the parameters registered before the
    blocks form the embeddings group, those after them (final norm, pooler, classifier, LM head) the head
    group; a group with no parameters is left out. n: the number of groups in all, the blocks split into
    n - 2 contiguous chunks (the lower chunks one block larger where they do not divide evenly). Parameters
    shared between modules (a tied LM head) count once, where they first appear (the embeddings). Other
    structures raise a ValueError: pass fine_tune(groups=...) explicitly then.
    """
    return _auto_groups(_unwrap(model), n)[1]


def freeze_to(model_or_groups, n: int) -> None:
    """fastai's freeze_to: groups[n:] train (requires_grad=True), groups[:n] are frozen.

    freeze_to(model, -1) leaves only the head trainable, freeze_to(model, -2) the head and the block below
    it, freeze_to(model, 0) everything. model_or_groups: a model (its layer_groups) or a list of groups
    (modules, lists of parameters, or layer_groups' output). n: an int in [-len(groups), len(groups) - 1].
    Sets the flags of every parameter in the groups, whatever they were (fine_tune, by contrast, never
    unfreezes a parameter that was frozen when it was called)."""
    if isinstance(model_or_groups, nn.Module):
        groups = _auto_groups(_unwrap(model_or_groups), None)[1]
    else:
        groups = _given_groups(None, model_or_groups)[1]
    k = len(groups)
    if isinstance(n, bool) or not isinstance(n, int) or not -k <= n < k:
        raise ValueError(f"n must be an int in [{-k}, {k - 1}] ({k} groups), got {n!r}")
    first = n % k
    for i, g in enumerate(groups):
        for _, p in g:
            p.requires_grad_(i >= first)


# ---- learning rates and parameter groups -------------------------------------------------------------

def _positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a positive number, got {v!r}")
    return float(v)


def _group_lrs(lr, k: int) -> List[float]:
    """One rate per group: lr, or fastai's reading of slice(lo, hi): rates in geometric progression from
    lo (the lowest group) to hi (the head); slice(hi) gives hi / 10 to every group below the head."""
    if isinstance(lr, slice):
        if lr.step is not None:
            raise ValueError(f"lr: slice(lo, hi) takes no step, got {lr!r}")
        hi = _positive("lr's hi (slice(lo, hi).stop)", lr.stop)
        if lr.start is None:
            return [hi / 10] * (k - 1) + [hi]
        lo = _positive("lr's lo (slice(lo, hi).start)", lr.start)
        if lo > hi:
            raise ValueError(f"lr: slice(lo, hi) needs lo <= hi (lo is the lowest group's rate, hi the head's), "
                             f"got {lr!r}")
        if k == 1:
            return [hi]
        return [lo] + [lo * (hi / lo) ** (i / (k - 1)) for i in range(1, k - 1)] + [hi]
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return [_positive("lr", lr)] * k
    raise TypeError(f"lr must be a float or a slice(lo, hi), not {type(lr).__name__}")


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def _decays(model: Optional[nn.Module], name: str, p: torch.Tensor) -> bool:
    """Weight decay belongs on weight matrices (and embeddings), not on biases or normalisation gains."""
    if p.dim() <= 1:
        return False
    owner = model.get_submodule(name.rpartition(".")[0]) if model is not None and "." in name else None
    return not (isinstance(owner, _NORMS) or "norm" in type(owner).__name__.lower())


def _optimizer_groups(model, labels, groups, lrs, weight_decay, keep=None) -> List[dict]:
    out = []
    for i, (label, g, lr) in enumerate(zip(labels, groups, lrs)):
        kept = [(n, p) for n, p in g if keep is None or id(p) in keep]
        decay = [p for n, p in kept if _decays(model, n, p)]
        plain = [p for n, p in kept if not _decays(model, n, p)]
        for params, wd, suffix in ((decay, weight_decay, ""), (plain, 0.0, " (no weight decay)")):
            if params:
                out.append({"params": params, "lr": lr, "initial_lr": lr, "weight_decay": wd,
                            "name": label + suffix, "layer_group": i})
    return out


def _check_weight_decay(weight_decay) -> float:
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    return float(weight_decay)


def param_groups(model: nn.Module, lr, *, groups=None, weight_decay: float = 0.01) -> List[dict]:
    """torch optimizer parameter groups with discriminative learning rates, for a loop of your own.

    Two per layer group (groups: None for layer_groups(model), an int n for layer_groups(model, n), or a
    list as fine_tune's groups=): its weight matrices and embeddings with ``weight_decay``, and its biases
    and normalisation gains (1-D parameters, and any parameter of a LayerNorm, RMSNorm, GroupNorm or
    BatchNorm or of a module whose class name says Norm) with none. lr: a float for every group, or
    slice(lo, hi) for rates in geometric progression from lo (lowest group) to hi (head). Each dict also
    carries "initial_lr" (the base rate), "name" and "layer_group" (its index). Every parameter of the
    groups is included, frozen or not, so that freeze_to can unfreeze them later."""
    m = _unwrap(model)
    labels, gs = _resolve_groups(m, groups)
    return _optimizer_groups(m, labels, gs, _group_lrs(lr, len(gs)), _check_weight_decay(weight_decay))


def _l2sp_kwargs(l2sp) -> dict:
    if isinstance(l2sp, bool) or not isinstance(l2sp, (int, float)) or not l2sp >= 0:
        raise ValueError(f"l2sp must be a number >= 0, got {l2sp!r}")
    if l2sp == 0:
        return {}
    if "l2sp" not in inspect.signature(AdamW).parameters:
        raise ValueError("l2sp needs a tltorch.optim.AdamW that takes l2sp=; this one does not (leave l2sp=0.0)")
    return {"l2sp": float(l2sp)}


# ---- data and the forward pass -----------------------------------------------------------------------

def _loader(data, name: str, batch_size: int, shuffle: bool):
    """Batches: a DataLoader or a list (or other sized, re-iterable collection) of batches as they are;
    a map-style torch Dataset wrapped in a DataLoader(batch_size, shuffle for training)."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle)
    if isinstance(data, (str, bytes, Mapping)) or not hasattr(data, "__iter__"):
        raise TypeError(f"{name} must be a DataLoader, a torch Dataset or a list of batches, "
                        f"not {type(data).__name__}")
    try:
        n = len(data)
    except TypeError:
        raise TypeError(f"{name} must have a len() and be iterable more than once (a DataLoader, a Dataset or "
                        f"a list of batches, not a generator): the schedule needs the number of steps") from None
    if n == 0:
        raise ValueError(f"{name} is empty")
    return data


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def _cross_entropy(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def _step_loss(model, batch, loss_fn, device, name: str):
    """(loss, logits or None, labels or None) of one batch: a dict of the model's keyword arguments
    (labels under "labels") or an (inputs, labels) pair, inputs a tensor or a dict."""
    if isinstance(batch, Mapping):
        kwargs = _to(dict(batch), device)
        labels = kwargs.get("labels")
        if loss_fn is not None:
            if labels is None:
                raise ValueError(f"{name}: loss_fn needs labels; dict batches must hold them under 'labels'")
            del kwargs["labels"]
        out = model(**kwargs)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, labels = _to(batch[0], device), _to(batch[1], device)
        out = model(**x) if isinstance(x, Mapping) else model(x)
    else:
        raise TypeError(f"{name}: a batch must be a dict (the model's keyword arguments, labels under 'labels') or "
                        f"an (inputs, labels) pair, got {type(batch).__name__}")
    loss = None
    if isinstance(out, torch.Tensor):
        logits = out
    elif isinstance(out, (tuple, list)):  # return_dict=False: (loss, logits, ...) when labels were passed
        loss, logits = (out[0], out[1]) if out[0].dim() == 0 and len(out) > 1 else (None, out[0])
    else:
        logits = getattr(out, "logits", None) if not isinstance(out, Mapping) else out.get("logits")
        loss = getattr(out, "loss", None) if not isinstance(out, Mapping) else out.get("loss")
    if loss_fn is not None:
        loss = loss_fn(logits, labels)
    elif loss is None:
        if labels is None or logits is None:
            raise ValueError(f"{name}: the model returned no loss and the batch has no labels: put 'labels' in dict "
                             "batches, or pass (inputs, labels) pairs (loss_fn, default cross-entropy)")
        loss = _cross_entropy(logits, labels)
    return loss, logits, labels


def _rows(labels) -> int:
    return labels.shape[0] if isinstance(labels, torch.Tensor) and labels.dim() else 1


def _correct(logits, labels, per_token: bool) -> Tuple[int, int]:
    """(correct, counted) for classifier outputs: (B, C) logits and (B,) labels, or with per_token (B, ...,
    C) and (B, ...) (token classification), -100 ignored."""
    if not (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor) and logits.dim() >= 2
            and logits.dim() == labels.dim() + 1 and logits.shape[:-1] == labels.shape
            and (logits.dim() == 2 or per_token)):
        return 0, 0
    mask = labels != -100
    return int((logits.argmax(-1)[mask] == labels[mask]).sum()), int(mask.sum())


@torch.no_grad()
def _evaluate(model, data, loss_fn, device) -> Tuple[float, float]:
    """Mean loss (batches weighted by their rows) and accuracy (nan unless classifier outputs)."""
    loss_sum = rows = correct = counted = 0
    # per-token accuracy for token classifiers, not for language models (their labels are shifted inside)
    inner = _unwrap(model)
    per_token = not (callable(getattr(inner, "can_generate", None)) and inner.can_generate())
    for batch in data:
        loss, logits, labels = _step_loss(model, batch, loss_fn, device, "val")
        r = _rows(labels)
        loss_sum += float(loss) * r
        rows += r
        c, k = _correct(logits, labels, per_token)
        correct += c
        counted += k
    return loss_sum / max(rows, 1), (correct / counted if counted else float("nan"))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("model has no parameters")
    return p.device


class _Restore:
    """Puts back, on exit, the flags (requires_grad) and train/eval modes the model had on entry, and
    with weights=True its parameters, buffers and gradients too, bit for bit."""

    def __init__(self, model: nn.Module, weights: bool = False):
        self.model, self.weights = model, weights

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.modes = [(m, m.training) for m in self.model.modules()]
        if self.weights:
            self.tensors = [(t, t.detach().clone()) for t in list(self.model.parameters()) + list(self.model.buffers())]
            # copies: backward accumulates into an existing .grad in place
            self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in self.model.parameters()]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            if self.weights:
                for t, saved in self.tensors:
                    t.copy_(saved)
                for p, g in self.grads:
                    p.grad = g
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for m, mode in self.modes:
            m.training = mode
        return False


# ---- fine_tune -----------------------------------------------------------------------------------------

class FineTuneHistory(History):
    """fine_tune's records: per epoch "train_loss" (mean over the epoch's batches, weighted by their rows),
    "val_loss", "val_acc" (with val: after the epoch, in eval mode; accuracy for classifier outputs, per
    token for token classifiers (labels -100 ignored), else nan), "lr" (each group's rate at the epoch's
    last step), "trainable_groups" (how many groups, from the head down, trained) and "time" (seconds
    since the start); per step "step_lr" (each group's rate);
    "groups" (the groups' names) and "base_lr" (each group's base rate). ``plot()`` draws them."""

    def plot(self, path: Optional[str] = None, title: Optional[str] = None):
        """Loss per epoch (training and validation), validation accuracy per epoch (when there is any),
        and each group's learning rate per step (log scale). Saved to `path` when given; returns the figure."""
        plt = _pyplot("FineTuneHistory.plot", path, title)
        with_acc = any(a == a for a in self["val_acc"])
        fig, axes = plt.subplots(1, 3 if with_acc else 2, figsize=(15 if with_acc else 10, 4.6), layout="constrained")
        epochs = range(1, len(self["train_loss"]) + 1)
        axes[0].plot(epochs, self["train_loss"], marker=".", label="train loss (mean over the epoch's batches)")
        if self["val_loss"]:
            axes[0].plot(epochs, self["val_loss"], marker=".", label="validation loss (after the epoch)")
        axes[0].set(title="loss", xlabel="epoch", ylabel="loss")
        if with_acc:
            axes[1].plot(epochs, self["val_acc"], marker=".", label="validation accuracy")
            axes[1].set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (fraction correct)")
        ax = axes[-1]
        steps = range(len(self["step_lr"]))
        for i, name in enumerate(self["groups"]):
            ax.plot(steps, [r[i] for r in self["step_lr"]], lw=1, label=name)
        ax.set(title="learning rate per group", xlabel="step", ylabel="learning rate", yscale="log")
        for a in axes:
            a.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False,
                     ncols=2 if a is ax and len(self["groups"]) > 6 else 1)
        if title is not None:
            fig.suptitle(title)
        if path is not None:
            fig.savefig(path)
        return fig


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def fine_tune(model: nn.Module, train, val=None, *, epochs: int, lr, groups=None,
              unfreeze: Union[str, int] = "gradual", schedule: str = "slanted_triangular",
              weight_decay: float = 0.01, loss_fn: Optional[Callable] = None, batch_size: int = 32,
              l2sp: float = 0.0, progress: bool = True) -> FineTuneHistory:
    """Fine-tune a model's body and head as ULMFiT / fastai do; returns a FineTuneHistory.

    groups: None (layer_groups(model): embeddings, each block, head), an int n (layer_groups(model, n)),
    or a list of modules or of lists of parameter names, lowest first; parameters in no group do not train.
    lr: slice(lo, hi), discriminative rates in geometric progression from lo (lowest group) to hi (head),
    or a float for every group (no default: run lr_find). unfreeze: "gradual" trains the head alone in the
    first epoch and one more group from the top each epoch after; "all" trains every group from the
    start; an int n trains the last n groups throughout. schedule: "slanted_triangular" (ULMFiT's,
    cut_frac 0.1, ratio 32), "one_cycle" (fastai's fit_one_cycle: pct_start 0.25, div 25, final_div 1e5)
    or "constant", over all the run's steps, as a factor on each group's rate. weight_decay: decoupled
    (AdamW), on weight matrices and embeddings, not on biases and normalisation gains.
    The optimizer is tltorch.optim.AdamW (betas (0.9, 0.999)); l2sp is passed to it when it takes one.

    train / val: a DataLoader, a list of batches, or a map-style torch Dataset (wrapped in a DataLoader of
    batch_size, train shuffled); for a Hugging Face dataset, pass a DataLoader with a collator. A batch is a
    dict of the model's keyword arguments (tokenizer outputs) with "labels", whose loss the model returns
    (transformers' .loss), or an (inputs, labels) pair, inputs a tensor or a dict, scored by
    loss_fn(logits, labels) (default: cross-entropy over the last dimension; given, it also replaces a dict
    batch's model loss). Logits are the output itself, its .logits, or its first element. Batches go to the
    device of the model's parameters.

    Only parameters that require grad when fine_tune is called ever train: those already frozen
    (tltorch.freeze, add_lora's base weights) stay frozen, so LoRA adapters or a compact body fine-tune the
    same way. On return, or on an error, every requires_grad flag and train/eval mode is as it was.
    """
    m = _unwrap(model)
    _check_int("epochs", epochs)
    _check_int("batch_size", batch_size)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(unfreeze, str) and unfreeze in UNFREEZE) and (isinstance(unfreeze, bool)
                                                                     or not isinstance(unfreeze, int)):
        raise ValueError(f"unfreeze must be 'gradual', 'all' or a number of groups, got {unfreeze!r}")
    weight_decay = _check_weight_decay(weight_decay)
    extra = _l2sp_kwargs(l2sp)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, not {type(loss_fn).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, not {type(progress).__name__}")
    labels, gs = _resolve_groups(m, groups)
    k = len(gs)
    if isinstance(unfreeze, int) and not 1 <= unfreeze <= k:
        raise ValueError(f"unfreeze must be in [1, {k}] ({k} groups: {', '.join(labels)}), got {unfreeze}")
    lrs = _group_lrs(lr, k)
    train = _loader(train, "train", batch_size, True)
    if val is not None:
        val = _loader(val, "val", batch_size, False)
    device = _device(m)

    trainable = {id(p) for g in gs for _, p in g if p.requires_grad}
    live = [any(id(p) in trainable for _, p in g) for g in gs]
    first_k = 1 if unfreeze == "gradual" else k if unfreeze == "all" else unfreeze
    if not any(live[k - first_k:]):
        raise ValueError(f"nothing would train: the last {first_k} group(s) ({', '.join(labels[k - first_k:])}) "
                         "hold no parameter that requires grad")
    if not all(live):
        warnings.warn(f"groups {[name for name, ok in zip(labels, live) if not ok]} hold no parameter that requires grad "
                      "and stay frozen (fine_tune trains only what was trainable when it was called)", stacklevel=2)
    opt = AdamW(_optimizer_groups(m, labels, gs, lrs, weight_decay, trainable), **extra)
    factor = _schedule(schedule)
    total = epochs * len(train)
    history = FineTuneHistory(train_loss=[], val_loss=[], val_acc=[], lr=[], trainable_groups=[], time=[],
                              step_lr=[], groups=list(labels), base_lr=list(lrs), best_epoch=None)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, desc="fine_tune", unit="epoch")
    step = 0
    t0 = time.perf_counter()
    with _Restore(m):
        try:
            opt.zero_grad(set_to_none=True)  # gradients left from before would join the first step's
            for epoch in range(epochs):
                n_train = k if unfreeze == "all" else min(epoch + 1, k) if unfreeze == "gradual" else unfreeze
                for p in m.parameters():
                    p.requires_grad_(False)
                for g in gs[k - n_train:]:
                    for _, p in g:
                        p.requires_grad_(id(p) in trainable)
                m.train()
                loss_sum = rows = 0
                seen = False
                for batch in train:
                    f = factor(min(step, total), total)
                    for pg in opt.param_groups:
                        pg["lr"] = pg["initial_lr"] * f
                    loss, _, y = _step_loss(model, batch, loss_fn, device, "train")
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    history["step_lr"].append([r * f for r in lrs])
                    loss_sum += float(loss.detach()) * _rows(y)
                    rows += _rows(y)
                    step += 1
                    seen = True
                if not seen:
                    raise ValueError(f"train yielded no batches in epoch {epoch + 1}: pass a collection that can be "
                                     "iterated again (a DataLoader or a list), not an iterator")
                history["train_loss"].append(loss_sum / rows)
                history["lr"].append(list(history["step_lr"][-1]))
                history["trainable_groups"].append(n_train)
                if val is not None:
                    m.eval()
                    vl, va = _evaluate(model, val, loss_fn, device)
                    history["val_loss"].append(vl)
                    history["val_acc"].append(va)
                history["time"].append(time.perf_counter() - t0)
                if bar is not None:
                    post = {"loss": f"{history['train_loss'][-1]:.4f}", "groups": n_train}
                    if val is not None:
                        post.update(val_loss=f"{history['val_loss'][-1]:.4f}", val_acc=f"{history['val_acc'][-1]:.3f}")
                    bar.set_postfix(post)
                    bar.update(1)
        finally:
            opt.zero_grad(set_to_none=True)
            if bar is not None:
                bar.close()
    return history


# ---- lr_find -------------------------------------------------------------------------------------------

class LRFinder(dict):
    """lr_find's result: "lrs" (the rate of each step), "losses" (the smoothed training loss after it),
    "raw_losses", "lr_steep" (the rate where the smoothed loss falls fastest against log lr),
    "lr_min" (the rate of the lowest smoothed loss, divided by 10) and "suggestion" (= lr_steep, the
    steepest descent), also readable as attributes. ``plot()`` draws the curve."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def plot(self, path: Optional[str] = None, title: Optional[str] = None):
        """The smoothed loss against the learning rate (log scale), with lr_steep and lr_min marked.
        Saved to `path` when given; returns the figure."""
        plt = _pyplot("LRFinder.plot", path, title)
        fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
        ax.plot(self["lrs"], self["losses"], label="training loss (smoothed, beta 0.98)")
        for key, style, what in (("lr_steep", "--", "steepest descent (the suggestion)"),
                                 ("lr_min", ":", "lowest loss / 10")):
            if self[key] == self[key]:
                ax.axvline(self[key], color="k", ls=style, lw=1, label=f"{what}: {self[key]:.2e}")
        ax.set(xscale="log", xlabel="learning rate (log scale)", ylabel="training loss",
               title=title if title is not None else "learning rate range test")
        ax.legend(fontsize="small")
        if path is not None:
            fig.savefig(path)
        return fig


def _suggest(lrs: Sequence[float], losses: Sequence[float]) -> Tuple[float, float]:
    """fastai's (lr_min / 10, lr_steep) over the points past the first tenth and before the last five."""
    n = len(lrs)
    lo, hi = (n // 10, n - 5) if n - 5 - n // 10 >= 3 else (0, n)
    lr, ls = lrs[lo:hi], losses[lo:hi]
    if len(lr) < 2:
        return float("nan"), float("nan")
    lr_min = lr[min(range(len(ls)), key=ls.__getitem__)] / 10
    slopes = [(ls[i + 1] - ls[i]) / (math.log(lr[i + 1]) - math.log(lr[i])) for i in range(len(lr) - 1)]
    return lr_min, lr[min(range(len(slopes)), key=slopes.__getitem__)]


def lr_find(model: nn.Module, train, loss_fn: Optional[Callable] = None, start_lr: float = 1e-7,
            end_lr: float = 10.0, num_it: int = 100, *, unfreeze: Union[str, int] = "all", groups=None,
            weight_decay: float = 0.01, stop_div: bool = True, batch_size: int = 32,
            progress: bool = True) -> LRFinder:
    """fastai's learning rate range test; the model is left exactly as it was. Returns an LRFinder.

    Trains for up to num_it steps (cycling through train) with one rate for every group, rising
    exponentially: step i uses start_lr * (end_lr / start_lr) ** (i / num_it). The loss is smoothed as
    fastai smooths it (an exponential moving average, beta 0.98, debiased), and with stop_div the test
    stops once it exceeds 4x its lowest value or is not finite. The suggestion is the steepest descent of
    the smoothed loss against log lr (fastai's lr_steep); lr_min (the lowest loss's rate / 10) is there
    too. unfreeze: "all" tests every parameter that requires grad, an int n only those of the last n layer
    groups (groups as in fine_tune), e.g. 1 for the head's rate. train, loss_fn, weight_decay, batch_size: as
    in fine_tune. Afterwards every parameter and buffer is restored bit for bit, with its gradient,
    requires_grad flag and train/eval mode.
    """
    m = _unwrap(model)
    start_lr, end_lr = _positive("start_lr", start_lr), _positive("end_lr", end_lr)
    if start_lr >= end_lr:
        raise ValueError(f"start_lr must be below end_lr, got {start_lr} and {end_lr}")
    _check_int("num_it", num_it, 2)
    _check_int("batch_size", batch_size)
    weight_decay = _check_weight_decay(weight_decay)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, not {type(loss_fn).__name__}")
    if unfreeze == "all":
        labels, gs = ["all"], [[(n, p) for n, p in m.named_parameters()]]
    elif isinstance(unfreeze, int) and not isinstance(unfreeze, bool):
        labels, gs = _resolve_groups(m, groups)
        if not 1 <= unfreeze <= len(gs):
            raise ValueError(f"unfreeze must be in [1, {len(gs)}] ({len(gs)} groups), got {unfreeze}")
        labels, gs = labels[-unfreeze:], gs[-unfreeze:]
    else:
        raise ValueError(f"unfreeze must be 'all' or a number of groups, got {unfreeze!r}")
    train = _loader(train, "train", batch_size, True)
    device = _device(m)
    trainable = {id(p) for g in gs for _, p in g if p.requires_grad}
    if not trainable:
        raise ValueError("nothing to test: no parameter in the chosen groups requires grad")
    opt = AdamW(_optimizer_groups(m, labels, gs, [start_lr] * len(gs), weight_decay, trainable))
    result = LRFinder(lrs=[], losses=[], raw_losses=[])
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=num_it, desc="lr_find", unit="step")
    avg, best = 0.0, math.inf
    with _Restore(m, weights=True):
        try:
            for p in m.parameters():
                p.requires_grad_(id(p) in trainable)
                p.grad = None
            m.train()
            batches = iter(train)
            for i in range(num_it):
                lr = start_lr * (end_lr / start_lr) ** (i / num_it)
                for pg in opt.param_groups:
                    pg["lr"] = lr
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(train)
                    batch = next(batches, None)
                    if batch is None:
                        raise ValueError("train yielded no batches the second time: pass a DataLoader or a list, "
                                         "not an iterator") from None
                loss = _step_loss(model, batch, loss_fn, device, "train")[0]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                raw = float(loss.detach())
                avg = 0.98 * avg + 0.02 * raw
                smooth = avg / (1 - 0.98 ** (i + 1))
                result["lrs"].append(lr)
                result["raw_losses"].append(raw)
                result["losses"].append(smooth)
                if bar is not None:
                    bar.update(1)
                if stop_div and not (smooth <= 4 * best):
                    break
                best = min(best, smooth)
        finally:
            if bar is not None:
                bar.close()
    result["lr_min"], result["lr_steep"] = _suggest(result["lrs"], result["losses"])
    result["suggestion"] = result["lr_steep"]
    return result
