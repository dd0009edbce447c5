"""tltorch's PEP 517 build backend: setuptools' own (setuptools.build_meta), plus cuBLAS's headers.

tltorch._cuda compiles against cublas_v2.h but does not link cuBLAS (it opens the library at run
time), so a build needs only the headers. Some CUDA toolkits lack them (pip's nvidia-cuda-* packages,
trimmed containers). When tltorch._cuda is going to be built (nvcc found, by setup.py's rules,
TLTORCH_CUDA=0 meaning never) and the toolkit has no cublas_v2.h, the build asks for the nvidia-cublas
wheel of nvcc's CUDA major version, which pip then installs into the isolated build environment: a
plain `pip install .` compiles the CUDA kernels with nothing installed by hand. setup.py finds the
headers there through sys.path. With --no-build-isolation pip installs no build requirements: the
headers must then already be installed (the toolkit's, or `pip install nvidia-cublas`).

setup.py imports find_nvcc, cuda_root and nvcc_major from here (this file cannot import setup.py
without running setup()), so the backend and the build agree on which nvcc and toolkit they use.
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook not overridden below)

# The wheel that brings cuBLAS's headers, by the CUDA major version nvcc reports. 13: the headers
# tltorch is tested with (nvidia/cu13/include); 12: the cu12 wheel (nvidia/cublas/include).
CUBLAS_WHEELS = {12: "nvidia-cublas-cu12", 13: "nvidia-cublas==13.10.0.20"}


def _log(msg):
    print(f"tltorch build backend: {msg}", file=sys.stderr)


def _cuda_disabled():
    v = os.environ.get("TLTORCH_CUDA")
    return v not in (None, "") and v.lower() in ("0", "false", "no", "off")


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.realpath(nvcc)
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def cuda_root(nvcc):
    home = os.path.dirname(os.path.dirname(nvcc))
    if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    try:
        run = subprocess.run([nvcc, "--dryrun", "-c", "tl.cu", "-o", os.devnull], capture_output=True,
                             text=True, timeout=120)
        for line in (run.stderr + run.stdout).splitlines():
            if line.startswith("#$ TOP="):
                return os.path.realpath(line[len("#$ TOP="):].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return home


def nvcc_major(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def _cublas_headers_requirement():
    """[the nvidia-cublas requirement] when _cuda will be built and the toolkit has no cublas_v2.h."""
    if _cuda_disabled():
        return []
    nvcc = find_nvcc()
    if not nvcc:
        return []
    if os.path.exists(os.path.join(cuda_root(nvcc), "include", "cublas_v2.h")):
        return []
    major = nvcc_major(nvcc)
    req = CUBLAS_WHEELS.get(major)
    if not req:
        _log(f"{nvcc} (CUDA {major}) has no cuBLAS headers and no nvidia-cublas wheel is known for it; "
             "install cuBLAS's headers yourself")
        return []
    _log(f"{nvcc} (CUDA {major}) has no cuBLAS headers: adding {req} to the build environment")
    return [req]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _cublas_headers_requirement()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _cublas_headers_requirement()
