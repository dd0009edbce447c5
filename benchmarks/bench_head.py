"""The fused head tltorch.functional.linear_cross_entropy against eager torch, side by side in one run.

    python benchmarks/bench_head.py [--quick] [--classification] [--vocab] [--repeat N]
                                    [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                    [--gpu-shapes] [--N 4096 --D 768 --C 30522,50257] [--x-grad] [--no-bias]

Both sides run forward + backward of the same loss on the same inputs:
    tltorch: tltorch.functional.linear_cross_entropy(x, weight, target, bias).backward()
    torch:   F.cross_entropy(F.linear(x, weight, bias), target).backward()
Loss and gradients are checked against eager torch on the same inputs (computed in float32 from them;
relative tolerance float32 1e-4, bfloat16 3e-2, float16 1e-2) before anything is timed.

Classification (--classification): N in {32, 256, 1024, 4096} rows, D in {384, 768}, C in
{2, 10, 100, 1000}; weight and bias require grad, x does not (features from a frozen body), plus one row
of variants where x requires grad too (D 768, C 1000, every N). Each timed call is one fwd+bwd with
.grad reset to None first. The candidates alternate in every repetition (harness.compare) and the
median is reported. Small shapes (N*D*C < 2**25 multiply-adds) are overhead-bound: they run without
cache flushing (flush=False: the data stays hot, as in a training loop) and with enough repetitions
for about 0.25 s per candidate (at least 25, at most 2000); larger ones flush caches between calls and
repeat for about 0.5 s (at least --repeat, default 7; at most 25). Ratio = eager / tltorch of the
median times (> 1 means tltorch is faster; target >= 1.5).

Vocabulary (--vocab): N 4096, D 768, C in {30522, 50257}, float32 (with --gpu-shapes: bfloat16,
N 8192, D 4096, C in {32000, 128256}). Time and peak memory above inputs and parameters, each case in
fresh processes (this script re-invoked with --child vocab --impl torch|tltorch ...): a child allocates
inputs and parameters, records its memory (CPU: VmRSS, with the VmHWM high-water mark reset to it via
/proc/self/clear_refs, and ru_maxrss; CUDA: torch.cuda.memory_allocated after
reset_peak_memory_stats), runs one untimed fwd+bwd and --repeat (1 per child) timed ones, and reports
the peak above that baseline (CPU: VmHWM and ru_maxrss; CUDA: max_memory_allocated). The .grad of
weight and bias (the size of the parameters) are alive at the peak of both. The parent runs --repeat
rounds (default 3) of one torch child and one tltorch child, alternating which goes first, and prints
the median time and the largest peak of each, and tltorch/torch ratios (targets: memory <= 0.10,
time <= 1.00). Times on CUDA come from CUDA events.

--quick: a small subset of both parts (a few classification shapes, one small vocab child pair) that
runs in well under 30 s; for smoke tests.
"""
import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import tltorch  # noqa: E402

CLS_N = (32, 256, 1024, 4096)
CLS_D = (384, 768)
CLS_C = (2, 10, 100, 1000)
CLS_XGRAD = [(n, 768, 1000) for n in CLS_N]  # (N, D, C) with x.requires_grad as well
VOCAB = [(4096, 768, 30522), (4096, 768, 50257)]
VOCAB_GPU = [(8192, 4096, 32000), (8192, 4096, 128256)]
QUICK_CLS = [(32, 384, 10, False), (256, 768, 100, False), (1024, 768, 1000, False), (256, 768, 1000, True)]
QUICK_VOCAB = [(1024, 384, 4096)]
SMALL_MACS = 1 << 25  # below this many N*D*C multiply-adds a shape counts as overhead-bound
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
MiB = float(1 << 20)


# ---- inputs and the two implementations ---------------------------------------------------------------

def make_inputs(n, d, c, dtype, device, x_grad, seed=0):
    """x (n, d), weight (c, d) scaled like nn.Linear's (logits of order 1), bias (c,), target (n,).
    Generated in place (no temporaries the size of the weight, which would inflate a child's baseline)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, dtype=dtype, device=device, generator=g)
    w = torch.randn(c, d, dtype=dtype, device=device, generator=g).mul_(1.0 / math.sqrt(d))
    b = torch.randn(c, dtype=dtype, device=device, generator=g).mul_(0.1)
    t = torch.randint(0, c, (n,), device=device, generator=g)
    x.requires_grad_(x_grad)
    w.requires_grad_(True)
    b.requires_grad_(True)
    return x, w, b, t


def loss_fn(impl):
    if impl == "torch":
        return lambda x, w, b, t: F.cross_entropy(F.linear(x, w, b), t)
    return lambda x, w, b, t: tltorch.functional.linear_cross_entropy(x, w, t, b)


def make_step(impl, x, w, b, t):
    """One training step of the head: fresh .grad, forward, backward."""
    f = loss_fn(impl)
    leaves = [p for p in (x, w, b) if p is not None and p.requires_grad]

    def step():
        for p in leaves:
            p.grad = None
        f(x, w, b, t).backward()
    return step


def run_once(impl, x, w, b, t):
    """(loss, [grads of the leaves that require grad]) of one fwd+bwd."""
    leaves = [p for p in (x, w, b) if p.requires_grad]
    for p in leaves:
        p.grad = None
    loss = loss_fn(impl)(x, w, b, t)
    loss.backward()
    out = loss.detach(), [p.grad for p in leaves]
    for p in leaves:
        p.grad = None
    return out


def unsupported(device, err):
    """On an accelerator tltorch may not have this kernel yet: report it instead of failing the run.
    On the CPU any error is a real failure."""
    return device != "cpu" and isinstance(err, (RuntimeError, NotImplementedError))


def check(x, w, b, t, label):
    """tltorch's loss and gradients against eager torch on the same inputs (in float32). Returns None
    when they agree, or a message when tltorch does not run on this device; raises when they differ."""
    dtype = x.dtype
    try:
        loss, grads = run_once("tltorch", x, w, b, t)
    except Exception as e:  # noqa: BLE001
        if unsupported(x.device.type, e):
            return f"{type(e).__name__}: {e}"
        raise
    ref_in = [v.detach().float().requires_grad_(v.requires_grad) for v in (x, w, b)]
    ref_loss, ref_grads = run_once("torch", *ref_in, t)
    names = [n for n, v in zip(("dx", "dweight", "dbias"), (x, w, b)) if v.requires_grad]
    harness.check_close(f"{label} loss", loss, ref_loss, TOL[dtype])
    for name, got, ref in zip(names, grads, ref_grads):
        if got.dtype != dtype or got.shape != ref.shape:
            raise AssertionError(f"{label} {name}: dtype/shape {got.dtype}/{tuple(got.shape)}, expected "
                                 f"{dtype}/{tuple(ref.shape)}")
        harness.check_close(f"{label} {name}", got, ref, TOL[dtype])
    return None


def fmt_t(s):
    if s is None:
        return f"{'n/a':>10}"
    if s < 1e-3:
        return f"{s * 1e6:7.1f} us"
    if s < 1.0:
        return f"{s * 1e3:7.2f} ms"
    return f"{s:7.3f} s "


def fmt_ratio(r, width=7):
    return f"{'n/a':>{width}}" if r is None else f"{r:{width}.2f}"


# ---- classification shapes ----------------------------------------------------------------------------

def time_pair(cands, device, small, min_repeat, quick):
    """Median seconds per fwd+bwd of each candidate, interleaved; the number of repetitions follows the
    cost of one call (estimated after warm-up)."""
    est = []
    for fn in cands.values():
        fn()  # warm-up
        ts = [harness.time_once(fn, device)]
        while len(ts) < 5 and sum(ts) < 0.05:
            ts.append(harness.time_once(fn, device))
        est.append(min(ts))  # the least is the one least disturbed by a busy machine
    t_est = max(statistics.mean(est), 1e-7)
    budget, lo, hi = (0.25, 25, 2000) if small else (0.5, min_repeat, max(min_repeat, 25))
    if quick:
        budget, hi = budget / 5, min(hi, 200)
    repeat = max(lo, min(hi, int(budget / t_est)))
    return harness.compare(cands, repeat=repeat, warmup=0, device=device, flush=not small), repeat


def bench_classification(args, dtype):
    if args.quick:
        cases = QUICK_CLS
    else:
        cases = [(n, d, c, False) for d in CLS_D for n in CLS_N for c in CLS_C]
        cases += [(n, d, c, True) for n, d, c in CLS_XGRAD]
    min_repeat = args.repeat or 7
    print(f"\n## Classification head, {str(dtype).replace('torch.', '')} on {args.device}: fwd+bwd per call "
          f"(weight, bias require grad; x too where x.grad = yes); median times; ratio = eager torch / "
          f"tltorch (> 1: tltorch faster; target >= 1.5)")
    print(f"## small = N*D*C < 2**{SMALL_MACS.bit_length() - 1} multiply-adds: overhead-bound, timed without "
          f"cache flushing (harness.compare flush=False) and with many repetitions")
    print(f"{'N':>5} {'D':>4} {'C':>5} {'x.grad':>6} {'small':>5} {'reps':>5} {'torch':>10} {'tltorch':>10} "
          f"{'ratio':>7}")
    ratios = []
    for n, d, c, xg in cases:
        x, w, b, t = make_inputs(n, d, c, dtype, args.device, xg, seed=n * 7 + d * 3 + c)
        note = check(x, w, b, t, f"N={n} D={d} C={c}")
        small = n * d * c < SMALL_MACS
        cands = {"torch": make_step("torch", x, w, b, t)}
        if note is None:
            cands["tltorch"] = make_step("tltorch", x, w, b, t)
        times, repeat = time_pair(cands, args.device, small, min_repeat, args.quick)
        ratio = times["torch"] / times["tltorch"] if note is None else None
        if ratio is not None:
            ratios.append(ratio)
        print(f"{n:5d} {d:4d} {c:5d} {'yes' if xg else 'no':>6} {'yes' if small else 'no':>5} {repeat:5d} "
              f"{fmt_t(times['torch'])} {fmt_t(times.get('tltorch'))} {fmt_ratio(ratio)}"
              + ("" if note is None else f"  tltorch not run: {note}"))
        del x, w, b, t, cands
    if ratios:
        geo = math.exp(statistics.mean(math.log(r) for r in ratios))
        met = sum(r >= 1.5 for r in ratios)
        print(f"# ratio: geometric mean {geo:.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}; "
              f">= 1.5 on {met}/{len(ratios)} shapes")


# ---- vocabulary shapes (memory in fresh processes) -----------------------------------------------------

def _status_kb():
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _maxrss_bytes():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB, macOS bytes


def child_vocab(args):
    """Runs in a fresh process: one implementation on one vocabulary shape. Prints one JSON line."""
    device, dtype = args.device, getattr(torch, args.dtype)
    n, d, c = args.N, args.D, int(args.C)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
    x, w, b, t = make_inputs(n, d, c, dtype, device, args.x_grad, seed=args.seed)
    if args.no_bias:
        b = None
    step = make_step(args.impl, x, w, b, t)
    res = {"impl": args.impl, "N": n, "D": d, "C": c, "dtype": args.dtype, "device": device}
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res.update(base_bytes=base)
    else:
        hwm_reset = False
        try:  # "5" resets the VmHWM high-water mark to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            hwm_reset = True
        except OSError:
            pass
        st = _status_kb()
        base = st.get("VmRSS", 0) * 1024
        base_maxrss = _maxrss_bytes()
        res.update(base_bytes=base, base_hwm_bytes=st.get("VmHWM", 0) * 1024, base_maxrss_bytes=base_maxrss,
                   hwm_reset=hwm_reset)
    times = []
    try:
        for i in range(1 + args.repeat):  # the first fwd+bwd is warm-up: counted in the peak, not timed
            s = harness.time_once(step, device)
            if i:
                times.append(s)
    except Exception as e:  # noqa: BLE001
        if not unsupported(device, e):
            raise
        res["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(res))
        return
    if cuda:
        torch.cuda.synchronize()
        res.update(peak_above_bytes=torch.cuda.max_memory_allocated() - base)
    else:
        st = _status_kb()
        res.update(peak_above_bytes=st.get("VmHWM", 0) * 1024 - base,
                   peak_above_maxrss_bytes=_maxrss_bytes() - base_maxrss)
    res.update(times=times, threads=torch.get_num_threads())
    print(json.dumps(res))


def spawn_child(impl, n, d, c, args, dtype_name):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "vocab", "--impl", impl, "--N", str(n),
           "--D", str(d), "--C", str(c), "--dtype", dtype_name, "--device", args.device, "--repeat", "1",
           "--seed", str(args.seed)] + (["--x-grad"] if args.x_grad else []) + (["--no-bias"] if args.no_bias else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"child {' '.join(cmd[2:])} failed (rc {p.returncode}):\n  " + "\n  ".join(tail))
    return json.loads(lines[-1])


def bench_vocab(args, dtype):
    dname = str(dtype).replace("torch.", "")
    if args.N or args.D or args.C:
        base_shapes = VOCAB_GPU if args.gpu_shapes else VOCAB
        n = args.N or base_shapes[0][0]
        d = args.D or base_shapes[0][1]
        cs = [int(v) for v in args.C.split(",")] if args.C else sorted({s[2] for s in base_shapes})
        shapes = [(n, d, c) for c in cs]
    elif args.quick:
        shapes = QUICK_VOCAB
    else:
        shapes = VOCAB_GPU if args.gpu_shapes else VOCAB
    rounds = 1 if (args.quick and not args.repeat) else (args.repeat or 3)
    cuda = args.device.startswith("cuda")
    what = ("torch.cuda.max_memory_allocated above memory_allocated after inputs+params" if cuda else
            "process RSS high-water mark (VmHWM) above RSS after inputs+params")
    print(f"\n## Vocabulary head, {dname} on {args.device}, x.grad = {'yes' if args.x_grad else 'no'}{', no bias' if args.no_bias else ''}: one fwd+bwd "
          f"per child process, {rounds} round(s) of (torch child, tltorch child) alternating order; "
          f"median time, largest peak")
    print(f"## peak = {what}; the .grad of weight and bias count in both; ratios = tltorch / torch "
          f"(targets: memory <= 0.10, time <= 1.00)")
    print(f"{'N':>5} {'D':>5} {'C':>7} {'inputs+params':>13} {'torch peak+':>12} {'tltorch peak+':>13} "
          f"{'mem ratio':>9} {'torch':>10} {'tltorch':>10} {'time ratio':>10}")
    xcheck = []
    for n, d, c in shapes:
        x, w, b, t = make_inputs(n, d, c, dtype, args.device, args.x_grad, seed=args.seed)
        note = check(x, w, b, t, f"N={n} D={d} C={c}")
        del x, w, b, t
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        res = {"torch": [], "tltorch": []}
        for r in range(rounds):
            order = ("torch", "tltorch") if r % 2 == 0 else ("tltorch", "torch")
            for impl in order:
                if impl == "tltorch" and note is not None:
                    continue
                res[impl].append(spawn_child(impl, n, d, c, args, dname))
        errs = [o["error"] for o in res["tltorch"] if "error" in o]
        if errs:
            note = errs[0]
        ok = {k: [o for o in v if "error" not in o] for k, v in res.items()}

        def peak(k, key="peak_above_bytes"):
            return max(o[key] for o in ok[k]) if ok[k] else None

        def med(k):
            return statistics.median(s for o in ok[k] for s in o["times"]) if ok[k] else None

        esize = torch.empty((), dtype=dtype).element_size()
        io = ((n * d + c * d + c) * esize + n * 8) / MiB
        pt, pl, tt, tl = peak("torch"), peak("tltorch"), med("torch"), med("tltorch")
        mr = pl / pt if (pl is not None and pt) else None
        tr = tl / tt if (tl is not None and tt) else None
        print(f"{n:5d} {d:5d} {c:7d} {io:9.1f} MiB {pt / MiB:8.1f} MiB "
              + (f"{pl / MiB:9.1f} MiB" if pl is not None else f"{'n/a':>13}")
              + f" {fmt_ratio(mr, 9)} {fmt_t(tt)} {fmt_t(tl)} {fmt_ratio(tr, 10)}"
              + ("" if note is None else f"  tltorch not run: {note}"))
        if not cuda:
            allc = [o for v in ok.values() for o in v]
            xcheck.append((n, d, c, peak("torch", "peak_above_maxrss_bytes"),
                           peak("tltorch", "peak_above_maxrss_bytes"),
                           max(o["base_maxrss_bytes"] - o["base_bytes"] for o in allc),
                           all(o.get("hwm_reset") for o in allc)))
    for n, d, c, pt, pl, slack, reset in xcheck:
        print(f"# cross-check N={n} D={d} C={c}: ru_maxrss above its value at baseline: torch {pt / MiB:.1f} MiB, "
              + (f"tltorch {pl / MiB:.1f} MiB" if pl is not None else "tltorch n/a")
              + (f" (ru_maxrss was already up to {slack / MiB:.1f} MiB above RSS at baseline, from start-up "
                 f"or inherited from this parent: peaks below that do not show in it)" if slack > MiB else "")
              + ("" if reset else "  [VmHWM could not be reset: peak+ may include start-up transients]"))


# ---- main ---------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small subset of both parts (< 30 s)")
    p.add_argument("--classification", action="store_true", help="run the classification part")
    p.add_argument("--vocab", action="store_true", help="run the vocabulary part")
    p.add_argument("--repeat", type=int, default=None,
                   help="classification: least timed repetitions of a large shape (default 7); "
                        "vocab: rounds of child pairs (default 3; 1 with --quick); child: timed fwd+bwd")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="float32 (default), bfloat16 (default with --gpu-shapes), float16")
    p.add_argument("--gpu-shapes", action="store_true",
                   help="vocab shapes N 8192, D 4096, C 32000 and 128256 (bfloat16 unless --dtype)")
    p.add_argument("--N", type=int, default=None, help="vocab: rows (overrides the preset shapes)")
    p.add_argument("--D", type=int, default=None, help="vocab: features (overrides the preset shapes)")
    p.add_argument("--C", default=None, help="vocab: classes, comma-separated (overrides the preset shapes)")
    p.add_argument("--x-grad", action="store_true", help="vocab: x requires grad too")
    p.add_argument("--no-bias", action="store_true", help="vocab: a head without bias (as LM heads mostly are)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["vocab"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["torch", "tltorch"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.gpu_shapes else "float32"
    dtype = getattr(torch, args.dtype)
    if args.child:
        if args.impl is None or args.N is None or args.D is None or args.C is None:
            p.error("--child vocab needs --impl, --N, --D and --C")
        args.repeat = 1 if args.repeat is None else args.repeat
        child_vocab(args)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    both = not (args.classification or args.vocab)
    print(f"# {harness.machine()}")
    if args.classification or both:
        bench_classification(args, dtype)
    if args.vocab or both:
        bench_vocab(args, dtype)


if __name__ == "__main__":
    main()
