"""tltorch: transfer learning for PyTorch, with hand-written C and CUDA kernels.

`import tltorch` needs no GPU and no CUDA driver: the CUDA kernels (tltorch._cuda) load on first use.
"""
import torch  # noqa: F401  (torch's OpenMP runtime is loaded before ours, so they are one)


def _missing_extension(err):
    """The error for a tltorch folder without its compiled core: most often Python started at the root of
    a clone (its ./tltorch, never built, shadows the installed package), said in words a user can act on."""
    import glob
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if glob.glob(os.path.join(here, "_C.*")):  # there, but it does not load: the loader's reason matters
        return ImportError(f"tltorch's C extension in {here} cannot be loaded ({err}); rebuild or reinstall "
                           "tltorch for this Python and platform")
    if os.path.exists(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return ImportError(
            f"tltorch is being imported from its source tree ({here}), where its C extension "
            f"(tltorch._C) has not been compiled. Either build it there: `pip install -e .` at {root} "
            f"(or `python setup.py build_ext --inplace`), or start Python outside {root} so that the "
            "installed tltorch is imported.")
    return ImportError(f"tltorch's C extension (tltorch._C) is missing from {here}: reinstall tltorch")


try:
    from . import _C
except ImportError as _err:  # a compiled module that exists but fails to load says why in _err
    raise _missing_extension(_err) from None

from . import functional, losses, nn, ops, optim
from .adapt import adapt_body
from .distill import distill, make_student
from ._heap import reuse_memory
from .extract import extract_features
from .finetune import fine_tune, freeze_to, layer_groups, lr_find, param_groups
from .fit import History, fit_head
from .freeze import freeze
from .lora import (LoraConfig, add_lora, disable_lora, load_adapter, merge_lora, save_adapter,
                   trainable_parameters)

__version__ = "0.1.0"

__all__ = ["backend_info", "functional", "losses", "nn", "optim", "freeze", "fit_head", "History", "__version__", "LoraConfig", "add_lora", "disable_lora",
           "merge_lora", "save_adapter", "load_adapter", "trainable_parameters",
           "extract_features", "fine_tune", "layer_groups", "freeze_to", "lr_find", "param_groups", "distill",
           "make_student", "adapt_body", "reuse_memory"]


def backend_info() -> dict:
    """What this installation of tltorch can run on.

    version, cuda_built (tltorch._cuda imports), cuda_available (built and a GPU is visible),
    device_name (the current CUDA device, or None), cpu_isa (the SIMD path of the CPU kernels:
    avx512, avx2 or portable), bf16_gemm (the micro-kernel tltorch's GEMMs run on bfloat16 operands:
    avx512_bf16, the AVX512-BF16 dot product, where it outruns the float32 FMA, else the float32 one on
    operands widened as they are packed), int8_isa (the int8 frozen kernel's: amx, avx512vnni or portable),
    bf16_linear (what a bfloat16 FrozenLinear runs on bfloat16 x: "onednn" where the CPU has AVX512-BF16,
    else "tltorch"), num_threads (the CPU threads kernels use: torch.get_num_threads()).
    """
    built = ops.cuda_built()
    available = False
    name = None
    if built:
        try:
            cuda = ops.cuda_module()
            available = cuda.device_count() > 0
            if available:
                idx = torch.cuda.current_device() if torch.cuda.is_available() else 0
                name = cuda.device_name(idx)
        except RuntimeError:
            available = False
    return {
        "version": __version__,
        "cuda_built": built,
        "cuda_available": available,
        "device_name": name,
        "cpu_isa": _C.cpu_isa(),
        "bf16_gemm": _C.bf16_gemm_isa(),
        "int8_isa": _C.int8_isa(),
        "bf16_linear": "onednn" if ops.frozen.bf16_native() else "tltorch",
        "num_threads": torch.get_num_threads(),
    }
