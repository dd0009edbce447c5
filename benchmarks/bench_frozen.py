"""tltorch.nn.FrozenLinear (bfloat16 / float16 / int8 weights) against torch's float32 F.linear, in one run.

    python benchmarks/bench_frozen.py [--quick] [--repeat N] [--tokens 2048]

For each shape (tokens x in -> out, float32 activations), times the forward pass and the forward +
input-gradient pass (what a frozen layer under a trainable one does) of:
    torch:    F.linear(x, W, b) with the float32 weight
    bf16/f16/int8: FrozenLinear.from_linear(layer, storage)(x): the weight stored compact and converted
              (int8: scaled per output channel) as tltorch's GEMM packs it
and prints the medians, time ratios tltorch/torch (target <= 1.0, i.e. >= 1.0x torch's speed), the weight
bytes relative to float32 (target for int8 <= 0.26) and the relative output error against the float32
layer. Candidates alternate in every repetition (harness.compare); caches are flushed between calls.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from tltorch.nn import FrozenLinear  # noqa: E402

SHAPES = [(768, 768), (768, 3072), (3072, 768), (4096, 4096)]
STORAGES = ("bfloat16", "float16", "int8")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    tokens = 256 if args.quick else args.tokens
    print(f"# {harness.machine()}")
    print(f"# FrozenLinear vs float32 F.linear, {tokens} tokens, median of {args.repeat}")
    print(f"{'in':>5} {'out':>5} {'pass':>8} {'storage':>8} {'torch ms':>9} {'tl ms':>8} {'tl/torch':>8} "
          f"{'bytes':>6} {'rel err':>8}")
    for d_in, d_out in shapes:
        g = torch.Generator().manual_seed(d_in + d_out)
        lin = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(d_out, d_in, generator=g) / d_in ** 0.5)
        lin.requires_grad_(False)
        x = torch.randn(tokens, d_in, generator=g)
        gy = torch.randn(tokens, d_out, generator=g)
        ref = F.linear(x, lin.weight, lin.bias)
        mods = {s: FrozenLinear.from_linear(lin, s) for s in STORAGES}
        for which in ("forward", "fwd+dx"):
            if which == "forward":
                cands = {"torch": lambda: F.linear(x, lin.weight, lin.bias)}
                cands.update({s: (lambda m=m: m(x)) for s, m in mods.items()})
            else:
                xg = x.clone().requires_grad_()

                def tstep():
                    xg.grad = None
                    F.linear(xg, lin.weight, lin.bias).backward(gy)

                def mstep(m):
                    xg.grad = None
                    m(xg).backward(gy)
                cands = {"torch": tstep}
                cands.update({s: (lambda m=m: mstep(m)) for s, m in mods.items()})
            med = harness.compare(cands, repeat=args.repeat, warmup=1)
            for s, m in mods.items():
                err = ((m(x) - ref).norm() / ref.norm()).item()
                print(f"{d_in:>5} {d_out:>5} {which:>8} {s:>8} {med['torch']*1e3:9.2f} {med[s]*1e3:8.2f} "
                      f"{med[s]/med['torch']:8.3f} {m.weight_bytes()/(4*d_in*d_out):6.3f} {err:8.1e}", flush=True)


if __name__ == "__main__":
    main()
