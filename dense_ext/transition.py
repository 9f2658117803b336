"""Transitions (and the network head) that keep nothing of the block output's size.

torchvision's transition computes ``pool(conv1x1(relu(bn(x))))`` and autograd keeps the BN
output (``x``-sized) for backward, next to ``x`` itself. Here the order is
``conv1x1(pool(relu(bn(x))))``: a 1x1 convolution and a 2x2 average pool are both linear and
act on different axes (channels, pixels), so they commute exactly (up to rounding), also for
odd H/W, where both orders drop the last row/column. The convolution then runs on a quarter
of the pixels. ``NormReluPoolFunction`` computes ``pool(relu(bn(x)))`` saving only ``x`` (the
block's feature buffer, which the block already holds) and per-channel statistics; backward
recomputes ``relu(bn(x))``. The convolution saves its input, the pooled activation.

The same function with global average pooling is the DenseNet head ``norm5-ReLU-avgpool``.

Synchronised BN: both take a ``StatsSync`` (the dense block's hook), so under DDP with sync BN
they stay fused: forward statistics are merged over processes, the two BN-backward reductions
summed, the weight and bias gradients left local (``nn.SyncBatchNorm``'s semantics).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dense_ext.backends.base import LOCAL, StatsSync, stats_dtype
from dense_ext.block import (
    DenseInputError,
    check_input,
    conv_mismatch,
    module_norm_call,
    norm_channels,
    norm_kind,
    relu_mismatch,
    unfused_reason,
)
from dense_ext.donation import donate
from dense_ext.function import autocast_off, first_order, suggest_format
from dense_ext.grad_layout import restride_weight_grad, weight_with_grad_layout
from dense_ext.norm import NormCall, fold_running_stats
from dense_ext.tracing import NotScriptable

POOLS = ("avg2x2", "global")


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _pool(z: Tensor, pool: str) -> Tensor:
    if pool == "avg2x2":
        return torch.nn.functional.avg_pool2d(z, kernel_size=2, stride=2)
    return z.mean(dim=(2, 3))


def _pool_backward(grad_p: Tensor, x: Tensor, pool: str) -> Tensor:
    """Gradient of ``_pool`` at an input shaped like ``x`` (the pool is linear: no values)."""
    if pool == "avg2x2":
        return torch.ops.aten.avg_pool2d_backward(
            grad_p, x, [2, 2], [2, 2], [0, 0], False, True, None
        )
    h, w = x.shape[2:]
    return (
        (grad_p / (h * w))[:, :, None, None]
        .expand(x.shape)
        .contiguous(memory_format=suggest_format(x))
    )


class NormReluPoolFunction(torch.autograd.Function):
    """``apply(x, weight, bias, call, pool, sync) -> pool(relu(batch_norm(x)))``.

    ``call`` is a ``NormCall``; ``pool`` is ``"avg2x2"`` (2x2 average pool, stride 2, floor)
    or ``"global"`` (mean over H and W, output [N, C]); ``sync`` a ``StatsSync`` that merges the
    batch statistics across processes (``LOCAL``: none; only used with batch statistics).
    Saves ``x`` and the two per-channel statistics vectors; the normalised map is recomputed
    in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, call: NormCall, pool: str, sync: StatsSync = LOCAL):
        synced = sync is not LOCAL and call.batch_stats and x.numel() > 0
        with autocast_off(x.device.type):
            if synced:
                z, mean, invstd, ctx.world_count = _synced_batch_norm(x, weight, bias, call, sync)
            else:
                z, mean, invstd = _native_batch_norm(x, weight, bias, call)
            if not call.batch_stats:
                mean, invstd = _eval_stats(call, x.dtype)
            out = _pool(z.relu_(), pool)
        del z
        ctx.call, ctx.pool, ctx.sync = call, pool, sync if synced else LOCAL
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd_or_var = ctx.saved_tensors
        call: NormCall = ctx.call
        if x.numel() == 0:  # an empty batch: zero gradients, as F.batch_norm gives
            zeros = [None if t is None else torch.zeros_like(t) for t in (weight, bias)]
            return torch.zeros_like(x), *zeros, None, None, None
        with autocast_off(x.device.type):
            invstd = invstd_or_var if call.batch_stats else torch.rsqrt(invstd_or_var + call.eps)
            if torch.compiler.is_compiling() and ctx.sync is LOCAL:
                # One expression for the compiler to fuse into two passes over x, writing only
                # the input gradient; the eager in-place, batch-sliced version below would be
                # functionalized into copies of every slice.
                grad_x, grad_w, grad_b = _bn_relu_pool_backward_traced(
                    grad_out, x, weight, bias, mean, invstd, call.batch_stats, ctx.pool
                )
                return grad_x, grad_w, grad_b, None, None, None
            grad_z = _pool_backward(grad_out, x, ctx.pool)
            del grad_out
            if ctx.sync is not LOCAL:
                grad_x, grad_w, grad_b = _bn_relu_backward_in_place(
                    grad_z, x, weight, bias, mean, invstd, True, ctx.sync, ctx.world_count
                )
            elif _fused_backward_applies(grad_z, x, mean):
                var = invstd_or_var if not call.batch_stats else invstd.pow(-2) - call.eps
                grad_x, grad_w, grad_b = _bn_relu_backward_fused(
                    grad_z, x, weight, bias, mean, var, call.eps, call.batch_stats
                )
            elif grad_z.dtype == x.dtype == mean.dtype or x.device.type == "cpu":
                # Low precision on the CPU too: ATen's CPU kernel holds two input-sized
                # buffers besides the pool's gradient, this one none (it converts a slice
                # at a time to float32).
                grad_x, grad_w, grad_b = _bn_relu_backward_in_place(
                    grad_z, x, weight, bias, mean, invstd, call.batch_stats
                )
            else:  # low precision on a GPU: one ATen kernel (accumulating in float32), not
                # a Python loop of launches over slices
                grad_x, grad_w, grad_b = _bn_relu_backward_aten(
                    ctx, grad_z, x, weight, bias, mean, invstd, invstd_or_var, call
                )
        # grad_x is fresh and never read here again: the block below may accumulate into it.
        return donate(grad_x) if grad_x is not None else None, grad_w, grad_b, None, None, None


def _eval_stats(call: NormCall, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Copies of the running mean and variance for backward, so that a later change to the
    buffers cannot skew it, in at least the statistics dtype of a ``dtype`` input: a float16 or
    bfloat16 model's own buffers would make backward's sums and ReLU mask half-precision
    arithmetic (input gradients up to 91 % off where PyTorch's were within 0.4 %)."""
    assert call.running_mean is not None and call.running_var is not None
    acc = torch.promote_types(call.running_mean.dtype, stats_dtype(dtype))
    return call.running_mean.to(acc, copy=True), call.running_var.to(acc, copy=True)


def _native_batch_norm(x: Tensor, weight, bias, call: NormCall):
    """``torch.native_batch_norm`` as ``call`` says; an empty batch (which that kernel refuses)
    gives an empty output and leaves the running statistics alone, as ``F.batch_norm`` does."""
    if x.numel() == 0:
        stats = x.new_zeros(
            x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32
        )
        return torch.empty_like(x), stats, stats.clone()
    batch_norm = torch.native_batch_norm
    if torch.compiler.is_compiling() and x.device.type == "cpu" and call.batch_stats:
        # (torch.export never gets here: every module runs unfused under it,
        # dense_ext.block.unfused_reason. Not in evaluation: the op declares the running
        # statistics mutated, and inductor then wrote the weight gradient into running_mean's
        # memory in backward (torch 2.14, CPU); evaluation needs no reduction.)
        batch_norm = _opaque_batch_norm
    return batch_norm(
        x,
        weight,
        bias,
        call.running_mean,
        call.running_var,
        call.batch_stats,
        call.factor(),
        call.eps,
    )


# torch.native_batch_norm as one opaque op in compiled graphs on the CPU: inductor decomposes it
# into reductions that took several times ATen's time on the 2-core CPU (DenseNet-BC-100's first
# transition, batch 16, forward + backward: 38 ms compiled against 13 ms eager; 11 ms with this).
# The Function's forward runs without autograd, so the op needs no derivative.
@torch.library.custom_op(
    "dense_ext::opaque_batch_norm", mutates_args=("running_mean", "running_var")
)
def _opaque_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.native_batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps
    )


@_opaque_batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, training, momentum, eps):
    stats = x.shape[1] if training else 0
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty_like(x, memory_format=suggest_format(x))
    return out, x.new_empty(stats, dtype=acc), x.new_empty(stats, dtype=acc)


def _synced_batch_norm(x: Tensor, weight, bias, call: NormCall, sync: StatsSync):
    """``batch_norm(x)`` with the statistics of the global batch; updates the running statistics
    with the global count. Returns the output, the mean, the inverse std and the global count."""
    count = x.numel() // x.shape[1]
    mean, var = sync.stats(*_local_mean_var(x), count)
    world_count = sync.world_count(count)
    if world_count < 2:
        raise DenseInputError(
            f"Expected more than 1 value per channel when training, got {world_count} in all"
        )
    fold_running_stats(call, mean, var, world_count)
    # Normalising "with running statistics" that are the global batch's: ATen's kernel, as
    # the local path uses, and no update.
    z = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, call.eps)[0]
    return z, mean, torch.rsqrt(var + call.eps), world_count


def _slice_rows(x: Tensor, at_most: int | None = None) -> int:
    """Samples per batch slice of ``x`` for the paths that work a slice at a time in float32:
    about 2**20 values, or more where that would make over ``at_most`` slices."""
    rows = max(1, (1 << 20) // max(1, x[0].numel()))
    return rows if at_most is None else max(rows, -(-x.shape[0] // at_most))


def _local_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` in the statistics dtype. Low-precision
    inputs go a batch slice at a time (Chan's merge), so no float32 copy of ``x`` is made."""
    acc = stats_dtype(x.dtype)
    if x.dtype == acc:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        return mean, var
    chunk = _slice_rows(x)
    n, mean, m2 = 0, None, None
    for xs in x.split(chunk):
        var_s, mean_s = torch.var_mean(xs.to(acc), dim=(0, 2, 3), correction=0)
        n_s = xs.numel() // xs.shape[1]
        if mean is None:
            n, mean, m2 = n_s, mean_s, var_s * n_s
            continue
        delta = mean_s - mean
        total = n + n_s
        mean = mean + delta * (n_s / total)
        m2 = m2 + var_s * n_s + delta.square() * (n * n_s / total)
        n = total
    return mean, m2 / n


def _bn_relu_backward_aten(ctx, grad_z, x, weight, bias, mean, invstd, invstd_or_var, call):
    grad_z = _mask_relu_gradient_(grad_z, x, weight, bias, mean, invstd)
    running = (None, None)
    if not call.batch_stats:
        # The running statistics in the buffers' dtype, as nn.BatchNorm2d passes them (the
        # copies are exact upcasts of those: _eval_stats, which asserts that they exist).
        dtype = cast(Tensor, call.running_mean).dtype
        running = (mean.to(dtype), invstd_or_var.to(dtype))
    return torch.ops.aten.native_batch_norm_backward(
        grad_z,
        x,
        weight,
        *running,
        mean if call.batch_stats else None,
        invstd if call.batch_stats else None,
        call.batch_stats,
        call.eps,
        [
            ctx.needs_input_grad[0],
            weight is not None and ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        ],
    )


# The dtypes the extension's BN kernels take, with float32 statistics (float64 for float64).
_FUSED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _fused_backward_applies(g: Tensor, x: Tensor, mean: Tensor) -> bool:
    """Whether ``_bn_relu_backward_fused`` can run: CPU or CUDA tensors in channels_last, ``g``
    in ``x``'s dtype, the statistics in its accumulation dtype (low precision under autocast:
    bfloat16 or float16 input, float32 statistics), and the extension's kernels built for the
    device."""
    if x.device.type not in ("cpu", "cuda") or x.dtype not in _FUSED_DTYPES:
        return False
    if g.dtype != x.dtype or mean.dtype != stats_dtype(x.dtype):
        return False
    cl = torch.channels_last
    if not (x.is_contiguous(memory_format=cl) and g.is_contiguous(memory_format=cl)):
        return False
    from dense_ext.backends import cpp

    return cpp.unavailable_reason(x.device) is None


def _bn_relu_backward_fused(g, x, weight, bias, mean, var, eps, batch_stats):
    """BN-ReLU backward written into ``g`` by one call of the extension's ``bn_relu_backward``
    (two vectorised passes: the sums of g and g*xhat, then dx; on CUDA two kernels, where the
    Python paths below launch a few per batch slice), the same result as
    ``_bn_relu_backward_in_place`` up to rounding. In place: every element of ``g`` is read
    once, by the thread that then writes its dx (csrc/cuda/kernels.cu, bn_grad_input_kernel).
    ``var`` is what the BN normalised with (recovered from ``invstd`` in training:
    ``invstd**-2 - eps``, within a few ulps)."""
    acc = mean.dtype
    gamma = torch.ones_like(mean) if weight is None else weight.to(acc).contiguous()
    beta = torch.zeros_like(mean) if bias is None else bias.to(acc).contiguous()
    sum_gxhat, sum_g = torch.empty_like(mean), torch.empty_like(mean)
    torch.ops.dense_ext.bn_relu_backward(
        g, x, mean, var.contiguous(), gamma, beta, eps, batch_stats, False, g, sum_gxhat, sum_g
    )
    grad_w = None if weight is None else sum_gxhat.to(weight.dtype)
    grad_b = None if bias is None else sum_g.to(bias.dtype)
    return g, grad_w, grad_b


def _bn_relu_backward_in_place(
    g, x, weight, bias, mean, invstd, batch_stats, sync: StatsSync = LOCAL, count=None
):
    """BN-ReLU backward written into ``g`` (the pool's fresh gradient), batch by batch.

    The transition after a dense block runs at the peak of the model's backward pass; doing the
    two reductions and the apply in place, a slice of the batch at a time, holds one
    block-sized gradient instead of three (gradient, recomputed activation, input gradient).
    With a ``sync``, the two reductions are summed over processes and ``count`` is the global
    batch's; low-precision ``x`` and ``g`` are then handled a slice at a time in the
    statistics dtype (the local path gives those to ATen's kernel).
    """
    acc = mean.dtype
    gamma = torch.ones_like(mean) if weight is None else weight.to(acc)
    beta = torch.zeros_like(mean) if bias is None else bias.to(acc)
    chunk = _slice_rows(x)
    sum_g = torch.zeros_like(mean)
    sum_gxhat = torch.zeros_like(mean)
    for xs, gs in zip(x.split(chunk), g.split(chunk)):
        xhat = (xs.to(acc) - _channel(mean)).mul_(_channel(invstd))
        # ReLU's gradient as torch's threshold_backward: zero where bn(x) <= 0 (a NaN input
        # passes), whatever the incoming gradient holds there (a NaN or Inf too, which a
        # multiplication by the mask would keep).
        inactive = torch.addcmul(_channel(beta), xhat, _channel(gamma)) <= 0
        gs.masked_fill_(inactive, 0)
        del inactive
        ga = gs.to(acc)
        sum_g += ga.sum(dim=(0, 2, 3))
        sum_gxhat += (ga * xhat).sum(dim=(0, 2, 3))
    scale = gamma * invstd
    # The parameters' gradients are this process's sums (DDP averages them), as nn.SyncBatchNorm.
    grad_w = None if weight is None else sum_gxhat.to(weight.dtype)
    grad_b = None if bias is None else sum_g.to(bias.dtype)
    if batch_stats:
        sum_g, sum_gxhat = sync.grad_sums(torch.stack([sum_g, sum_gxhat]))
        count = count if count is not None else x.numel() // x.shape[1]
        mean_g, mean_gxhat = sum_g / count, sum_gxhat / count
    for xs, gs in zip(x.split(chunk), g.split(chunk)):
        ga = gs.to(acc)  # gs itself unless low precision
        if batch_stats:
            xhat = (xs.to(acc) - _channel(mean)).mul_(_channel(invstd))
            ga.sub_(_channel(mean_g)).sub_(xhat.mul_(_channel(mean_gxhat)))
        ga.mul_(_channel(scale))
        if ga is not gs:
            gs.copy_(ga)
    return g, grad_w, grad_b


def _bn_relu_pool_backward_traced(grad_out, x, weight, bias, mean, invstd, batch_stats, pool):
    """The transition backward as plain tensor expressions (for torch.compile)."""
    acc = mean.dtype
    gamma = torch.ones_like(mean) if weight is None else weight.to(acc)
    beta = torch.zeros_like(mean) if bias is None else bias.to(acc)
    xhat = (x.to(acc) - _channel(mean)) * _channel(invstd)
    z = xhat * _channel(gamma) + _channel(beta)
    g = _pool_backward(grad_out, x, pool).to(acc)
    g = torch.where(z <= 0, torch.zeros_like(g), g)  # torch's ReLU mask: NaN passes
    sum_g = g.sum(dim=(0, 2, 3))
    sum_gxhat = (g * xhat).sum(dim=(0, 2, 3))
    if batch_stats:
        count = x.numel() // x.shape[1]
        g = g - _channel(sum_g / count) - xhat * _channel(sum_gxhat / count)
    grad_x = (g * _channel(gamma * invstd)).to(x.dtype).contiguous(memory_format=suggest_format(x))
    grad_w = None if weight is None else sum_gxhat.to(weight.dtype)
    grad_b = None if bias is None else sum_g.to(bias.dtype)
    return grad_x, grad_w, grad_b


# At most this many batch slices when masking a low-precision gradient: each costs a few
# kernel launches (the GPU step is host-bound), and each holds its slice in float32.
_MASK_SLICES = 8


def _mask_relu_gradient_(grad_z: Tensor, x: Tensor, weight, bias, mean, invstd) -> Tensor:
    """``grad_z`` zeroed in place where ``bn(x) <= 0`` (ReLU's gradient), a batch slice at a
    time. Whole, the float32 recompute of a low-precision ``x`` held two float32 copies of a
    block's output at the backward's peak: 4x the bfloat16 output, which made a bfloat16
    DenseNet-BC-100's `min` step take more memory per sample than float32's."""
    rows = _slice_rows(x, at_most=_MASK_SLICES)
    for xs, gs in zip(x.split(rows), grad_z.split(rows)):
        gs.masked_fill_(_recompute_inactive(xs, weight, bias, mean, invstd), 0)
    return grad_z


def _recompute_inactive(x, weight, bias, mean, invstd) -> Tensor:
    """Where ``bn(x) <= 0`` (torch's ReLU backward zeroes the gradient there; a NaN is not
    ``<= 0`` and passes), from the statistics the forward used."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale if bias is None else bias.to(invstd.dtype) - mean * scale
    z = x.to(invstd.dtype, copy=True).mul_(_channel(scale))  # one temporary, never x itself
    return z.add_(_channel(shift)) <= 0


def norm_relu_pool(
    x: Tensor, norm: nn.BatchNorm2d, pool: str = "avg2x2", sync: StatsSync | None = None
) -> Tensor:
    """``pool(relu(norm(x)))`` keeping only ``x`` for backward; ``norm`` behaves as if called.

    ``pool="avg2x2"`` is ``nn.AvgPool2d(2)``; ``pool="global"`` averages over H and W and
    returns [N, C] (the DenseNet head). Running statistics of ``norm`` are updated once, with
    ``nn.BatchNorm2d``'s semantics (momentum, ``momentum=None``, eval mode,
    ``track_running_stats=False``). ``norm`` is an ``nn.BatchNorm2d``, timm's ``BatchNormAct2d``
    (ReLU) or torchvision's ``FrozenBatchNorm2d``; when ``norm`` has hooks, is of another kind
    or under tracing and ``torch.func`` (``dense_ext.block.unfused_reason``), ``norm`` itself is
    called, followed by a ReLU and the pool, as torchvision's DenseNet does.

    ``sync`` (the hook of synchronised BN, see ``dense_ext.sync_bn``) merges the statistics
    across processes while ``norm`` is in training mode, as ``nn.SyncBatchNorm`` does; None
    takes ``norm.stats_sync`` when ``norm`` has one (a ``dense_ext.sync_bn.SyncBatchNorm``),
    so a model's fused head follows ``enable_sync_bn`` without knowing about it.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if norm_kind(norm) is None or unfused_reason(norm, called=False) is not None:
        out = F.relu(norm(x))
        if pool == "avg2x2":
            return F.avg_pool2d(out, kernel_size=2, stride=2)
        return torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
    check_input(x, norm_channels(norm), "norm_relu_pool")
    if pool == "avg2x2" and (x.shape[2] < 2 or x.shape[3] < 2):
        raise DenseInputError(f"a 2x2 pool needs H, W >= 2, got input shape {tuple(x.shape)}")
    if sync is None:
        sync = getattr(norm, "stats_sync", None) or LOCAL
    if not norm.training:  # nn.SyncBatchNorm: no sync in evaluation, even on batch statistics
        sync = LOCAL
    call = module_norm_call(norm)
    if sync is LOCAL and call.batch_stats and x.numel() // x.shape[1] == 1:
        # (synced: the global count decides)
        raise DenseInputError(
            f"Expected more than 1 value per channel when training, got input size {list(x.shape)}"
        )
    return NormReluPoolFunction.apply(x, norm.weight, norm.bias, call, pool, sync)


def is_avg_pool_2x2(pool: nn.Module | None) -> bool:
    """Whether ``pool`` is torchvision's transition pool: ``nn.AvgPool2d(2, 2)`` (floor mode,
    no padding, no divisor override)."""
    pair = torch.nn.modules.utils._pair
    return (
        type(pool) is nn.AvgPool2d
        and pair(pool.kernel_size) == (2, 2)
        and pair(pool.stride or pool.kernel_size) == (2, 2)
        and pair(pool.padding) == (0, 0)
        and not pool.ceil_mode
        and pool.divisor_override is None
    )


class EfficientTransition(NotScriptable, nn.Module):
    """Drop-in for torchvision's ``_Transition`` (BN-ReLU-Conv1x1-AvgPool2x2), pooling first.

    Computes ``conv(avgpool2x2(relu(norm(x))))``, equal to torchvision's order up to
    rounding, with a quarter of the convolution's FLOPs, and keeps for backward only ``x``
    and the pooled activation (see the module docstring). Submodules and state_dict keys
    are torchvision's: ``norm``, ``relu``, ``conv``, ``pool``; ``relu`` and ``pool`` hold no
    state and are fixed (ReLU, 2x2 stride-2 average pool).

    Args:
        num_input_features: channels of the input (the dense block's output).
        num_output_features: channels after the 1x1 convolution.

    Attribute ``stats_sync`` (default None), like the dense block's, may hold a
    ``dense_ext.backends.base.StatsSync`` that combines the BN's batch statistics across
    processes (synchronised BN, set by ``dense_ext.sync_bn.enable_sync_bn``).
    """

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(
            num_input_features, num_output_features, kernel_size=1, stride=1, bias=False
        )
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.stats_sync: StatsSync | None = None

    @classmethod
    def from_modules(
        cls, norm: nn.BatchNorm2d, relu: nn.Module, conv: nn.Conv2d, pool: nn.Module
    ) -> EfficientTransition:
        """A transition that reuses these module objects (and so their parameters/buffers)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.norm, self.relu, self.conv, self.pool = norm, relu, conv, pool
        self.stats_sync = None
        return self

    # nn.Sequential's container protocol, as torchvision's _Transition (an nn.Sequential) has
    # it: code that walks a transition's modules (segmentation_models_pytorch's
    # TransitionWithSkip before 0.4, which keeps the ReLU's output as a skip connection) runs
    # them one by one, in torchvision's order, as it did before converting.
    def __iter__(self) -> Iterator[nn.Module]:
        """The modules in torchvision's order: ``norm``, ``relu``, ``conv``, ``pool``."""
        return iter(self._sequence())

    def __len__(self) -> int:
        return len(self._sequence())

    def __getitem__(self, index: int | slice) -> nn.Module:
        """``transition[i]`` is the i-th module (``transition[2] is transition.conv``);
        ``transition[a:b]`` an ``nn.Sequential`` of those modules, as ``nn.Sequential`` gives."""
        if isinstance(index, slice):
            return nn.Sequential(OrderedDict(self._named_sequence()[index]))
        return self._sequence()[operator.index(index)]

    def _named_sequence(self) -> list[tuple[str, nn.Module]]:
        return [(name, module) for name, module in self._modules.items() if module is not None]

    def _sequence(self) -> list[nn.Module]:
        return [module for _, module in self._named_sequence()]

    def structure_reason(self) -> str | None:
        """Why the fused path (BN-ReLU-pool, then the conv module on the pooled map) would not
        compute this transition's modules, or None. Pooling first is exact only for a 1x1,
        stride-1 conv (any bias or groups: the conv module itself runs) after a 2x2 average
        pool; a BN the kernels do not model or a replaced ReLU runs the modules too."""
        modules = cast(dict[str, nn.Module], self._modules)
        norm = modules.get("norm")
        if norm is None or norm_kind(norm) is None:
            return f"norm is a {type(norm).__name__}, not a batch norm the kernels model"
        reason = relu_mismatch(modules.get("relu"), norm)
        if reason is not None:
            return f"relu {reason}"
        reason = conv_mismatch(modules.get("conv"), 1, weight_only=False)
        if reason is not None:
            return f"conv {reason}"
        if not is_avg_pool_2x2(modules.get("pool")):
            return "pool is not a 2x2, stride-2, unpadded floor-mode average pool"
        return None

    def forward(self, x: Tensor) -> Tensor:
        """[N, C_in, H, W] -> [N, C_out, H // 2, W // 2]. Runs torchvision's order, module by
        module, when ``dense_ext.block.unfused_reason`` says so (a hook on a submodule, tracing,
        ``torch.func``)."""
        # ATen gives the conv's weight gradient the layout of its input, channels_last when
        # the input is a block's output: restrided to the weight's, as the naive model's is.
        conv = self.conv
        if unfused_reason(self) is not None:
            out = conv(self.relu(self.norm(x)))
            return self.pool(restride_weight_grad(out))
        check_input(x, norm_channels(self.norm), "EfficientTransition")
        pooled = norm_relu_pool(x, self.norm, "avg2x2", self.stats_sync)
        # The module's own computation (a stock nn.Conv2d without hooks on this path).
        return conv._conv_forward(pooled, weight_with_grad_layout(conv.weight), conv.bias)
