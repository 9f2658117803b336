"""Parameter gradients laid out exactly like their parameters.

PyTorch's gradient layout contract: a parameter's ``.grad`` has the parameter's strides when
the parameter is dense and non-overlapping, and is contiguous otherwise (``AccumulateGrad``
copies a gradient that does not obey it). ``AccumulateGrad`` ignores the strides of size-1
dimensions when it checks, but ``DistributedDataParallel`` compares every stride with its
bucket view (the parameter's) and warns "Grad strides do not match bucket view strides" for
any difference. A 1x1 convolution's weight ``[O, C, 1, 1]`` has strides ``(C, 1, 1, 1)``,
while ATen's convolution backward on a channels_last input returns its gradient with the
channels_last strides ``(C, 1, C, C)``: the same memory order, different strides on the
size-1 dimensions. So every gradient dense_ext produces goes through ``grad_like_param``, and
the transition's stock 1x1 convolution gets ``keep_grad_layout``'s hook on its weight.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill its memory without gaps or overlaps (in some dimension
    order), i.e. ATen's ``is_non_overlapping_and_dense``."""
    if torch.compiler.is_compiling():
        # Traced once, so nothing to cache; Dynamo would warn at every compile that it
        # ignores an lru_cache.
        return _dense_layout(tuple(t.shape), tuple(t.stride()))
    return _cached_dense_layout(t.shape, t.stride())


def _dense_layout(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for step, size in sorted((s, n) for n, s in zip(shape, stride) if n != 1):
        if step != expected:
            return False
        expected *= size
    return True


# Cached in eager mode: every parameter gradient of every step asks about its parameter's layout.
_cached_dense_layout = functools.lru_cache(maxsize=4096)(_dense_layout)


def _same_order(grad: Tensor, param: Tensor) -> bool:
    """Whether ``grad`` and ``param`` address memory identically: equal strides on every
    dimension longer than 1 (a size-1 dimension's stride never changes an address)."""
    return all(
        n == 1 or a == b for n, a, b in zip(grad.shape, grad.stride(), param.stride(), strict=True)
    )


def grad_like_param(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` with exactly the strides ``AccumulateGrad`` would give ``param``'s ``.grad``.

    No copy when only the strides of size-1 dimensions differ (the common channels_last 1x1
    case: the same memory, restrided); a copy into the parameter's layout otherwise.
    """
    if grad.shape != param.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} != parameter {tuple(param.shape)}")
    if not is_dense(param):  # AccumulateGrad's rule for such parameters: contiguous
        return grad.contiguous()
    if grad.stride() == param.stride():
        return grad
    if is_dense(grad) and _same_order(grad, param):
        return grad.as_strided(param.shape, param.stride())  # keeps the storage offset
    out = grad.new_empty_strided(param.shape, param.stride())
    return out.copy_(grad)


_HOOKED = "_dense_ext_grad_layout_hook"


def keep_grad_layout(param: Tensor) -> None:
    """Make every gradient accumulated into ``param`` follow its layout (``grad_like_param``).

    For parameters whose gradient comes from a stock module (the transition's 1x1
    convolution). Registers a tensor hook, which runs before ``AccumulateGrad`` and so before
    DDP's bucket copy; idempotent. A copied parameter (``copy.deepcopy``) has no hook: the
    module calls this again in forward. The hook holds ``param`` weakly.
    """
    if not param.requires_grad or getattr(param, _HOOKED, False):
        return
    ref = weakref.ref(param)

    def hook(grad: Tensor) -> Tensor:
        target = ref()
        return grad if target is None else grad_like_param(grad, target)

    param.register_hook(hook)
    setattr(param, _HOOKED, True)


def ensure_grad_layout(param: Tensor) -> None:
    """``keep_grad_layout`` from a module's forward: in eager mode only (a compiled graph
    keeps the hooks registered before it was traced)."""
    if not torch.compiler.is_compiling():
        keep_grad_layout(param)
