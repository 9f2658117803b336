#!/usr/bin/env bash
# The GPU suite: one command on a CUDA machine with no network.
#
#   bash bench/gpu_suite.sh [OUT_DIR] [STEPS]        (make gpu-suite)
#
# STEPS: comma list of build, tests, bench-main, bench-imagenet, bench-depth, merge, micro,
# roofline (default: all, in that order; `bench` = the three bench-* steps and merge). A device
# command may run at most 10 minutes: a session can run `build,tests` in one call, then
# `bench-main`, ... in the next ones on the same warm machine with the same OUT_DIR (the in-place
# build stays there). BENCH_ARGS adds options to bench/run.py.
#
# 1. builds dense_ext._C from source (CPU + CUDA kernels) against the torch that is installed,
#    in place, without pip or network;
# 2. runs the CUDA and Triton tests (Triton compiled, not interpreted);
# 3. runs the full benchmark on the GPU (bench/run.py --device cuda) and the block
#    microbenchmarks (pytest-benchmark);
# everything (logs, JSON, markdown, plots, environment) goes to OUT_DIR
# (default bench/results/gpu-<UTC date and time>), so a session lent a GPU spends its time
# measuring. A failing step is recorded and the later steps still run; the exit status is the
# number of failed steps.
#
# Python: $PY if set, else .venv/bin/python when it imports a CUDA torch, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-bench/results/gpu-$(date -u +%Y-%m-%dT%H%M)}
STEPS=",${2:-build,tests,bench,micro,roofline},"
STEPS=${STEPS/,bench,/,bench-main,bench-imagenet,bench-depth,merge,}
want() { [[ "$STEPS" == *",$1,"* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi

failed=0
step() {  # step NAME COMMAND...: runs COMMAND, output to $OUT/NAME.log, records failure
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - t0)) s)"
    else
        echo "   FAILED ($((SECONDS - t0)) s), see $OUT/$name.log"; tail -n 20 "$OUT/$name.log"
        failed=$((failed + 1))
    fi
}

{
    date -u
    nvidia-smi 2>&1 || true
    command -v nvcc >/dev/null && nvcc --version
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    git rev-parse HEAD 2>/dev/null && git status --short --untracked-files=no 2>/dev/null
} >>"$OUT/environment.txt" 2>&1

# The build: CUDA forced on (setup.py reads DENSE_EXT_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST);
# architectures of the card present, so the kernels that run are the ones just compiled.
ARCH=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')" 2>/dev/null || echo "8.0;9.0")
want build && step build env DENSE_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace
step backends "$PY" -c "import dense_ext, torch; print('cuda:', dense_ext.available_backends('cuda')); print('cpu:', dense_ext.available_backends('cpu'))"
want tests && step tests-gpu "$PY" -m pytest -q -ra -m "cuda or triton" tests
for suite in main imagenet depth; do
    # One JSON per suite (each a fresh set of worker processes), merged below into one file.
    want "bench-$suite" && step "bench-$suite" "$PY" bench/run.py --device cuda --out "$OUT" \
        --suites "$suite" --name "suite-$suite" ${BENCH_ARGS:-}
done
if want merge; then
    parts=$(ls "$OUT"/suite-*.json 2>/dev/null)
    [ -n "$parts" ] && step merge "$PY" bench/run.py --out "$OUT" --merge $parts
fi
want micro && step microbench "$PY" -m pytest bench/test_block_microbench.py --benchmark-only -k cuda \
    --benchmark-json "$OUT/microbench.json"
if want roofline && [ -f bench/triton_roofline.py ]; then
    step triton-roofline-fp32 "$PY" bench/triton_roofline.py --dtype float32 --out "$OUT"
    step triton-roofline-bf16 "$PY" bench/triton_roofline.py --dtype bfloat16 --out "$OUT"
fi

echo "gpu suite: $failed failed step(s); results in $OUT"
ls -1 "$OUT"
exit "$failed"
