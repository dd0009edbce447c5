"""tltorch's ops: the one place that calls the extensions (tltorch._C, tltorch._cuda).

Each op is defined once in its family's file (ops/_define.py says how): its schema, fake kernel, device
kernels and autograd formula, registered as the torch.library op tltorch::<name> so that autograd,
torch.compile, functorch and DistributedDataParallel see an ordinary torch op, and called eagerly
without the dispatcher's cost.

  linear.py   gemm, colsum, linear (+ linear_backward)
  lora.py     dropout, lora_linear (+ lora_linear_backward), lora_update
  head.py     linear_cross_entropy (+ linear_cross_entropy_backward), and xent, the fused kernel's call;
              distill_rows, distillation's per-row math
  frozen.py   qgemm, frozen_linear (+ frozen_linear_backward), int8_pack, int8_linear (CPU)
  pool.py     pool
  adamw.py    adamw_
"""
from ._device import cuda_built, cuda_module
from .adamw import adamw_
from .frozen import dequant, frozen_linear, int8_dequant, int8_linear, int8_pack, qgemm
from .head import DIVERGENCES, REDUCTIONS, distill_rows, linear_cross_entropy, xent
from .linear import colsum, gemm, linear
from .lora import dropout, lora_linear, lora_update, next_dropout_seed
from .pool import POOL_MODES, pool

__all__ = ["cuda_built", "cuda_module", "adamw_", "dequant", "frozen_linear", "int8_dequant", "int8_linear",
           "int8_pack", "qgemm", "REDUCTIONS", "DIVERGENCES", "distill_rows", "linear_cross_entropy", "xent", "colsum",
           "gemm", "linear", "dropout", "lora_linear", "lora_update", "next_dropout_seed", "POOL_MODES", "pool"]
