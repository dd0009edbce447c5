"""Run the notebooks as saved (QUICK = True) and store their outputs in them.

    python notebooks/execute.py                  # execute every notebook, save the outputs into it
    python notebooks/execute.py distillation     # only notebooks/distillation.ipynb (or: quickstart)
    python notebooks/execute.py --check          # execute, and fail if the saved outputs are not current

A notebook runs in a scratch folder (its OUT goes there), offline. With the outputs it stores the hash
of its code cells' sources, so a later edit of a cell that was not followed by a rerun is caught by
--check (tests/test_demo.py runs that check), as is a saved run whose results the code no longer gives.
"""
import argparse
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parent / "quickstart.ipynb"
DISTILLATION = NOTEBOOK.parent / "distillation.ipynb"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
SUMMARY = re.compile(r"summary: frozen body \+ fit_head ([0-9.]+), LoRA ([0-9.]+) \(test accuracy\); "
                     r"adapter saved to (\S+)")
DISTILL_SUMMARY = re.compile(r"summary: student perplexity ([0-9.]+) -> ([0-9.]+) \(teacher ([0-9.]+)\); "
                             r"KL to the teacher ([0-9.]+) -> ([0-9.]+)")


def sources_hash(nb) -> str:
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    return hashlib.sha256("\n\0\n".join(code).encode()).hexdigest()


def _last_output(nb) -> str:
    return "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []) if o.get("output_type") == "stream")


def summary(nb):
    """(fit_head accuracy, LoRA accuracy, adapter folder) printed by quickstart's last cell, or None."""
    m = SUMMARY.search(_last_output(nb))
    return (float(m.group(1)), float(m.group(2)), m.group(3)) if m else None


def distill_summary(nb):
    """(student perplexity before, after, the teacher's, KL to the teacher before, after) printed by
    distillation's last cell, or None."""
    m = DISTILL_SUMMARY.search(_last_output(nb))
    return tuple(float(g) for g in m.groups()) if m else None


def execute(folder, timeout=900, notebook=None):
    """The notebook (default quickstart) executed in `folder`; returns the executed notebook (the file is
    not written)."""
    import nbclient
    import nbformat
    nb = nbformat.read(notebook or NOTEBOOK, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
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


def check(executed, notebook=None) -> list:
    """What is stale in the saved notebook (default quickstart) next to a fresh execution (an empty list:
    current)."""
    import nbformat
    path = Path(notebook or NOTEBOOK)
    saved = nbformat.read(path, as_version=4)
    problems = []
    if saved.metadata.get("tltorch", {}).get("sources_sha256") != sources_hash(saved):
        problems.append("the code cells changed since the outputs were saved")
    for i, c in enumerate(saved.cells):
        if c.cell_type == "code" and (c.execution_count is None or not c.outputs):
            if executed.cells[i].outputs:
                problems.append(f"cell {i} has no saved outputs")
    if path.name == DISTILLATION.name:  # seeded: only the CPU's rounding differs (5% covers its drift)
        old, new = distill_summary(saved), distill_summary(executed)
        if old is None:
            problems.append("the saved notebook has no summary line")
        elif new is not None and any(abs(a - b) > 0.05 * abs(a) for a, b in zip(old, new)):
            problems.append(f"the saved results {old} differ from this run's {new} by more than 5%")
        return problems
    old, new = summary(saved), summary(executed)
    if old is None:
        problems.append("the saved notebook has no summary line")
    elif new is not None and (abs(old[0] - new[0]) > 0.05 or abs(old[1] - new[1]) > 0.05):
        problems.append(f"the saved accuracies {old[:2]} differ from this run's {new[:2]} by more than 0.05")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="the notebooks to run: quickstart, distillation (default: both)")
    ap.add_argument("--check", action="store_true", help="do not write; fail if the saved outputs are stale")
    args = ap.parse_args(argv)
    paths = {p.stem: p for p in (NOTEBOOK, DISTILLATION)}
    for n in args.names:
        if n not in paths:
            ap.error(f"no notebook {n!r}: the notebooks are {', '.join(paths)}")
    import nbformat
    failed = 0
    for path in (paths[n] for n in args.names or paths):
        with tempfile.TemporaryDirectory() as tmp:
            nb = execute(tmp, notebook=path)
        if args.check:
            problems = check(nb, notebook=path)
            for p in problems:
                print(f"stale ({path.name}):", p, file=sys.stderr)
            if problems:
                print(f"rerun `python notebooks/execute.py {path.stem}` and commit the notebook", file=sys.stderr)
                failed = 1
            continue
        nbformat.write(nb, path)
        print(f"wrote {path}: {summary(nb) if path == NOTEBOOK else distill_summary(nb)}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
