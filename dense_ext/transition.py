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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dense_ext.block import DenseDtypeError, DenseInputError
from dense_ext.donation import donate
from dense_ext.function import suggest_format
from dense_ext.norm import NormCall, norm_call

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
    """``apply(x, weight, bias, call, pool) -> pool(relu(batch_norm(x)))``.

    ``call`` is a ``NormCall``; ``pool`` is ``"avg2x2"`` (2x2 average pool, stride 2, floor)
    or ``"global"`` (mean over H and W, output [N, C]). Saves ``x`` and the two per-channel
    statistics vectors; the normalised map is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, call: NormCall, pool: str):
        with torch.autocast(device_type=x.device.type, enabled=False):
            z, mean, invstd = _native_batch_norm(x, weight, bias, call)
            if not call.batch_stats:
                # Eval mode: keep copies, so a later change to the buffers cannot skew backward.
                mean, invstd = call.running_mean.clone(), call.running_var.clone()
            out = _pool(z.relu_(), pool)
        del z
        ctx.call, ctx.pool = call, pool
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd_or_var = ctx.saved_tensors
        call: NormCall = ctx.call
        if x.numel() == 0:  # an empty batch: zero gradients, as F.batch_norm gives
            zeros = [None if t is None else torch.zeros_like(t) for t in (weight, bias)]
            return torch.zeros_like(x), *zeros, None, None
        with torch.autocast(device_type=x.device.type, enabled=False):
            invstd = invstd_or_var if call.batch_stats else torch.rsqrt(invstd_or_var + call.eps)
            grad_z = _pool_backward(grad_out, x, ctx.pool)
            del grad_out
            if grad_z.dtype == x.dtype == mean.dtype:
                grad_x, grad_w, grad_b = _bn_relu_backward_in_place(
                    grad_z, x, weight, bias, mean, invstd, call.batch_stats
                )
            else:  # low-precision input: ATen's kernel accumulates in float32 for us
                grad_x, grad_w, grad_b = _bn_relu_backward_aten(
                    ctx, grad_z, x, weight, bias, mean, invstd, invstd_or_var, call
                )
        # grad_x is fresh and never read here again: the block below may accumulate into it.
        return donate(grad_x) if grad_x is not None else None, grad_w, grad_b, None, None


def _native_batch_norm(x: Tensor, weight, bias, call: NormCall):
    """``torch.native_batch_norm`` as ``call`` says; an empty batch (which that kernel refuses)
    gives an empty output and leaves the running statistics alone, as ``F.batch_norm`` does."""
    if x.numel() == 0:
        stats = x.new_zeros(
            x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32
        )
        return torch.empty_like(x), stats, stats.clone()
    return torch.native_batch_norm(
        x,
        weight,
        bias,
        call.running_mean,
        call.running_var,
        call.batch_stats,
        call.factor(),
        call.eps,
    )


def _bn_relu_backward_aten(ctx, grad_z, x, weight, bias, mean, invstd, invstd_or_var, call):
    positive = _recompute_positive(x, weight, bias, mean, invstd)
    grad_z = grad_z.masked_fill_(~positive, 0)
    del positive
    running = (None, None) if call.batch_stats else (mean, invstd_or_var)
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


def _bn_relu_backward_in_place(g, x, weight, bias, mean, invstd, batch_stats):
    """BN-ReLU backward written into ``g`` (the pool's fresh gradient), batch by batch.

    The transition after a dense block runs at the peak of the model's backward pass; doing the
    two reductions and the apply in place, a slice of the batch at a time, holds one
    block-sized gradient instead of three (gradient, recomputed activation, input gradient).
    """
    acc = mean.dtype
    gamma = torch.ones_like(mean) if weight is None else weight.to(acc)
    beta = torch.zeros_like(mean) if bias is None else bias.to(acc)
    chunk = max(1, (1 << 20) // max(1, x[0].numel()))
    sum_g = torch.zeros_like(mean)
    sum_gxhat = torch.zeros_like(mean)
    for xs, gs in zip(x.split(chunk), g.split(chunk)):
        xhat = (xs - _channel(mean)).mul_(_channel(invstd))
        positive = torch.addcmul(_channel(beta), xhat, _channel(gamma)) > 0
        gs.mul_(positive)
        del positive
        sum_g += gs.sum(dim=(0, 2, 3))
        sum_gxhat += (gs * xhat).sum(dim=(0, 2, 3))
    scale = gamma * invstd
    if batch_stats:
        count = x.numel() // x.shape[1]
        mean_g, mean_gxhat = sum_g / count, sum_gxhat / count
        for xs, gs in zip(x.split(chunk), g.split(chunk)):
            xhat = (xs - _channel(mean)).mul_(_channel(invstd))
            gs.sub_(_channel(mean_g)).sub_(xhat.mul_(_channel(mean_gxhat)))
    g.mul_(_channel(scale))
    grad_w = None if weight is None else sum_gxhat.to(weight.dtype)
    grad_b = None if bias is None else sum_g.to(bias.dtype)
    return g, grad_w, grad_b


def _recompute_positive(x, weight, bias, mean, invstd) -> Tensor:
    """Where ``bn(x) > 0``, from the statistics the forward used (the ReLU mask)."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale if bias is None else bias.to(invstd.dtype) - mean * scale
    z = x.to(invstd.dtype) * _channel(scale)
    return z.add_(_channel(shift)) > 0


def _check_input(x: Tensor, channels: int, who: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise DenseInputError(f"{who} expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise DenseInputError(
            f"{who} expects {channels} input channels, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )
    if not x.is_floating_point():
        raise DenseDtypeError(f"{who} expects a floating-point input, got {x.dtype}")


def norm_relu_pool(x: Tensor, norm: nn.BatchNorm2d, pool: str = "avg2x2") -> Tensor:
    """``pool(relu(norm(x)))`` keeping only ``x`` for backward; ``norm`` behaves as if called.

    ``pool="avg2x2"`` is ``nn.AvgPool2d(2)``; ``pool="global"`` averages over H and W and
    returns [N, C] (the DenseNet head). Running statistics of ``norm`` are updated once, with
    ``nn.BatchNorm2d``'s semantics (momentum, ``momentum=None``, eval mode,
    ``track_running_stats=False``).
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    _check_input(x, norm.num_features, "norm_relu_pool")
    if pool == "avg2x2" and (x.shape[2] < 2 or x.shape[3] < 2):
        raise DenseInputError(f"a 2x2 pool needs H, W >= 2, got input shape {tuple(x.shape)}")
    if (norm.training or norm.running_mean is None) and x.numel() // x.shape[1] == 1:
        raise DenseInputError(
            f"Expected more than 1 value per channel when training, got input size {list(x.shape)}"
        )
    return NormReluPoolFunction.apply(x, norm.weight, norm.bias, norm_call(norm), pool)


class EfficientTransition(nn.Module):
    """Drop-in for torchvision's ``_Transition`` (BN-ReLU-Conv1x1-AvgPool2x2), pooling first.

    Computes ``conv(avgpool2x2(relu(norm(x))))``, equal to torchvision's order up to
    rounding, with a quarter of the convolution's FLOPs, and keeps for backward only ``x``
    and the pooled activation (see the module docstring). Submodules and state_dict keys
    are torchvision's: ``norm``, ``relu``, ``conv``, ``pool``; ``relu`` and ``pool`` hold no
    state and are fixed (ReLU, 2x2 stride-2 average pool).

    Args:
        num_input_features: channels of the input (the dense block's output).
        num_output_features: channels after the 1x1 convolution.
    """

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(
            num_input_features, num_output_features, kernel_size=1, stride=1, bias=False
        )
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    @classmethod
    def from_modules(
        cls, norm: nn.BatchNorm2d, relu: nn.Module, conv: nn.Conv2d, pool: nn.Module
    ) -> EfficientTransition:
        """A transition that reuses these module objects (and so their parameters/buffers)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.norm, self.relu, self.conv, self.pool = norm, relu, conv, pool
        return self

    def forward(self, x: Tensor) -> Tensor:
        """[N, C_in, H, W] -> [N, C_out, H // 2, W // 2]."""
        _check_input(x, self.norm.num_features, "EfficientTransition")
        return self.conv(norm_relu_pool(x, self.norm, "avg2x2"))
