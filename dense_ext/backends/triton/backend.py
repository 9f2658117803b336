"""``TritonBackend``: the block's layer loop over the fused Triton ops (DESIGN.md sections 4-5).

Per layer, forward (bottleneck layer):
  1. ``bn_relu_conv_fwd`` KS=1: ``Y1 = relu(bn1(prefix)) @ W1^T`` + statistics of ``Y1``;
  2. ``bn_relu_conv_fwd`` KS=3 over ``relu(bn2(Y1))`` straight into ``feat[:, C_in:C_in+k]``
     (dropout mask applied in the epilogue) + statistics of the new channels.
A plain layer is step 2 over ``relu(bn1(prefix))``. Backward, in reverse layer order:
  ``Y1`` (kept, or recomputed by step 1 with ``memory="min"``); ``dW2`` by
  ``bn_relu_conv_wgrad``; ``dY1`` by ``conv_dgrad_bn_relu_reduce/apply`` (BN2-ReLU backward
  fused); ``dW1``; ``grad_feat[:, :C_in] += dX`` by the same dgrad pair with KS=1.
The only per-layer temporaries are ``Y1``-sized scratch (``[M, 4k]``), allocated once per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dense_ext.backends.base import (
    LOCAL,
    Backend,
    BlockCall,
    DropoutReplay,
    LayerView,
    new_feature_buffer,
    new_stats,
    stats_dtype,
)
from dense_ext.backends.triton._common import INTERPRETED
from dense_ext.backends.triton.conv_dgrad import conv_dgrad_bn_relu_apply, conv_dgrad_bn_relu_reduce
from dense_ext.backends.triton.conv_fwd import bn_relu_conv_fwd, conv_weight_taps
from dense_ext.backends.triton.conv_wgrad import bn_relu_conv_wgrad
from dense_ext.backends.triton.stats import channel_stats

__all__ = ["INTERPRETED", "TritonBackend", "get_backend"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _vec(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(dtype).contiguous()


class TritonBackend(Backend):
    """Fused Triton kernels; CUDA (sm_80+) compiled, or CPU under ``TRITON_INTERPRET=1``."""

    name = "triton"
    supports_sync = False

    @staticmethod
    def _check(x: Tensor) -> None:
        if x.dtype not in _DTYPES:
            raise TypeError(f"dense_ext triton backend supports {_DTYPES}, got {x.dtype}")
        if x.device.type == "cpu" and not INTERPRETED:
            raise RuntimeError("dense_ext triton backend: CPU tensors need TRITON_INTERPRET=1")

    def forward(self, x, params, call: BlockCall):
        spec, save = call.spec, call.save
        if call.sync is not LOCAL:
            raise ValueError("dense_ext triton backend does not support synchronised batch norm")
        self._check(x)
        feat = new_feature_buffer(x, spec)
        acc = stats_dtype(x.dtype)
        dev = x.device
        n, c0, h, w = x.shape
        m = n * h * w
        state = new_stats(x, call)
        if call.stats1_needed:
            channel_stats(feat, 0, c0, state.stats1, 0, spec.num_features)
        if call.dropout:
            state.dropout = DropoutReplay(dev)
        keep = save and spec.keeps_bottleneck
        scratch = None
        if spec.bottleneck and not keep:
            scratch = torch.empty((m, spec.mid_channels), dtype=x.dtype, device=dev)
        k, mid, c_total = spec.growth_rate, spec.mid_channels, spec.num_features
        for layer in range(spec.num_layers):
            lv = LayerView(layer, params, call, state)
            p = lv.params
            mask = None
            if lv.drop_rate > 0:
                mask = state.dropout.draw(layer, (n, k, h, w), lv.drop_rate, x.dtype)
            stats1 = state.stats1 if call.stats1_needed else None
            bn1 = (lv.mean1.contiguous(), lv.invstd1.contiguous(), _vec(p[0], acc), _vec(p[1], acc))
            if spec.bottleneck:
                y1 = torch.empty((m, mid), dtype=x.dtype, device=dev) if keep else scratch
                stats2 = state.stats2 if lv.norm2.batch_stats else None
                off2 = layer * 2 * mid
                bn_relu_conv_fwd(
                    feat,
                    0,
                    lv.c_in,
                    *bn1,
                    conv_weight_taps(p[2], x.dtype),
                    y1,
                    0,
                    None,
                    stats2,
                    off2,
                    off2 + mid,
                    h,
                    w,
                )
                if keep:
                    state.bottlenecks.append(y1)
                mean2, invstd2 = lv.bn2()
                bn2 = (mean2.contiguous(), invstd2.contiguous(), _vec(p[3], acc), _vec(p[4], acc))
                bn_relu_conv_fwd(
                    y1,
                    0,
                    mid,
                    *bn2,
                    conv_weight_taps(p[5], x.dtype),
                    feat,
                    lv.c_in,
                    mask,
                    stats1,
                    lv.c_in,
                    c_total + lv.c_in,
                    h,
                    w,
                )
            else:
                bn_relu_conv_fwd(
                    feat,
                    0,
                    lv.c_in,
                    *bn1,
                    conv_weight_taps(p[2], x.dtype),
                    feat,
                    lv.c_in,
                    mask,
                    stats1,
                    lv.c_in,
                    c_total + lv.c_in,
                    h,
                    w,
                )
        return feat, state

    def backward(self, grad_feat, feat, state, params, call: BlockCall):
        spec = call.spec
        if call.sync is not LOCAL:
            raise ValueError("dense_ext triton backend does not support synchronised batch norm")
        self._check(feat)
        grads: list[Tensor | None] = [None] * len(params)
        dtype, dev = feat.dtype, feat.device
        acc = stats_dtype(dtype)
        n, _, h, w = feat.shape
        m = n * h * w
        k, mid = spec.growth_rate, spec.mid_channels
        if not grad_feat.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("dense_ext triton backend: grad_feat must be channels_last")
        grad_y1 = y1_scratch = None
        if spec.bottleneck:
            grad_y1 = torch.empty((m, mid), dtype=dtype, device=dev)
            if not spec.keeps_bottleneck:
                y1_scratch = torch.empty((m, mid), dtype=dtype, device=dev)
        for layer in reversed(range(spec.num_layers)):
            lv = LayerView(layer, params, call, state)
            p = lv.params
            c_in = lv.c_in
            mask = None
            if lv.drop_rate > 0:
                mask = state.dropout.replay(layer, (n, k, h, w), lv.drop_rate, dtype)
            bn1 = (lv.mean1.contiguous(), lv.invstd1.contiguous(), _vec(p[0], acc), _vec(p[1], acc))
            w1 = conv_weight_taps(p[2], dtype)
            if spec.bottleneck:
                if spec.keeps_bottleneck:
                    y1 = state.bottlenecks[layer]
                else:
                    y1 = y1_scratch
                    bn_relu_conv_fwd(feat, 0, c_in, *bn1, w1, y1, 0, None, None, 0, 0, h, w)
                mean2, invstd2 = lv.bn2()
                bn2 = (mean2.contiguous(), invstd2.contiguous(), _vec(p[3], acc), _vec(p[4], acc))
                w2 = conv_weight_taps(p[5], dtype)
                grad_w2 = bn_relu_conv_wgrad(grad_feat, c_in, k, mask, y1, 0, mid, *bn2, 3, h, w)
                sums2 = conv_dgrad_bn_relu_reduce(grad_feat, c_in, mask, w2, y1, 0, mid, *bn2, h, w)
                conv_dgrad_bn_relu_apply(
                    grad_feat,
                    c_in,
                    mask,
                    w2,
                    y1,
                    0,
                    mid,
                    *bn2,
                    sums2,
                    grad_y1,
                    0,
                    lv.norm2.batch_stats,
                    False,
                    h,
                    w,
                )
                grad_w1 = bn_relu_conv_wgrad(grad_y1, 0, mid, None, feat, 0, c_in, *bn1, 1, h, w)
                sums1 = conv_dgrad_bn_relu_reduce(grad_y1, 0, None, w1, feat, 0, c_in, *bn1, h, w)
                conv_dgrad_bn_relu_apply(
                    grad_y1,
                    0,
                    None,
                    w1,
                    feat,
                    0,
                    c_in,
                    *bn1,
                    sums1,
                    grad_feat,
                    0,
                    lv.norm1.batch_stats,
                    True,
                    h,
                    w,
                )
                layer_grads = [sums1[1], sums1[0], grad_w1, sums2[1], sums2[0], grad_w2]
            else:
                grad_w1 = bn_relu_conv_wgrad(grad_feat, c_in, k, mask, feat, 0, c_in, *bn1, 3, h, w)
                sums1 = conv_dgrad_bn_relu_reduce(
                    grad_feat, c_in, mask, w1, feat, 0, c_in, *bn1, h, w
                )
                conv_dgrad_bn_relu_apply(
                    grad_feat,
                    c_in,
                    mask,
                    w1,
                    feat,
                    0,
                    c_in,
                    *bn1,
                    sums1,
                    grad_feat,
                    0,
                    lv.norm1.batch_stats,
                    True,
                    h,
                    w,
                )
                layer_grads = [sums1[1], sums1[0], grad_w1]
            first = layer * spec.params_per_layer
            for i, g in enumerate(layer_grads):
                grads[first + i] = g.to(params[first + i].dtype)
        return grads


_BACKEND = TritonBackend()


def get_backend() -> TritonBackend:
    return _BACKEND
