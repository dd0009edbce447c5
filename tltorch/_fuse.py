"""Inference-time fusion of a frozen layer with the activation that follows it.

In a transformer's feed-forward block (BertIntermediate: ``h = self.dense(h); h = self.intermediate_act_fn(h)``)
the activation is a second pass over the block's widest tensor. Under bfloat16 on a CPU with AVX512-BF16 a
FrozenLinear runs oneDNN's GEMM, which can apply GELU or ReLU to the float32 sums before rounding them
(FrozenLinear.forward_act): on all-MiniLM-L6-v2 at 128 tokens aten::gelu alone took 19% of the body's
time under autocast. ``fused_activations(body)`` swaps such pairs for the duration of a ``with`` block
(extract_features uses it) and puts every module back as it was on the way out.

A pair is fused only where that cannot change what the model computes: read from the module class's own
source (every class of its MRO below nn.Module), a statement ``v = self.L(...)`` directly followed by
``v = self.A(v)``, with ``self.L`` and ``self.A`` read nowhere else in the class; L a FrozenLinear, A a
GELU (torch's or transformers') or ReLU; neither carrying hooks. nn.Sequential: a FrozenLinear directly
followed by such an activation. Anything else runs as it is.
"""
import ast
import contextlib
import inspect
import textwrap
from functools import lru_cache
from typing import Optional, Tuple

from torch import Tensor, nn

from .nn.frozen import FrozenLinear


def _act_kind(act: nn.Module) -> Optional[Tuple[str, str]]:
    """(oneDNN post-op, GELU approximation) computing what `act` computes, or None."""
    t = type(act)
    if t is nn.GELU:
        return ("gelu", act.approximate)
    if t is nn.ReLU:
        return ("relu", "none")
    if not t.__module__.startswith("transformers."):
        return None
    if t.__name__ == "GELUActivation":
        return ("gelu", "none")  # F.gelu, or the same erf formula written out
    if t.__name__ in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation"):
        return ("gelu", "tanh")  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    return None


def _self_attr(node) -> Optional[str]:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


@lru_cache(maxsize=None)
def _source_pairs(cls) -> Tuple[Tuple[str, str], ...]:
    """(L, A) attribute pairs of `cls` whose source applies self.A directly and only to self.L's output."""
    trees = []
    for c in cls.__mro__:
        if c.__module__.startswith("torch.") or c is object:
            continue
        try:
            trees.append(ast.parse(textwrap.dedent(inspect.getsource(c))))
        except (OSError, TypeError, SyntaxError, IndentationError):
            return ()  # no source: nothing is known, nothing is fused
    reads = {}
    candidates = []
    for tree in trees:
        for node in ast.walk(tree):
            name = _self_attr(node)
            if name is not None and isinstance(node.ctx, ast.Load):
                reads[name] = reads.get(name, 0) + 1
            body = getattr(node, "body", None)
            if not isinstance(body, list):
                continue
            for first, second in zip(body, body[1:]):
                pair = _assigned_pair(first, second)
                if pair is not None:
                    candidates.append(pair)
    return tuple(p for p in candidates if reads.get(p[0]) == 1 and reads.get(p[1]) == 1)


def _assigned_pair(first, second) -> Optional[Tuple[str, str]]:
    """(L, A) for the statements ``v = self.L(...)`` then ``v = self.A(v)``, else None."""
    if not (isinstance(first, ast.Assign) and isinstance(second, ast.Assign)):
        return None
    if len(first.targets) != 1 or len(second.targets) != 1:
        return None
    v, w = first.targets[0], second.targets[0]
    if not (isinstance(v, ast.Name) and isinstance(w, ast.Name) and v.id == w.id):
        return None
    f, g = first.value, second.value
    if not (isinstance(f, ast.Call) and isinstance(g, ast.Call)):
        return None
    lin, act = _self_attr(f.func), _self_attr(g.func)
    if lin is None or act is None or g.keywords or len(g.args) != 1:
        return None
    arg = g.args[0]
    if not (isinstance(arg, ast.Name) and arg.id == v.id):
        return None
    return lin, act


def _hooked(m: nn.Module) -> bool:
    """Hooks a fused call would skip (freeze's keep-eval pre-hook changes nothing at inference)."""
    pre = [h for h in m._forward_pre_hooks.values() if getattr(h, "__name__", "") != "_keep_eval"]
    return bool(pre or m._forward_hooks or getattr(m, "_forward_hooks_with_kwargs", None)
                or getattr(m, "_forward_pre_hooks_with_kwargs", None) or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


class _LinearAct(nn.Module):
    """act(linear(x)), by oneDNN's fused post-op where the layer's call runs there."""

    def __init__(self, linear: FrozenLinear, act: nn.Module, kind: Tuple[str, str]):
        super().__init__()
        self.linear, self.act = linear, act
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear.forward_act(x, *self.kind)
        return self.act(self.linear(x)) if y is None else y


def _pairs(parent: nn.Module):
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        return list(zip(names, names[1:]))
    return _source_pairs(type(parent))


@contextlib.contextmanager
def fused_activations(body: nn.Module):
    """Within the block, body's (FrozenLinear, activation) pairs (see the module's docstring) run as one
    oneDNN call where they can; yields how many pairs were swapped. Inference only: outside autograd
    (a call that wants gradients runs unfused)."""
    from torch.nn.modules import module as _module
    swaps = []
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        yield 0
        return
    try:
        for parent in list(body.modules()):
            if isinstance(parent, (_LinearAct, FrozenLinear)):
                continue
            for lin_name, act_name in _pairs(parent):
                lin, act = parent._modules.get(lin_name), parent._modules.get(act_name)
                if type(lin) is not FrozenLinear or act is None or _hooked(lin) or _hooked(act):
                    continue
                kind = _act_kind(act)
                if kind is None:
                    continue
                swaps.append((parent, lin_name, lin, act_name, act))
                parent._modules[lin_name] = _LinearAct(lin, act, kind)
                parent._modules[act_name] = nn.Identity()
        yield len(swaps)
    finally:
        for parent, lin_name, lin, act_name, act in reversed(swaps):
            parent._modules[lin_name] = lin
            parent._modules[act_name] = act
