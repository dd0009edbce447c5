"""tltorch's LoRA linear layer against the frozen base layer and PEFT's LoRA layer, side by side in one run.

    python benchmarks/bench_lora.py [--quick] [--repeat N] [--device cpu|cuda] [--dtype float32|bfloat16]
                                    [--tokens 4096] [--widths 768,1024,4096] [--ranks 8,16,64]

Each candidate runs one forward and backward of the same layer on the same input (tokens x width,
x.requires_grad, upstream gradient of ones-like random values), with every .grad reset first:
    base:    torch.nn.Linear(width, width), frozen (forward + input gradient only)
    peft:    peft.tuners.lora.Linear around that base, the same lora_A / lora_B (input gradient and the
             adapters' gradients)
    tltorch: tltorch.nn.LoRALinear around the same base (the same gradients), via
             tltorch.functional.lora_linear
lora_alpha = r, dropout 0. Outputs and gradients of tltorch are checked against PEFT's first (relative
tolerance float32 1e-4, bfloat16 3e-2). The candidates alternate in every repetition (harness.compare)
and the medians are printed with the ratios tltorch/base (target <= 1.10) and tltorch/peft (target <= 0.75).
Width 4096 uses half the tokens on the CPU (a single GEMM there is 0.3 s).

    python benchmarks/bench_lora.py --compact [--repeat N] [--tokens 2048] [--widths 1024] [--ranks 16]

LoRA over a compact body (QLoRA style): tltorch.nn.LoRALinear around the float32 base (the fused kernel)
against LoRALinear around FrozenLinear.from_linear(base, storage) for bfloat16 and int8 (the frozen kernel,
then the adapter), the same adapter, fwd+bwd with the same gradients; and the float32 and int8 layers under
bfloat16 autocast (QLoRA's bfloat16 compute: the int8 weight expanded to bfloat16 per call). Prints each
against the float32 one (target for int8 at width 1024, 2048 tokens, r 16: <= 0.6) and the relative error
of y against it.
"""
import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tltorch  # noqa: E402
import tltorch.functional as TF  # noqa: E402

try:
    from peft import LoraConfig as PeftConfig
    from peft.tuners.lora import Linear as PeftLinear
except ImportError:  # peft is optional: the base comparison still runs
    PeftLinear = None


def make(width, r, tokens, dtype, device):
    g = torch.Generator().manual_seed(width * 131 + r)
    base = torch.nn.Linear(width, width).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(width, width, generator=g) / width ** 0.5)
        base.bias.copy_(torch.randn(width, generator=g) * 0.1)
    base = base.to(device).requires_grad_(False)
    a = (torch.randn(r, width, generator=g) / width ** 0.5).to(dtype).to(device)
    b = (torch.randn(width, r, generator=g) * 0.1).to(dtype).to(device)
    x = torch.randn(tokens, width, generator=g).to(dtype).to(device).requires_grad_()
    gy = torch.randn(tokens, width, generator=g).to(dtype).to(device)
    return base, a, b, x, gy


def run_shape(width, r, tokens, dtype, device, repeat):
    base, a, b, x, gy = make(width, r, tokens, dtype, device)
    ta, tb = a.clone().requires_grad_(), b.clone().requires_grad_()
    scale = 1.0  # lora_alpha = r

    def step_base():
        x.grad = None
        base(x).backward(gy)

    def step_tl():
        x.grad = ta.grad = tb.grad = None
        TF.lora_linear(x, base.weight, base.bias, ta, tb, scale).backward(gy)

    cands = {"base": step_base}
    if PeftLinear is not None:
        cfg = PeftConfig(r=r, lora_alpha=r, lora_dropout=0.0)
        peft = PeftLinear(base, "default", cfg, r=r, lora_alpha=r, lora_dropout=0.0).to(device)
        with torch.no_grad():
            peft.lora_A["default"].weight.copy_(a)
            peft.lora_B["default"].weight.copy_(b)
        pa, pb = peft.lora_A["default"].weight, peft.lora_B["default"].weight

        def step_peft():
            x.grad = pa.grad = pb.grad = None
            peft(x).backward(gy)

        # correctness first
        tol = 1e-4 if dtype is torch.float32 else 3e-2
        step_peft()
        ref = (peft(x).detach(), x.grad.clone(), pa.grad.clone(), pb.grad.clone())
        step_tl()
        got = (TF.lora_linear(x, base.weight, base.bias, ta, tb, scale).detach(), x.grad, ta.grad, tb.grad)
        for name, g_, r_ in zip(("y", "dx", "dA", "dB"), got, ref):
            harness.check_close(f"{name} (width {width}, r {r})", g_, r_, tol)
        cands["peft"] = step_peft
    cands["tltorch"] = step_tl
    return harness.compare(cands, repeat=repeat, warmup=1, device=device)


def run_compact(width, r, tokens, repeat):
    base, a, b, x, gy = make(width, r, tokens, torch.float32, "cpu")
    layers = {"fp32": tltorch.nn.LoRALinear(base, r=r, lora_alpha=r)}
    for storage in ("bfloat16", "int8"):
        layers[storage] = tltorch.nn.LoRALinear(tltorch.nn.FrozenLinear.from_linear(base, storage), r=r,
                                                lora_alpha=r)
    for m in layers.values():
        with torch.no_grad():
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)

    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    runs = {k: (m, contextlib.nullcontext) for k, m in layers.items()}
    # in bfloat16 compute (QLoRA's compute_dtype), the float32 layer under the same autocast beside it
    runs["fp32 ac"] = (layers["fp32"], autocast)
    runs["int8 ac"] = (layers["int8"], autocast)

    def step(m, ctx):
        def go():
            x.grad = m.lora_A.grad = m.lora_B.grad = None
            with ctx():
                y = m(x)
            y.float().backward(gy)
        return go

    with torch.no_grad():
        ref = layers["fp32"](x)
        errs = {}
        for k, (m, ctx) in runs.items():
            with ctx():
                errs[k] = ((m(x).float() - ref).abs().max() / ref.abs().max()).item()
    return harness.compare({k: step(*v) for k, v in runs.items()}, repeat=repeat, warmup=1), errs


def main_compact(args):
    widths = [int(w) for w in (args.widths or "1024").split(",")]
    ranks = [int(r) for r in (args.ranks if args.ranks != "8,16,64" else "16").split(",")]
    tokens = args.tokens or 2048
    print(f"# {harness.machine()}")
    print(f"# LoRA over a compact body, fwd+bwd, float32 activations, cpu, median of {args.repeat}")
    print("# 'ac': under torch.autocast('cpu', bfloat16) (x cast to bfloat16 by the layer, as nn.Linear's);"
          " time / fp32's, and max error of y against fp32's relative to its largest entry")
    names = ("fp32", "bfloat16", "int8", "fp32 ac", "int8 ac")
    print(f"{'tokens':>6} {'width':>5} {'r':>3} {'fp32 ms':>8} " + " ".join(f"{n + '/fp32':>13}" for n in names[1:])
          + " " + " ".join(f"{n + ' err':>12}" for n in names[1:]))
    for w in widths:
        for r in ranks:
            m, e = run_compact(w, r, tokens, args.repeat)
            print(f"{tokens:>6} {w:>5} {r:>3} {m['fp32']*1e3:8.2f} "
                  + " ".join(f"{m[n] / m['fp32']:13.3f}" for n in names[1:]) + " "
                  + " ".join(f"{e[n]:12.2e}" for n in names[1:]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--widths", default=None)
    ap.add_argument("--ranks", default="8,16,64")
    ap.add_argument("--compact", action="store_true", help="LoRA over bfloat16/int8 FrozenLinear bases")
    args = ap.parse_args()
    if args.compact:
        return main_compact(args)
    dtype = getattr(torch, args.dtype)
    if args.quick:
        shapes = [(768, 8, 512), (768, 64, 512)]
    else:
        widths = [int(w) for w in (args.widths or ("4096" if args.device == "cuda" else "768,1024,4096")).split(",")]
        ranks = [int(r) for r in args.ranks.split(",")]
        shapes = []
        for w in widths:
            t = args.tokens or (8192 if args.device == "cuda" else (2048 if w >= 4096 else 4096))
            shapes += [(w, r, t) for r in ranks]
    print(f"# {harness.machine()}")
    print(f"# LoRA linear fwd+bwd, {args.dtype}, {args.device}, median of {args.repeat}")
    print(f"{'tokens':>6} {'width':>5} {'r':>3} {'base ms':>8} {'peft ms':>8} {'tltorch ms':>10} "
          f"{'tl/base':>7} {'tl/peft':>7}")
    for w, r, t in shapes:
        m = run_shape(w, r, t, dtype, args.device, args.repeat)
        p = m.get("peft", float("nan"))
        print(f"{t:>6} {w:>5} {r:>3} {m['base']*1e3:8.2f} {p*1e3:8.2f} {m['tltorch']*1e3:10.2f} "
              f"{m['tltorch']/m['base']:7.3f} {m['tltorch']/p:7.3f}", flush=True)


if __name__ == "__main__":
    main()
