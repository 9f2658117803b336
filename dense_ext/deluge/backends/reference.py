"""The reference stage backend: the DelugeNet stage algorithm in plain torch ops.

It is the oracle of the other backends and the last fallback. It has the memory profile of the
design (one slot buffer, statistics once per slot, every per-layer intermediate recomputed in
backward) but no fusion: the CLDC is a loop of slot-sized torch ops.
"""

from __future__ import annotations

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
from dense_ext.deluge.backends.base import (
    StageBackend,
    StageState,
    cldc_normaliser,
    new_slot_buffer,
    normaliser,
    stats_dtype,
)


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _slot(buf: Tensor, i: int, channels: int) -> Tensor:
    return buf[:, i * channels : (i + 1) * channels]


class LayerView:
    """Composite layer ``k``'s parameters and the (mean, invstd) of each of its BNs."""

    def __init__(self, k, params, call, state: StageState):
        spec = call.spec
        c, mid = spec.channels, spec.mid_channels
        first = spec.first_param(k)
        p = list(params[first : first + spec.params_per_layer(k)])
        self.k = k
        self.norms = call.layers[k - 1]
        self.cldc_weight: Tensor | None = p[0] if spec.has_cldc(k) else None
        self.cldc_bias: Tensor | None = p[1] if spec.has_cldc(k) else None
        (self.gamma, self.beta, self.w1, self.gamma1, self.beta1, self.w2) = p[-9:-3]
        (self.gamma2, self.beta2, self.w3) = p[-3:]
        self._stats = state.layer_stats[k - 1]
        self._ranges = ((0, c), (c, c + mid), (c + mid, 2 * c))
        if self.cldc_weight is not None:
            self.cldc_mean, self.cldc_invstd = cldc_normaliser(
                self.norms.cldc, state.slot_stats, k, c, state.slot_stats.dtype
            )

    def bn(self, j: int) -> tuple[Tensor, Tensor]:
        """(mean, invstd) of ``norm`` (j=0), ``norm1`` (1) or ``norm2`` (2); with batch
        statistics, read once they are written."""
        norm = (self.norms.norm, self.norms.norm1, self.norms.norm2)[j]
        lo, hi = self._ranges[j]
        return normaliser(norm, self._stats[0, lo:hi], self._stats[1, lo:hi], self._stats.dtype)


def write_stats(stats: Tensor, t: Tensor, lo: int) -> None:
    """Batch mean and biased variance of ``t``'s channels into ``stats[:, lo:lo + C]``."""
    mean, var = channel_stats(t, stats.dtype)
    stats[0, lo : lo + t.shape[1]] = mean
    stats[1, lo : lo + t.shape[1]] = var


def cldc_forward(buf: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``sum_i weight[:, i] * invstd[i] * (slot_i - mean[i]) + bias[:, i]`` over k slots."""
    acc = mean.dtype
    channels, k = weight.shape
    scale = weight.to(acc).t() * invstd  # [k, C]
    y = torch.empty_like(_slot(buf, 0, channels), dtype=acc, memory_format=torch.channels_last)
    y.copy_(_channel(bias.to(acc).sum(dim=1)).expand_as(y))
    centred = torch.empty_like(y)
    for i in range(k):
        # In place, not out=: torch 2.11's dynamo refuses out= into a channels_last tensor.
        centred.copy_(_slot(buf, i, channels)).sub_(_channel(mean[i]))
        y.addcmul_(centred, _channel(scale[i]))
    return y.to(buf.dtype)


def cldc_backward(
    grad_y: Tensor,
    buf: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor,
    batch_stats: bool,
    grad_buf: Tensor,
) -> tuple[Tensor, Tensor]:
    """The k per-input BN backwards of a CLDC: ``grad_buf[:, :k*C] += dx``; returns (dw, db).

    With ``xc_i = slot_i - mean_i`` and ``g = grad_y``: ``db[c, i] = sum g``,
    ``dw[c, i] = invstd_i * sum g*xc_i`` and (batch statistics)
    ``dx_i = a_i * (g - mean(g) - xc_i * invstd_i^2 * mean(g*xc_i))``, ``a = weight * invstd``.
    """
    acc = mean.dtype
    channels, k = weight.shape
    count = grad_y.numel() // channels
    g = grad_y.to(acc)
    sum_g = g.sum(dim=(0, 2, 3))
    scale = weight.to(acc).t() * invstd
    grad_w = torch.empty((channels, k), dtype=acc, device=buf.device)
    centred = torch.empty_like(g)
    for i in range(k):
        # In place, not out=: torch 2.11's dynamo refuses out= into a channels_last tensor.
        centred.copy_(_slot(buf, i, channels)).sub_(_channel(mean[i]))
        sum_gx = (g * centred).sum(dim=(0, 2, 3))
        grad_w[:, i] = sum_gx * invstd[i]
        if batch_stats:
            centred.mul_(_channel(invstd[i] * invstd[i] * sum_gx / count))
            dx = (g - _channel(sum_g / count)).sub_(centred)
        else:
            dx = g.clone()
        _slot(grad_buf, i, channels).add_(dx.mul_(_channel(scale[i])).to(grad_buf.dtype))
    grad_b = sum_g[:, None].expand(channels, k).clone()
    return grad_w, grad_b


class ReferenceStageBackend(StageBackend):
    """Pure-PyTorch stage; runs on any device. Subclasses may replace the CLDC and the slot
    statistics (``cldc_forward``, ``cldc_backward``, ``slot_stats``) and keep the layer loop."""

    name = "reference"

    def slot_stats(self, buf: Tensor, channels: int) -> Tensor:
        stats = torch.zeros((2, buf.shape[1]), dtype=stats_dtype(buf.dtype), device=buf.device)
        write_stats(stats, buf, 0)
        return stats

    def cldc_forward(self, buf, mean, invstd, weight, bias):
        return cldc_forward(buf, mean, invstd, weight, bias)

    def cldc_backward(self, grad_y, buf, mean, invstd, weight, batch_stats, grad_buf):
        return cldc_backward(grad_y, buf, mean, invstd, weight, batch_stats, grad_buf)

    def stage_forward(self, x0, params, call):
        spec = call.spec
        c = spec.channels
        buf = new_slot_buffer(x0, spec)
        acc = stats_dtype(x0.dtype)
        state = StageState(
            slot_stats=torch.zeros((2, spec.buffer_channels), dtype=acc, device=x0.device),
            layer_stats=torch.zeros((spec.num_layers, 2, 2 * c), dtype=acc, device=x0.device),
        )
        if call.slot_needs_stats(0):
            write_stats(state.slot_stats, x0, 0)
        for k in range(1, spec.num_slots):
            new = self._layer_forward(buf, k, params, call, state)
            _slot(buf, k, c).copy_(new)
            if call.slot_needs_stats(k):
                write_stats(state.slot_stats, new, k * c)
        return buf, state

    def _layer_forward(self, buf, k, params, call, state):
        spec = call.spec
        c, mid = spec.channels, spec.mid_channels
        stats = state.layer_stats[k - 1]
        norms = call.layers[k - 1]
        lv = LayerView(k, params, call, state)
        if spec.has_cldc(k):
            y = self.cldc_forward(buf, lv.cldc_mean, lv.cldc_invstd, lv.cldc_weight, lv.cldc_bias)
            if norms.norm.batch_stats:
                write_stats(stats, y, 0)
        else:
            y = _slot(buf, 0, c)
            if norms.norm.batch_stats:
                stats[:, :c] = state.slot_stats[:, :c]
        z = bn_relu(y, *lv.bn(0), lv.gamma, lv.beta)
        del y
        t1 = F.conv2d(z, lv.w1)
        if norms.norm1.batch_stats:
            write_stats(stats, t1, c)
        z = bn_relu(t1, *lv.bn(1), lv.gamma1, lv.beta1)
        del t1
        t2 = F.conv2d(z, lv.w2, padding=1)
        if norms.norm2.batch_stats:
            write_stats(stats, t2, c + mid)
        if call.save and spec.keeps_bottleneck:
            state.kept.append(t2)
        z = bn_relu(t2, *lv.bn(2), lv.gamma2, lv.beta2)
        return F.conv2d(z, lv.w3)

    def stage_backward(self, grad_buf, buf, state, params, call):
        spec = call.spec
        grads: list[Tensor | None] = [None] * len(params)
        for k in reversed(range(1, spec.num_slots)):
            lv = LayerView(k, params, call, state)
            layer_grads = self._layer_backward(grad_buf, buf, lv, spec, state)
            first = spec.first_param(k)
            for i, g in enumerate(layer_grads):
                grads[first + i] = g.to(params[first + i].dtype)
        return grads

    def _layer_backward(self, grad_buf, buf, lv: LayerView, spec, state):
        # Recompute the layer (CLDC, then the bottleneck), then its backward; temporaries are
        # dropped as soon as they are dead, the peak of this loop is the backward's peak.
        c = spec.channels
        k = lv.k
        grad_new = _slot(grad_buf, k, c)
        if lv.cldc_weight is not None:
            y = self.cldc_forward(buf, lv.cldc_mean, lv.cldc_invstd, lv.cldc_weight, lv.cldc_bias)
        else:
            y = _slot(buf, 0, c)
        z0 = bn_relu(y, *lv.bn(0), lv.gamma, lv.beta)
        t1 = F.conv2d(z0, lv.w1)
        z1 = bn_relu(t1, *lv.bn(1), lv.gamma1, lv.beta1)
        t2 = state.kept[k - 1] if spec.keeps_bottleneck else F.conv2d(z1, lv.w2, padding=1)
        z2 = bn_relu(t2, *lv.bn(2), lv.gamma2, lv.beta2)
        grad_z2, grad_w3 = conv_backward(grad_new, z2, lv.w3, padding=0)
        grad_z2 = relu_backward_(grad_z2, z2)
        del z2
        grad_t2, grad_g2, grad_b2 = bn_backward(
            grad_z2, t2, *lv.bn(2), lv.gamma2, lv.norms.norm2.batch_stats
        )
        del grad_z2, t2
        grad_z1, grad_w2 = conv_backward(grad_t2, z1, lv.w2, padding=1)
        del grad_t2
        grad_z1 = relu_backward_(grad_z1, z1)
        del z1
        grad_t1, grad_g1, grad_b1 = bn_backward(
            grad_z1, t1, *lv.bn(1), lv.gamma1, lv.norms.norm1.batch_stats
        )
        del grad_z1, t1
        grad_z0, grad_w1 = conv_backward(grad_t1, z0, lv.w1, padding=0)
        del grad_t1
        grad_z0 = relu_backward_(grad_z0, z0)
        del z0
        grad_y, grad_g0, grad_b0 = bn_backward(
            grad_z0, y, *lv.bn(0), lv.gamma, lv.norms.norm.batch_stats
        )
        del grad_z0, y
        tail = [grad_g0, grad_b0, grad_w1, grad_g1, grad_b1, grad_w2, grad_g2, grad_b2, grad_w3]
        if lv.cldc_weight is None:
            _slot(grad_buf, 0, c).add_(grad_y)
            return tail
        grad_cw, grad_cb = self.cldc_backward(
            grad_y,
            buf,
            lv.cldc_mean,
            lv.cldc_invstd,
            lv.cldc_weight,
            lv.norms.cldc.batch_stats,
            grad_buf,
        )
        return [grad_cw, grad_cb, *tail]


_BACKEND = ReferenceStageBackend()


def unavailable_reason(device: torch.device) -> str | None:
    return None


def get_backend() -> ReferenceStageBackend:
    return _BACKEND
