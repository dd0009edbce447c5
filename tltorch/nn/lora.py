"""LoRALinear: a frozen Linear (or transformers Conv1D, or compact FrozenLinear) plus a trainable low-rank
update."""
import math
import numbers
import warnings
from typing import Union

import torch
from torch import Tensor, nn

from .. import functional as TF
from .. import ops
from .frozen import FrozenLinear

# The string values of init_lora_weights: initialisations that leave the base weights as they are.
INITS = ("gaussian", "orthogonal")


def is_conv1d(module: nn.Module) -> bool:
    """A transformers Conv1D (GPT-2's projections): a Linear whose weight is stored (in, out).

    Recognised by class name so that tltorch never imports transformers."""
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2


def is_lora_base(module: nn.Module) -> bool:
    """A layer LoRALinear can wrap: nn.Linear, a transformers Conv1D, or a compact FrozenLinear."""
    return isinstance(module, (nn.Linear, FrozenLinear)) or is_conv1d(module)


def check_rank(name: str, r) -> None:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(r).__name__}")
    if r <= 0:
        raise ValueError(f"{name} must be a positive int, got {r}")


def check_alpha(name: str, lora_alpha) -> None:
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real):
        raise TypeError(f"{name} must be a number, not {type(lora_alpha).__name__}")
    if not math.isfinite(lora_alpha):
        raise ValueError(f"{name} must be finite, got {lora_alpha}")


def check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights) -> None:
    """The ValueError/TypeError LoraConfig and LoRALinear raise for bad hyperparameters."""
    check_rank("r", r)
    check_alpha("lora_alpha", lora_alpha)
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real):
        raise TypeError(f"lora_dropout must be a number, not {type(lora_dropout).__name__}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if not (isinstance(init_lora_weights, bool) or init_lora_weights in INITS):
        raise ValueError(f"init_lora_weights must be True, False, {' or '.join(map(repr, INITS))}, "
                         f"got {init_lora_weights!r}")
    if init_lora_weights == "orthogonal" and r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even r, got {r}")


class LoRALinear(nn.Module):
    """A frozen Linear (or transformers Conv1D) ``base`` plus a trainable low-rank update:
    ``y = base(x) + s * dropout(x) @ lora_A.T @ lora_B.T``, with ``s = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with ``use_rslora``), computed by tltorch's fused LoRA kernel.

    base: an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored (in, out), read transposed in
    place), kept as ``self.base``. Its parameters are frozen here (requires_grad False, as PEFT
    does), so backward computes no weight gradient for it; set ``base.bias.requires_grad_(True)`` to
    train its bias (``add_lora``'s ``bias="lora_only"``). ``lora_A`` (r, in_features) and ``lora_B``
    (out_features, r) take base's dtype and device.

    init_lora_weights: True (lora_A Kaiming-uniform with a=sqrt(5), lora_B zeros), "gaussian"
    (lora_A ~ N(0, std=1/r), lora_B zeros) or "orthogonal" (PEFT's: both nonzero, with
    lora_B @ lora_A = 0; r even) make the layer start as exactly ``base``; False draws both like
    nn.Linear's weight (a nonzero update, for tests).

    ``merge()`` folds the update into base's weight (then forward runs base alone), ``unmerge()``
    takes it out again; ``disabled = True`` also runs base alone.
    """

    def __init__(self, base: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: Union[bool, str] = True):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise TypeError("base is already a LoRALinear")
        self.is_conv1d = False
        if isinstance(base, nn.Linear):
            out_features, in_features = base.weight.shape
        elif isinstance(base, FrozenLinear):
            out_features, in_features = base.out_features, base.in_features
        elif is_conv1d(base):
            self.is_conv1d = True
            in_features, out_features = base.weight.shape
        else:
            raise TypeError("base must be a torch.nn.Linear, a transformers Conv1D or a tltorch.nn.FrozenLinear, "
                            f"not {type(base).__name__}")
        check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights)
        base.requires_grad_(False)
        self.base = base
        self.r = int(r)
        self.lora_dropout = float(lora_dropout)
        self.set_scaling(lora_alpha, use_rslora)
        # Over a compact base the adapter is float32 (as PEFT keeps adapters over 8- and 4-bit layers): its
        # few parameters are what trains, and bfloat16 would round their updates away.
        wdtype = torch.float32 if self.compact else base.weight.dtype
        factory = {"device": base.weight.device, "dtype": wdtype}
        self._premerge = None  # a compact base's stored weight before merge(), restored by unmerge()
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.r, **factory))
        self.merged = False
        self.disabled = False
        self.reset_lora_parameters(init_lora_weights)

    def set_scaling(self, lora_alpha: float, use_rslora: bool = False) -> None:
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = float(lora_alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        if init_lora_weights == "orthogonal":
            # PEFT's: with Q a random orthogonal r x r matrix and G1, G2 Gaussian, A = Q[0::2]^T G1 and
            # B = G2 Q[1::2], so B @ A = G2 Q[1::2] Q[0::2]^T G1 = 0 (Q's rows are orthonormal).
            q, _ = torch.linalg.qr(torch.randn(self.r, self.r))
            a = (torch.randn(self.in_features, self.r // 2) @ q[0::2]).T / 10.0
            b = torch.randn(self.out_features, self.r // 2) @ q[1::2] / 10.0
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)  # PEFT's choice: std 1/r
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    @property
    def compact(self) -> bool:
        """The base is a FrozenLinear (bfloat16/float16/int8 weight, read by tltorch's frozen kernels)."""
        return isinstance(self.base, FrozenLinear)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def weight(self) -> Tensor:
        """base's weight, as base stores it ((in, out) for a Conv1D)."""
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def _weight_out_in(self) -> Tensor:
        w = self.base.weight
        return w.t() if self.is_conv1d else w

    def delta_weight(self) -> Tensor:
        """s * lora_B @ lora_A, (out, in), in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to base's weight (rounded once to its dtype); a no-op when merged.

        On a compact base the sum is rounded to its storage (int8: requantised with new
        scales), with a warning: the merged layer differs from base + adapter by that rounding. The
        stored weight before merging is kept, so that unmerge() restores it exactly."""
        if self.merged:
            return
        if self.compact:
            base = self.base
            if base.storage == "int8":
                warnings.warn("merging a LoRA adapter into an int8 FrozenLinear requantises its weight: the "
                              "merged layer's outputs differ from the unmerged ones by that rounding",
                              UserWarning, stacklevel=2)
            self._premerge = (base.weight.clone(), None if base.weight_scale is None else base.weight_scale.clone())
            base.set_weight(base.dequantized_weight(torch.float32) + self.delta_weight())
        else:
            w = self._weight_out_in()
            w.copy_(w.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from base's weight again; a no-op when not merged."""
        if not self.merged:
            return
        if self.compact and self._premerge is not None:
            weight, scale = self._premerge
            self.base.set_weight(weight, scale)
            self._premerge = None
        elif self.compact:  # merged before it was wrapped here (e.g. loaded merged): subtract and round
            self.base.set_weight(self.base.dequantized_weight(torch.float32) - self.delta_weight())
        else:
            w = self._weight_out_in()
            w.copy_(w.float() - self.delta_weight())
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return self.base(x)
        p = self.lora_dropout if self.training else 0.0
        if self.compact:
            # base's frozen kernel (its input gradient through the compact weight) plus the low-rank
            # update in the adapter's float32, as PEFT computes adapters over 8- and 4-bit layers; under
            # autocast in its dtype, as PEFT's nn.Linear adapters are there (gradients reach the float32
            # adapter through the casts)
            a, b, dev = self.lora_A, self.lora_B, x.device.type
            if torch.is_autocast_enabled(dev) and a.dtype is torch.float32:
                dt = torch.get_autocast_dtype(dev)
                # x cast once for base and adapter: their input gradients then meet in dt, and one
                # cast takes the sum back to x's dtype
                a, b, x = a.to(dt), b.to(dt), (x.to(dt) if x.is_floating_point() and x.dtype != dt else x)
            return ops.lora_update(self.base(x), x, a, b, self.scaling, p)
        return TF.lora_linear(x, self._weight_out_in(), self.base.bias, self.lora_A, self.lora_B,
                              scaling=self.scaling, dropout=p)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
             f"lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}")
        if self.use_rslora:
            s += ", use_rslora=True"
        if self.lora_dropout:
            s += f", lora_dropout={self.lora_dropout}"
        if self.is_conv1d:
            s += ", conv1d=True"
        if self.compact:
            s += f", base_storage={self.base.storage}"
        if self.merged:
            s += ", merged=True"
        if self.disabled:
            s += ", disabled=True"
        return s
