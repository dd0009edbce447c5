"""Drop-in modules built on tltorch's kernels."""
from .frozen import FrozenLinear
from .head import LinearCrossEntropy
from .lora import LoRALinear

__all__ = ["FrozenLinear", "LinearCrossEntropy", "LoRALinear"]
