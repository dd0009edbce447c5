"""freeze: keep a pretrained body fixed (and, optionally, compact) while something small trains."""
import fnmatch
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .nn.frozen import ACTIVATIONS, INT8_WEIGHT_GROUP, STORAGES, FrozenLinear, _check_group
from .nn.lora import LoRALinear

_BN = (nn.modules.batchnorm._BatchNorm,)


def _keep_eval(module: nn.Module, args) -> None:
    """A forward pre-hook: a frozen module runs in eval mode even after model.train() (BatchNorm uses and
    keeps its running statistics; dropout is off)."""
    module.training = False


def _matches(name: str, patterns) -> bool:
    """A module path matches a pattern that names or globs (fnmatch) it or one of its parents."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(q == p or fnmatch.fnmatchcase(q, p) for p in patterns for q in prefixes)


def freeze(model: nn.Module, *, except_: Union[str, Iterable[str]] = (), storage: Optional[str] = None,
           activations: str = "int8", group: Optional[int] = INT8_WEIGHT_GROUP) -> nn.Module:
    """Freeze `model` in place, except the submodules named in `except_`, and return it.

    Every parameter outside ``except_`` stops requiring grad, and every frozen module is put in eval mode
    and kept there (a forward pre-hook), so BatchNorm statistics stay as pretrained and dropout stays off
    even after ``model.train()``. ``except_``: module paths as ``named_modules`` gives them (``"classifier"``,
    ``"encoder.layer.11"``) or globs (``"encoder.layer.1*"``); a named module's whole subtree stays trainable.
    ``storage``: None keeps the weights as they are; "bfloat16", "float16" or "int8" also replaces each
    frozen ``nn.Linear`` by a ``tltorch.nn.FrozenLinear`` holding its weight in that form (int8: absmax
    scales per output channel and group of inputs, ``group``), which still passes gradients to its input,
    so trainable layers and adapters below it keep learning. ``activations``: with int8 storage on the CPU, "int8" quantises each
    layer's input to 8 bits too (the int8 kernel), "float" keeps it in float (FrozenLinear.activations).
    ``group``: with int8 storage, the weight's scales: one per output channel and group of ``group`` inputs
    (x is then quantised in the same groups), or None for one per channel (FrozenLinear.from_linear).
    The default, 32, keeps all-MiniLM-L6-v2's mean-pooled features at a cosine of 0.9992 to float32's
    (min over the demo's reviews) where one scale a channel gives 0.998, for 0.125 bytes a weight more.
    ``group`` applies to int8 storage only (ValueError with another storage).

    LoRA adapters (tltorch.add_lora's) keep training: their A and B keep requires_grad and their layers
    follow model.train()/eval(), while their base layers freeze like any other (and take ``storage``) and
    the modules around them stay in eval mode (the body's dropout off). A layer frozen before with another
    storage (or int8 groups or activations) is a ValueError, the model left as it was: its float weight is
    gone, so freeze a float copy of the model instead.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, not {type(model).__name__}")
    patterns = (except_,) if isinstance(except_, str) else tuple(except_)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"except_ must hold module names (str), got {type(p).__name__}")
    if storage is not None and storage not in STORAGES[1:]:
        raise ValueError(f"storage must be None, 'bfloat16', 'float16' or 'int8', got {storage!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    _check_group(group)
    if storage != "int8" and group != INT8_WEIGHT_GROUP:
        raise ValueError(f"group applies to storage='int8' only (the int8 weight's scales), got storage={storage!r} "
                         f"with group={group!r}")
    names = [n for n, _ in model.named_modules()]
    for p in patterns:
        if not any(_matches(n, (p,)) for n in names if n):
            raise ValueError(f"except_ names {p!r}, which matches no submodule of the model")

    if storage is not None:
        for name, m in model.named_modules():
            if isinstance(m, FrozenLinear) and not (name and _matches(name, patterns)) and (
                    m.storage != storage or (storage == "int8" and (m.group, m.activations) != (group, activations))):
                was = f"storage={m.storage!r}" + (f", group={m.group!r}, activations={m.activations!r}"
                                                  if m.storage == "int8" else "")
                raise ValueError(f"{name or 'the model'!r} is already frozen with {was}; its float weight is gone, "
                                 "so freeze a float copy of the model to store it otherwise")

    frozen = [(n, m) for n, m in model.named_modules() if not (n and _matches(n, patterns))]
    kept = {n for n, _ in model.named_modules() if n and _matches(n, patterns)}
    # LoRA adapters keep training: their A and B, and their own mode (the eval hook of the modules
    # around them sets those modules' flags only)
    adapters = {n for n, m in model.named_modules() if n and isinstance(m, LoRALinear)}
    for name, module in frozen:
        if name in adapters:
            continue
        # parameters directly owned by a frozen module (children are visited on their own)
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        if not any(k.startswith(name + ".") or not name for k in kept):
            module.eval()
            if not getattr(module, "_tltorch_frozen", False):
                module.register_forward_pre_hook(_keep_eval)
                module._tltorch_frozen = True
    if storage is not None:
        for name, module in list(model.named_modules()):
            # exactly nn.Linear: subclasses (MultiheadAttention's out_proj) are read by their owners
            # as plain weights
            if type(module) is not nn.Linear or (name and _matches(name, patterns)):
                continue
            if not name:
                raise ValueError("storage= needs the model to contain layers; the model itself is an nn.Linear")
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FrozenLinear.from_linear(module, storage, activations, group))
    return model
