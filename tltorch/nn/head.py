"""LinearCrossEntropy: a classifier (or vocabulary) head whose loss never materialises the logits."""
import math
import operator
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as TF


def _size(name: str, value, least: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}")
    return value


class LinearCrossEntropy(nn.Module):
    """A linear head trained with cross-entropy: ``forward(x, target)`` returns the loss.

    Equivalent to ``nn.Linear(in_features, num_classes, bias)`` followed by
    ``nn.CrossEntropyLoss(weight=class_weight, ignore_index=..., label_smoothing=..., reduction=...)``,
    computed by tltorch's fused kernel (no N x num_classes logits in memory). ``logits(x)`` and
    ``predict(x)`` serve evaluation. ``LinearCrossEntropy.from_linear(linear)`` takes over an existing
    nn.Linear head, sharing its parameters.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, ignore_index: int = -100,
                 label_smoothing: float = 0.0, class_weight: Optional[Tensor] = None,
                 reduction: str = "mean", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = _size("in_features", in_features, 0)
        self.num_classes = _size("num_classes", num_classes, 1)
        self._set_options(ignore_index, label_smoothing, reduction, class_weight, device)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features, **factory))
        self.bias = nn.Parameter(torch.empty(self.num_classes, **factory)) if bias else None
        self.reset_parameters()

    def _set_options(self, ignore_index, label_smoothing, reduction, class_weight, device) -> None:
        """Checks and stores the loss options, so that a bad one fails here rather than at the first
        forward."""
        TF.check_reduction(reduction)
        self.ignore_index = TF.check_ignore_index(ignore_index)
        self.label_smoothing = TF.check_label_smoothing(label_smoothing)
        self.reduction = reduction
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32, device=device)
            if tuple(class_weight.shape) != (self.num_classes,):
                raise ValueError(f"class_weight must have shape ({self.num_classes},) (one weight per class), "
                                 f"got {tuple(class_weight.shape)}")
        self.register_buffer("class_weight", class_weight)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "LinearCrossEntropy":
        """A head that shares `linear`'s weight and bias (the same Parameter objects)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, not {type(linear).__name__}")
        unknown = set(options) - {"ignore_index", "label_smoothing", "class_weight", "reduction"}
        if unknown:
            raise TypeError(f"unexpected options: {', '.join(sorted(unknown))}")
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features = linear.in_features
        head.num_classes = _size("linear.out_features (num_classes)", linear.out_features, 1)
        head._set_options(options.get("ignore_index", -100), options.get("label_smoothing", 0.0),
                          options.get("reduction", "mean"), options.get("class_weight"), linear.weight.device)
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return TF.linear_cross_entropy(x, self.weight, target, self.bias, ignore_index=self.ignore_index,
                                       label_smoothing=self.label_smoothing, class_weight=self.class_weight,
                                       reduction=self.reduction)

    def logits(self, x: Tensor) -> Tensor:
        return TF.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.bias is not None}, reduction={self.reduction!r}")
