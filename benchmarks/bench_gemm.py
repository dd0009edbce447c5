"""tltorch.functional.linear against torch.nn.functional.linear, side by side in one run.

    python benchmarks/bench_gemm.py [--repeat 7] [--device cpu|cuda] [--dtypes float32,bfloat16]

Transformer shapes: 2048 tokens; 768->768, 768->3072, 3072->768, 4096->4096. Prints GFLOP/s of each
and the ratio tltorch/torch of their median times' inverse (> 1 means tltorch is faster).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tltorch  # noqa: E402

SHAPES = [(2048, 768, 768), (2048, 768, 3072), (2048, 3072, 768), (2048, 4096, 4096)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--shapes", default=None, help="e.g. 2048x768x768,512x64x64 (tokens x in x out)")
    args = p.parse_args()
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    torch.manual_seed(0)
    print(f"# {harness.machine()}")
    print(f"{'dtype':9} {'tokens x in -> out':22} {'torch GFLOP/s':>14} {'tltorch GFLOP/s':>16} {'ratio':>7}")
    for dname in args.dtypes.split(","):
        dt = getattr(torch, dname)
        for n, k, m in shapes:
            x = torch.randn(n, k, dtype=dt, device=args.device)
            w = torch.randn(m, k, dtype=dt, device=args.device) / k ** 0.5
            ref = F.linear(x.double(), w.double())
            harness.check_close("tltorch.linear", tltorch.functional.linear(x, w), ref, TOL[dt])
            with torch.no_grad():
                t = harness.compare({"torch": lambda: F.linear(x, w), "tltorch": lambda: tltorch.functional.linear(x, w)},
                                    repeat=args.repeat, device=args.device)
            flop = 2.0 * n * k * m
            print(f"{dname:9} {f'{n} x {k} -> {m}':22} {flop / t['torch'] / 1e9:14.1f} "
                  f"{flop / t['tltorch'] / 1e9:16.1f} {t['torch'] / t['tltorch']:7.2f}")


if __name__ == "__main__":
    main()
