"""How tltorch is built and found: a source tree without its compiled core says what to run; a build ships
only what it compiled; an edited header rebuilds; the repository's address is written once."""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("csrc", "tltorch", "setup.py", "build_backend.py", "pyproject.toml", "README.md", "MANIFEST.in")
# Python without an editable install's import hooks: only sys.path decides where tltorch comes from.
NO_EDITABLE_HOOKS = ("import sys; "
                     "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
                     "sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in repr(h).lower()]; "
                     "sys.path_importer_cache.clear(); ")


def _source_copy(dest: Path) -> Path:
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _run(args, cwd, **env):
    e = {**os.environ, "TLTORCH_CUDA": "0", **env}
    return subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=900)


def test_source_tree_without_extension_says_what_to_run(tmp_path):
    src = _source_copy(tmp_path)
    proc = _run([sys.executable, "-c", NO_EDITABLE_HOOKS + "import tltorch"], cwd=src)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: tltorch is being imported from its source tree"), proc.stderr[-2000:]
    assert "pip install -e ." in last and "circular" not in proc.stderr


def _ext_file(folder: Path, name: str):
    found = sorted((folder / "tltorch").glob(f"{name}.*.so"))
    return found[0] if found else None


@pytest.mark.slow
def test_build_rebuilds_on_headers_and_ships_only_what_it_built(tmp_path):
    src = _source_copy(tmp_path / "src")
    build = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    # A _cuda an earlier build (one that found nvcc) left in the tree and in build/: neither may survive
    # into a build that does not compile it.
    stale = "_cuda.cpython-311-x86_64-linux-gnu.so"
    (src / "tltorch" / stale).write_bytes(b"stale")
    proc = _run(build, cwd=src)
    assert proc.returncode == 0, proc.stderr[-3000:]
    so = _ext_file(src, "_C")
    assert so is not None and not (src / "tltorch" / stale).exists()

    # Up to date: nothing is rebuilt. An edited header (of the core, of the CPU kernels, the AdamW
    # coefficients) is newer than the module: it is rebuilt.
    t0 = so.stat().st_mtime_ns
    assert _run(build, cwd=src).returncode == 0 and so.stat().st_mtime_ns == t0
    for header in ("csrc/tl.h", "csrc/adamw_coefs.h", "csrc/cpu/cpu.h"):
        os.utime(src / header, ns=(so.stat().st_mtime_ns + 10**9,) * 2)
        before = so.stat().st_mtime_ns
        proc = _run(build, cwd=src)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert so.stat().st_mtime_ns != before, f"editing {header} did not rebuild tltorch._C"

    # A wheel from this used tree: build/lib holds a _cuda from "an earlier build"; the wheel must not.
    libs = list((src / "build").glob("lib*"))
    assert libs
    (libs[0] / "tltorch").mkdir(parents=True, exist_ok=True)
    (libs[0] / "tltorch" / stale).write_bytes(b"stale")
    proc = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                 str(tmp_path / "whl"), str(src)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "whl").glob("tltorch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.match(r"tltorch/_C\..*\.so$", n) for n in names), names
    assert not any("_cuda" in n for n in names), names


def test_repository_address_written_once():
    """pyproject's Repository URL, the README's and the notebook's Colab links and the notebook's install
    source name the same repository."""
    tomllib = pytest.importorskip("tomllib")
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    m = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", repo)
    assert m, repo
    colab = f"https://colab.research.google.com/github/{m.group(1)}/blob/main/notebooks/quickstart.ipynb"
    assert colab in (ROOT / "README.md").read_text()
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"])
    assert colab in text
    assert f'TLTORCH_SOURCE = "git+{repo}"' in text


def test_readme_commands():
    """The README's two commands, as tests/readme_first_command.sh and CI read them."""
    text = (ROOT / "README.md").read_text()
    first = re.search(r"^# set up and run the main job.*\n(.+)$", text, re.M).group(1)
    # the CI check appends --quick: the command must end with the demo's own arguments
    assert first.startswith("pip install ") and first.endswith("python -m tltorch demo"), first
    assert re.search(r"^bash tests/run.sh$", text, re.M)
