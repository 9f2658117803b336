"""The whole dense block as one autograd Function.

Autograd sees one node per block, not per layer: the Function saves the feature buffer, the
cached channel statistics and (with ``memory="bottleneck"``) each layer's conv1 output, and
its backward re-derives everything else. Running statistics are updated here, exactly once per
forward, with ``nn.BatchNorm2d``'s arithmetic; the backward recomputation never touches them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dense_ext.backends.base import LOCAL, Backend, ForwardState, StatsSync
from dense_ext.donation import take_donated
from dense_ext.spec import BlockSpec


@dataclass
class RunningStats:
    """The running-statistics state of one BN, as ``nn.BatchNorm2d`` keeps it.

    ``momentum=None`` selects the cumulative moving average (factor ``1/num_batches_tracked``).
    """

    mean: Tensor
    var: Tensor
    num_batches_tracked: Tensor | None
    momentum: float | None


@dataclass
class BlockCall:
    """Everything about one block call that is not a differentiable tensor.

    Attributes:
        spec: the block's static configuration (``drop_rate`` already 0 outside training).
        backend: the backend that runs the layer loop.
        eps: one epsilon per BN, in parameter order.
        batch_stats: normalise with batch statistics (training, or no running statistics).
        running: one ``RunningStats`` per BN, or empty when no BN tracks statistics.
        update_running: update ``running`` from this batch (training with tracked stats).
        save: keep what backward needs (grad enabled and something requires grad).
        sync: how batch statistics combine across processes (``LOCAL``: not at all).
    """

    spec: BlockSpec
    backend: Backend
    eps: Sequence[float]
    batch_stats: bool
    running: Sequence[RunningStats] = field(default_factory=list)
    update_running: bool = False
    save: bool = True
    sync: StatsSync = LOCAL

    def __post_init__(self) -> None:
        if self.sync is not LOCAL and not self.backend.supports_sync:
            raise ValueError(
                f"dense_ext backend {self.backend.name!r} does not support synchronised batch "
                "norm; use backend='reference'"
            )

    def running_tensors(self) -> list[Tensor]:
        """The flat ``(mean, var)`` per BN sequence that backends read in eval mode."""
        if self.batch_stats:
            return []
        return [t for rs in self.running for t in (rs.mean, rs.var)]


def update_running_stats(call: BlockCall, state: ForwardState, count: int) -> None:
    """Fold this batch's statistics into every BN's running statistics.

    Matches ``nn.BatchNorm2d``: ``running = (1 - f) * running + f * batch`` with the unbiased
    batch variance and ``f = momentum`` (or ``1 / num_batches_tracked`` when momentum is None).
    All BNs are updated with a handful of foreach kernels rather than a Python loop of ops.
    """
    spec = call.spec
    bessel = count / (count - 1)
    batch_means: list[Tensor] = []
    batch_vars: list[Tensor] = []
    for layer in range(spec.num_layers):
        c_in = spec.in_channels(layer)
        batch_means.append(state.stats1[0, :c_in])
        batch_vars.append(state.stats1[1, :c_in])
        if spec.bottleneck:
            batch_means.append(state.stats2[layer, 0])
            batch_vars.append(state.stats2[layer, 1])

    tracked = [rs.num_batches_tracked for rs in call.running if rs.num_batches_tracked is not None]
    if tracked:
        torch._foreach_add_(tracked, 1)
    factors = [
        rs.momentum if rs.momentum is not None else 1.0 / float(rs.num_batches_tracked)
        for rs in call.running
    ]
    means = [rs.mean for rs in call.running]
    variances = [rs.var for rs in call.running]
    dtype = means[0].dtype
    new_means = torch._foreach_mul([m.to(dtype) for m in batch_means], factors)
    new_vars = torch._foreach_mul([(v * bessel).to(dtype) for v in batch_vars], factors)
    keep = [1.0 - f for f in factors]
    torch._foreach_mul_(means, keep)
    torch._foreach_add_(means, new_means)
    torch._foreach_mul_(variances, keep)
    torch._foreach_add_(variances, new_vars)


class DenseBlockFunction(torch.autograd.Function):
    """``DenseBlockFunction.apply(x, call, *params) -> feat``.

    ``x`` is the [N, C0, H, W] block input, ``call`` a ``BlockCall`` and ``params`` the flat
    parameter tuple described in ``dense_ext.spec``. Returns the [N, C0 + L*k, H, W]
    channels_last feature buffer. The buffer is saved for backward with ``save_for_backward``,
    so modifying it in place before backward raises instead of giving wrong gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, call: BlockCall, *params: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            feat, state = call.backend.forward(
                x,
                params,
                call.running_tensors(),
                call.eps,
                call.spec,
                call.batch_stats,
                call.save,
                call.sync,
            )
        if call.update_running:
            count = call.sync.world_count(feat.numel() // feat.shape[1])
            update_running_stats(call, state, count)
        ctx.call = call
        ctx.x_format = suggest_format(x)
        ctx.num_params = len(params)
        ctx.num_bottlenecks = len(state.bottlenecks)
        ctx.dropout = state.dropout
        if call.save:
            ctx.save_for_backward(feat, *params, *state.tensors())
        return feat

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        # First statement: see dense_ext.donation. Compiled graphs never donate.
        refs = sys.getrefcount(grad_out) if not torch.compiler.is_compiling() else None
        call: BlockCall = ctx.call
        if not call.save:
            raise RuntimeError(
                "dense_ext: backward through a block that ran without saving for backward "
                "(it was called under torch.no_grad() or with nothing requiring grad)"
            )
        feat, *rest = ctx.saved_tensors
        params = rest[: ctx.num_params]
        stats1, stats2, *bottlenecks = rest[ctx.num_params :]
        state = ForwardState(stats1, stats2, list(bottlenecks), ctx.dropout)
        grad_feat = take_donated(grad_out, refs, feat)
        if grad_feat is None:
            grad_feat = torch.empty_like(feat, memory_format=torch.channels_last)
            grad_feat.copy_(grad_out)
        del grad_out
        with torch.autocast(device_type=feat.device.type, enabled=False):
            grads = call.backend.backward(
                grad_feat,
                feat,
                state,
                params,
                call.running_tensors(),
                call.eps,
                call.spec,
                call.batch_stats,
                call.sync,
            )
        grad_x = None
        if ctx.needs_input_grad[0]:
            c0 = call.spec.num_input_features
            grad_x = grad_feat[:, :c0].clone(memory_format=ctx.x_format)
        del grad_feat
        param_grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:])]
        return (grad_x, None, *param_grads)


def suggest_format(t: Tensor) -> torch.memory_format:
    """channels_last if ``t`` is laid out so (and is not also plain contiguous), else contiguous."""
    if t.is_contiguous() or not t.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last
