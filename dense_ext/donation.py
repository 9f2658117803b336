"""Gradient donation between dense_ext's own autograd Functions.

The block backward needs a writable gradient buffer the size of its output. The gradient it
receives usually comes from the next transition's backward, which allocated it and will never
read it again; copying it would hold two block-sized buffers at the backward's peak. A
producer that knows it gives its gradient away marks it with ``donate``; the block then
accumulates into it in place (``take_donated``) instead of copying.

Donation is refused whenever anyone else may see the tensor: a Python reference beyond the
autograd engine's own (a tensor hook that kept it, say) shows up in the reference count,
measured against a baseline taken once, at import, through the same kind of call.
(``retain_grad`` clones, so it never aliases the gradient.)
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_MARK = "_dense_ext_donated"


def donate(grad: Tensor) -> Tensor:
    """Mark ``grad`` as given away by its producer, which must never read it again."""
    setattr(grad, _MARK, True)
    return grad


def take_donated(grad: Tensor, refs: int | None, like: Tensor) -> Tensor | None:
    """``grad`` if it was donated, nobody else holds it (``refs``, its reference count at the
    top of the consumer's backward, is the baseline) and it is laid out like ``like``
    (channels_last); else None. ``refs`` None (unknown) never donates."""
    if refs is None or refs > _BASELINE_REFS or not getattr(grad, _MARK, False):
        return None
    if grad.shape != like.shape or grad.dtype != like.dtype or grad.device != like.device:
        return None
    if not grad.is_contiguous(memory_format=torch.channels_last):
        return None
    setattr(grad, _MARK, False)  # taken once
    return grad


class _Producer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return donate(grad.clone())


class _Consumer(torch.autograd.Function):
    refs = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        refs = sys.getrefcount(grad_out)  # the same first statement as the block's backward
        _Consumer.refs = refs
        return grad_out


def _measure_baseline() -> int:
    x = torch.zeros(2, requires_grad=True)
    with torch.enable_grad():
        _Producer.apply(_Consumer.apply(x)).sum().backward()
    return _Consumer.refs


_BASELINE_REFS = _measure_baseline()
