"""The ``triton`` backend: fused Triton kernels for the dense block (docs/design.md, 7).

Importing this package defines no kernel and touches no GPU: ``get_backend()`` imports the
kernel modules on first use. That matters because Triton decides at *definition* time whether a
``@triton.jit`` function is compiled or interpreted (``TRITON_INTERPRET=1``); the interpreted
kernels run on CPU tensors (tests without a GPU), the compiled ones on CUDA tensors.

Layout (Liger order inside every file: kernels, host launchers, op registration):

* ``_common.py``   shared ``@triton.jit`` helpers (3x3 tap geometry, BN parameters, dropout
                   mask, rounding);
* ``stats.py``     per-channel batch statistics: per-tile mean/M2, merged with Chan's formula;
* ``conv_fwd.py``  BN-ReLU prologue + implicit-GEMM convolution (1x1 = the bottleneck GEMM, 3x3)
                   + dropout-mask and channel-statistics epilogue;
* ``conv_dgrad.py`` data gradient of the convolution fused with BN-ReLU backward (reduce pass,
                   then apply pass that stores or accumulates into the gradient buffer);
* ``conv_wgrad.py`` weight gradient with the BN-ReLU operand recomputed as it is loaded;
* ``compile_check.py`` ahead-of-time compile of every kernel to a cubin (no GPU needed);
* ``configs.py``   block sizes per problem shape and GPU generation (sm_80, sm_90) or interpreter;
* ``backend.py``   the layer loop (``TritonBackend``), the glue to ``DenseBlockFunction``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_MIN_CAPABILITY = (8, 0)


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to interpret kernels (CPU execution)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernels_mode() -> bool | None:
    """True/False if the kernel modules are loaded (interpreted or not), None if not yet."""
    import sys

    module = sys.modules.get("dense_ext.backends.triton.backend")
    return None if module is None else module.INTERPRETED


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None if it can.

    CUDA: Triton importable, compute capability >= 8.0, kernels compiled (not interpreted).
    CPU: only under ``TRITON_INTERPRET=1`` (the Triton interpreter; slow, for tests).
    """
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    loaded = _kernels_mode()
    if device.type == "cpu":
        if loaded is False or (loaded is None and not interpret_requested()):
            return (
                "Triton runs on CPU tensors only through its interpreter; set "
                "TRITON_INTERPRET=1 before dense_ext's Triton kernels are first used"
            )
        return None
    if device.type != "cuda":
        return f"Triton kernels run on CUDA devices (or interpreted on CPU), not {device.type}"
    if loaded is True or (loaded is None and interpret_requested()):
        return (
            "the Triton kernels are interpreted (TRITON_INTERPRET=1 was set when they were "
            "defined); CUDA tensors need compiled kernels: unset TRITON_INTERPRET"
        )
    if not torch.cuda.is_available():
        return "CUDA is not available"
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < _MIN_CAPABILITY:
        return (
            f"GPU capability sm_{capability[0]}{capability[1]} is below sm_80, the oldest "
            "architecture these kernels are tuned and tested for"
        )
    return None


def get_backend():
    """The backend object; the first call defines (compiles or interprets) the kernels."""
    from dense_ext.backends.triton.backend import get_backend as _get

    return _get()
