#!/usr/bin/env bash
# The Triton backend against the GPU image's versions (torch 2.11.0, triton 3.6.0), on a machine
# without a GPU: a throwaway virtualenv from PyPI, then the AOT compile check (sm_80 and sm_90,
# every dtype: compiles, fits shared memory, no spills, TF32 rounding in the PTX) and the
# interpreter tests of tests/test_triton.py.
#
#   bash tools/triton_gpu_image_check.sh [VENV_DIR]      (default: /tmp/dense_ext-gpu-image)
#
# Cost: downloads torch 2.11.0 with its CUDA libraries from PyPI (about 3 GB, a few minutes on a
# fast link; nothing is downloaded again while VENV_DIR exists), then ~2 min of compiling and
# ~5 min of interpreter tests on 2 cores. Not part of `make test` for the download's sake.
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
# The interpreter tests; the subprocess-based ones use the same interpreter.
TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_triton.py -m "not slow" || status=1
exit $status
