"""Shared benchmark plumbing: check correctness first, flush caches, interleave candidates, report medians.

Each benchmark times tltorch and its eager torch equivalent in the same run, alternating them in every
repetition so that a noisy machine slows both alike, and prints the ratio of medians.
"""
import platform
import statistics
import time

import torch

_FLUSH = None


def flush_caches():
    """Evict the CPU caches (and the GPU's L2) between timed runs by writing a buffer larger than them."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(64 << 20, dtype=torch.uint8)
    _FLUSH.fill_(1)
    if torch.cuda.is_available():
        torch.empty(256 << 20, dtype=torch.uint8, device="cuda").fill_(1)


def time_once(fn, device="cpu"):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(candidates, repeat=7, warmup=1, device="cpu", flush=True):
    """candidates: dict name -> zero-argument callable. Returns dict name -> median seconds."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            if flush:
                flush_caches()
            times[name].append(time_once(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import tltorch
    info = tltorch.backend_info()
    gpu = info["device_name"] if info["cuda_available"] else "no GPU"
    return (f"{cpu}, {torch.get_num_threads()} threads, tltorch cpu_isa={info['cpu_isa']}, {gpu}, "
            f"torch {torch.__version__}")


def check_close(name, got, ref, rtol):
    err = (got.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-30)
    if not err <= rtol:
        raise AssertionError(f"{name}: relative error {err:.2e} exceeds {rtol:.0e}; not timing a wrong result")
