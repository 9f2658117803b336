"""The ``triton`` stage backend: the CLDC as Triton kernels.

Importing this package defines no kernel and touches no GPU; ``get_backend()`` imports
``kernels`` (the ``@triton.jit`` CLDC kernels and their ``torch.library.triton_op`` launchers) on
first use, since Triton decides at definition time whether a kernel is compiled (CUDA tensors)
or interpreted (``TRITON_INTERPRET=1``, CPU tensors in tests). Availability follows the dense
block's Triton backend (``dense_ext.backends.triton.unavailable_reason``).

The CLDC forward, its per-(slot, channel) backward sums and the slots' input-gradient update
run as Triton kernels; the composite layers' convolutions and BN-ReLU run through the layer
loop of the reference stage backend (ATen).
"""

from __future__ import annotations

import torch

from dense_ext.backends import triton as block_triton


def unavailable_reason(device: torch.device) -> str | None:
    return block_triton.unavailable_reason(device)


def get_backend():
    """The backend object; the first call defines (compiles or interprets) the kernels."""
    from dense_ext.deluge.backends.triton.backend import get_backend as _get

    return _get()
