"""The extensions, and what every device kernel needs from torch.

tltorch._C (the CPU kernels) is always there; tltorch._cuda is imported on first use, so that importing
tltorch needs no GPU and no CUDA driver. Outputs and workspaces are allocated with torch.empty on the
inputs' device, so torch's allocator owns all memory; CUDA kernels run on torch's current stream (the
extension asks torch for it through DLPack).
"""
import importlib
from typing import Optional

import torch
from torch import Tensor

_cuda_mod = None
_cuda_error: Optional[str] = None


def cuda_module():
    """tltorch._cuda, imported on first use; RuntimeError naming the reason when it is unavailable."""
    global _cuda_mod, _cuda_error
    if _cuda_mod is not None:
        return _cuda_mod
    if _cuda_error is None:
        try:
            _cuda_mod = importlib.import_module("tltorch._cuda")
            return _cuda_mod
        except ImportError as e:
            _cuda_error = str(e)
    raise RuntimeError(
        "tltorch was built without CUDA kernels (tltorch._cuda could not be imported: "
        f"{_cuda_error}); reinstall with nvcc and cuBLAS available, or keep tensors on the CPU")


def cuda_built() -> bool:
    try:
        cuda_module()
        return True
    except RuntimeError:
        return False


_CUBLAS_WS_BYTES = 4 << 20


def cublas_workspace(device) -> Tensor:
    return torch.empty(_CUBLAS_WS_BYTES, dtype=torch.uint8, device=device)


def allow_tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def cublas_ready(t: Tensor) -> Tensor:
    """A 2-D view cuBLAS can read: one unit stride and a leading dimension covering the other."""
    r, c = t.shape
    s0, s1 = t.stride()
    if (s1 == 1 or c == 1) and s0 >= max(1, c):
        return t
    if (s0 == 1 or r == 1) and s1 >= max(1, r):
        return t
    return t.contiguous()


def rows(t: Tensor) -> Tensor:
    """t as a 2-D (rows, last dim) tensor: itself when it is 2-D, else a reshape (a view where it can be).
    Not reshape(-1, k): the last dim may be 0."""
    return t if t.dim() == 2 else t.reshape(t.shape[:-1].numel(), t.shape[-1])
