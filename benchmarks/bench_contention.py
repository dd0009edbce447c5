"""tltorch and eager torch on a machine where other processes want the cores.

    python benchmarks/bench_contention.py [--what kernels,recipes] [--busy 3] [--jobs 0] [--own-session]
                                          [--rounds 3] [--rule-off] [--repeat 7] [--passive]

Kernels (--what kernels): times the same cases in a fresh child process for each condition: on an
otherwise idle machine and while `--busy` other processes spin (a Python busy loop each); with --passive,
both again with the child under OMP_WAIT_POLICY=passive (OpenMP threads that wait at a barrier sleep
instead of spinning; the variable must be set before the OpenMP runtime loads, hence the child). Each
case alternates tltorch and torch in every repetition and reports medians and torch / tltorch (> 1:
tltorch faster). Both libraries run their threads on the same OpenMP runtime (torch's libgomp).

Recipes (--what recipes): the three recipes of `python -m tltorch demo --quick` (tltorch/demo.py's
functions, its quick sizes and epochs): (a) the seed recipe, torch alone; (b) extract_features +
fit_head; (c) LoRA fine-tuning. One child loads the model and, each round, runs the three idle and
beside the other processes (`--busy` spinners and `--jobs` torch jobs, started once, stopped with
SIGSTOP while idle; which condition goes first alternates). The recipes run in two threads that take
turns every 0.3 s at a batch boundary ((a) in one, (b) then (c) in the other), each timed while it
holds the turn, so that a change in the rest of the machine's load meets them alike. A recipe's
slowdown is its busy time over its idle time in the round; (b)'s and (c)'s over (a)'s in the same round
say whether tltorch's recipes suffer more from the load than torch's (<= 1: no more). Medians over
`--rounds`. --own-session puts each other process in a session of its own: Linux's autogroups then
share the CPUs between sessions first and between threads second, so that a process's extra threads
no longer buy it a larger share.

With --rule-off, everything runs again with TLTORCH_THREADS_LOAD=off (tltorch's kernels then take every
thread torch would, busy or not): for the recipes a second child, for the kernels two more conditions.
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


# A busy process: a Python loop that ends when its parent does.
SPIN = "import os\np = os.getppid()\nwhile os.getppid() == p:\n    for _ in range(1000000): pass"
# A second job: torch on all its threads (OpenMP teams that fork, join and spin while they wait), matrix
# products of the sizes a small model's layers have, until its parent ends.
JOB = ("import os, torch\np = os.getppid()\na, w = torch.randn(640, 384), torch.randn(1536, 384)\n"
       "while os.getppid() == p:\n    for _ in range(20): torch.nn.functional.gelu(a @ w.t()) @ w")

RECIPES = r"""
import copy, json, os, signal, subprocess, sys, tempfile, threading, time
import torch
import tltorch
from tltorch import demo

rounds, others, own_session = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1"  # others: their code
tokenizer, body0 = demo.load_minilm("cpu")
tltorch.freeze(body0)
data = demo.split_reviews(256, 64, 160, seed=0)  # the demo's --quick sizes, epochs 3 and 2
train, val, test = (demo.tokenize(tokenizer, *data[k]) for k in ("train", "val", "test"))
with torch.no_grad():  # first-call costs (allocator, kernels' set-up) out of the timings
    body0(**demo._inputs(train[0], "cpu")[0])


class Baton:
    # Runs the recipes in threads of which one at a time holds the baton, passing it on after SLICE
    # seconds at the next batch: a change in the machine's other load meets all three alike. Each
    # recipe's time is the time its thread held the baton.
    SLICE = 0.3

    def __init__(self, names):
        self.cv, self.order, self.left = threading.Condition(), list(names), list(names)
        self.turn, self.t0, self.held = names[0], 0.0, dict.fromkeys(names, 0.0)

    def take(self, name):
        with self.cv:
            self.cv.wait_for(lambda: self.turn == name)
            self.t0 = time.perf_counter()

    def give(self, name, finished=False):
        with self.cv:
            self.held[name] += time.perf_counter() - self.t0
            i = self.left.index(name)
            if finished:
                self.left.remove(name)
            if self.left:
                self.turn = self.left[(i if finished else i + 1) % len(self.left)]
            self.cv.notify_all()

    def batch(self):  # at every batch of every recipe
        name = threading.current_thread().name
        if name in self.held and time.perf_counter() - self.t0 >= self.SLICE:
            self.give(name)
            self.take(name)

    def run(self, recipes):
        def go(name, fn):
            self.take(name)
            try:
                fn()
            finally:
                self.give(name, finished=True)
        threads = [threading.Thread(target=go, args=kv, name=kv[0]) for kv in recipes.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.held


baton = None
inputs, pool = demo._inputs, tltorch.functional.pool
demo._inputs = lambda *a, **k: (baton.batch(), inputs(*a, **k))[1]  # (a) and (c): each batch
tltorch.functional.pool = lambda *a, **k: (baton.batch(), pool(*a, **k))[1]  # (b): each batch extracted


def recipes():
    global baton
    body = copy.deepcopy(body0)  # (c) adds LoRA to the body in place
    with tempfile.TemporaryDirectory() as tmp:
        def seed():
            demo.recipe_seed(body0, train, test, epochs=3, lr=3e-2, device="cpu", seed=0)

        def extract_then_lora():  # (c) starts from (b)'s head, so (b) runs first in (c)'s thread
            head, *_ = demo.recipe_extract(body, train, val, test, epochs=3, lr=3e-2, device="cpu", seed=0,
                                           cache=os.path.join(tmp, "features"), progress=False)
            t_b[0] = baton.held["c"] + time.perf_counter() - baton.t0
            demo.recipe_lora(body, head, train, test, epochs=2, lr=2e-3, device="cpu", seed=0,
                             adapter_dir=os.path.join(tmp, "adapter"))
        t_b = [0.0]
        baton = Baton(["a", "c"])
        t = baton.run({"a": seed, "c": extract_then_lora})
    return {"a": t["a"], "b": t_b[0], "c": t["c"] - t_b[0]}


def load():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


spinners = [subprocess.Popen([sys.executable, "-c", code], start_new_session=own_session) for code in others]
try:
    for r in range(rounds):
        for n in ((0, len(others)) if r % 2 == 0 else (len(others), 0)):  # idle first, then busy first, ...
            for p in spinners:
                os.kill(p.pid, signal.SIGCONT if n else signal.SIGSTOP)
            for _ in range(4):  # the thread rule's measurements catch up with the change
                time.sleep(0.2)
                tltorch._C.threads(0)
            load0 = load()
            t = recipes()
            print(json.dumps({"round": r, "busy": n, "times": t, "load": [load0, load()]}), flush=True)
finally:
    for p in spinners:
        p.kill()
        p.wait()
"""
RECIPE_NAMES = {"a": "(a) seed recipe (torch alone)", "b": "(b) extract_features + fit_head",
                "c": "(c) LoRA fine-tuning"}


def run_child(code, args, busy, env_extra=None, each=None):
    """Runs `code` in a fresh Python beside `busy` spinning processes; returns its last line of output as
    JSON (each: called with every line of output as it comes)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env_extra or {}))
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if each:
                each(line)
        if proc.wait():
            raise RuntimeError(f"the child failed ({proc.returncode})")
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return json.loads(lines[-1])


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def fmt(s):
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def recipes(a):
    """One child per variant (the thread rule on; with --rule-off, also off) runs a.rounds rounds of the
    three recipes idle and beside the other processes; a round's slowdown is its busy time / idle time."""
    variants = [("", {})] + ([(", rule off", {"TLTORCH_THREADS_LOAD": "off"})] if a.rule_off else [])
    times = {v: {} for v, _ in variants}
    for v, env in variants:
        def show(line, v=v):
            r = json.loads(line)
            times[v][(r["round"], r["busy"])] = r["times"]
            print(f"# round {r['round'] + 1}{v}, {r['busy']} others: "
                  + ", ".join(f"({k}) {s:.2f} s" for k, s in r["times"].items())
                  + f"; load average {r['load'][0]:.2f} -> {r['load'][1]:.2f}", flush=True)
        run_child(RECIPES, [str(a.rounds), json.dumps([SPIN] * a.busy + [JOB] * a.jobs), str(int(a.own_session))],
                  0, env, show)
    n = a.busy + a.jobs
    slow = {v: {k: [t[(r, n)][k] / t[(r, 0)][k] for r in range(a.rounds)] for k in RECIPE_NAMES}
            for v, t in times.items()}
    beside = f"{a.busy} busy" + (f" + {a.jobs} torch jobs" if a.jobs else "")
    print(f"\n| recipe | " + " | ".join(f"slowdown beside {beside}{v} (rounds) | median | / (a)'s (rounds) | "
                                        "median" for v, _ in variants) + " |")
    print("| --- |" + " --- | ---: | --- | ---: |" * len(variants))
    for k, name in RECIPE_NAMES.items():
        cells = []
        for v, _ in variants:
            rel = [x / y for x, y in zip(slow[v][k], slow[v]["a"])]
            cells += [", ".join(f"{x:.2f}" for x in slow[v][k]), f"{statistics.median(slow[v][k]):.2f}",
                      ", ".join(f"{x:.2f}" for x in rel), f"{statistics.median(rel):.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("/ (a)'s: the recipe's slowdown over the seed recipe's in the same round (<= 1: tltorch's recipe "
          "degrades no more than torch's)")


def kernels(a):
    conds = [("idle", 0, {}), (f"{a.busy} busy", a.busy, {})]
    if a.rule_off:
        off = {"TLTORCH_THREADS_LOAD": "off"}
        conds += [("idle, rule off", 0, off), (f"{a.busy} busy, rule off", a.busy, off)]
    if a.passive:
        passive = {"OMP_WAIT_POLICY": "passive"}
        conds += [("idle, passive", 0, passive), (f"{a.busy} busy, passive", a.busy, passive)]
    print(f"\nkernels: median of {a.repeat}, alternating")
    results = {c[0]: run_child(CHILD, [str(a.repeat)], c[1], c[2]) for c in conds}
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", default="kernels,recipes", help="kernels, recipes or both (comma-separated)")
    ap.add_argument("--busy", type=int, default=1, help="spinning processes during the busy runs")
    ap.add_argument("--repeat", type=int, default=7, help="kernels: repetitions per case")
    ap.add_argument("--passive", action="store_true", help="kernels: also both conditions with OMP_WAIT_POLICY=passive")
    ap.add_argument("--rounds", type=int, default=3, help="recipes: rounds of (idle, busy) runs")
    ap.add_argument("--rule-off", action="store_true", help="also with TLTORCH_THREADS_LOAD=off")
    ap.add_argument("--jobs", type=int, default=0, help="recipes: also this many torch jobs during the busy runs")
    ap.add_argument("--own-session", action="store_true",
                    help="recipes: each other process in a session of its own (Linux's autogroups then share "
                         "the CPUs between sessions first, threads second)")
    a = ap.parse_args()
    what = set(a.what.split(","))
    if not what <= {"kernels", "recipes"}:
        ap.error(f"--what takes kernels and/or recipes, not {a.what!r}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness
    print(f"# {harness.machine()}; {os.cpu_count()} CPUs; load average {loadavg():.2f} before the first child")
    if "recipes" in what:
        recipes(a)
    if "kernels" in what:
        kernels(a)


if __name__ == "__main__":
    main()
