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
    BlockCall,
    DropoutReplay,
    ForwardState,
    LayerView,
    StatsSync,
    new_feature_buffer,
    new_stats,
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
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        # Recorded by autograd, now or when a compiled or exported graph runs: out= is not
        # differentiable (and Dynamo before torch 2.14 refuses a channels_last out=).
        return torch.addcmul(_channel(beta.to(acc)), z, _channel(scale)).relu().to(x.dtype)
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


class ReferenceBackend(Backend):
    """Pure-PyTorch implementation of the block; runs on any device."""

    name = "reference"
    supports_sync = True

    def forward(self, x, params, call: BlockCall):
        spec, sync = call.spec, call.sync
        feat = new_feature_buffer(x, spec)
        n, _, h, w = x.shape
        state = new_stats(x, call)
        if call.stats1_needed:
            self._write_stats(state.stats1, x, 0, spec.num_input_features, sync)
        if call.dropout:
            state.dropout = DropoutReplay(x.device)
        for layer in range(spec.num_layers):
            lv = LayerView(layer, params, call, state)
            new = self._layer_forward(feat, lv, call, state)
            if lv.drop_rate > 0:
                shape = (n, spec.growth_rate, h, w)
                new = new * state.dropout.draw(layer, shape, lv.drop_rate, new.dtype)
            feat[:, lv.c_in : lv.c_out].copy_(new)
            if call.stats1_needed:
                self._write_stats(state.stats1, new, lv.c_in, lv.c_out, sync)
        return feat, state

    @staticmethod
    def _write_stats(stats: Tensor, t: Tensor, lo: int, hi: int, sync: StatsSync) -> None:
        """Statistics of ``t``, the tensor just written into buffer channels [lo, hi)."""
        mean, var = channel_stats(t, stats.dtype, sync)
        stats[0, lo:hi] = mean
        stats[1, lo:hi] = var

    def _layer_forward(self, feat, lv: LayerView, call: BlockCall, state: ForwardState):
        p = lv.params
        z1 = bn_relu(feat[:, : lv.c_in], lv.mean1, lv.invstd1, p[0], p[1])
        if not call.spec.has_bottleneck:
            return F.conv2d(z1, p[2], padding=1)
        y1 = F.conv2d(z1, p[2])
        del z1
        if lv.norm2.batch_stats:
            mean2, var2 = channel_stats(y1, state.stats2.dtype, call.sync)
            state.stats2[lv.layer, 0] = mean2
            state.stats2[lv.layer, 1] = var2
        if call.save and call.spec.saves_bottleneck_outputs:
            state.bottlenecks.append(y1)
        z2 = bn_relu(y1, *lv.bn2(), p[3], p[4])
        return F.conv2d(z2, p[5], padding=1)

    def backward(self, grad_feat, feat, state, params, call: BlockCall):
        spec = call.spec
        grads: list[Tensor | None] = [None] * len(params)
        n, _, h, w = feat.shape
        for layer in reversed(range(spec.num_layers)):
            lv = LayerView(layer, params, call, state)
            grad_new = grad_feat[:, lv.c_in : lv.c_out]
            if lv.drop_rate > 0:
                shape = (n, spec.growth_rate, h, w)
                grad_new = grad_new * state.dropout.replay(
                    layer, shape, lv.drop_rate, grad_new.dtype
                )
            layer_grads = self._layer_backward(grad_feat, grad_new, feat, lv, call, state)
            first = layer * spec.params_per_layer
            for i, g in enumerate(layer_grads):
                grads[first + i] = g.to(params[first + i].dtype)
        return grads

    def _layer_backward(self, grad_feat, grad_new, feat, lv: LayerView, call, state):
        # Temporaries are dropped as soon as they are dead: the peak of this loop is the peak
        # of the whole backward, and each one is as large as the layer's input.
        spec, sync = call.spec, call.sync
        prefix = feat[:, : lv.c_in]
        p = lv.params
        z1 = bn_relu(prefix, lv.mean1, lv.invstd1, p[0], p[1])
        tail: list[Tensor] = []
        if spec.has_bottleneck:
            if spec.saves_bottleneck_outputs:
                y1 = state.bottlenecks[lv.layer]
            else:
                y1 = F.conv2d(z1, p[2])
            mean2, invstd2 = lv.bn2()
            z2 = bn_relu(y1, mean2, invstd2, p[3], p[4])
            grad_z2, grad_w2 = conv_backward(grad_new, z2, p[5], padding=1)
            grad_z2 = relu_backward_(grad_z2, z2)
            del z2
            grad_y1, grad_g2, grad_b2 = bn_backward(
                grad_z2, y1, mean2, invstd2, p[3], lv.norm2.batch_stats, sync
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
            grad_z1, prefix, lv.mean1, lv.invstd1, p[0], lv.norm1.batch_stats, sync
        )
        del grad_z1
        grad_feat[:, : lv.c_in].add_(grad_x)
        return [grad_g1, grad_b1, grad_w1, *tail]


_BACKEND = ReferenceBackend()


def unavailable_reason(device: torch.device) -> str | None:
    return None


def get_backend() -> ReferenceBackend:
    return _BACKEND
