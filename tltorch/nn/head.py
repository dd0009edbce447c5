"""LinearCrossEntropy: a classifier (or vocabulary) head whose loss never materialises the logits."""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as TF


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
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32, device=device)
        self.register_buffer("class_weight", class_weight)
        self.reset_parameters()

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
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features = linear.in_features
        head.num_classes = linear.out_features
        head.weight = linear.weight
        head.bias = linear.bias
        head.ignore_index = options.pop("ignore_index", -100)
        head.label_smoothing = options.pop("label_smoothing", 0.0)
        head.reduction = options.pop("reduction", "mean")
        cw = options.pop("class_weight", None)
        if options:
            raise TypeError(f"unexpected options: {', '.join(sorted(options))}")
        if cw is not None:
            cw = torch.as_tensor(cw, dtype=torch.float32, device=linear.weight.device)
        head.register_buffer("class_weight", cw)
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
