"""Drop-in modules built on tltorch's kernels."""
from .head import LinearCrossEntropy

__all__ = ["LinearCrossEntropy"]
