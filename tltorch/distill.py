"""distill: a smaller student trained from a frozen teacher through the fused distillation loss
(tltorch.losses.linear_distillation_loss); make_student: a student of the teacher's family initialised
from every k-th of its layers, as DistilBERT was."""
import copy
import hashlib
import inspect
import io
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ._io import atomic_write
from .cache import CacheError, StaleCacheWarning, _hash_body, _hash_inputs
from .extract import _batches, _caller, _split, _to
from .finetune import SCHEDULES, _Restore, _block_lists, _check_int, _check_weight_decay, _decays, _positive, \
    _pyplot, _schedule
from .fit import History
from .functional import _check_positive, linear_cross_entropy
from .losses import DIVERGENCES, _check_number, linear_distillation_loss
from .optim import AdamW

__all__ = ["distill", "make_student", "DistillHistory"]

IGNORE_INDEX = -100  # transformers' label for "not a target" (padding, unmasked MLM positions)


# ---- make_student --------------------------------------------------------------------------------------

def kept_layers(num_layers: int, of: int) -> List[int]:
    """The teacher layers make_student keeps: `num_layers` of `of`, evenly spaced, the first and the last
    among them, i.e. round(i (of - 1) / (num_layers - 1)) for i = 0 .. num_layers - 1 (halves rounded
    up); 12 -> 6 gives [0, 2, 4, 7, 9, 11], the layers DistilBERT was initialised from. One layer: [0]."""
    if num_layers == 1:
        return [0]
    return [math.floor(i * (of - 1) / (num_layers - 1) + 0.5) for i in range(num_layers)]


def make_student(teacher: nn.Module, num_layers: Optional[int] = None, *, layers: Optional[Sequence[int]] = None
                 ) -> nn.Module:
    """A student of the teacher's class with fewer layers, initialised from the teacher's weights.

    The student is ``type(teacher)(config)`` for a copy of teacher.config with num_hidden_layers (GPT-2's
    n_layer) set to the number of layers kept (and a per-layer list such as layer_types cut to them),
    then loaded with the teacher's state: embeddings, final norm, pooler and heads as they are, and its
    layer i from the teacher's layer layers[i], bit for bit, in the teacher's dtype and on its device.
    num_layers: how many to keep, chosen by kept_layers (evenly spaced, the first and the last among
    them: 12 -> 6 keeps 0, 2, 4, 7, 9, 11, as DistilBERT); or layers: the teacher layers to keep, in
    increasing order. The teacher's layers are its one nn.ModuleList of blocks (GPT-2's transformer.h,
    Llama's model.layers, BERT's bert.encoder.layer), as tltorch.layer_groups finds them. The teacher is
    not changed; it must be a plain transformers model (not frozen or with adapters: their modules are not
    the class's own).
    """
    if not isinstance(teacher, nn.Module) or not hasattr(teacher, "config"):
        raise TypeError(f"teacher must be a transformers model (an nn.Module with a .config), not "
                        f"{type(teacher).__name__}")
    lists = _block_lists(teacher)
    if len(lists) != 1:
        raise ValueError(f"teacher: cannot tell the layers of {type(teacher).__name__}: make_student looks for "
                         f"one nn.ModuleList of repeated blocks and found {len(lists)}")
    path, blocks = lists[0]
    count = len(blocks)
    if (num_layers is None) == (layers is None):
        raise ValueError("give num_layers (how many layers to keep) or layers (which ones), not both")
    if layers is None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= count:
            raise ValueError(f"num_layers must be an int in [1, {count}] (the teacher has {count} layers), "
                             f"got {num_layers!r}")
        kept = kept_layers(num_layers, count)
    else:
        kept = list(layers) if isinstance(layers, (list, tuple, range)) else None
        if (not kept or any(isinstance(i, bool) or not isinstance(i, int) for i in kept)
                or any(b <= a for a, b in zip(kept, kept[1:])) or kept[0] < 0 or kept[-1] >= count):
            raise ValueError(f"layers must be a non-empty increasing list of layer indices in [0, {count}), got "
                             f"{layers!r}")
    config = copy.deepcopy(teacher.config)
    if not hasattr(config, "num_hidden_layers"):
        raise TypeError(f"teacher's config ({type(config).__name__}) has no num_hidden_layers")
    config.num_hidden_layers = len(kept)
    for name, value in vars(config).items():  # per-layer settings (layer_types, ...) follow their layers
        if "layer" in name and isinstance(value, list) and len(value) == count:
            setattr(config, name, [value[i] for i in kept])
    ref = next((p for p in teacher.parameters() if p.is_floating_point()), None)
    student = type(teacher)(config)
    for name, child in list(student.named_children()):  # a part the teacher was built without (BertModel's
        if child is not None and getattr(teacher, name, child) is None:  # pooler, add_pooling_layer=False)
            setattr(student, name, None)
    if ref is not None:
        student.to(device=ref.device, dtype=ref.dtype)
    where = {old: new for new, old in enumerate(kept)}
    prefix = f"{path}."
    state = {}
    for name, t in teacher.state_dict().items():
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if int(index) in where:
                state[f"{prefix}{where[int(index)]}.{rest}"] = t
        else:
            state[name] = t
    student.load_state_dict(state, strict=True)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.train(teacher.training)


# ---- the two models' outputs --------------------------------------------------------------------------

class _Captured(BaseException):
    """Raised by the pre-hook on a language model's vocabulary head once its input is taken: the forward
    stops there, so the B x T x V logits are never computed. (A BaseException, so that no `except
    Exception` inside the model catches it.)"""


def _lm_head(model: nn.Module) -> Optional[nn.Linear]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


def _task(model, name: str) -> str:
    """"clm" (a causal LM), "mlm" (a masked LM) or "classifier" (anything else: (B, C) logits)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, not {type(model).__name__}")
    if _lm_head(model) is None:
        return "classifier"
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        raise ValueError(f"{name} ({type(model).__name__}) soft-caps its logits, which distill does not model")
    return "mlm" if type(model).__name__.endswith("ForMaskedLM") else "clm"


def _call(model: nn.Module, inputs):
    if not isinstance(inputs, Mapping):
        return model(inputs)
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs = {**inputs, "use_cache": False}
    return _caller(model)(inputs)


def _lm_hidden(model: nn.Module, head: nn.Linear, inputs) -> Tensor:
    """The hidden states the model's vocabulary head is given (B, T, D): after the final norm (GPT-2,
    Llama) or the MLM head's transform (BERT)."""
    box = []

    def grab(module, args):
        box.append(args[0])
        raise _Captured

    handle = head.register_forward_pre_hook(grab)
    try:
        _call(model, inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"{type(model).__name__}'s forward did not reach its output embeddings")
    return box[0]


def _logits(out, name: str) -> Tensor:
    z = out
    if not isinstance(z, Tensor):
        z = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", None)
    if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
        raise TypeError(f"{name} must return class logits (batch, classes): a tensor, a tuple whose first "
                        f"element is one, or an output with .logits; got "
                        f"{tuple(z.shape) if isinstance(z, Tensor) else type(out).__name__}")
    return z


def _weights(linear: nn.Linear, grad: bool):
    """(weight, bias) of a head; detached where no gradient is wanted, since tltorch's fused losses compute
    the gradients in the forward pass for every input that requires grad."""
    w, b = linear.weight, linear.bias
    return (w, b) if grad else (w.detach(), None if b is None else b.detach())


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Batch:
    """One batch: inputs (a dict for language models), labels, and for language models the positions
    that count (a bool mask over the hidden states' (B, T)) and their targets (n,)."""

    def __init__(self, batch, task: str, where: str):
        inputs, labels = _split(batch)
        if task != "classifier":
            if isinstance(inputs, Tensor):
                inputs = {"input_ids": inputs}
            ids = inputs.get("input_ids")
            if not isinstance(ids, Tensor) or ids.dim() != 2:
                raise ValueError(f"{where}: a language model's batch needs input_ids of shape (batch, tokens)")
            if labels is not None and (not isinstance(labels, Tensor) or labels.shape != ids.shape):
                raise ValueError(f"{where}: labels must have input_ids' shape {tuple(ids.shape)}")
            if task == "clm":  # the state at position j predicts token j + 1
                mask = inputs.get("attention_mask")
                if labels is None and isinstance(mask, Tensor):  # neither end of a pair may be padding
                    real = mask != 0
                    labels = ids.masked_fill(~real, IGNORE_INDEX)
                    self.targets = labels[:, 1:].masked_fill(~real[:, :-1], IGNORE_INDEX)
                else:
                    self.targets = (ids if labels is None else labels)[:, 1:]
            else:
                if labels is None:
                    raise ValueError(f"{where}: a masked LM's batches need labels (the original tokens at the "
                                     f"masked positions, {IGNORE_INDEX} elsewhere), as transformers' "
                                     "DataCollatorForLanguageModeling makes them")
                self.targets = labels
            self.keep = self.targets != IGNORE_INDEX
        elif labels is not None and (not isinstance(labels, Tensor) or labels.dim() != 1):
            raise ValueError(f"{where}: a classifier's labels must be a 1-D tensor of class indices")
        self.inputs, self.labels, self.task = inputs, labels, task

    def digest(self) -> str:
        parts = dict(self.inputs) if isinstance(self.inputs, Mapping) else {"inputs": self.inputs}
        if self.labels is not None:
            parts["labels"] = self.labels
        return _hash_inputs(parts)

    def lm_rows(self, hidden: Tensor) -> Tensor:
        """hidden's rows at the counted positions (n, D), in row-major order."""
        h = hidden[:, :-1] if self.task == "clm" else hidden
        return h[self.keep.to(h.device)]


# ---- the teacher's cache -------------------------------------------------------------------------------

_CACHE_FORMAT = 1
_MANIFEST = "manifest.json"
_BATCH_FILE = re.compile(r"^[0-9a-f]{32}\.npy$")


class _TeacherCache:
    """cache_teacher's directory: one .npy file per batch, named by the hash of the batch's inputs and
    labels, and manifest.json: {"format", "fingerprint" (the teacher's hash, the task, the stored dtype),
    "batches": {input hash: {"nbytes", "checksum"}}}. A file is written (atomically) before the manifest
    names it, and the manifest is rewritten (atomically) after each pass over the data."""

    def __init__(self, path, fingerprint: dict):
        self.dir = os.fspath(path)
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise ValueError(f"cache_teacher {self.dir!r} exists and is not a directory")
        os.makedirs(self.dir, exist_ok=True)
        self.fp, self.entries, self.dirty, self.writable, self.warned = fingerprint, {}, False, True, False
        man = None
        try:
            with open(os.path.join(self.dir, _MANIFEST), "rb") as f:
                man = json.loads(f.read())
        except FileNotFoundError:
            pass
        except ValueError as e:
            raise CacheError(f"cache_teacher manifest in {self.dir!r} is unreadable ({e}); delete the directory "
                             "to rebuild the cache") from None
        if man is not None:
            if isinstance(man, dict) and man.get("format") == _CACHE_FORMAT and man.get("fingerprint") == fingerprint:
                batches = man.get("batches")
                if not (isinstance(batches, dict) and all(
                        isinstance(v, dict) and isinstance(v.get("nbytes"), int) and isinstance(v.get("checksum"), str)
                        and _BATCH_FILE.match(k + ".npy") for k, v in batches.items())):
                    raise CacheError(f"cache_teacher manifest in {self.dir!r} is damaged; delete the directory to "
                                     "rebuild the cache")
                self.entries = batches
            else:
                warnings.warn(f"cache_teacher {self.dir!r} holds another teacher's outputs (or another task's, or "
                              "another format's); rebuilding it", StaleCacheWarning, stacklevel=3)
                self.dirty = True
        for name in os.listdir(self.dir):  # a stale cache's files, or a killed run's
            if (_BATCH_FILE.match(name) and name[:-4] not in self.entries) or ".tmp-" in name:
                os.unlink(os.path.join(self.dir, name))

    def get(self, digest: str) -> Optional[Tensor]:
        rec = self.entries.get(digest)
        if rec is None:
            return None
        path = os.path.join(self.dir, digest + ".npy")
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            blob = b""
        if len(blob) != rec["nbytes"] or hashlib.blake2b(blob, digest_size=16).hexdigest() != rec["checksum"]:
            raise CacheError(f"cache_teacher file {path!r} is missing, truncated or corrupt; delete the directory "
                             f"{self.dir!r} to rebuild the cache")
        return torch.from_numpy(np.load(io.BytesIO(blob), allow_pickle=False))

    def put(self, digest: str, t: Tensor) -> None:
        buf = io.BytesIO()
        np.save(buf, t.cpu().numpy(), allow_pickle=False)
        blob = buf.getvalue()
        atomic_write(os.path.join(self.dir, digest + ".npy"), blob)
        self.entries[digest] = {"nbytes": len(blob), "checksum": hashlib.blake2b(blob, digest_size=16).hexdigest()}
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            man = {"format": _CACHE_FORMAT, "fingerprint": self.fp, "batches": self.entries}
            atomic_write(os.path.join(self.dir, _MANIFEST), json.dumps(man, separators=(",", ":")).encode())
            self.dirty = False


# ---- one teacher, one student -------------------------------------------------------------------------

class _Pair:
    """The teacher's side of a batch (computed or read from the cache), the student's, and the loss."""

    def __init__(self, teacher, student, task, cache_path, options):
        self.teacher, self.student, self.task, self.options = teacher, student, task, options
        self.device, self.t_device = _device(student), _device(teacher)
        self.calls = 0  # teacher forward passes
        self.covers = True  # the student's vocabulary holds the teacher's: KL(p_t || p_s) is finite
        if task != "classifier":
            self.t_head, self.s_head = _lm_head(teacher), _lm_head(student)
            self.covers = self.s_head.weight.shape[0] >= self.t_head.weight.shape[0]
        self.cache = None
        if cache_path is not None:
            # Language models: the counted tokens' final hidden states in float16 (8x finer steps than
            # bfloat16; they come out of a normalisation layer, far inside float16's range: a batch that
            # is not is stored in float32). Classifiers: the class logits in float32, fewer numbers per
            # example than a hidden state.
            stored = "float16" if task != "classifier" else "float32"
            self.cache = _TeacherCache(cache_path, {"teacher": _hash_body(teacher), "task": task, "stored": stored})

    def teacher_side(self, b: _Batch) -> Tensor:
        """(n, Dt) hidden states of the counted tokens, or (B, C) float32 logits; on the student's device."""
        digest = b.digest() if self.cache is not None else None
        out = self.cache.get(digest) if digest is not None else None
        if out is None:
            self.calls += 1
            with torch.inference_mode():
                inputs = _to(b.inputs, self.t_device)
                if self.task == "classifier":
                    out = _logits(_call(self.teacher, inputs), "teacher").float()
                else:
                    out = b.lm_rows(_lm_hidden(self.teacher, self.t_head, inputs))
                if self.cache is not None:  # every epoch then uses the stored values, rounded or not
                    if self.task != "classifier":
                        half = out.to(torch.float16)
                        out = half if torch.isfinite(half).all() or not torch.isfinite(out).all() else out.float()
                    if self.cache.writable:
                        self.cache.put(digest, out)
                    elif not self.cache.warned:
                        self.cache.warned = True
                        warnings.warn("cache_teacher: a batch unseen in the first epoch (the batches change between "
                                      "epochs: a shuffling DataLoader, random masking or augmentation); the teacher "
                                      "runs for such batches and they are not stored", stacklevel=4)
        if self.task != "classifier":
            return out.to(device=self.device, dtype=self.t_head.weight.dtype)
        return out.to(self.device)

    def student_side(self, b: _Batch) -> Tensor:
        inputs = _to(b.inputs, self.device)
        if self.task == "classifier":
            return _logits(_call(self.student, inputs), "student")
        return b.lm_rows(_lm_hidden(self.student, self.s_head, inputs))

    def targets(self, b: _Batch) -> Optional[Tensor]:
        t = b.targets[b.keep] if self.task != "classifier" else b.labels
        return None if t is None else t.to(self.device, torch.int64)

    def check_classes(self, s: Tensor, t: Tensor) -> None:
        if s.shape != t.shape:
            raise ValueError(f"student gives {tuple(s.shape)} logits where the teacher gives {tuple(t.shape)}: a "
                             "classifier student needs the teacher's classes (num_labels)")

    def loss(self, s: Tensor, t: Tensor, targets: Optional[Tensor], grad: bool = True, **override) -> Tensor:
        opts = {**self.options, **override}
        if self.task == "classifier":  # (B, C) logits: the identity head, exact in any float dtype
            eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
            return linear_distillation_loss(s, eye, teacher_logits=t, targets=targets, ignore_index=IGNORE_INDEX,
                                            **opts)
        w, b = _weights(self.s_head, grad)
        return linear_distillation_loss(s, w, t, self.t_head.weight, targets=targets, student_bias=b,
                                        teacher_bias=self.t_head.bias, **opts)

    def evaluate(self, batches) -> dict:
        """Mean distillation loss, KL(p_t || p_s) at temperature 1, and the student's and the teacher's
        perplexity (language models) or accuracy (classifiers) over `batches`, the student in eval mode."""
        self.student.eval()
        sums = dict(loss=0.0, rows=0, kl=0.0, kl_rows=0, s=0.0, t=0.0, counted=0)
        for batch in batches:
            b = _Batch(batch, self.task, "val")
            t = self.teacher_side(b)
            with torch.inference_mode():
                s = self.student_side(b)
                if self.task == "classifier":
                    self.check_classes(s, t)
                y = self.targets(b)
                n = s.shape[0] if y is None else int((y != IGNORE_INDEX).sum())
                if n:
                    sums["loss"] += float(self.loss(s, t, y, grad=False)) * n
                    sums["rows"] += n
                if s.shape[0] and self.covers:
                    sums["kl"] += float(self.loss(s, t, None, grad=False, temperature=1.0, divergence="kl")) \
                        * s.shape[0]
                    sums["kl_rows"] += s.shape[0]
                if self.task != "classifier" and n:
                    for key, h, head in (("s", s, self.s_head), ("t", t, self.t_head)):
                        w, bias = _weights(head, False)
                        sums[key] += float(linear_cross_entropy(h, w, y, bias)) * n
                    sums["counted"] += n
                elif self.task == "classifier" and y is not None:
                    real = y != IGNORE_INDEX
                    sums["s"] += int((s.argmax(-1)[real] == y[real]).sum())
                    sums["t"] += int((t.argmax(-1)[real] == y[real]).sum())
                    sums["counted"] += int(real.sum())
        nan = float("nan")
        out = {"val_loss": sums["loss"] / sums["rows"] if sums["rows"] else nan,
               "val_kl": sums["kl"] / sums["kl_rows"] if sums["kl_rows"] else nan if self.covers else math.inf}
        k = sums["counted"]
        if self.task == "classifier":
            out["val_acc"], out["teacher_val_acc"] = (sums["s"] / k, sums["t"] / k) if k else (nan, nan)
        else:
            out["val_ppl"], out["teacher_val_ppl"] = (math.exp(sums["s"] / k), math.exp(sums["t"] / k)) if k \
                else (nan, nan)
        return out


# ---- distill ---------------------------------------------------------------------------------------------

class DistillHistory(History):
    """distill's records, per epoch: "train_loss" (the distillation loss, mean over the epoch's counted
    tokens or examples), "val_loss", "val_kl" (KL(p_teacher || p_student) at temperature 1, mean per
    token or example, whatever the divergence trained; inf where the student's vocabulary lacks some of
    the teacher's), "val_ppl" (language models: the student's perplexity on the targets) or "val_acc"
    (classifiers), "lr" (at the epoch's last step), "teacher_batches" (how many batches the teacher ran
    on, validation included), "time" (seconds since the start); "initial" (the val_* numbers before the
    first step), "teacher" (its val_ppl or val_acc), "task" ("clm", "mlm" or "classifier"). Also
    readable as attributes; ``plot()`` draws the curves."""

    def plot(self, path: Optional[str] = None, title: Optional[str] = None):
        """Loss per epoch (training and validation) and, with validation data, the student's KL to the
        teacher and its perplexity or accuracy (epoch 0: before distillation; the teacher's as a line).
        Saved to `path` when given; returns the figure."""
        plt = _pyplot("DistillHistory.plot", path, title)
        metric = "val_ppl" if "val_ppl" in self else "val_acc"
        panels = 3 if self["val_loss"] else 1
        fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.6), layout="constrained", squeeze=False)
        axes = axes[0]
        epochs = list(range(1, len(self["train_loss"]) + 1))
        axes[0].plot(epochs, self["train_loss"], marker=".", label="train (mean over the epoch)")
        axes[0].set(title="distillation loss", xlabel="epoch", ylabel="loss")
        if panels == 3:
            axes[0].plot(epochs, self["val_loss"], marker=".", label="validation (after the epoch)")
            start = [0] if self.get("initial") else []
            for ax, key, what in ((axes[1], "val_kl", "KL(teacher || student), T = 1"),
                                  (axes[2], metric, "perplexity" if metric == "val_ppl" else "accuracy")):
                ys = ([self["initial"][key]] if start else []) + list(self[key])
                ax.plot(start + epochs, ys, marker=".", label="student (epoch 0: before)")
                if key == metric and self.get("teacher"):
                    ax.axhline(self["teacher"][metric], color="k", ls=":", lw=1, label="teacher")
                ax.set(title=f"validation {what}", xlabel="epoch", ylabel=what)
        for ax in axes:
            ax.legend(fontsize="small")
        if title is not None:
            fig.suptitle(title)
        if path is not None:
            fig.savefig(path)
        return fig


def _batch_list(data, name: str, batch_size: int):
    """data's batches: a list (a tensor or dict of tensors cut into batch_size rows, or a list given), or a
    DataLoader / Dataset loader iterated as it is; each must be iterable again every epoch."""
    if isinstance(data, (str, bytes)) or data is None:
        raise TypeError(f"{name} must be a tensor, a dict of tensors, a list of batches, a DataLoader or a "
                        f"torch Dataset, not {type(data).__name__}")
    try:
        batches = _batches(data, batch_size)[0]
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None
    if isinstance(batches, Iterator):
        if not isinstance(data, (Tensor, Mapping)):
            raise TypeError(f"{name} must be iterable more than once (a list of batches or a DataLoader, not an "
                            "iterator)")
        batches = list(batches)
    try:
        n = len(batches)
    except TypeError:
        raise TypeError(f"{name} must have a len() (a list of batches, a DataLoader or a map-style Dataset)") from None
    if n == 0:
        raise ValueError(f"{name} holds no batches")
    return batches


def distill(teacher: nn.Module, student: nn.Module, data, *, temperature: float = 2.0, alpha: float = 0.5,
            divergence: str = "kl", beta: float = 0.5, epochs: int = 1, lr: float = 5e-4,
            weight_decay: float = 0.01, batch_size: int = 8, schedule: str = "one_cycle", shuffle: bool = True,
            cache_teacher: Union[str, os.PathLike, None] = None, val=None, progress: bool = True,
            seed: Optional[int] = 0) -> DistillHistory:
    """Train `student` to match a frozen `teacher` (knowledge distillation); returns a DistillHistory.

    Per counted token (language models) or example (classifiers), with targets y, the loss is
    tltorch.losses.linear_distillation_loss's:

        (1 - alpha) T^2 D(p_teacher^T || p_student^T) + alpha CE(student logits, y),   p^T = softmax(z / T)

    (DistilBERT's with divergence "kl"; "reverse_kl" and "jsd" (with beta) as that function has them), the
    mean over the batch's counted tokens or labelled examples; a classifier batch without labels gives the
    soft term alone, T^2 D.

    Language models (a model whose get_output_embeddings() is an nn.Linear: GPT2LMHeadModel,
    LlamaForCausalLM and other *ForCausalLM, BertForMaskedLM and other *ForMaskedLM): each model runs up to
    its vocabulary head, whose input (the final hidden states, after the last norm or the MLM head's
    transform) a forward pre-hook takes before the head runs, so neither model's B x T x V logits are ever
    computed; the loss projects the counted tokens' states through each model's head weight (and bias) a
    chunk at a time. The targets: causal LMs, the next token (the batch's labels shifted when it has
    labels, else input_ids shifted, with positions whose next token is padding left out); masked LMs, the
    batch's labels (the original token at the masked positions, -100 elsewhere: the masked positions
    count, as DistilBERT's restrict_ce_to_mask). Teacher and student may differ in width and layers and
    tokenizer-aligned vocabularies may differ in size (see linear_distillation_loss for which divergence
    allows which side); both must share a tokenizer.
    Classifiers (anything else, e.g. BertForSequenceClassification, or a body + head module of your own):
    each model's (B, C) class logits, from its output (a tensor, its first element, or .logits); teacher and
    student must have the same classes.

    data / val: a tensor of token ids (N, T), or a dict of tensors (a tokenizer's output for the whole set,
    "labels" included or not), cut into batches of batch_size rows; a list of batches; a DataLoader or a
    map-style torch Dataset. A batch is a dict of the model's keyword arguments (input_ids, attention_mask,
    ..., labels), a tensor of input_ids, or an (inputs, labels) pair. With shuffle, the batches of a list
    are visited in a new order each epoch (seeded); a DataLoader is iterated as it is.

    The teacher runs in eval mode under torch.inference_mode with every parameter's requires_grad off; it
    is never changed, and its flags and train/eval modes are restored on return (also on an error), as the
    student's are. The student trains in train mode with tltorch.optim.AdamW (weight decay on weight
    matrices and embeddings only), rate lr under `schedule` ("one_cycle", "slanted_triangular" or
    "constant", as fine_tune's) over all steps; only parameters that require grad train. seed: seeds the
    batch order and the global RNG (dropout) inside the call, leaving the caller's generator as it was;
    None takes them from the global generator.

    cache_teacher: a directory. The teacher's outputs the loss needs are computed once and stored there (a
    file per batch, named by the hash of the batch's inputs and labels; a manifest records the teacher's
    hash, so another teacher makes the cache stale: rebuilt with a StaleCacheWarning): language models'
    counted tokens' final hidden states in float16 (half the bytes of float32, 8x finer than bfloat16;
    a batch that would overflow float16 is kept in float32), classifiers' logits in float32. Epochs after
    the first, and later calls with the same teacher and data, read them and never run the teacher (the
    "cached-features trick"). It applies when every epoch shows the teacher the same batches: a tensor,
    dict or list that distill batches (their order may change), a DataLoader without shuffling, and no
    random masking (make MLM masks once) or augmentation. A batch not seen in the first epoch is given to
    the teacher and not stored, with a warning. With a cache, every epoch (the first too) uses the stored
    float16 states, so the loss does not depend on whether they came from the file.

    Errors before anything trains: an unknown divergence, a temperature <= 0, alpha or beta outside
    [0, 1], a student of another kind than the teacher (a classifier for a language model), vocabularies
    the divergence cannot bridge (forward KL needs the student's to cover the teacher's), a student that
    shares parameters with the teacher or has none to train (ValueError or TypeError naming the argument);
    a classifier student with other classes raises at the first batch, before any step.
    """
    if teacher is student:
        raise ValueError("student is the teacher itself; pass a separate model (make_student builds one)")
    task = _task(teacher, "teacher")
    s_task = _task(student, "student")
    names = {"clm": "a causal language model", "mlm": "a masked language model", "classifier": "a classifier"}
    if s_task != task:
        raise ValueError(f"student ({type(student).__name__}) is {names[s_task]} but teacher "
                         f"({type(teacher).__name__}) is {names[task]}")
    T = _check_positive("temperature", temperature)
    alpha = _check_number("alpha", alpha, 0.0, 1.0)
    beta = _check_number("beta", beta, 0.0, 1.0)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    _check_int("epochs", epochs)
    _check_int("batch_size", batch_size)
    lr = _positive("lr", lr)
    weight_decay = _check_weight_decay(weight_decay)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    for name, flag in (("shuffle", shuffle), ("progress", progress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, not {type(seed).__name__}")
    if cache_teacher is not None and not isinstance(cache_teacher, (str, os.PathLike)):
        raise TypeError(f"cache_teacher must be a directory path or None, not {type(cache_teacher).__name__}")
    if task != "classifier":
        vt, vs = _lm_head(teacher).weight.shape[0], _lm_head(student).weight.shape[0]
        kind = divergence if divergence != "jsd" or 0.0 < beta < 1.0 else ("kl" if beta == 0.0 else "reverse_kl")
        if (kind == "kl" and vt > vs) or (kind == "reverse_kl" and vs > vt):
            raise ValueError(f"student's vocabulary ({vs} tokens) and the teacher's ({vt}) cannot be bridged by "
                             f"divergence={divergence!r}" + (f" (beta {beta})" if divergence == "jsd" else "") +
                             ": forward KL needs the student's to cover the teacher's, reverse KL the teacher's "
                             "the student's; 'jsd' with 0 < beta < 1 takes either")
    shared = {p.data_ptr() for p in teacher.parameters() if p.numel()}
    if any(p.data_ptr() in shared for p in student.parameters() if p.numel()):
        raise ValueError("student shares parameters with the teacher, which must stay unchanged; give the "
                         "student its own copy (make_student copies the layers it keeps)")
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("student has no parameter that requires grad: nothing would train")
    train = _batch_list(data, "data", batch_size)
    val = _batch_list(val, "val", batch_size) if val is not None else None

    decay = [p for n, p in named if _decays(student, n, p)]
    plain = [p for n, p in named if not _decays(student, n, p)]
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (plain, 0.0)) if ps]
    opt = AdamW(groups, lr=lr)
    factor = _schedule(schedule)
    total = epochs * len(train)
    history = DistillHistory(train_loss=[], val_loss=[], val_kl=[], lr=[], teacher_batches=[], time=[],
                             initial=None, teacher=None, task=task,
                             **({"val_acc": []} if task == "classifier" else {"val_ppl": []}))
    order = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    dev = _device(student)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, desc="distill", unit="epoch")
    t0 = time.perf_counter()
    pair = None
    with _Restore(teacher), _Restore(student), \
            torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], enabled=seed is not None):
        try:
            if seed is not None:
                torch.manual_seed(seed)
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.eval()
            pair = _Pair(teacher, student, task, cache_teacher, dict(temperature=T, alpha=alpha,
                                                                      divergence=divergence, beta=beta))
            if val is not None:
                found = pair.evaluate(val)
                history["initial"] = {k: v for k, v in found.items() if not k.startswith("teacher")}
                history["teacher"] = {k[len("teacher_"):]: v for k, v in found.items() if k.startswith("teacher")}
            step = 0
            for epoch in range(epochs):
                calls = pair.calls
                student.train()
                loss_sum = rows = 0.0
                visit = torch.randperm(len(train), generator=order).tolist() if shuffle and isinstance(train, list) \
                    else None
                for batch in (train[i] for i in visit) if visit is not None else train:
                    b = _Batch(batch, task, "data")
                    t = pair.teacher_side(b)
                    s = pair.student_side(b)
                    if task == "classifier":
                        pair.check_classes(s, t)
                    y = pair.targets(b)
                    n = s.shape[0] if y is None else int((y != IGNORE_INDEX).sum())
                    f = factor(min(step, total), total)
                    step += 1
                    if not n:
                        continue
                    for g in opt.param_groups:
                        g["lr"] = lr * f
                    loss = pair.loss(s, t, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += float(loss.detach()) * n
                    rows += n
                if pair.cache is not None:
                    pair.cache.flush()
                if val is not None:
                    for k, v in pair.evaluate(val).items():
                        if not k.startswith("teacher"):
                            history[k].append(v)
                if pair.cache is not None:
                    pair.cache.flush()
                    pair.cache.writable = False
                history["train_loss"].append(loss_sum / rows if rows else float("nan"))
                history["lr"].append(lr * f)
                history["teacher_batches"].append(pair.calls - calls)
                history["time"].append(time.perf_counter() - t0)
                if bar is not None:
                    post = {"loss": f"{history['train_loss'][-1]:.4f}"}
                    if val is not None:
                        post["val_kl"] = f"{history['val_kl'][-1]:.4f}"
                    bar.set_postfix(post)
                    bar.update(1)
        finally:
            opt.zero_grad(set_to_none=True)
            if pair is not None and pair.cache is not None:
                pair.cache.flush()
            if bar is not None:
                bar.close()
    return history
