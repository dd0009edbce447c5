"""Run notebooks/quickstart.ipynb as saved (QUICK = True) and store its outputs in it.

    python notebooks/execute.py            # execute, save the outputs into the notebook
    python notebooks/execute.py --check    # execute, and fail if the saved outputs are not current

The notebook runs in a scratch folder (its OUT goes there), offline. With the outputs it stores the hash
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
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
SUMMARY = re.compile(r"summary: frozen body \+ fit_head ([0-9.]+), LoRA ([0-9.]+) \(test accuracy\); "
                     r"adapter saved to (\S+)")


def sources_hash(nb) -> str:
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    return hashlib.sha256("\n\0\n".join(code).encode()).hexdigest()


def summary(nb):
    """(fit_head accuracy, LoRA accuracy, adapter folder) printed by the last cell, or None."""
    text = "".join(o.get("text", "") for o in nb.cells[-1].get("outputs", []) if o.get("output_type") == "stream")
    m = SUMMARY.search(text)
    return (float(m.group(1)), float(m.group(2)), m.group(3)) if m else None


def execute(folder, timeout=900):
    """The notebook executed in `folder`; returns the executed notebook (the file is not written)."""
    import nbclient
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
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


def check(executed) -> list:
    """What is stale in the saved notebook next to a fresh execution (an empty list: current)."""
    import nbformat
    saved = nbformat.read(NOTEBOOK, as_version=4)
    problems = []
    if saved.metadata.get("tltorch", {}).get("sources_sha256") != sources_hash(saved):
        problems.append("the code cells changed since the outputs were saved")
    for i, c in enumerate(saved.cells):
        if c.cell_type == "code" and (c.execution_count is None or not c.outputs):
            if executed.cells[i].outputs:
                problems.append(f"cell {i} has no saved outputs")
    old, new = summary(saved), summary(executed)
    if old is None:
        problems.append("the saved notebook has no summary line")
    elif new is not None and (abs(old[0] - new[0]) > 0.05 or abs(old[1] - new[1]) > 0.05):
        problems.append(f"the saved accuracies {old[:2]} differ from this run's {new[:2]} by more than 0.05")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="do not write; fail if the saved outputs are stale")
    args = ap.parse_args(argv)
    import nbformat
    with tempfile.TemporaryDirectory() as tmp:
        nb = execute(tmp)
    if args.check:
        problems = check(nb)
        for p in problems:
            print("stale:", p, file=sys.stderr)
        if problems:
            print("rerun `python notebooks/execute.py` and commit the notebook", file=sys.stderr)
        return 1 if problems else 0
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK}: {summary(nb)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
