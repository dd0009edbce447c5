"""Per-call overhead of a tiny op: how much a tltorch call costs beyond the arithmetic.

    python benchmarks/bench_overhead.py

Times, on 1x1 inputs (no real work): one torch op (F.linear), the raw binding tltorch._C.gemm (the
DLPack bridge for 3 tensors, argument checks, the kernel's dispatch), and tltorch.functional.linear
(Python checks + the op's eager route, tltorch/ops/_define.py + the binding). Reports microseconds per call.
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tltorch  # noqa: E402
from tltorch import _C  # noqa: E402


def per_call_us(fn, n=20000, repeat=5):
    for _ in range(1000):
        fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main():
    print(f"# {harness.machine()}")
    x, w, y = torch.randn(1, 1), torch.randn(1, 1), torch.empty(1, 1)
    wt = w.t()
    nt = torch.get_num_threads()
    rows = [
        ("torch F.linear (one torch op)", lambda: F.linear(x, w)),
        ("torch.add (one torch op)", lambda: torch.add(x, w)),
        ("tltorch._C.gemm (bridge + kernel)", lambda: _C.gemm(x, wt, y, None, None, 1.0, 0.0, nt)),
        ("tltorch._C.describe (bridge, 1 tensor)", lambda: _C.describe(x)),
        ("tltorch.functional.linear", lambda: tltorch.functional.linear(x, w)),
    ]
    base = None
    print(f"{'call':42} {'us/call':>8} {'x F.linear':>11}")
    with torch.no_grad():
        for name, fn in rows:
            us = per_call_us(fn)
            base = base or us
            print(f"{name:42} {us:8.2f} {us / base:11.2f}")


if __name__ == "__main__":
    main()
