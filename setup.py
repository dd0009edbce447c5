"""Build tltorch's C extensions.

tltorch._C      the CPU kernels (csrc/cpu) and the DLPack binding; always built. C11, -O3, OpenMP.
                SIMD paths are chosen at run time, so one build runs on any x86-64 (and elsewhere the
                portable path builds).
tltorch._cuda   the CUDA kernels (csrc/cuda) and their binding; built when nvcc is found (PATH or
                CUDA_HOME) together with cuBLAS's headers (the toolkit's, or an nvidia-cublas wheel's:
                `pip install .` puts one in the build environment when needed, see build_backend.py).
                cudart is linked statically and cuBLAS not at all: the module opens libcublas with
                dlopen on first use (csrc/cuda/common.cu), so it imports where cuBLAS is absent.

Environment switches:
  TLTORCH_CUDA=0        never build _cuda;  TLTORCH_CUDA=1  a failure to build it is an error
  TLTORCH_CUDA_ARCHS    e.g. "90" or "80;90" (default: 75;80;86;89;90, plus PTX for the newest)
  TLTORCH_SANITIZE=1    build _C with AddressSanitizer and UndefinedBehaviorSanitizer
  TLTORCH_NATIVE=1      also let the compiler tune the portable code for this CPU (-march=native)
"""
import glob
import os
import site
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_backend import cuda_root, find_nvcc, nvcc_major  # noqa: E402  (one copy of the nvcc rules)

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def env_flag(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.lower() not in ("0", "false", "no", "off")


def log(msg):
    print(f"tltorch setup: {msg}", file=sys.stderr)


def find_cublas(cuda_home, major):
    """The folder holding cuBLAS's headers (cublas_v2.h), or None: the toolkit's own, else an
    nvidia-cublas wheel's (nvidia/cu13 for CUDA 13, nvidia/cublas for the cu12 wheel). Only headers
    are needed: the library is opened at run time. Wheels are looked for on sys.path first (under
    `pip install .` that is the isolated build environment) and then in site-packages."""
    cands = [os.path.join(cuda_home, "include")]
    if major == 12:
        subs = ["nvidia/cublas"]
    elif major:
        subs = [f"nvidia/cu{major}"]
    else:
        subs = ["nvidia/cu13", "nvidia/cublas"]
    roots = list(dict.fromkeys(sys.path + site.getsitepackages() + [site.getusersitepackages()]))
    for r in roots:
        for sub in subs:
            cands.append(os.path.join(r, sub, "include"))
    for inc in cands:
        if os.path.exists(os.path.join(inc, "cublas_v2.h")):
            return inc
    return None


def cuda_archs():
    spec = os.environ.get("TLTORCH_CUDA_ARCHS", "75;80;86;89;90")
    archs = [a.strip() for a in spec.replace(",", ";").split(";") if a.strip()]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


SANITIZE = env_flag("TLTORCH_SANITIZE")
C_FLAGS = ["-std=c11", "-O3", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wextra",
           "-Wno-unused-parameter", "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
LINK_FLAGS = ["-fopenmp"]
if SANITIZE:
    C_FLAGS = [f for f in C_FLAGS if f != "-O3"] + ["-O1", "-g", "-fsanitize=address,undefined",
                                                    "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    LINK_FLAGS += ["-fsanitize=address,undefined"]
if env_flag("TLTORCH_NATIVE"):
    C_FLAGS.append("-march=native")

# The bindings (bind.c, bind_*.c) and the argument checks (check.c) are compiled into both extensions.
BIND_SOURCES = (["csrc/check.c", "csrc/python/bridge.c", "csrc/python/bind.c"]
                + sorted(glob.glob("csrc/python/bind_*.c")))
CPU_SOURCES = sorted(glob.glob("csrc/cpu/*.c")) + BIND_SOURCES + ["csrc/python/module.c"]
# Every header a source may include: build_ext rebuilds an extension when one of these is newer than it
# (setuptools otherwise compares only the .c files, and an edited header keeps the old build).
HEADERS = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
# The compiled modules of the package, as file name globs (CPython and Windows suffixes).
BINARIES = ("_C.*.so", "_C.so", "_C.*.pyd", "_cuda.*.so", "_cuda.so", "_cuda.*.pyd")


def _binaries(folder):
    return sorted({f for pat in BINARIES for f in glob.glob(os.path.join(folder, "tltorch", pat))})


class BuildPy(build_py):
    """Starts every build from a package folder without compiled modules: a build directory left by an
    earlier build (say one that found nvcc) must not put that build's _cuda into this one's wheel."""

    def run(self):
        if not self.editable_mode:
            for f in _binaries(self.build_lib):
                log(f"removing {f}, left by an earlier build")
                os.remove(f)
        super().run()


class BuildExt(build_ext):
    """Compiles the .cu files of tltorch._cuda with nvcc; leaves the rest to setuptools."""

    def build_extensions(self):
        self._tl_skipped = set()
        super().build_extensions()
        # An optional extension that failed is left out of what gets copied and installed.
        self.extensions = [e for e in self.extensions if e.name not in self._tl_skipped]

    def run(self):
        super().run()
        # An in-place build (`pip install -e .`, `build_ext --inplace`) that did not build _cuda removes a
        # _cuda left in the source tree by an earlier one: the tree then holds only what this build made.
        if self.inplace and not any(e.name == "tltorch._cuda" for e in self.extensions):
            for f in _binaries(ROOT):
                if os.path.basename(f).startswith("_cuda"):
                    log(f"removing {f}: this build did not build tltorch._cuda")
                    os.remove(f)

    def build_extension(self, ext):
        if ext.name != "tltorch._cuda":
            return super().build_extension(ext)
        try:
            self._build_cuda(ext)
        except Exception as e:  # noqa: BLE001 - any failure means "no CUDA build" unless it was required
            if env_flag("TLTORCH_CUDA"):
                raise
            log(f"skipping tltorch._cuda: {e}")
            self._tl_skipped.add(ext.name)

    def _build_cuda(self, ext):
        nvcc = ext._tl_nvcc
        # Looked for now, not when setup.py is loaded: `pip install .` first runs setup.py to ask for the
        # build requirements, before it has installed the nvidia-cublas wheel that brings the headers.
        inc = find_cublas(ext._tl_cuda_home, nvcc_major(nvcc))
        if not inc:
            raise RuntimeError("nvcc found but not cuBLAS's headers (cublas_v2.h): install the CUDA "
                               "toolkit's cuBLAS or `pip install nvidia-cublas` (nvidia-cublas-cu12 for "
                               "CUDA 12)")
        log(f"building tltorch._cuda with {nvcc} and cuBLAS's headers from {inc}")
        objs = []
        tmp = os.path.join(self.build_temp, "cuda")
        os.makedirs(tmp, exist_ok=True)
        for src in ext._tl_cu_sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "-Xcompiler", "-fvisibility=hidden", "--expt-relaxed-constexpr",
                   "-Icsrc", f"-I{inc}", *cuda_archs()]
            log(" ".join(cmd))
            subprocess.check_call(cmd)
            objs.append(obj)
        ext.extra_objects = objs + ext.extra_objects
        super().build_extension(ext)


def extensions():
    exts = [Extension("tltorch._C", sources=CPU_SOURCES, include_dirs=["csrc"], depends=HEADERS,
                      extra_compile_args=C_FLAGS, extra_link_args=LINK_FLAGS)]
    want = env_flag("TLTORCH_CUDA")
    if want is False:
        log("TLTORCH_CUDA=0: not building tltorch._cuda")
        return exts
    nvcc = find_nvcc()
    if not nvcc:
        if want:
            raise RuntimeError("TLTORCH_CUDA=1 but nvcc was not found (PATH, CUDA_HOME)")
        log("nvcc not found: building the CPU extension only")
        return exts
    cuda_home = cuda_root(nvcc)
    cuda_lib = os.path.join(cuda_home, "lib64")
    if not os.path.isdir(cuda_lib):
        cuda_lib = os.path.join(cuda_home, "lib")
    ext = Extension(
        "tltorch._cuda",
        # common.c: the status and dtype tables (tl_status_string, tl_dtype_name, tl_numel) the bindings use.
        sources=["csrc/cpu/common.c"] + BIND_SOURCES + ["csrc/python/cuda_module.c"],
        include_dirs=["csrc", os.path.join(cuda_home, "include")],
        depends=HEADERS,
        library_dirs=[cuda_lib],
        # No cuBLAS here: it is opened with dlopen at run time (dl). stdc++: nvcc's host code needs the
        # C++ runtime (static-local guards, the EH personality).
        libraries=["cudart_static", "stdc++", "dl", "rt", "pthread"],
        extra_compile_args=[f for f in C_FLAGS if not f.startswith("-fsanitize")],
        extra_link_args=["-fopenmp"],
        language="c",
    )
    ext._tl_nvcc = nvcc
    ext._tl_cuda_home = cuda_home
    ext._tl_cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    ext.depends = ext.depends + ext._tl_cu_sources
    exts.append(ext)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt, "build_py": BuildPy})
