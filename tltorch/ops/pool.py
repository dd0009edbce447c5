"""pool: (B, D) from hidden states h (B, T, D): the first token (mode 0), or the mean (1) or maximum (2)
over the tokens whose mask is nonzero (all tokens when mask is None); zeros for a row with none. No
gradient."""
import torch

from .. import _C
from ._define import define_op
from ._device import cuda_module

POOL_MODES = {"cls": 0, "mean": 1, "max": 2}


def _buffers(h, mask):
    out = torch.empty(h.shape[0], h.shape[2], dtype=h.dtype, device=h.device)
    if mask is not None and mask.dtype is torch.bool:
        mask = mask.view(torch.uint8)  # DLPack's bool is not one tltorch reads; same bytes, 0 or 1
    return mask, out


def _pool_cpu(h, mask, mode):
    mask, out = _buffers(h, mask)
    _C.pool(h, mask, mode, out, torch.get_num_threads())
    return out


def _pool_cuda(h, mask, mode):
    mask, out = _buffers(h, mask)
    cuda_module().pool(h, mask, mode, out)
    return out


pool = define_op("pool", "(Tensor h, Tensor? mask, SymInt mode) -> Tensor", {"cpu": _pool_cpu, "cuda": _pool_cuda},
                 lambda h, mask, mode: h.new_empty(h.shape[0], h.shape[2]))
