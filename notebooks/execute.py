"""Run the notebooks in notebooks/ as saved (QUICK = True) and store their outputs in them.

    python notebooks/execute.py                    # execute each, save the outputs into it
    python notebooks/execute.py --check            # execute each, fail if its saved outputs are not current
    python notebooks/execute.py ulmfit [--check]   # only the notebooks named

Each notebook runs in a scratch folder (its OUT goes there), offline. With the outputs it stores the hash
of its code cells' sources, so a later edit of a cell that was not followed by a rerun is caught by
--check (tests/test_demo.py runs that check), as is a saved run whose results the code no longer gives:
each notebook's last cell prints a summary line, whose numbers must agree with a fresh run's within the
notebook's tolerances.
"""
import argparse
import hashlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

HERE = Path(__file__).resolve().parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
# The kernel's OpenMP threads sleep while they wait instead of spinning: on a CPU shared with other
# processes (a CI machine) spinning threads can slow a run of small ops many times over. Results are the same.
THREADS = {"OMP_WAIT_POLICY": "passive"}


@dataclass(frozen=True)
class Notebook:
    """One notebook: its name (notebooks/<name>.ipynb), the summary line its last cell prints (a regex
    with named groups) and, for each numeric group, how far a fresh run may land from the saved one."""
    name: str
    summary: "re.Pattern"
    tolerance: Dict[str, float]
    timeout: int = 900

    @property
    def path(self) -> Path:
        return HERE / f"{self.name}.ipynb"


_NUM = r"-?[0-9.]+"
NOTEBOOKS = {nb.name: nb for nb in (
    Notebook("quickstart",
             re.compile(rf"summary: frozen body \+ fit_head (?P<probe>{_NUM}), LoRA (?P<lora>{_NUM}) "
                        r"\(test accuracy\); adapter saved to (?P<adapter>\S+)"),
             {"probe": 0.05, "lora": 0.05}),
    Notebook("ulmfit",
             re.compile(rf"summary: masked-LM loss on held-out reviews (?P<mlm_before>{_NUM}) -> "
                        rf"(?P<mlm_after>{_NUM}); ULMFiT (?P<accuracy>{_NUM}) \(test accuracy\)"),
             {"mlm_before": 0.1, "mlm_after": 0.2, "accuracy": 0.05}),
    Notebook("distillation",   # seeded: only the CPU's rounding moves these
             re.compile(rf"summary: student perplexity (?P<ppl_before>{_NUM}) -> (?P<ppl_after>{_NUM}) "
                        rf"\(teacher (?P<teacher>{_NUM})\); KL to the teacher (?P<kl_before>{_NUM}) -> "
                        rf"(?P<kl_after>{_NUM})"),
             {"ppl_before": 0.3, "ppl_after": 0.3, "teacher": 0.3, "kl_before": 0.01, "kl_after": 0.003}),
    Notebook("dpo",
             re.compile(rf"summary: held-out reward margin (?P<margin_before>{_NUM}) -> (?P<margin_after>{_NUM}), "
                        rf"reward accuracy (?P<accuracy>{_NUM}) after (?P<steps>\d+) steps"),
             {"margin_before": 0.01, "margin_after": 0.2, "accuracy": 0.1}, timeout=300),
)}
# the first notebook's, under the names this module has always had
NOTEBOOK = NOTEBOOKS["quickstart"].path
SUMMARY = NOTEBOOKS["quickstart"].summary


def _spec(notebook) -> Notebook:
    if isinstance(notebook, Notebook):
        return notebook
    if notebook not in NOTEBOOKS:
        raise ValueError(f"notebook must be one of {', '.join(NOTEBOOKS)}, got {notebook!r}")
    return NOTEBOOKS[notebook]


def sources_hash(nb) -> str:
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    return hashlib.sha256("\n\0\n".join(code).encode()).hexdigest()


def summary(nb, notebook="quickstart") -> Optional[dict]:
    """The named values of the summary line printed by the last cell (numbers as floats), or None."""
    spec = _spec(notebook)
    text = "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []) if o.get("output_type") == "stream")
    m = spec.summary.search(text)
    if m is None:
        return None
    return {k: float(v) if k in spec.tolerance else v for k, v in m.groupdict().items()}


def execute(folder, notebook="quickstart", timeout=None):
    """The notebook executed in `folder`; returns the executed notebook (the file is not written)."""
    import nbclient
    import nbformat
    spec = _spec(notebook)
    nb = nbformat.read(spec.path, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    env = {**THREADS, **{k: os.environ[k] for k in THREADS if os.environ.get(k)}, **OFFLINE}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=timeout or spec.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(folder)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for c in nb.cells:  # progress bars and the kernel's warnings: noise, and this machine's paths
        if c.cell_type == "code":
            c.outputs = [o for o in c.outputs if o.get("name") != "stderr"]
    nb.metadata["tltorch"] = {"sources_sha256": sources_hash(nb)}
    return nb


def check(executed, notebook="quickstart", saved=None) -> list:
    """What is stale in the saved notebook next to a fresh execution (an empty list: current).
    saved: the saved notebook (default: read from its file)."""
    import nbformat
    spec = _spec(notebook)
    if saved is None:
        saved = nbformat.read(spec.path, as_version=4)
    problems = []
    if saved.metadata.get("tltorch", {}).get("sources_sha256") != sources_hash(saved):
        problems.append("the code cells changed since the outputs were saved")
    for i, c in enumerate(saved.cells):
        if c.cell_type == "code" and (c.execution_count is None or not c.outputs):
            if i < len(executed.cells) and executed.cells[i].get("outputs"):
                problems.append(f"cell {i} has no saved outputs")
    old, new = summary(saved, spec), summary(executed, spec)
    if old is None:
        problems.append("the saved notebook has no summary line")
    elif new is not None:
        off = {k: (old[k], new[k]) for k, tol in spec.tolerance.items() if abs(old[k] - new[k]) > tol}
        if off:
            problems.append("the saved results differ from this run's by more than their tolerances: " +
                            ", ".join(f"{k} {a} (saved) vs {b} (tolerance {spec.tolerance[k]})"
                                      for k, (a, b) in off.items()))
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", metavar="NAME", help=f"which ones (default: all of "
                    f"{', '.join(NOTEBOOKS)})")
    ap.add_argument("--check", action="store_true", help="do not write; fail if the saved outputs are stale")
    args = ap.parse_args(argv)
    unknown = [n for n in args.notebooks if n not in NOTEBOOKS]
    if unknown:
        ap.error(f"unknown notebook(s) {', '.join(unknown)}; choose from {', '.join(NOTEBOOKS)}")
    import nbformat
    failed = False
    for name in args.notebooks or list(NOTEBOOKS):
        spec = NOTEBOOKS[name]
        with tempfile.TemporaryDirectory() as tmp:
            nb = execute(tmp, spec)
        if args.check:
            problems = check(nb, spec)
            for p in problems:
                print(f"stale: {spec.path.name}: {p}", file=sys.stderr)
            if problems:
                print(f"rerun `python notebooks/execute.py {name}` and commit the notebook", file=sys.stderr)
                failed = True
            else:
                print(f"current: {spec.path.name}: {summary(nb, spec)}")
            continue
        nbformat.write(nb, spec.path)
        print(f"wrote {spec.path}: {summary(nb, spec)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
