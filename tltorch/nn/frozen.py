"""FrozenLinear: a linear layer that is never trained, its weight stored compact."""
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops

STORAGES = ("float32", "bfloat16", "float16", "int8")
ACTIVATIONS = ("int8", "float")
# The int8 kernel's groups of inputs: x is quantised with one scale and zero point per row and group.
# On all-MiniLM-L6-v2, groups of 64 lose 0.0005 of the body's min cosine to the float32 one where whole
# rows lose 0.004 (csrc/cpu/qlinear_int8.c).
INT8_GROUP = 64
# The int8 weight's default scales: one per output channel and group of this many inputs (None: one per
# channel), x then quantised in the same groups. On all-MiniLM-L6-v2 (the int8 kernel, min cosine of the
# mean-pooled features to float32's over 512 of the demo's reviews padded to 64 tokens): per channel
# 0.99799, groups of 128 0.99774, of 64 0.99874, of 32 0.99918: 32, the only one at 0.999, for 4 bytes
# of scale per 32 weights (0.28x float32's bytes against 0.25x); the body's speed was the same within
# noise (per channel, groups of 64, of 32: 1.47x, 1.29x, 1.43x float32 on a busy 2-core machine).
INT8_WEIGHT_GROUP = 32
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_group(group) -> None:
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 4 or group > 512
                              or group % 4):
        raise ValueError(f"group must be None or a multiple of 4 from 4 to 512, got {group!r}")


def _quantize_int8(w: Tensor, group: Optional[int]):
    """w (out, in) float32 -> (int8 weight, float32 scales): symmetric, absmax / 127 per output channel
    (group None) or per channel and group of `group` inputs ((out, ceil(in / group)) scales)."""
    n, k = w.shape
    g = k if group is None else group
    groups = -(-k // g) if k else 0
    blocks = torch.nn.functional.pad(w, (0, groups * g - k)).view(n, groups, g)
    scale = blocks.abs().amax(dim=2) / 127.0 if k else torch.zeros(n, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block stays zero
    q = torch.round(blocks / scale[:, :, None]).clamp_(-127, 127).to(torch.int8).view(n, groups * g)[:, :k]
    return q, (scale[:, 0] if group is None else scale)


class FrozenLinear(nn.Module):
    """y = x W^T + b with W and b frozen: outputs and input gradients, never weight gradients.

    The weight is kept as a buffer in `storage`: "bfloat16" or "float16" (half the bytes of float32), or
    "int8" with one float32 scale (absmax / 127) per output channel (a quarter of the bytes, plus 4 bytes
    a row) or, with ``group``, per output channel and group of that many inputs (plus 4 bytes a group).
    tltorch's kernels read it in that form and scale it as they go; no float32 copy is made on the CPU
    (with group scales, the input gradient and ``activations="float"`` go through the dequantised weight).
    x may be float32, bfloat16 or float16; y has x's dtype. The bias (if any) is kept in float32. Build one
    from a trained layer with ``FrozenLinear.from_linear(linear, storage)``.

    With int8 storage on the CPU, a float32 x is quantised to 8 bits too (``activations="int8"``, the
    default), per row and group of ``group`` (else INT8_GROUP) inputs, and the product runs in integers
    (AMX or AVX512-VNNI where the CPU has it): 1.8-2.8x float32's speed (one thread, 4096 rows, MiniLM's
    shapes; groups of 64 or one scale a channel 2.3-4.2x), at a relative error of about 1% of
    the layer's output (the weight's rounding alone: about 0.7%). ``activations="float"`` (also settable
    later) keeps x in float, as does a CPU without VNNI (the int8 kernel's portable C path there runs
    ~30x slower than the float GEMM; ``tltorch._C.int8_isa()`` says which path this CPU has).
    Under torch.autocast to bfloat16 (or the weight's own dtype) a float32 x is cast to it first, as
    nn.Linear's would be (y then has that dtype). bfloat16 x runs as nn.Linear in bfloat16 (oneDNN; AMX
    where present) on CPUs with AVX512-BF16: a bfloat16 weight as it is stored, and an int8 one with
    ``activations="int8"`` expanded to bfloat16 for the call (one pass over its bytes,
    ``ops.int8_dequant``), which there runs 2-3x the int8 kernel's rate and keeps x in 16 bits.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, storage: str = "bfloat16",
                 device=None, activations: str = "int8", group: Optional[int] = INT8_WEIGHT_GROUP):
        super().__init__()
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        _check_group(group)
        self.in_features, self.out_features, self.storage = in_features, out_features, storage
        self.activations = activations
        # int8: the weight's scales are per output channel (None) or per channel and group of `group` inputs
        self.group = group if storage == "int8" else None
        wdtype = torch.int8 if storage == "int8" else getattr(torch, storage)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=wdtype, device=device))
        scale_shape = (out_features,) if self.group is None else (out_features, -(-in_features // self.group))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device)
                             if storage == "int8" else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device)
                             if bias else None)
        # int8 on the CPU: the weight in the int8 kernel's layout (ops.int8_pack), derived from weight and
        # weight_scale and rebuilt when either changes (load_state_dict, in-place edits, .to()); not a
        # buffer, so neither saved nor counted by weight_bytes (it takes as many bytes again as weight)
        self.packed_weight: Optional[Tensor] = None
        self._packed_of = None

    @property
    def activations(self) -> str:
        """int8 storage on the CPU: "int8" quantises x too, per row and group of INT8_GROUP inputs, for the
        int8 kernel (csrc/cpu/qlinear_int8.c); "float" multiplies float x by the int8 weight. Either way the
        input gradient is dy (W*s). Other storages and CUDA: float x."""
        return self._activations

    @activations.setter
    def activations(self, value: str) -> None:
        if value not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {value!r}")
        self._activations = value

    @classmethod
    def from_linear(cls, linear: nn.Linear, storage: str = "bfloat16", activations: str = "int8",
                    group: Optional[int] = INT8_WEIGHT_GROUP) -> "FrozenLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, not {type(linear).__name__}")
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, storage, device=w.device,
                activations=activations, group=group)
        with torch.no_grad():
            if storage == "int8":
                w32 = w.float()
                if not bool(torch.isfinite(w32).all()):
                    raise ValueError("linear.weight has NaN or infinite entries, which int8 storage cannot "
                                     "hold; use storage='bfloat16' or 'float16'")
                q, scale = _quantize_int8(w32, m.group)
                m.weight.copy_(q)
                m.weight_scale.copy_(scale)
            else:
                m.weight.copy_(w)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach().float())
        if m._uses_int8_kernel(w):
            m._packed()
        return m

    def _uses_int8_kernel(self, x: Tensor) -> bool:
        return self.storage == "int8" and self._activations == "int8" and x.device.type == "cpu" and \
            ops.frozen.int8_fast()

    def _packed(self) -> Tensor:
        """packed_weight, rebuilt if weight or weight_scale changed since it was packed."""
        if torch.compiler.is_compiling():  # traced: packed when the layer was built, or on an eager call
            return self.packed_weight
        w, s = self.weight, self.weight_scale
        try:
            key = (w.data_ptr(), w._version, s.data_ptr(), s._version)
        except RuntimeError:  # inference tensors have no version counter, and cannot change in place
            key = (w.data_ptr(), -1, s.data_ptr(), -1)
        if self.packed_weight is None or key != self._packed_of:
            self.packed_weight = ops.int8_pack(w, s, self._x_group())
            self._packed_of = key
        return self.packed_weight

    def _x_group(self) -> int:
        """The int8 kernel's groups: the weight's scale groups where it has them (the kernel's are shared)."""
        return self.group or INT8_GROUP

    def dequantized_weight(self, dtype=torch.float32) -> Tensor:
        """The weight the layer computes with, as a dense tensor (for inspection and tests)."""
        return ops.dequant(self.weight, self.weight_scale, dtype, self.group)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a per-channel scale (N,), as layers saved before group scales hold, is the same scale in every group
        s = state_dict.get(prefix + "weight_scale")
        if self.group is not None and isinstance(s, Tensor) and s.dim() == 1 and s.shape[0] == self.out_features:
            state_dict[prefix + "weight_scale"] = s[:, None].expand(self.weight_scale.shape).contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, not {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"x has dtype {x.dtype}; expected float32, bfloat16 or float16")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dim, got shape {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but the layer is on {self.weight.device}")
        x = x.resolve_neg()
        if x.dtype is torch.float32 and torch.is_autocast_enabled(x.device.type) and \
                torch.get_autocast_dtype(x.device.type) in (torch.bfloat16, self.weight.dtype):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # as nn.Linear under autocast
        if self._uses_int8_kernel(x) and x.dtype is torch.bfloat16 and ops.frozen.bf16_native():
            w = ops.dequant(self.weight, self.weight_scale, torch.bfloat16, self.group)
            return ops.frozen_linear(x, w, None, self.bias)
        if self._uses_int8_kernel(x):
            packed, g = self._packed(), self._x_group()
            if x.dim() == 1:
                return ops.int8_linear(x.unsqueeze(0), self.weight, self.weight_scale, packed, g,
                                       self.bias).squeeze(0)
            return ops.int8_linear(x, self.weight, self.weight_scale, packed, g, self.bias)
        # qgemm scales per channel only: group scales go through the dequantised weight
        w, s = (self.weight, self.weight_scale) if self.group is None else (self.dequantized_weight(), None)
        if x.dim() == 1:
            return ops.frozen_linear(x.unsqueeze(0), w, s, self.bias).squeeze(0)
        return ops.frozen_linear(x, w, s, self.bias)

    @torch.no_grad()
    def set_weight(self, weight: Tensor, scale: Optional[Tensor] = None) -> None:
        """Replace the stored weight in place: a float (out, in) weight is rounded to the storage
        (int8: new scales, per channel or group as the layer's), as from_linear does; with `scale`, `weight`
        is taken as stored
        (int8 and its scales, as weight and weight_scale hold them)."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"weight must have shape {tuple(self.weight.shape)}, got {tuple(weight.shape)}")
        if scale is None:
            lin = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
            lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
            q = FrozenLinear.from_linear(lin, self.storage, group=self.group)
            weight, scale = q.weight, q.weight_scale
        self.weight.copy_(weight)
        if self.weight_scale is not None:
            self.weight_scale.copy_(scale)

    def weight_bytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + (0 if self.weight_scale is None else self.weight_scale.numel() * 4)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, storage={self.storage}"
                + (f", activations={self.activations}, group={self.group}" if self.storage == "int8" else ""))
