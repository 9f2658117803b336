"""The reference backend: the block algorithm in plain torch ops.

It is the oracle of the other backends and the last fallback. It already has the memory
profile of the design (one feature buffer, BN-ReLU and optionally conv1 recomputed in
backward); it only lacks the fusion, so every step is a separate pass over memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dense_ext.backends.base import (
    LOCAL,
    Backend,
    ForwardState,
    StatsSync,
    new_feature_buffer,
    stats_dtype,
)


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def channel_stats(t: Tensor, acc: torch.dtype, sync: StatsSync = LOCAL) -> tuple[Tensor, Tensor]:
    """Batch mean and biased variance of each channel of an [N, C, H, W] tensor.

    ``var_mean`` uses Welford's algorithm, so data with a large mean loses nothing.
    """
    var, mean = torch.var_mean(t.to(acc), dim=(0, 2, 3), correction=0)
    return sync.stats(mean, var, t.numel() // t.shape[1])


def bn_relu(x: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """relu((x - mean) * scale + beta), scale = gamma * invstd, in the statistics dtype.

    Subtracting the mean first (rather than folding it into a shift) keeps data with a large
    mean accurate: the subtraction is exact where the fold would cancel two large terms.
    """
    acc = mean.dtype
    scale = gamma.to(acc) * invstd
    z = x.to(acc) - _channel(mean)
    torch.addcmul(_channel(beta.to(acc)), z, _channel(scale), out=z)  # one temporary, not two
    return z.relu_().to(x.dtype)


def relu_backward_(grad_z: Tensor, z: Tensor) -> Tensor:
    """grad_z * (z > 0), written into grad_z (which the caller owns)."""
    return torch.ops.aten.threshold_backward(grad_z, z, 0, grad_input=grad_z)


def bn_backward(
    g: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    gamma: Tensor,
    batch_stats: bool,
    sync: StatsSync = LOCAL,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of y = (x - mean) * invstd * gamma + beta with respect to x, gamma and beta,
    given g = dL/dy (the ReLU mask already applied).

    With batch statistics the mean and variance depend on x, which gives the two reduction
    terms: dx = gamma*invstd * (g - mean(g) - xhat * mean(g*xhat)).
    """
    acc = mean.dtype
    g = g.to(acc)
    if batch_stats and sync is LOCAL and x.dtype == acc:
        # ATen's fused kernel does the two reductions and the apply in two passes; it is ten
        # times slower on the strided prefix than on a contiguous copy.
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.ops.aten.native_batch_norm_backward(
            g, x, gamma, None, None, mean, invstd, True, 0.0, [True, True, True]
        )
    xhat = (x.to(acc) - _channel(mean)).mul_(_channel(invstd))
    grad_beta = g.sum(dim=(0, 2, 3))
    grad_gamma = (g * xhat).sum(dim=(0, 2, 3))
    scale = gamma.to(acc) * invstd
    if batch_stats:
        count = sync.world_count(x.numel() // x.shape[1])
        sum_g, sum_gxhat = sync.grad_sums(torch.stack([grad_beta, grad_gamma]))
        g = g.sub_(_channel(sum_g / count)).sub_(xhat.mul_(_channel(sum_gxhat / count)))
    grad_x = g.mul_(_channel(scale))
    return grad_x.to(x.dtype), grad_gamma, grad_beta


def conv_backward(
    grad_out: Tensor, inp: Tensor, weight: Tensor, padding: int
) -> tuple[Tensor, Tensor]:
    """Input and weight gradients of a stride-1, bias-free convolution."""
    grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out,
        inp,
        weight,
        None,
        [1, 1],
        [padding, padding],
        [1, 1],
        False,
        [0, 0],
        1,
        [True, True, False],
    )
    return grad_in, grad_w


class DropoutReplay:
    """Draws each layer's dropout mask and replays it exactly in backward.

    The mask is drawn like ``F.dropout`` draws it on the CPU (a contiguous [N, k, H, W]
    tensor filled by ``bernoulli_(1 - p)`` and divided by ``1 - p``), from the device's
    default generator, so a seeded naive model and the block use the same masks. Instead of
    keeping the masks, the generator state before each draw is kept (a few KiB per layer).
    """

    def __init__(self, device: torch.device, p: float) -> None:
        self.device = device
        self.p = p
        self.states: dict[int, Tensor] = {}

    def _get_state(self) -> Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        mask = torch.empty(shape, dtype=dtype, device=self.device).bernoulli_(1 - self.p)
        return mask.div_(1 - self.p)

    def draw(self, layer: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        self.states[layer] = self._get_state()
        return self._draw(shape, dtype)

    def replay(self, layer: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        cuda = self.device.type == "cuda"
        devices = [self.device] if cuda else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            if cuda:
                torch.cuda.set_rng_state(self.states[layer], self.device)
            else:
                torch.set_rng_state(self.states[layer])
            return self._draw(shape, dtype)


class LayerView:
    """One layer's parameters, normalisation statistics and channel range."""

    def __init__(self, layer, params, running, eps, spec, state, batch_stats):
        self.layer = layer
        self.c_in = spec.in_channels(layer)
        self.c_out = self.c_in + spec.growth_rate
        first = layer * spec.params_per_layer
        self.params = params[first : first + spec.params_per_layer]
        self.batch_stats = batch_stats
        self._state, self._running = state, running
        self._bn1 = layer * spec.bns_per_layer
        self._eps = eps
        if batch_stats:
            mean1, var1 = state.stats1[0, : self.c_in], state.stats1[1, : self.c_in]
        else:
            mean1, var1 = running[2 * self._bn1], running[2 * self._bn1 + 1]
        self.mean1, self.invstd1 = self._normaliser(mean1, var1, eps[self._bn1])

    def _normaliser(self, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        acc = self._state.stats1.dtype
        return mean.to(acc), torch.rsqrt(var.to(acc) + eps)

    def bn2(self) -> tuple[Tensor, Tensor]:
        """Mean and inverse std of the bottleneck BN (batch statistics must be written)."""
        if self.batch_stats:
            mean2, var2 = self._state.stats2[self.layer]
        else:
            mean2, var2 = self._running[2 * self._bn1 + 2], self._running[2 * self._bn1 + 3]
        return self._normaliser(mean2, var2, self._eps[self._bn1 + 1])


class ReferenceBackend(Backend):
    """Pure-PyTorch implementation of the block; runs on any device."""

    name = "reference"
    supports_sync = True

    def forward(self, x, params, running, eps, spec, batch_stats, save, sync=LOCAL):
        feat = new_feature_buffer(x, spec)
        acc = stats_dtype(x.dtype)
        dev = x.device
        n, _, h, w = x.shape
        empty = torch.empty(0, dtype=acc, device=dev)
        state = ForwardState(stats1=empty, stats2=empty)
        if batch_stats:
            state.stats1 = torch.empty((2, spec.num_features), dtype=acc, device=dev)
            self._write_stats(state.stats1, x, 0, spec.num_input_features, sync)
            if spec.bottleneck:
                shape = (spec.num_layers, 2, spec.mid_channels)
                state.stats2 = torch.empty(shape, dtype=acc, device=dev)
        if spec.drop_rate > 0:
            state.dropout = DropoutReplay(dev, spec.drop_rate)
        for layer in range(spec.num_layers):
            lv = LayerView(layer, params, running, eps, spec, state, batch_stats)
            new = self._layer_forward(feat, lv, spec, state, save, sync)
            if state.dropout is not None:
                new = new * state.dropout.draw(layer, (n, spec.growth_rate, h, w), new.dtype)
            feat[:, lv.c_in : lv.c_out].copy_(new)
            if batch_stats:
                self._write_stats(state.stats1, new, lv.c_in, lv.c_out, sync)
        return feat, state

    @staticmethod
    def _write_stats(stats: Tensor, t: Tensor, lo: int, hi: int, sync: StatsSync) -> None:
        """Statistics of ``t``, the tensor just written into buffer channels [lo, hi)."""
        mean, var = channel_stats(t, stats.dtype, sync)
        stats[0, lo:hi] = mean
        stats[1, lo:hi] = var

    def _layer_forward(self, feat, lv, spec, state, save, sync):
        p = lv.params
        z1 = bn_relu(feat[:, : lv.c_in], lv.mean1, lv.invstd1, p[0], p[1])
        if not spec.bottleneck:
            return F.conv2d(z1, p[2], padding=1)
        y1 = F.conv2d(z1, p[2])
        del z1
        if lv.batch_stats:
            mean2, var2 = channel_stats(y1, state.stats2.dtype, sync)
            state.stats2[lv.layer, 0] = mean2
            state.stats2[lv.layer, 1] = var2
        if save and spec.keeps_bottleneck:
            state.bottlenecks.append(y1)
        z2 = bn_relu(y1, *lv.bn2(), p[3], p[4])
        return F.conv2d(z2, p[5], padding=1)

    def backward(self, grad_feat, feat, state, params, running, eps, spec, batch_stats, sync=LOCAL):
        grads: list[Tensor | None] = [None] * len(params)
        n, _, h, w = feat.shape
        for layer in reversed(range(spec.num_layers)):
            lv = LayerView(layer, params, running, eps, spec, state, batch_stats)
            grad_new = grad_feat[:, lv.c_in : lv.c_out]
            if state.dropout is not None:
                mask = state.dropout.replay(layer, (n, spec.growth_rate, h, w), grad_new.dtype)
                grad_new = grad_new * mask
            layer_grads = self._layer_backward(grad_feat, grad_new, feat, lv, spec, state, sync)
            first = layer * spec.params_per_layer
            for i, g in enumerate(layer_grads):
                grads[first + i] = g.to(params[first + i].dtype)
        return grads

    def _layer_backward(self, grad_feat, grad_new, feat, lv, spec, state, sync):
        # Temporaries are dropped as soon as they are dead: the peak of this loop is the peak
        # of the whole backward, and each one is as large as the layer's input.
        prefix = feat[:, : lv.c_in]
        p = lv.params
        z1 = bn_relu(prefix, lv.mean1, lv.invstd1, p[0], p[1])
        tail: list[Tensor] = []
        if spec.bottleneck:
            y1 = state.bottlenecks[lv.layer] if spec.keeps_bottleneck else F.conv2d(z1, p[2])
            mean2, invstd2 = lv.bn2()
            z2 = bn_relu(y1, mean2, invstd2, p[3], p[4])
            grad_z2, grad_w2 = conv_backward(grad_new, z2, p[5], padding=1)
            grad_z2 = relu_backward_(grad_z2, z2)
            del z2
            grad_y1, grad_g2, grad_b2 = bn_backward(
                grad_z2, y1, mean2, invstd2, p[3], lv.batch_stats, sync
            )
            del grad_z2, y1
            grad_z1, grad_w1 = conv_backward(grad_y1, z1, p[2], padding=0)
            del grad_y1
            tail = [grad_g2, grad_b2, grad_w2]
        else:
            grad_z1, grad_w1 = conv_backward(grad_new, z1, p[2], padding=1)
        grad_z1 = relu_backward_(grad_z1, z1)
        del z1
        grad_x, grad_g1, grad_b1 = bn_backward(
            grad_z1, prefix, lv.mean1, lv.invstd1, p[0], lv.batch_stats, sync
        )
        del grad_z1
        grad_feat[:, : lv.c_in].add_(grad_x)
        return [grad_g1, grad_b1, grad_w1, *tail]


_BACKEND = ReferenceBackend()


def unavailable_reason(device: torch.device) -> str | None:
    return None


def get_backend() -> ReferenceBackend:
    return _BACKEND
