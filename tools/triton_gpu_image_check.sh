#!/usr/bin/env bash
# dense_ext against the GPU image's versions (torch 2.11.0, triton 3.6.0), on a machine without
# a GPU: a throwaway virtualenv from PyPI, then the extension built against it in a scratch copy
# of the checkout (torch 2.11 compiles extensions as C++17, CI's 2.14 as C++20: the first GPU
# run failed there), tests/test_compile.py (torch.compile(fullgraph=True) with 2.11's dynamo),
# the AOT compile check (sm_80 and sm_90, every dtype: compiles, fits shared memory, no spills,
# TF32 rounding and 16-byte accesses in the PTX; and sm_90 as torch.compile re-emits the
# kernels) and the rest of tests/test_triton.py (interpreter and mocked launches).
#
#   bash tools/triton_gpu_image_check.sh [VENV_DIR]      (default: /tmp/dense_ext-gpu-image)
#
# Cost: downloads torch 2.11.0 with its CUDA libraries from PyPI (about 3 GB, a few minutes on a
# fast link; 4.7 GB on disk; nothing is downloaded again while VENV_DIR exists), then ~4 min of
# building the extension, ~8 min of compiling kernels (172 variants + the re-emitted ones) and
# ~7 min of tests on 2 shared cores. Not part of `make test` for
# the download's sake.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
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
# A scratch copy: the in-place build must not replace the checkout's extension (CI's torch).
COPY=$(mktemp -d /tmp/dense_ext-torch211.XXXXXX)
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$COPY"
cd "$COPY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
# ninja comes from the checkout's .venv when this venv has none (torch looks for it on PATH).
PATH="$PATH:$ROOT/.venv/bin" TORCH_CUDA_ARCH_LIST=9.0 \
    "$VENV/bin/python" setup.py build_ext --inplace -q || status=1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_compile.py || status=1
TRITON_INTERPRET=0 "$VENV/bin/python" -m dense_ext.backends.triton.compile_check --arch 80 90 || status=1
TRITON_INTERPRET=0 "$VENV/bin/python" -m dense_ext.backends.triton.compile_check --arch 90 \
    --as-inductor || status=1
# The interpreter tests and the mocked-launch ones (FastLaunch, torch.compile tracing), which
# run compiled kernels in subprocesses of the same interpreter; the compile test ran above.
TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_triton.py -k "not compile_for_the_gpu and not re_emits" || status=1
rm -rf "$COPY"
exit $status
