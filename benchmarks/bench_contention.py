"""tltorch and eager torch on a machine where another process wants a core.

    python benchmarks/bench_contention.py [--repeat 7] [--busy 1] [--passive]

Times the same cases in a fresh child process for each condition: on an otherwise idle machine and
while `--busy` other processes spin (a Python busy loop each); with --passive, both again with the
child under OMP_WAIT_POLICY=passive (OpenMP threads that wait at a barrier sleep instead of spinning;
the variable must be set before the OpenMP runtime loads, hence the child). Each case
alternates tltorch and torch in every repetition and reports medians and torch / tltorch (> 1: tltorch
faster). Both libraries run their threads on the same OpenMP runtime (torch's libgomp).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, math, statistics, sys, time
import torch
import torch.nn.functional as F
import tltorch

repeat = int(sys.argv[1])
torch.manual_seed(0)


def head(n, d, c):
    x = torch.randn(n, d)
    w = (torch.randn(c, d) / math.sqrt(d)).requires_grad_()
    b = torch.zeros(c).requires_grad_()
    t = torch.randint(0, c, (n,))

    def ours():
        w.grad = b.grad = None
        tltorch.functional.linear_cross_entropy(x, w, t, b).backward()

    def eager():
        w.grad = b.grad = None
        F.cross_entropy(F.linear(x, w, b), t).backward()
    return f"head {n} x {d} x {c}", ours, eager


def lora(n, d, r):
    base = torch.nn.Linear(d, d).requires_grad_(False)
    layer = tltorch.nn.LoRALinear(base, r=r, lora_alpha=r)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(n, d, requires_grad=True)
    g = torch.randn(n, d)

    def ours():
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        layer(x).backward(g)

    def eager():  # the frozen base layer alone
        x.grad = None
        base(x).backward(g)
    return f"LoRA {n} x {d}, r = {r} (torch: base layer)", ours, eager


def linear(n, k, m):
    x, w = torch.randn(n, k), torch.randn(m, k)
    return f"linear {n} x {k} -> {m}", (lambda: tltorch.functional.linear(x, w)), (lambda: F.linear(x, w))


rows = []
for name, ours, eager in (head(4096, 64, 30000), head(4096, 768, 1000), head(256, 768, 100),
                          lora(4096, 1024, 16), linear(2048, 768, 768)):
    ours(), eager()
    t = {"ours": [], "eager": []}
    for _ in range(repeat):
        for k, f in (("ours", ours), ("eager", eager)):
            t0 = time.perf_counter()
            f()
            t[k].append(time.perf_counter() - t0)
    rows.append([name, statistics.median(t["ours"]), statistics.median(t["eager"])])
print(json.dumps(rows))
"""


def run_child(repeat, busy, passive):
    env = dict(os.environ)
    if passive:
        env["OMP_WAIT_POLICY"] = "passive"
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(repeat)], env=env, capture_output=True,
                             text=True, check=True).stdout
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return json.loads(out.strip().splitlines()[-1])


def fmt(s):
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--busy", type=int, default=1, help="spinning processes during the busy runs")
    ap.add_argument("--passive", action="store_true", help="also time both conditions with OMP_WAIT_POLICY=passive")
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness
    print(f"# {harness.machine()}; {os.cpu_count()} CPUs; median of {a.repeat}, alternating")
    conds = [("idle", 0, False), (f"{a.busy} busy", a.busy, False)]
    if a.passive:
        conds += [("idle, passive", 0, True), (f"{a.busy} busy, passive", a.busy, True)]
    results = {c[0]: run_child(a.repeat, c[1], c[2]) for c in conds}
    print("| case | " + " | ".join(f"{c} tltorch | {c} torch | ratio" for c, _, _ in conds) + " |")
    print("| --- |" + " ---: | ---: | ---: |" * len(conds))
    names = [r[0] for r in results["idle"]]
    for i, name in enumerate(names):
        cells = []
        for c, _, _ in conds:
            _, ours, eager = results[c][i]
            cells += [fmt(ours), fmt(eager), f"{eager / ours:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    gm = {c: math.exp(statistics.fmean(math.log(r[2] / r[1]) for r in results[c])) for c, _, _ in conds}
    print("geometric mean of torch / tltorch: " + ", ".join(f"{c} {v:.2f}" for c, v in gm.items()))


if __name__ == "__main__":
    main()
