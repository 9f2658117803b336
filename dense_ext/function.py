"""The whole dense block as one autograd Function.

Autograd sees one node per block, not per layer: the Function saves the feature buffer, the
cached channel statistics and (with ``memory="bottleneck"``) each layer's conv1 output, and
its backward re-derives everything else. Running statistics are updated here, exactly once per
forward, with ``nn.BatchNorm2d``'s arithmetic; the backward recomputation never touches them.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch._C import _functions

from dense_ext import donation
from dense_ext.backends.base import BlockCall, ForwardState, new_feature_buffer, new_stats
from dense_ext.donation import take_donated
from dense_ext.grad_layout import grad_like_param

NOT_TWICE_DIFFERENTIABLE = (
    "dense_ext blocks are not twice differentiable: a gradient computed with create_graph=True "
    "through an EfficientDenseBlock, EfficientTransition or the fused head (or an efficient "
    "DelugeNet stage, CLDC, transition, head or entry) cannot be differentiated again (double "
    "backward, gradient penalties, Hessian-vector products). Use the naive model "
    "(efficient=False) for higher-order gradients."
)


def first_order(backward: Callable) -> Callable:
    """Decorates an autograd Function's backward that is not itself differentiable.

    Without ``create_graph`` it just runs. With it, the backward runs without recording and its
    gradients are returned through an error node that raises ``NOT_TWICE_DIFFERENTIABLE``
    whenever anything differentiates through them. Unlike ``once_differentiable``, which attaches
    that node only when an incoming gradient requires grad, the node here always hangs on the
    tensors the Function saved (its inputs, parameters and output), so the second-order term
    through them can never be dropped silently: a constant ``grad_outputs``
    (``torch.autograd.grad(out, x, v, create_graph=True)``) followed by a backward through the
    result raises too, also under ``torch.autograd.grad(..., inputs=...)``.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        return _through_error_node(outputs, ctx.saved_tensors)

    return wrapper


def _through_error_node(outputs: Sequence[Tensor | None], anchors: Sequence[Tensor]):
    """``outputs`` (aliases, no copy) with an error node for grad_fn whose inputs include every
    ``anchor`` that requires grad."""
    anchors = [t for t in anchors if t.requires_grad]
    if not anchors:
        return outputs
    grads = [g.detach() if isinstance(g, Tensor) else None for g in outputs]
    error = _functions.DelayedError(NOT_TWICE_DIFFERENTIABLE.encode(), len(grads) + len(anchors))
    # A None input gives an undefined output, which autograd reads as None.
    return tuple(error(*grads, *anchors)[: len(grads)])


def update_running_stats(call: BlockCall, state: ForwardState, count: int) -> None:
    """Fold this batch's statistics into the running statistics of every BN that updates.

    Matches ``F.batch_norm``: ``running = (1 - f) * running + f * batch`` with the unbiased
    batch variance and ``f`` the BN's momentum, or ``1 / num_batches_tracked`` when momentum
    is None (computed on the device: no host sync). The BNs of each momentum are updated with
    one ``torch._foreach_lerp_`` (``running + f * (batch - running)``, the same average up to
    rounding), not a Python loop of ops nor three foreach ops with a temporary: host time.
    """
    spec = call.spec
    bessel = count / (count - 1) if count > 1 else float("nan")
    by_factor: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    # Each BN's batch statistics are a view of stats1 (a prefix of its two rows) or a row of
    # stats2; the unbiased variances of all are computed in one operation per tensor and the
    # views taken from those rows (a few operations per BN, not a dozen: host time per layer).
    mean1 = unbiased1 = None
    if call.stats1_needed:
        mean1, unbiased1 = state.stats1[0], state.stats1[1] * bessel
    means2: Sequence[Tensor] = ()
    unbiased2: Sequence[Tensor] = ()
    if call.stats2_needed:
        means2, unbiased2 = state.stats2[:, 0].unbind(0), (state.stats2[:, 1] * bessel).unbind(0)
    for i, norm in enumerate(call.norms):
        if not norm.update:
            continue
        layer, second = divmod(i, spec.bns_per_layer)
        if second:
            mean, var = means2[layer], unbiased2[layer]
        else:
            assert mean1 is not None and unbiased1 is not None
            c_in = spec.in_channels(layer)
            mean, var = mean1[:c_in], unbiased1[:c_in]
        assert norm.running_mean is not None and norm.running_var is not None
        dtype = norm.running_mean.dtype
        if mean.dtype != dtype:
            mean, var = mean.to(dtype), var.to(dtype)
        if norm.momentum is None:
            _cumulative_update(norm, mean, var)
            continue
        running, batch = by_factor.setdefault(float(norm.momentum), ([], []))
        running += [norm.running_mean, norm.running_var]
        batch += [mean, var]
    for factor, (running, batch) in by_factor.items():
        torch._foreach_lerp_(running, batch, factor)


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
        with autocast_off(x.device.type):
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
        ctx.weights = state.weights if call.save else None
        if call.save:
            ctx.save_for_backward(feat, *params, *state.tensors())
        return feat

    @staticmethod
    @first_order
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
        state = ForwardState(stats1, stats2, list(bottlenecks), ctx.dropout, ctx.weights)
        grad_feat = writable_gradient(grad_out, refs, feat)
        del grad_out
        with autocast_off(feat.device.type):
            if feat.numel() == 0:
                grads = [torch.zeros_like(p) for p in params]
            else:
                grads = call.backend.backward(grad_feat, feat, state, params, call)
        grad_x = input_gradient(ctx, grad_feat, call.spec.num_input_features)
        del grad_feat
        return (grad_x, None, *parameter_gradients(ctx, grads, params))


def writable_gradient(grad_out: Tensor, refs: int | None, like: Tensor) -> Tensor:
    """The buffer a backward accumulates its input gradients into: ``grad_out`` itself when its
    producer donated it and nothing else holds it (``dense_ext.donation``; ``refs`` is its
    reference count taken by the backward's first statement), else a channels_last copy."""
    grad = take_donated(grad_out, refs, like)
    if grad is None:
        grad = torch.empty_like(like, memory_format=torch.channels_last)
        grad.copy_(grad_out)
    return grad


def input_gradient(ctx, grad_buf: Tensor, channels: int) -> Tensor | None:
    """The gradient of a Function's first input (the first ``channels`` channels of the
    buffer), in the input's memory format (``ctx.x_format``); None when not needed."""
    if not ctx.needs_input_grad[0]:
        return None
    return grad_buf[:, :channels].clone(memory_format=ctx.x_format)


def parameter_gradients(ctx, grads, params) -> list[Tensor | None]:
    """``grads`` for the parameters that need one (inputs 2.. of the Function), each laid out
    like its parameter: backends return gradients in whatever layout their kernels write, and
    autograd (and DDP's buckets) expect each parameter's own strides."""
    return [
        grad_like_param(g, p) if need and g is not None else None
        for g, p, need in zip(grads, params, ctx.needs_input_grad[2:])
    ]


# Whether each device type has autocast at all (meta has not), filled at import for the usual
# types: compiled code then reads a constant from this dict, because torch 2.11's dynamo cannot
# trace torch.amp.is_autocast_available (a graph break, an error under fullgraph=True). Not
# torch.compiler.assume_constant_result: that imports torch._dynamo (and triton) with dense_ext.
_AUTOCAST_AVAILABLE = {
    t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "xpu", "mps", "meta")
}


def autocast_available(device_type: str) -> bool:
    """Whether ``device_type`` has autocast (``torch.amp.is_autocast_available``), cached."""
    known = _AUTOCAST_AVAILABLE.get(device_type)
    if known is None:
        known = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return known


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type`` (nothing to turn off on types without
    autocast, such as meta)."""
    if autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def suggest_format(t: Tensor) -> torch.memory_format:
    """channels_last if ``t`` is laid out so (and is not also plain contiguous), else contiguous."""
    if t.is_contiguous() or not t.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


donation.measure_baseline(first_order)
