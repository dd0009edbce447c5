#!/usr/bin/env bash
# On a machine with a CUDA GPU: build tltorch in place for that GPU, run the CUDA tests, then the GPU
# benchmarks. Logs go to $OUT (default ./gpu-logs); the end of each step is printed.
#
#     bash benchmarks/gpu.sh [build] [tests] [head] [vocab] [vocab-nobias] [vocab-xgrad] [lora] [gemm] [sanitize]   (no step: all of them)
#
# Extra pytest arguments for the tests step: TESTS="tests/test_head_cuda.py -k bf16".
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
steps=${*:-build tests lora vocab head gemm}

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, print its end
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-25}" "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
for s in $steps; do
    case $s in
    build)
        arch=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
        rm -f tltorch/_C*.so tltorch/_cuda*.so
        TAIL=5 step build 300 env TLTORCH_CUDA=1 TLTORCH_CUDA_ARCHS="$arch" $PY setup.py build_ext --inplace \
            || exit 1
        $PY -m tltorch info ;;
    tests)
        step tests ${TESTS_LIMIT:-400} $PY -m pytest -q -ra -p no:cacheprovider -m cuda ${TESTS:-tests} ;;
    head)
        step head 200 $PY benchmarks/bench_head.py --device cuda --classification ;;
    vocab)
        step vocab 300 $PY benchmarks/bench_head.py --device cuda --vocab --gpu-shapes ;;
    vocab-nobias)
        step vocab-nobias 300 $PY benchmarks/bench_head.py --device cuda --vocab --gpu-shapes --no-bias ;;
    vocab-xgrad)
        step vocab-xgrad 300 $PY benchmarks/bench_head.py --device cuda --vocab --gpu-shapes --no-bias --x-grad ;;
    lora)
        step lora 200 $PY benchmarks/bench_lora.py --device cuda --dtype bfloat16 --repeat 30 ;;
    gemm)
        step gemm 120 $PY benchmarks/bench_gemm.py --device cuda ;;
    sanitize)  # compute-sanitizer's memcheck over the CUDA kernels' own tests
        step sanitize ${SANITIZE_LIMIT:-300} compute-sanitizer --tool memcheck --error-exitcode 9 \
            $PY -m pytest -q -x -p no:cacheprovider -m cuda ${SANITIZE_TESTS:-tests/test_gemm_cuda.py tests/test_head_cuda.py tests/test_lora_cuda.py} ;;
    *) echo "unknown step $s"; exit 2 ;;
    esac
done
