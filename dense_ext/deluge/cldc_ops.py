"""A CLDC's backend calls as functional custom ops, opaque to ``torch.compile``.

The CLDC glue (``CLDCFunction``, the transition, the head) asks its stage backend for three
things: the slot statistics, the CLDC output and the CLDC backward. Each backend computes them
by allocating a tensor, letting a kernel fill it in place, then reading it. Traced as is, that
is ``empty`` + an in-place op that functionalization turns into ``auto_functionalized`` and
inductor re-inplaces; torch 2.11's inductor then scheduled a fused *read* of the statistics
before the kernel that *writes* them (found on the GPU image's torch: a compiled DelugeNet's
output off by a relative 69 or NaN on CPU with cpp, its input gradient off by 2.8 on CUDA with
Triton; torch 2.14 orders them right). Here each call is one op that returns fresh tensors and
mutates nothing it is given, so there is no mutation for any compiler version to reorder, and
the reference backend's ``out=`` into strided views (which torch 2.11's dynamo refuses) is never
traced. Eager calls pay one custom-op dispatch (a few per model step: the stages' own CLDCs run
inside their stage op).

``backend`` is the resolved backend name (``StageBackend.name``); each op looks the backend up
in the registry for the tensors' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dense_ext.deluge.backends import get_backend
from dense_ext.deluge.backends.base import stats_dtype

__all__ = ["cldc_backward", "cldc_forward", "slot_stats"]


@torch.library.custom_op("dense_ext::deluge_slot_stats", mutates_args=())
def slot_stats(buf: Tensor, channels: int, backend: str) -> Tensor:
    """[2, S*C]: batch mean and biased variance of every channel of the slot buffer."""
    return get_backend(backend, buf.device).slot_stats(buf, channels)


@slot_stats.register_fake
def _(buf: Tensor, channels: int, backend: str) -> Tensor:
    return buf.new_empty((2, buf.shape[1]), dtype=stats_dtype(buf.dtype))


@torch.library.custom_op("dense_ext::deluge_cldc_forward", mutates_args=())
def cldc_forward(
    buf: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, backend: str
) -> Tensor:
    """The CLDC output [N, C, H, W] (channels_last, ``buf``'s dtype) over the first
    ``k = weight.shape[1]`` slots of ``buf``."""
    return get_backend(backend, buf.device).cldc_forward(buf, mean, invstd, weight, bias)


@cldc_forward.register_fake
def _(buf, mean, invstd, weight, bias, backend):
    n, _, h, w = buf.shape
    out = buf.new_empty((n, weight.shape[0], h, w))
    return out.contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("dense_ext::deluge_cldc_backward", mutates_args=())
def cldc_backward(
    grad_y: Tensor,
    buf: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor,
    batch_stats: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_buf, grad_weight, grad_bias)``: ``grad_buf`` is a fresh channels_last gradient
    of the whole buffer (zero beyond the CLDC's ``k`` slots); the weight and bias gradients
    are [C, k] in the statistics dtype."""
    grad_buf = torch.zeros_like(buf, memory_format=torch.channels_last)
    grad_w, grad_b = get_backend(backend, buf.device).cldc_backward(
        grad_y, buf, mean, invstd, weight, batch_stats, grad_buf
    )
    return grad_buf, grad_w, grad_b


@cldc_backward.register_fake
def _(grad_y, buf, mean, invstd, weight, batch_stats, backend):
    grad_buf = torch.empty_like(buf, memory_format=torch.channels_last)
    grad_w = weight.new_empty(weight.shape, dtype=mean.dtype)
    return grad_buf, grad_w, torch.empty_like(grad_w)
