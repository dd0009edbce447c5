"""Inference-time fusion of a frozen layer with the activation that follows it.

In a transformer's feed-forward block (BertIntermediate: ``h = self.dense(h); h = self.intermediate_act_fn(h)``)
the activation is a second pass over the block's widest tensor. Under bfloat16 on a CPU with AVX512-BF16 a
FrozenLinear runs oneDNN's GEMM, which can apply GELU or ReLU to the float32 sums before rounding them
(FrozenLinear.forward_act), once a shape recurs (see FUSE_AFTER). ``fused_activations(body)`` swaps
such pairs for the duration of a ``with`` block (extract_features uses it) and puts every module back as it
was on the way out.

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
import weakref
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


# oneDNN builds (JIT-compiles) a primitive for each new shape it multiplies: with the GELU post-op the first
# call of a shape took ~14 ms on this CPU against ~5 without it and ~2 for a repeated one (900-1900 x 384 ->
# 1536), while the fusion saves ~2 ms a call at 8192 rows, less with fewer. Batches padded to their own
# longest sequence bring a new shape nearly every time: fusing each of them ran the demo's 15 such batches
# 5-19% slower than fusing none. So a pair fuses a shape only once it has seen it FUSE_AFTER times, and
# only with FUSE_MIN_OUTPUTS outputs or more a call.
FUSE_AFTER = 3
FUSE_MIN_OUTPUTS = 1 << 22
_MAX_SHAPES = 4096  # shapes counted per layer, at most
_SEEN = weakref.WeakKeyDictionary()  # FrozenLinear -> {rows: calls}, across blocks (oneDNN's cache is global)


class _LinearAct(nn.Module):
    """act(linear(x)), by oneDNN's fused post-op where the layer's call runs there and the shape recurs."""

    def __init__(self, linear: FrozenLinear, act: nn.Module, kind: Tuple[str, str]):
        super().__init__()
        self.linear, self.act = linear, act
        self.kind = kind
        self.seen = _SEEN.setdefault(linear, {})

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1]:
            rows = x.numel() // x.shape[-1]
            n = self.seen.get(rows, 0)
            if n < FUSE_AFTER or rows * self.linear.out_features < FUSE_MIN_OUTPUTS:
                if n or len(self.seen) < _MAX_SHAPES:
                    self.seen[rows] = n + 1
            else:
                y = self.linear.forward_act(x, *self.kind)
                if y is not None:
                    return y
        return self.act(self.linear(x))


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
            kids = [m for m in parent._modules.values() if m is not None]
            # reading a class's source parses its whole file: only where a pair could be
            if not any(type(m) is FrozenLinear for m in kids) or not any(_act_kind(m) for m in kids):
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
