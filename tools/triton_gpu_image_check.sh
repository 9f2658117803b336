#!/usr/bin/env bash
# The Triton backend against the GPU image's versions (torch 2.11.0, triton 3.6.0), on a machine
# without a GPU: a throwaway virtualenv from PyPI, then the AOT compile check (sm_80 and sm_90,
# every dtype: compiles, fits shared memory, no spills, TF32 rounding and 16-byte accesses in
# the PTX) and the rest of tests/test_triton.py (interpreter and mocked launches).
#
#   bash tools/triton_gpu_image_check.sh [VENV_DIR]      (default: /tmp/dense_ext-gpu-image)
#
# Cost: downloads torch 2.11.0 with its CUDA libraries from PyPI (about 3 GB, a few minutes on a
# fast link; 4.7 GB on disk; nothing is downloaded again while VENV_DIR exists), then ~8 min of
# compiling (172 variants) and ~6 min of tests on 2 shared cores. Not part of `make test` for
# the download's sake.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/dense_ext-gpu-image}
TORCH=${TORCH_VERSION:-2.11.0}
TRITON=${TRITON_VERSION:-3.6.0}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q "torch==$TORCH" "triton==$TRITON" \
    "$(grep '^numpy==' requirements.txt)" "$(grep '^pytest==' requirements.txt)"
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
TRITON_INTERPRET=0 "$VENV/bin/python" -m dense_ext.backends.triton.compile_check --arch 80 90 || status=1
# The interpreter tests and the mocked-launch ones (FastLaunch, torch.compile tracing), which
# run compiled kernels in subprocesses of the same interpreter; the compile test ran above.
TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_triton.py -k "not compile_for_the_gpu" || status=1
exit $status
