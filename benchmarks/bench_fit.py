"""fit_head(task="regression") against the eager torch loop that does the same work, side by side in one run.

    python benchmarks/bench_fit.py [--quick] [--repeat N] [--epochs E] [--batch-size B] [--device cpu|cuda]
                                   [--threads T] [--shapes 4096x384x1,16384x768x1,4096x768x8]

Each shape N x D x k: N rows of D float32 features, k float targets (a noisy linear function of the
features). Both sides train the same objective the same way, 20 epochs of shuffled batches of 256:
    tltorch: tltorch.fit_head(x, y, task="regression", weight_decay=wd, seed=s)
    torch:   nn.Linear(D, k) + nn.MSELoss + wd * ||W||^2 in the loss, torch.optim.AdamW (its own decay
             off: fit_head's regression penalty is in the loss), on targets standardised per output as
             fit_head trains, the cosine schedule per step (LambdaLR), the same shuffles (a generator
             seeded with s), each batch's loss read back, and per epoch the training R^2 on up to 8192
             rows, as fit_head records them.
Before timing, the two heads (in the targets' units) must agree to 1e-3 of max|W| and max|b|. Then the
candidates alternate in every repetition (harness.compare, --repeat rounds, default 5, one warm-up
each) and the medians are printed with the ratio torch / tltorch (> 1: fit_head is faster). The
machine line and the load average (os.getloadavg before and after) say how busy the machine was.
--threads sets torch.set_num_threads for both sides (tltorch's kernels take torch's thread count).
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tltorch  # noqa: E402

SHAPES = [(4096, 384, 1), (16384, 768, 1), (4096, 768, 8)]
QUICK_SHAPES = [(1024, 128, 1), (1024, 128, 4)]
SAMPLE = 8192  # fit_head's training-metric rows
WD, LR, SEED = 1e-2, 1e-2, 0


def make_data(n, d, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(k, d, generator=g) / math.sqrt(d)
    y = x @ w.t() + 0.3 * torch.randn(n, k, generator=g) + 2.0
    return x.to(device), (y[:, 0] if k == 1 else y).to(device)


def eager_fit(x, y, epochs, batch_size, lr=LR, wd=WD, seed=SEED):
    """The same training as fit_head's regression, written with torch's modules and optimizer."""
    n, d = x.shape
    y2 = y.reshape(n, -1)
    mean, std = y2.double().mean(0), y2.double().std(0, correction=0)
    ys = ((y2.double() - mean) / std).float()
    head = torch.nn.Linear(d, y2.shape[1], device=x.device)
    with torch.no_grad():  # fit_head starts from zeros: the mean prediction
        head.weight.zero_()
        head.bias.zero_()
    mse = torch.nn.MSELoss()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n, generator=g)[:SAMPLE].to(x.device) if n > SAMPLE else None
    xs, yss = (x, ys) if sample is None else (x[sample], ys[sample])
    var = std.square().float()
    hist = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(x.device)
        loss_sum = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            pred = head(x[idx])
            loss = mse(pred, ys[idx]) + wd * head.weight.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                loss_sum += float(((pred - ys[idx]).square() * var).mean()) * idx.numel()
        with torch.no_grad():
            res = (head(xs) - yss).double().square().sum(0)
            tot = (yss.double() - yss.double().mean(0)).square().sum(0)
            hist.append((loss_sum / n, float((1 - res / tot).mean())))
    with torch.no_grad():
        w = head.weight * std.float()[:, None]
        b = head.bias * std.float() + mean.float()
    return w, b, hist


def tl_fit(x, y, epochs, batch_size):
    return tltorch.fit_head(x, y, task="regression", epochs=epochs, lr=LR, weight_decay=WD, batch_size=batch_size,
                            seed=SEED, progress=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shapes", default=None, help="NxDxk,... (rows x features x outputs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = (QUICK_SHAPES if args.quick else
              [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES)
    epochs = 2 if args.quick else args.epochs
    print(f"# {harness.machine()}")
    print(f"# load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"# {epochs} epochs, batch {args.batch_size}, lr {LR}, weight_decay {WD}, cosine; medians of {args.repeat} "
          "interleaved rounds")
    print("| N x D x k | torch loop (ms) | fit_head (ms) | torch / fit_head |")
    print("|---|---|---|---|")
    for n, d, k in shapes:
        x, y = make_data(n, d, k, args.device)
        w, b, _ = eager_fit(x, y, epochs, args.batch_size)
        head, _ = tl_fit(x, y, epochs, args.batch_size)
        harness.check_close(f"{n}x{d}x{k} weight", head.weight.detach(), w, 1e-3)
        harness.check_close(f"{n}x{d}x{k} bias", head.bias.detach(), b, 1e-3)
        m = harness.compare({"torch": lambda: eager_fit(x, y, epochs, args.batch_size),
                             "tltorch": lambda: tl_fit(x, y, epochs, args.batch_size)},
                            repeat=args.repeat, device=args.device, flush=False)
        print(f"| {n} x {d} x {k} | {m['torch'] * 1e3:.1f} | {m['tltorch'] * 1e3:.1f} | "
              f"{m['torch'] / m['tltorch']:.2f}x |", flush=True)
    print(f"# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
