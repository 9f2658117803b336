#!/usr/bin/env bash
# The GPU suite: what a first GPU hour should run, on a bare CUDA machine with no network.
#
#   bash bench/gpu_suite.sh DIR STEPS [PACK_DIR]        (make gpu-suite DIR=... STEPS=...)
#
# DIR: where results go (default bench/scratch/gpu-suite, ignored by git). STEPS: a comma list
# of the steps below, run in that order (default: all). PACK_DIR: when given, DIR is packed
# into PACK_DIR/gpu-suite-<first step>.tgz at the end (the device tool's $OUT), so nothing is
# lost if the machine is given back before the next call. bench/README.md, "GPU suite", says
# which steps to run in which device call (each call at most 10 minutes).
#
#   env        what the machine has: GPU, driver, nvcc, torch, triton, optional packages
#   build      dense_ext._C in place (CPU + CUDA kernels for the card present), no pip, no
#              network; incremental, so a second call on a warm machine rebuilds nothing
#   backends   which backends run on CUDA; fails unless cpp and triton both do
#   tests      the test files that have CUDA tests, -m "cuda or triton", Triton compiled
#              (TRITON_INTERPRET=0), JUnit XML
#   profile    torch.profiler trace of one DenseNet-BC-100 b64 training step per backend
#   bench-main, bench-imagenet, bench-depth, bench-scale
#              python -m bench.run --suites <suite> on CUDA, each with a deadline (its JSON is
#              rewritten after every job: a cut-off run keeps its rows)
#   micro      pytest-benchmark microbenchmarks (skipped without pytest-benchmark)
#   roofline   bench/triton_roofline.py
#   merge      one JSON + markdown (+ plots) of the bench-* results in DIR
#
# Every step runs under `timeout` with its budget (STEP_BUDGET below; BUDGET_<step> overrides,
# e.g. BUDGET_tests=400) or what is left of CALL_BUDGET (default 570 s), whichever is less; with
# less than a minute left a step is not started, and says so. A failing step is recorded and
# the later steps still run; the exit status is the number of failed steps. Optional packages
# (hypothesis, tqdm, matplotlib, pytest-benchmark) may be missing: their tests skip, the bench
# prints no progress bar and draws no plots.
# shellcheck disable=SC2317  # the step functions run through `bash -c` (exported)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
DIR=${1:-bench/scratch/gpu-suite}
STEPS=${2:-env,build,backends,tests,profile,bench-main,bench-imagenet,bench-depth,bench-scale,micro,roofline,merge}
PACK_DIR=${3:-}
CALL_BUDGET=${CALL_BUDGET:-570}
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compiled kernels: a GPU run must never test the interpreter
PY=${PY:-python3}

# The CUDA toolkit: the one whose nvcc is on PATH (else /usr/local/cuda, added to PATH).
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH="/usr/local/cuda/bin:$PATH"
fi
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
fi

# Upper limits per step (seconds); a step also stops where its call's budget ends.
declare -A STEP_BUDGET=(
    [env]=30 [build]=300 [backends]=60 [tests]=360 [profile]=120
    [bench-main]=540 [bench-imagenet]=180 [bench-depth]=180 [bench-scale]=120
    [micro]=90 [roofline]=120 [merge]=60
)
START=$SECONDS
failed=0

budget() {  # budget STEP: seconds for STEP (BUDGET_<step with _ for ->) overrides the table
    local var="BUDGET_${1//-/_}"
    echo "${!var:-${STEP_BUDGET[$1]}}"
}

step() {  # step NAME COMMAND...: runs COMMAND within NAME's budget, output to DIR/NAME.log
    # The step gets its budget or what is left of the call, whichever is less; with less than
    # a minute left it is not started. COMMAND sees its limit as STEP_LIMIT.
    local name=$1; shift
    local limit left t0 rc
    left=$((CALL_BUDGET - (SECONDS - START) - 10))
    limit=$(budget "$name")
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 60 ]; then
        echo "== $name: not started (${left} s left of this call's ${CALL_BUDGET} s)" \
            | tee -a "$DIR/steps.log"
        failed=$((failed + 1))
        return
    fi
    echo "== $name (limit ${limit} s): $*"
    t0=$SECONDS
    # Through bash -c: the command may be one of the functions below (exported).
    STEP_LIMIT=$limit timeout --kill-after=20 "$limit" bash -c '"$@"' _ "$@" >"$DIR/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "   ok ($((SECONDS - t0)) s)"
        echo "$name ok $((SECONDS - t0)) s" >>"$DIR/steps.log"
    else
        [ "$rc" -eq 124 ] && echo "   TIMED OUT after ${limit} s" >>"$DIR/$name.log"
        echo "   FAILED (exit $rc, $((SECONDS - t0)) s), see $DIR/$name.log"
        tail -n 25 "$DIR/$name.log"
        echo "$name FAILED exit $rc $((SECONDS - t0)) s" >>"$DIR/steps.log"
        failed=$((failed + 1))
    fi
}

has() { "$PY" -c "import $1" >/dev/null 2>&1; }

env_report() {
    date -u
    nvidia-smi 2>&1 || true
    command -v nvcc && nvcc --version
    echo "CUDA_HOME=${CUDA_HOME:-}"
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)" 2>&1
    for m in hypothesis tqdm matplotlib pytest_benchmark numpy ninja; do
        if has "$m"; then echo "$m: present"; else echo "$m: MISSING"; fi
    done
    git rev-parse HEAD 2>/dev/null && git status --short --untracked-files=no 2>/dev/null
}

build() {
    local arch
    arch=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
    DENSE_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace
}

backends() {
    "$PY" - <<'EOF'
import dense_ext
from dense_ext.backends import unavailable_reason
for name in ("reference", "cpp", "triton"):
    print(f"{name:>9} on cuda: {unavailable_reason(name, 'cuda') or 'available'}")
missing = [b for b in ("cpp", "triton") if unavailable_reason(b, "cuda") is not None]
raise SystemExit(f"not available on CUDA: {missing}" if missing else 0)
EOF
}

gpu_tests() {
    # Only the files with CUDA tests: the others test the CPU, which CI covers.
    local files
    files=$(grep -l -E "pytest\.mark\.cuda|cuda_or_skip\(" tests/test_*.py)
    echo "files: $files"
    # Triton's compiles are CPU-bound: with pytest-xdist, PYTEST_WORKERS processes share the
    # GPU (and the on-disk kernel cache) and compile in parallel.
    local workers=()
    if [ "${PYTEST_WORKERS:-0}" -gt 1 ] && has xdist; then workers=(-n "$PYTEST_WORKERS"); fi
    # shellcheck disable=SC2086
    "$PY" -m pytest -v -ra -p no:cacheprovider "${workers[@]}" -m "cuda or triton" $files \
        --junitxml="$DIR/tests-gpu.xml"
}

bench_suite() {  # bench_suite SUITE: one result file per run, its deadline inside the step's
    local name="suite-$1" n=2
    while [ -e "$DIR/$name.json" ] || [ -e "$DIR/$name.partial.json" ]; do  # a re-run: keep both
        name="suite-$1-$n"; n=$((n + 1))
    done
    # shellcheck disable=SC2086
    "$PY" -m bench.run --device cuda --suites "$1" --out "$DIR" --name "$name" \
        --deadline-s $((STEP_LIMIT - 30)) ${BENCH_ARGS:-}
}

merge() {  # finished suites, and what a deadline or a timeout left of the others
    local parts=() f
    for f in "$DIR"/suite-*.json; do
        [ -e "$f" ] && parts+=("$f")
    done
    [ "${#parts[@]}" -gt 0 ] || { echo "no bench results in $DIR"; return 1; }
    "$PY" -m bench.run --out "$DIR" --name gpu-suite --merge "${parts[@]}"
}

micro() {
    if ! has pytest_benchmark; then echo "pytest-benchmark missing: microbenchmarks skipped"; return 0; fi
    "$PY" -m pytest -q -p no:cacheprovider bench/test_block_microbench.py --benchmark-only \
        -k cuda --benchmark-json "$DIR/microbench.json"
}

roofline() {
    "$PY" bench/triton_roofline.py --dtype float32 --out "$DIR" &&
        "$PY" bench/triton_roofline.py --dtype bfloat16 --out "$DIR"
}

export DIR PY
export -f has build backends gpu_tests bench_suite merge micro roofline

IFS=',' read -r -a WANT <<<"$STEPS"
for s in "${WANT[@]}"; do
    case "$s" in
        env) env_report >>"$DIR/environment.txt" 2>&1; echo "== env: $DIR/environment.txt" ;;
        build) step build build ;;
        backends) step backends backends ;;
        tests) step tests gpu_tests ;;
        profile) step profile "$PY" -m bench.profile_step --device cuda --out "$DIR/profile" ;;
        bench-main | bench-imagenet | bench-depth | bench-scale) step "$s" bench_suite "${s#bench-}" ;;
        micro) step micro micro ;;
        roofline) step roofline roofline ;;
        merge) step merge merge ;;
        *) echo "unknown step $s"; failed=$((failed + 1)) ;;
    esac
done

echo "gpu suite: $failed failed or unstarted step(s) in $((SECONDS - START)) s; results in $DIR"
if [ -n "$PACK_DIR" ]; then
    # Named after the call's last step, so the packs of several calls do not collide.
    name="gpu-suite-upto-${WANT[${#WANT[@]} - 1]}"
    mkdir -p "$PACK_DIR"
    # Profiler traces in their own pack: one file over the device tool's 16 MiB would lose all.
    tar czf "$PACK_DIR/$name.tgz" --exclude='trace-*.json.gz' -C "$(dirname "$DIR")" "$(basename "$DIR")"
    if compgen -G "$DIR/profile/trace-*.json.gz" >/dev/null; then
        tar cf "$PACK_DIR/$name-traces.tar" -C "$DIR" profile
    fi
    cp "$DIR/steps.log" "$PACK_DIR/$name-steps.log" 2>/dev/null || true
    ls -l "$PACK_DIR"
fi
exit "$failed"
