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
the transition's stock 1x1 convolution's node gets ``restride_weight_grad``'s hook.
"""

from __future__ import annotations

import functools

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


def _same_order(grad: Tensor, stride: tuple[int, ...]) -> bool:
    """Whether ``grad`` and a tensor of its shape with ``stride`` address memory identically:
    equal strides on every dimension longer than 1 (a size-1 dimension's stride never changes
    an address)."""
    return all(n == 1 or a == b for n, a, b in zip(grad.shape, grad.stride(), stride, strict=True))


def grad_like_param(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` with exactly the strides ``AccumulateGrad`` would give ``param``'s ``.grad``.

    No copy when only the strides of size-1 dimensions differ (the common channels_last 1x1
    case: the same memory, restrided); a copy into the parameter's layout otherwise.
    """
    if grad.shape != param.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} != parameter {tuple(param.shape)}")
    if not is_dense(param):  # AccumulateGrad's rule for such parameters: contiguous
        return grad.contiguous()
    return _like_layout(grad, param.shape, param.stride())


def _like_layout(grad: Tensor, shape: torch.Size, stride: tuple[int, ...]) -> Tensor:
    """``grad`` with ``stride``, the strides of a dense parameter of ``grad``'s ``shape``."""
    if grad.stride() == stride:
        return grad
    if is_dense(grad) and _same_order(grad, stride):
        return grad.as_strided(shape, stride)  # keeps the storage offset
    out = grad.new_empty_strided(shape, stride)
    return out.copy_(grad)


class _GradLikeWeight(torch.autograd.Function):
    """The identity on a parameter, whose backward gives the gradient the parameter's strides."""

    @staticmethod
    def forward(ctx, weight: Tensor) -> Tensor:
        ctx.layout = (weight.shape, weight.stride())
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # A traced convolution's gradient has the strides of its meta function, which
            # need not be those of the kernel that runs: a copy into the layout, always.
            shape, stride = ctx.layout
            return grad.new_empty_strided(shape, stride).copy_(grad)
        return _like_layout(grad, *ctx.layout)


def weight_with_grad_layout(weight: Tensor) -> Tensor:
    """``weight`` for a convolution computed by hand, whose gradient arrives in ``weight``'s
    strides (``grad_like_param``'s rule), in eager mode and compiled alike."""
    if not weight.requires_grad or not is_dense(weight):
        return weight
    return _GradLikeWeight.apply(weight)


def _restride_weight_grad(shape, stride, grad_inputs, grad_outputs):
    """A ``ConvolutionBackward0`` node's post-hook: its weight gradient (second output) with
    the weight's ``shape`` and ``stride`` (``grad_like_param``'s rule)."""
    grad = grad_inputs[1]
    if grad is None:
        return None
    return (grad_inputs[0], _like_layout(grad, shape, stride), *grad_inputs[2:])


def restride_weight_grad(out: Tensor) -> Tensor:
    """``out``, the output of a convolution module, whose autograd node now gives the conv's
    weight parameter a gradient in the parameter's strides (``grad_like_param``'s rule).

    For a module called as it is (its hooks must run), in eager mode. The hook is on this
    call's node, which lives as long as this call's graph, not on the parameter: a tensor hook
    on the parameter would need a reference to it (a weak one makes ``torch.utils.swap_tensors``,
    hence ``module.to`` under ``torch.__future__.set_swap_module_params_on_conversion``, refuse
    the parameter; a strong one makes a cycle), and such hooks stop running when the
    parameter's contents are swapped or it is pickled. The parameter is found through the
    node, so a parametrized weight is not read again. Nothing is hooked while tracing, or when
    ``out`` does not come straight from a convolution over a parameter (a forward hook replaced
    it, or a parametrization computes the weight).
    """
    if not isinstance(out, Tensor) or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return out
    node = out.grad_fn
    if node is None or node.name() != "ConvolutionBackward0":
        return out
    weight = getattr(node.next_functions[1][0], "variable", None)  # an AccumulateGrad's
    if weight is None or not is_dense(weight):  # AccumulateGrad makes those contiguous itself
        return out
    node.register_hook(functools.partial(_restride_weight_grad, weight.shape, weight.stride()))
    return out
