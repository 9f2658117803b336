"""A DelugeNet stage as one autograd Function, and the CLDC over a finished stage's buffer.

``DelugeStageFunction`` is the unit of autograd for a whole stage: it saves the slot buffer
and O(channels) statistics (plus, with ``memory="bottleneck"``, each layer's 3x3-convolution
output); backward recomputes everything else. ``CLDCFunction`` is the cross-layer depthwise
convolution that transitions and the head apply to a stage's buffer: it saves nothing but
statistics (the buffer is the stage's, already held) and hands the buffer-sized gradient it
allocates to the stage's backward (``dense_ext.donation``).

The rules of ``nn.BatchNorm2d`` live here, once for every backend: which statistics a module
normalises with (its own ``training`` flag, ``track_running_stats``, running buffers present),
``num_batches_tracked``, momentum or ``momentum=None``, the unbiased running variance, and
that an empty batch updates nothing but ``num_batches_tracked``. Running statistics are
updated once per forward, never by the backward recomputation.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dense_ext.deluge import cldc_ops
from dense_ext.deluge.backends.base import (
    LayerNorms,
    NormCall,
    StageBackend,
    StageCall,
    StageState,
    cldc_normaliser,
    stats_dtype,
)
from dense_ext.donation import donate
from dense_ext.function import (
    autocast_off,
    first_order,
    input_gradient,
    parameter_gradients,
    writable_gradient,
)
from dense_ext.grad_layout import grad_like_param
from dense_ext.norm import norm_call as shared_norm_call


def norm_call(module: nn.Module, count: bool = True) -> NormCall:
    """How ``module`` (an ``nn.BatchNorm2d`` or a CLDC) normalises in this call.

    The decisions are ``dense_ext.norm.norm_call``'s, i.e. ``nn.BatchNorm2d.forward``'s (a CLDC
    carries the same attributes), including the side effect: in training with tracked
    statistics ``num_batches_tracked`` is incremented here, once per forward (unless ``count``
    is False: the caller has incremented it, with other counters in one call). Without batch
    statistics the running ones are snapshotted, so that a later change of the buffers cannot
    skew backward.
    """
    decided = shared_norm_call(cast(_BatchNorm, module), count)
    call = NormCall(eps=decided.eps, batch_stats=decided.batch_stats, factor=decided.factor())
    if decided.batch_stats:
        call.running_mean, call.running_var = decided.running_mean, decided.running_var
    elif decided.running_mean is not None and decided.running_var is not None:
        call.eval_mean = decided.running_mean.clone()
        call.eval_var = decided.running_var.clone()
    return call


def update_running_stats(updates: Sequence[tuple[NormCall, Tensor, Tensor]], count: int) -> None:
    """Fold batch statistics into running ones: ``running = (1 - f) * running + f * batch``.

    ``updates`` holds ``(norm, batch_mean, biased_batch_var)`` with the batch statistics shaped
    like the running ones; the variance is made unbiased (``count / (count - 1)``) as in
    ``nn.BatchNorm2d``. An empty batch (``count == 0``) changes nothing, like ``F.batch_norm``.
    All updates run as a handful of foreach kernels.
    """
    updates = [u for u in updates if u[0].update]
    if count < 1 or not updates:
        return
    bessel = count / (count - 1)
    buffers = [norm.updated() for norm, _, _ in updates]
    means = [mean for mean, _ in buffers]
    variances = [var for _, var in buffers]
    factors = [norm.factor for norm, _, _ in updates]
    new_means = torch._foreach_mul([m.to(r.dtype) for (_, m, _), r in zip(updates, means)], factors)
    new_vars = torch._foreach_mul(
        [(v * bessel).to(r.dtype) for (_, _, v), r in zip(updates, variances)], factors
    )
    keep = [1.0 - f for f in factors]
    torch._foreach_mul_(means, keep)
    torch._foreach_add_(means, list(new_means))
    torch._foreach_mul_(variances, keep)
    torch._foreach_add_(variances, list(new_vars))


def stage_updates(call: StageCall, state: StageState) -> list[tuple[NormCall, Tensor, Tensor]]:
    """Every normalisation of the stage with the batch statistics it used, running-shaped."""
    c, mid = call.spec.channels, call.spec.mid_channels
    updates = []
    for k, ln in enumerate(call.layers, start=1):
        if ln.cldc is not None:
            slots = state.slot_stats[:, : k * c].view(2, k, c)
            updates.append((ln.cldc, slots[0].t(), slots[1].t()))
        stats = state.layer_stats[k - 1]
        for norm, (lo, hi) in zip(
            (ln.norm, ln.norm1, ln.norm2), ((0, c), (c, c + mid), (c + mid, 2 * c))
        ):
            updates.append((norm, stats[0, lo:hi], stats[1, lo:hi]))
    return updates


def suggest_format(t: Tensor) -> torch.memory_format:
    """channels_last if ``t`` is laid out so (and is not also plain contiguous), else contiguous."""
    if t.is_contiguous() or not t.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _rows(t: Tensor) -> int:
    return t.shape[0] * t.shape[2] * t.shape[3]


class DelugeStageFunction(torch.autograd.Function):
    """``DelugeStageFunction.apply(x0, call, *params) -> buf``.

    ``x0`` is the [N, C, H, W] stage input (slot 0), ``call`` a ``StageCall`` and ``params`` the
    flat parameter tuple of ``dense_ext.deluge.spec``. Returns the [N, S*C, H, W] channels_last
    slot buffer, saved for backward with ``save_for_backward`` (so an in-place change before
    backward raises instead of giving wrong gradients).
    """

    @staticmethod
    def forward(ctx, x0: Tensor, call: StageCall, *params: Tensor) -> Tensor:
        spec = call.spec
        with autocast_off(x0.device.type):
            if _rows(x0) == 0:  # an empty batch: nothing to compute, as in the naive model
                n, _, h, w = x0.shape
                buf = x0.new_empty((n, spec.buffer_channels, h, w)).contiguous(
                    memory_format=torch.channels_last
                )
                acc = x0.new_empty((0,), dtype=stats_dtype(x0.dtype))
                state = StageState(acc, acc)
            else:
                buf, state = call.backend.stage_forward(x0, params, call)
                update_running_stats(stage_updates(call, state), _rows(x0))
        ctx.call = call
        ctx.x_format = suggest_format(x0)
        ctx.num_params = len(params)
        if call.save:
            ctx.save_for_backward(buf, *params, *state.tensors())
        return buf

    @staticmethod
    @first_order
    def backward(ctx, grad_out: Tensor):
        # First statement: see dense_ext.donation. Compiled graphs never donate.
        refs = sys.getrefcount(grad_out) if not torch.compiler.is_compiling() else None
        call: StageCall = ctx.call
        if not call.save:
            raise RuntimeError(
                "dense_ext: backward through a DelugeNet stage that ran without saving for "
                "backward (it was called under torch.no_grad() or with nothing requiring grad)"
            )
        buf, *rest = ctx.saved_tensors
        params = rest[: ctx.num_params]
        c = call.spec.channels
        if _rows(buf) == 0:
            grad_x = buf.new_zeros((buf.shape[0], c, *buf.shape[2:]))
            return (grad_x, None, *[torch.zeros_like(p) for p in params])
        slot_stats, layer_stats, *kept = rest[ctx.num_params :]
        state = StageState(slot_stats, layer_stats, list(kept))
        grad_buf = writable_gradient(grad_out, refs, buf)
        del grad_out
        with autocast_off(buf.device.type):
            grads = call.backend.stage_backward(grad_buf, buf, state, params, call)
        grad_x = input_gradient(ctx, grad_buf, c)
        del grad_buf
        return (grad_x, None, *parameter_gradients(ctx, grads, params))


@dataclass
class CLDCCall:
    """One call of a CLDC over a stage's buffer: its backend and normalisation choices."""

    channels: int
    backend: StageBackend
    norm: NormCall


class CLDCFunction(torch.autograd.Function):
    """``CLDCFunction.apply(buf, call, weight, bias) -> y``: the CLDC over every slot of ``buf``.

    ``buf`` is [N, S*C, H, W] with ``S = weight.shape[1]``; ``y`` is [N, C, H, W] channels_last.
    Saves ``buf`` and the per-(slot, channel) mean and inverse std; backward returns a fresh,
    donated gradient of the whole buffer.
    """

    @staticmethod
    def forward(ctx, buf: Tensor, call: CLDCCall, weight: Tensor, bias: Tensor) -> Tensor:
        c, k = weight.shape
        n, _, h, w = buf.shape
        acc = stats_dtype(buf.dtype)
        with autocast_off(buf.device.type):
            if _rows(buf) == 0:
                y = buf.new_empty((n, c, h, w)).contiguous(memory_format=torch.channels_last)
                mean = invstd = buf.new_empty((0,), dtype=acc)
            else:
                name = call.backend.name
                stats = cldc_ops.slot_stats(buf, c, name) if call.norm.batch_stats else None
                mean, invstd = cldc_normaliser(call.norm, stats, k, c, acc)
                y = cldc_ops.cldc_forward(buf, mean, invstd, weight, bias, name)
                if stats is not None:
                    slots = stats.view(2, k, c)
                    update_running_stats([(call.norm, slots[0].t(), slots[1].t())], _rows(buf))
        ctx.call = call
        ctx.save_for_backward(buf, weight, mean, invstd)
        return y

    @staticmethod
    @first_order
    def backward(ctx, grad_y: Tensor):
        buf, weight, mean, invstd = ctx.saved_tensors
        call: CLDCCall = ctx.call
        if _rows(buf) == 0:
            grad_buf = torch.zeros_like(buf, memory_format=torch.channels_last)
            return grad_buf, None, torch.zeros_like(weight), torch.zeros_like(weight)
        with autocast_off(buf.device.type):
            grad_y = grad_y.contiguous(memory_format=torch.channels_last)
            grad_buf, grad_w, grad_b = cldc_ops.cldc_backward(
                grad_y, buf, mean, invstd, weight, call.norm.batch_stats, call.backend.name
            )
        # grad_buf is fresh and never read here again: the stage below may accumulate into it.
        grad_w = grad_like_param(grad_w.to(weight.dtype), weight)
        grad_b = grad_like_param(grad_b.to(weight.dtype), weight)
        return donate(grad_buf), None, grad_w, grad_b


__all__ = [
    "CLDCCall",
    "CLDCFunction",
    "DelugeStageFunction",
    "LayerNorms",
    "NormCall",
    "StageCall",
    "norm_call",
    "update_running_stats",
]
