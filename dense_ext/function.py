"""The whole dense block as one autograd Function.

Autograd sees one node per block, not per layer: the Function saves the feature buffer, the
cached channel statistics and (with ``memory="bottleneck"``) each layer's conv1 output, and
its backward re-derives everything else. Running statistics are updated here, exactly once per
forward, with ``nn.BatchNorm2d``'s arithmetic; the backward recomputation never touches them.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dense_ext.backends.base import BlockCall, ForwardState, new_feature_buffer, new_stats
from dense_ext.donation import take_donated


def update_running_stats(call: BlockCall, state: ForwardState, count: int) -> None:
    """Fold this batch's statistics into the running statistics of every BN that updates.

    Matches ``F.batch_norm``: ``running = (1 - f) * running + f * batch`` with the unbiased
    batch variance and ``f`` the BN's momentum, or ``1 / num_batches_tracked`` when momentum
    is None (computed on the device: no host sync). BNs with a momentum are updated with a
    handful of foreach kernels rather than a Python loop of ops.
    """
    spec = call.spec
    bessel = count / (count - 1) if count > 1 else float("nan")
    running: list[Tensor] = []
    batch: list[Tensor] = []
    factors: list[float] = []
    for i, norm in enumerate(call.norms):
        if not norm.update:
            continue
        layer, second = divmod(i, spec.bns_per_layer)
        if second:
            mean, var = state.stats2[layer, 0], state.stats2[layer, 1]
        else:
            c_in = spec.in_channels(layer)
            mean, var = state.stats1[0, :c_in], state.stats1[1, :c_in]
        assert norm.running_mean is not None and norm.running_var is not None
        dtype = norm.running_mean.dtype
        if norm.momentum is None:
            _cumulative_update(norm, mean.to(dtype), (var * bessel).to(dtype))
            continue
        running += [norm.running_mean, norm.running_var]
        batch += [mean.to(dtype), (var * bessel).to(dtype)]
        factors += [float(norm.momentum)] * 2
    if running:
        torch._foreach_mul_(running, [1.0 - f for f in factors])
        torch._foreach_add_(running, torch._foreach_mul(batch, factors))


def _cumulative_update(norm, mean: Tensor, var: Tensor) -> None:
    """``momentum=None``: factor ``1 / num_batches_tracked``, kept on the device."""
    if norm.num_batches_tracked is None:  # nn.BatchNorm2d then uses factor 0: no change
        return
    factor = norm.num_batches_tracked.to(mean.dtype).reciprocal()
    for buf, new in ((norm.running_mean, mean), (norm.running_var, var)):
        buf.mul_(1 - factor).add_(new * factor)


class DenseBlockFunction(torch.autograd.Function):
    """``DenseBlockFunction.apply(x, call, *params) -> feat``.

    ``x`` is the [N, C0, H, W] block input, ``call`` a ``BlockCall`` and ``params`` the flat
    parameter tuple described in ``dense_ext.spec``. Returns the [N, C0 + L*k, H, W]
    channels_last feature buffer. The buffer is saved for backward with ``save_for_backward``,
    so modifying it in place before backward raises instead of giving wrong gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, call: BlockCall, *params: Tensor) -> Tensor:
        empty = x.numel() == 0
        with torch.autocast(device_type=x.device.type, enabled=False):
            if empty:  # N*H*W == 0: like nn.BatchNorm2d, no statistics and no update
                feat, state = new_feature_buffer(x, call.spec), new_stats(x, call)
            else:
                feat, state = call.backend.forward(x, params, call)
        if any(norm.update for norm in call.norms) and not empty:
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
            if feat.numel() == 0:
                grads = [torch.zeros_like(p) for p in params]
            else:
                grads = call.backend.backward(grad_feat, feat, state, params, call)
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
