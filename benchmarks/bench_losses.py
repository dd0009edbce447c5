"""token_logprobs forward + backward against the eager torch formula, time and peak memory.

    eager:    logp = torch.log_softmax(F.linear(h, W), -1).gather(-1, t[..., None])[..., 0]
    tltorch:  logp = tltorch.functional.token_logprobs(h, W, t)
then (logp * g).sum().backward() with a random upstream gradient g (as a sequence-level loss gives), h and
W requiring grad (--frozen-weight: W frozen, as under LoRA). Default shape: 4096 tokens (B 8 x T 512),
D 768, V 32000, float32, on the CPU; a tenth of the targets ignored.

Correctness first: both against float64 on a small shape (log-probs and both gradients). Then each
candidate runs in fresh processes (this script re-invoked with --child IMPL): the child allocates the
inputs, resets the VmHWM high-water mark to its RSS (/proc/self/clear_refs) and also reads ru_maxrss,
runs one untimed fwd+bwd and one timed one, and reports the peak above that baseline (the .grad of h and W
are alive at the peak of both). The parent runs --rounds pairs (default 3), alternating which goes
first, and prints the median time, the largest peak, and tltorch/eager ratios (targets: memory <= 0.15,
time <= 1.0). On a lent GPU (--device cuda): CUDA events and max_memory_allocated.

--distill: tltorch.losses.linear_distillation_loss (student h, W trained; a teacher of the same D and V,
frozen; T 2, alpha 0.5, forward KL plus the hard cross-entropy) against the eager DistilBERT formula on
full logits: log_softmax of both models' logits / T, F.kl_div(log_target=True), F.cross_entropy; the
scalar's backward. The same processes, peaks and ratios.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tltorch  # noqa: E402,F401
from tltorch.functional import token_logprobs  # noqa: E402
from tltorch.losses import linear_distillation_loss  # noqa: E402

MiB = 1 << 20


def eager(h, w, t):
    keep = t != -100
    lp = torch.log_softmax(F.linear(h, w).float(), -1).gather(-1, torch.where(keep, t, 0)[..., None])[..., 0]
    return torch.where(keep, lp, 0.0)


IMPLS = {"eager": eager, "tltorch": lambda h, w, t: token_logprobs(h, w, t)}
TEMPERATURE, ALPHA = 2.0, 0.5


def eager_distill(h, w, th, tw, t):
    zs = F.linear(h, w).float()
    with torch.no_grad():
        lt = torch.log_softmax(F.linear(th, tw).float() / TEMPERATURE, -1)
    kl = F.kl_div(torch.log_softmax(zs / TEMPERATURE, -1), lt, reduction="none", log_target=True).sum(-1)
    ce = F.cross_entropy(zs.flatten(0, -2), t.flatten(), reduction="none").view(t.shape)
    keep = t != -100
    per = (1 - ALPHA) * TEMPERATURE ** 2 * kl + ALPHA * ce
    return torch.where(keep, per, 0.0).sum() / keep.sum()


DISTILL_IMPLS = {"eager": eager_distill,
                 "tltorch": lambda h, w, th, tw, t: linear_distillation_loss(h, w, th, tw, targets=t,
                                                                             temperature=TEMPERATURE, alpha=ALPHA)}


def make_inputs(B, T, D, V, dtype, device, frozen, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * D ** -0.5).to(device=device, dtype=dtype).requires_grad_(not frozen)
    t = torch.randint(0, V, (B, T), generator=g)
    t[torch.rand(B, T, generator=g) < 0.1] = -100
    up = torch.randn(B, T, generator=g).to(device)
    return h, w, t.to(device), up


def make_teacher(B, T, D, V, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    th = torch.randn(B, T, D, generator=g).to(device=device, dtype=dtype)
    tw = (torch.randn(V, D, generator=g) * D ** -0.5).to(device=device, dtype=dtype)
    return th, tw


def distill_step_of(impl, h, w, th, tw, t):
    fn = DISTILL_IMPLS[impl]

    def step():
        h.grad = w.grad = None
        fn(h, w, th, tw, t).backward()
    return step


def check_distill(device):
    h, w, t, _ = make_inputs(2, 37, 48, 1000, torch.float32, device, frozen=False, seed=1)
    th, tw = make_teacher(2, 37, 48, 1000, torch.float32, device)
    h64, w64 = (x.detach().double().requires_grad_(True) for x in (h, w))
    ref = eager_distill(h64, w64, th.double(), tw.double(), t)
    ref_grads = torch.autograd.grad(ref, [h64, w64])
    for impl, fn in DISTILL_IMPLS.items():
        hh, ww = (x.detach().clone().requires_grad_(True) for x in (h, w))
        loss = fn(hh, ww, th, tw, t)
        grads = torch.autograd.grad(loss, [hh, ww])
        harness.check_close(f"{impl} distillation loss", loss, ref, 1e-5)
        for name, a, b in zip(("dh", "dW"), grads, ref_grads):
            harness.check_close(f"{impl} {name}", a, b, 1e-5)


def step_of(impl, h, w, t, up):
    fn = IMPLS[impl]

    def step():
        h.grad = None
        if w.requires_grad:
            w.grad = None
        (fn(h, w, t) * up).sum().backward()
    return step


def check(device):
    h, w, t, up = make_inputs(2, 37, 48, 1000, torch.float32, device, frozen=False, seed=1)
    h64, w64 = (x.detach().double().requires_grad_(True) for x in (h, w))
    ref = eager(h64, w64, t)
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), [h64, w64])
    for impl, fn in IMPLS.items():
        hh, ww = (x.detach().clone().requires_grad_(True) for x in (h, w))
        lp = fn(hh, ww, t)
        grads = torch.autograd.grad((lp * up).sum(), [hh, ww])
        harness.check_close(f"{impl} log-probs", lp, ref, 1e-5)
        for name, a, b in zip(("dh", "dW"), grads, ref_grads):
            harness.check_close(f"{impl} {name}", a, b, 1e-5)


def _status_kb(key):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def child(args):
    device, dtype = args.device, getattr(torch, args.dtype)
    cuda = device.startswith("cuda")
    h, w, t, up = make_inputs(args.B, args.T, args.D, args.V, dtype, device, args.frozen_weight)
    if args.distill:
        th, tw = make_teacher(args.B, args.T, args.D, args.V, dtype, device)
        step = distill_step_of(args.child, h, w, th, tw, t)
    else:
        step = step_of(args.child, h, w, t, up)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _status_kb("VmRSS") * 1024
        base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up, counted in the peak
    secs = harness.time_once(step, device)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        extra = {}
    else:
        peak = _status_kb("VmHWM") * 1024 - base
        extra = {"peak_above_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_maxrss}
    print(json.dumps({"impl": args.child, "secs": secs, "peak": peak, **extra, "threads": torch.get_num_threads()}))


def spawn(impl, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--device", args.device, "--dtype", args.dtype,
           "--B", str(args.B), "--T", str(args.T), "--D", str(args.D), "--V", str(args.V)]
    cmd += ["--frozen-weight"] if args.frozen_weight else []
    cmd += ["--distill"] if args.distill else []
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"child {impl} failed (rc {p.returncode}): {(p.stderr or p.stdout)[-2000:]}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=list(IMPLS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--D", type=int, default=768)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frozen-weight", action="store_true")
    ap.add_argument("--distill", action="store_true")
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(f"# {harness.machine()}")
    if args.distill:
        check_distill(args.device)
        print("# correctness: distillation loss, dh and dW of both within 1e-5 of float64 (B 2, T 37, D 48, V 1000)")
    else:
        check(args.device)
        print("# correctness: log-probs, dh and dW of both within 1e-5 of float64 (B 2, T 37, D 48, V 1000)")
    res = {k: [] for k in IMPLS}
    for r in range(args.rounds):
        for impl in (("eager", "tltorch") if r % 2 == 0 else ("tltorch", "eager")):
            res[impl].append(spawn(impl, args))
    secs = {k: statistics.median(x["secs"] for x in v) for k, v in res.items()}
    peak = {k: max(x["peak"] for x in v) for k, v in res.items()}
    what = f"N {args.B * args.T} (B {args.B} x T {args.T}), D {args.D}, V {args.V}, {args.dtype}, {args.device}, " \
           f"W {'frozen' if args.frozen_weight else 'trained'}"
    if args.distill:
        what = f"N {args.B * args.T} (B {args.B} x T {args.T}), D {args.D}, V {args.V} (student and teacher), " \
               f"{args.dtype}, {args.device}, T {TEMPERATURE}, alpha {ALPHA}, forward KL"
    print(f"# {'linear_distillation_loss' if args.distill else 'token_logprobs'} fwd+bwd, {what}, {args.rounds} rounds")
    for k in IMPLS:
        more = f", ru_maxrss +{max(x['peak_above_maxrss'] for x in res[k]) / MiB:.0f} MiB" \
            if "peak_above_maxrss" in res[k][0] else ""
        print(f"{k:8s} time {secs[k]:.3f} s   extra peak memory {peak[k] / MiB:8.1f} MiB{more}")
    print(f"tltorch/eager: time {secs['tltorch'] / secs['eager']:.2f} (target <= 1.0), "
          f"memory {peak['tltorch'] / peak['eager']:.3f} (target <= 0.15)")


if __name__ == "__main__":
    main()
