"""The parts of a DelugeNet around the stages, as Functions that keep only their input.

Written plainly, a transition ``CLDC -> BN -> conv3x3/2`` keeps two slot-sized tensors for
backward (the CLDC output for the BN, the BN output for the convolution) and the CIFAR entry,
a pre-activation bottleneck, six. Both run at the largest resolution of their stage, next to
the peak of the backward pass. ``TransitionFunction`` keeps only the stage's slot buffer (held
anyway) and ``PreActBottleneckFunction`` only its input, plus O(channels) statistics; backward
recomputes the rest, which costs a fraction of a stage's work.

Normalisation follows each module's own flags (``norm_call``), running statistics are updated
once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dense_ext.backends.reference import (
    bn_backward,
    bn_relu,
    channel_stats,
    conv_backward,
    relu_backward_,
)
from dense_ext.deluge import cldc_ops
from dense_ext.deluge.backends.base import NormCall, StageBackend, cldc_normaliser, stats_dtype
from dense_ext.deluge.function import update_running_stats
from dense_ext.donation import donate
from dense_ext.function import autocast_off, first_order
from dense_ext.grad_layout import grad_like_param


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _rows(t: Tensor) -> int:
    return t.shape[0] * t.shape[2] * t.shape[3]


def normalise_stats(norm: NormCall, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, var, invstd)`` a BN uses on ``x`` (batch statistics computed here, or its
    running snapshot); its running statistics are updated with the batch's."""
    acc = stats_dtype(x.dtype)
    if norm.batch_stats:
        mean, var = channel_stats(x, acc)
        update_running_stats([(norm, mean, var)], _rows(x))
    else:
        running_mean, running_var = norm.running()
        mean, var = running_mean.to(acc), running_var.to(acc)
    return mean, var, torch.rsqrt(var + norm.eps)


def batch_norm(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """``(x - mean) * invstd * gamma + beta`` (no ReLU), in the statistics dtype."""
    acc = mean.dtype
    z = (x.to(acc) - _channel(mean)).mul_(_channel(invstd * gamma.to(acc)))
    return z.add_(_channel(beta.to(acc))).to(x.dtype)


@dataclass
class TransitionCall:
    """One transition call: the stage backend (for the CLDC) and both normalisations."""

    backend: StageBackend
    cldc: NormCall
    norm: NormCall


class TransitionFunction(torch.autograd.Function):
    """``apply(buf, call, cldc_weight, cldc_bias, gamma, beta, conv_weight)``:
    ``conv3x3_stride2(bn(cldc(buf)))`` over the [N, S*C, H, W] slot buffer ``buf``.

    Saves ``buf`` (the stage's, already held) and per-channel statistics; backward recomputes
    the CLDC and BN outputs and returns a fresh, donated gradient of the whole buffer.
    """

    @staticmethod
    def forward(ctx, buf, call: TransitionCall, cldc_weight, cldc_bias, gamma, beta, conv_weight):
        c, k = cldc_weight.shape
        acc = stats_dtype(buf.dtype)
        with autocast_off(buf.device.type):
            name = call.backend.name
            slot_stats = cldc_ops.slot_stats(buf, c, name) if call.cldc.batch_stats else None
            cldc_mean, cldc_invstd = cldc_normaliser(call.cldc, slot_stats, k, c, acc)
            if slot_stats is not None:
                slots = slot_stats.view(2, k, c)
                update_running_stats([(call.cldc, slots[0].t(), slots[1].t())], _rows(buf))
            y = cldc_ops.cldc_forward(buf, cldc_mean, cldc_invstd, cldc_weight, cldc_bias, name)
            mean, _, invstd = normalise_stats(call.norm, y)
            z = batch_norm(y, mean, invstd, gamma, beta)
            del y
            out = F.conv2d(z, conv_weight, stride=2, padding=1)
        ctx.call = call
        ctx.save_for_backward(buf, cldc_weight, cldc_bias, gamma, beta, conv_weight)
        ctx.stats = (cldc_mean, cldc_invstd, mean, invstd)
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        buf, cldc_weight, cldc_bias, gamma, beta, conv_weight = ctx.saved_tensors
        cldc_mean, cldc_invstd, mean, invstd = ctx.stats
        call: TransitionCall = ctx.call
        name = call.backend.name
        with autocast_off(buf.device.type):
            y = cldc_ops.cldc_forward(buf, cldc_mean, cldc_invstd, cldc_weight, cldc_bias, name)
            z = batch_norm(y, mean, invstd, gamma, beta)
            grad_z, grad_conv, _ = torch.ops.aten.convolution_backward(
                grad_out.to(z.dtype),
                z,
                conv_weight,
                None,
                [2, 2],
                [1, 1],
                [1, 1],
                False,
                [0, 0],
                1,
                [True, True, False],
            )
            del z
            grad_y, grad_gamma, grad_beta = bn_backward(
                grad_z, y, mean, invstd, gamma, call.norm.batch_stats
            )
            del grad_z, y
            grad_y = grad_y.contiguous(memory_format=torch.channels_last)
            grad_buf, grad_cw, grad_cb = cldc_ops.cldc_backward(
                grad_y, buf, cldc_mean, cldc_invstd, cldc_weight, call.cldc.batch_stats, name
            )
        return (
            donate(grad_buf),  # fresh and never read here again: the stage may accumulate into it
            None,
            grad_like_param(grad_cw.to(cldc_weight.dtype), cldc_weight),
            grad_like_param(grad_cb.to(cldc_bias.dtype), cldc_bias),
            grad_like_param(grad_gamma.to(gamma.dtype), gamma),
            grad_like_param(grad_beta.to(beta.dtype), beta),
            grad_like_param(grad_conv, conv_weight),
        )


class PreActBottleneckFunction(torch.autograd.Function):
    """``apply(x, norms, g1, b1, w1, g2, b2, w2, g3, b3, w3)``: BN-ReLU-conv1x1, BN-ReLU-conv3x3,
    BN-ReLU-conv1x1, keeping only ``x`` and per-channel statistics for backward.

    ``norms`` holds the three ``NormCall``s. Backward recomputes every intermediate.
    """

    @staticmethod
    def forward(ctx, x, norms, g1, b1, w1, g2, b2, w2, g3, b3, w3):
        stats = []
        with autocast_off(x.device.type):
            h = x
            for norm, gamma, beta, weight, padding in zip(
                norms, (g1, g2, g3), (b1, b2, b3), (w1, w2, w3), (0, 1, 0)
            ):
                mean, _, invstd = normalise_stats(norm, h)
                stats.append((mean, invstd))
                h = F.conv2d(bn_relu(h, mean, invstd, gamma, beta), weight, padding=padding)
        ctx.norms, ctx.stats = norms, stats
        ctx.save_for_backward(x, g1, b1, w1, g2, b2, w2, g3, b3, w3)
        return h

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        layers = [params[0:3], params[3:6], params[6:9]]
        with autocast_off(x.device.type):
            inputs = [x]  # the input of each BN, recomputed
            for (gamma, beta, weight), (mean, invstd), padding in zip(
                layers[:2], ctx.stats[:2], (0, 1)
            ):
                z = bn_relu(inputs[-1], mean, invstd, gamma, beta)
                inputs.append(F.conv2d(z, weight, padding=padding))
            grads = []
            grad = grad_out.to(x.dtype)
            for j in (2, 1, 0):
                (gamma, beta, weight), (mean, invstd) = layers[j], ctx.stats[j]
                z = bn_relu(inputs[j], mean, invstd, gamma, beta)
                grad_z, grad_w = conv_backward(grad, z, weight, padding=1 if j == 1 else 0)
                grad_z = relu_backward_(grad_z, z)
                del z
                grad, grad_gamma, grad_beta = bn_backward(
                    grad_z, inputs[j], mean, invstd, gamma, ctx.norms[j].batch_stats
                )
                grads = [
                    grad_like_param(grad_gamma.to(gamma.dtype), gamma),
                    grad_like_param(grad_beta.to(beta.dtype), beta),
                    grad_like_param(grad_w, weight),
                    *grads,
                ]
                inputs.pop()
        return (grad, None, *grads)
