"""One masked-LM training step (forward + backward + AdamW step) of tltorch.adapt_body's path against the
same step on transformers' own loss, time and peak memory.

    hf:       model(input_ids, labels=labels).loss: BertForMaskedLM's head (dense + gelu + LayerNorm, decoder)
              on every token, the B x T x V logits, F.cross_entropy over the masked ones
    rows:     the masked rows only, in plain torch: transform(hidden[masked]), F.linear to their N_m x V
              logits, F.cross_entropy (what the fused head saves beyond picking the rows)
    tltorch:  adapt_body's path: transform(hidden[masked]), then tltorch.functional.linear_cross_entropy
              (the logits a chunk of rows at a time, never materialised)
each followed by loss.backward() and tltorch.optim.AdamW's step over every parameter. Default shape: a
BERT-base-like model (vocabulary 30522, hidden 768, 12 heads, intermediate 3072) with --layers 2 encoder
layers, random weights, batch 16 x 128 tokens, 15% of them masked (labels -100 elsewhere), float32, CPU.

Correctness first: on one batch in eval mode, the loss and every parameter's gradient of rows and tltorch
against hf's. Then each candidate runs in a fresh process (multiprocessing's spawn): it builds the model,
the batch and the optimizer, runs one untimed step (AdamW's moments allocated), drops the gradients, resets
the VmHWM high-water mark to its RSS (/proc/self/clear_refs), runs --steps timed steps and reports their
median and the peak above that baseline (activations, logits, gradients). The parent runs --rounds rounds,
each with every candidate, the order rotated each round, and prints the median time, the largest peak and
the ratios to hf.
"""
import argparse
import gc
import multiprocessing
import os
import resource
import statistics
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_losses import _status_kb  # noqa: E402

import tltorch  # noqa: E402
from tltorch import adapt  # noqa: E402

MiB = 1 << 20
IMPLS = ("hf", "rows", "tltorch")
MASK_ID = 103  # BERT's [MASK]


def make_model(args, seed=0):
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=args.V, hidden_size=args.D, num_hidden_layers=args.layers,
                                  num_attention_heads=12, intermediate_size=4 * args.D, max_position_embeddings=512)
    return transformers.BertForMaskedLM(cfg)


def make_batch(args, seed=0):
    """Random tokens, 15% masked as DataCollatorForLanguageModeling would (labels -100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, args.V, (args.B, args.T), generator=g)
    masked = torch.rand(args.B, args.T, generator=g) < 0.15
    labels = torch.where(masked, ids, -100)
    return {"input_ids": torch.where(masked, MASK_ID, ids), "labels": labels}


def loss_fn(impl, model):
    """batch -> the masked-LM loss, by one of IMPLS."""
    if impl == "hf":
        return lambda b: model(input_ids=b["input_ids"], labels=b["labels"]).loss
    tokenizer = types.SimpleNamespace(mask_token="[MASK]", mask_token_id=MASK_ID)
    head = adapt._resolve(model, "mlm", tokenizer)
    if impl == "tltorch":
        return lambda b: head.loss(b)[0]

    def rows(b):
        x, target = head.features(b)
        return F.cross_entropy(F.linear(x, head.weight, head.bias), target)
    return rows


def check(args):
    model = make_model(args).eval()
    batch = make_batch(args)
    params = list(model.parameters())
    ref = loss_fn("hf", model)(batch)
    ref_g = torch.autograd.grad(ref, params)
    for impl in IMPLS[1:]:
        loss = loss_fn(impl, model)(batch)
        harness.check_close(f"{impl} loss", loss.detach(), ref.detach(), 1e-5)
        scale = max(float(g.abs().max()) for g in ref_g)
        for (name, _), a, b in zip(model.named_parameters(), torch.autograd.grad(loss, params), ref_g):
            err = float((a - b).abs().max()) / scale
            if not err <= 1e-4:
                raise AssertionError(f"{impl} d{name}: error {err:.2e} of the gradients' scale; not timing it")


def child(impl, opts):
    """One candidate's measurement; runs in a fresh interpreter (spawn), so its peak is its own."""
    args = argparse.Namespace(**opts)
    torch.set_num_threads(args.threads)
    model = make_model(args).train()
    batch = make_batch(args)
    fn = loss_fn(impl, model)
    opt = tltorch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        fn(batch).backward()
        opt.step()
    step()  # AdamW's moments allocated here, before the baseline
    opt.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_kb("VmRSS") * 1024
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = [harness.time_once(step) for _ in range(args.steps)]
    return {"impl": impl, "secs": statistics.median(times), "peak": _status_kb("VmHWM") * 1024 - base,
            "peak_above_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_maxrss,
            "base": base}


def spawn(impl, args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(child, (impl, vars(args)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--D", type=int, default=768)
    ap.add_argument("--V", type=int, default=30522)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per child (their median)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {harness.machine()}")
    check(argparse.Namespace(**{**vars(args), "B": 2, "T": 24, "layers": 1}))
    print("# correctness: rows and tltorch loss within 1e-5 of hf's, every gradient within 1e-4 of the "
          "gradients' scale (B 2, T 24, 1 layer)")
    res = {k: [] for k in IMPLS}
    for r in range(args.rounds):
        for impl in IMPLS[r % 3:] + IMPLS[:r % 3]:
            res[impl].append(spawn(impl, args))
    secs = {k: statistics.median(x["secs"] for x in v) for k, v in res.items()}
    peak = {k: max(x["peak"] for x in v) for k, v in res.items()}
    maxrss = {k: max(x["peak_above_maxrss"] for x in v) for k, v in res.items()}
    base = max(x["base"] for v in res.values() for x in v)
    print(f"# one BertForMaskedLM step (fwd + bwd + tltorch AdamW), V {args.V}, D {args.D}, {args.layers} layers, "
          f"B {args.B} x T {args.T} ({args.B * args.T} tokens, ~15% masked), float32, CPU, {args.threads} threads; "
          f"{args.rounds} rounds x {args.steps} steps, rotated order; RSS before the step {base / MiB:.0f} MiB")
    print(f"| path | step time (median) | peak above RSS (VmHWM) | ru_maxrss above | time / hf | memory / hf |")
    print("|---|---|---|---|---|---|")
    for k in IMPLS:
        print(f"| {k} | {secs[k]:.2f} s | {peak[k] / MiB:.0f} MiB | {maxrss[k] / MiB:.0f} MiB | "
              f"{secs[k] / secs['hf']:.2f} | {peak[k] / peak['hf']:.3f} |")


if __name__ == "__main__":
    main()
