"""``TritonBackend``: the block's layer loop over the fused Triton ops (docs/triton_kernels.md).

Per layer, forward (bottleneck layer):
  1. ``bn_relu_conv_fwd`` KS=1: ``Y1 = relu(bn1(prefix)) @ W1^T`` + statistics of ``Y1``;
  2. ``bn_relu_conv_fwd`` KS=3 over ``relu(bn2(Y1))`` straight into ``feat[:, C_in:C_in+k]``
     (dropout mask applied in the epilogue) + statistics of the new channels.
A plain layer is step 2 over ``relu(bn1(prefix))``. Backward, in reverse layer order: the
dropout mask applied in place to ``grad_feat[:, C_in:C_in+k]``; ``Y1`` (kept, or recomputed by
step 1 with ``memory="min"``); ``dW2`` by ``bn_relu_conv_wgrad``; ``dY1`` by
``conv_dgrad_bn_relu_reduce/apply`` (BN2-ReLU backward fused); ``dW1``; ``grad_feat[:, :C_in]
+= dX`` by the same dgrad pair with KS=1. The only per-layer temporaries are ``Y1``-sized
scratch (``[M, 4k]``), allocated once per call.

In eager mode the launchers are called directly (no custom-op dispatch, no ``wrap_triton``:
host time per launch matters at these kernel sizes); while ``torch.compile`` traces, the same
launchers are called through their ``torch.library.triton_op`` registrations so the kernels
become graph nodes.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from dense_ext.backends.base import (
    LOCAL,
    Backend,
    BlockCall,
    LayerView,
    new_feature_buffer,
    new_stats,
    stats_dtype,
)
from dense_ext.backends.triton import conv_dgrad, conv_fwd, conv_wgrad, dropout, eager, stats
from dense_ext.backends.triton._common import INTERPRETED, _tracing, device_guard, dot_config

__all__ = ["INTERPRETED", "TritonBackend", "get_backend"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MAX_PLANS = 64  # block shapes whose launches are kept (eager.BlockPlan)

# The same launchers, called directly (eager) or through their torch.library ops (tracing).
_EAGER = SimpleNamespace(
    stats=stats.channel_stats_,
    fwd=conv_fwd.bn_relu_conv_fwd_,
    wgrad=conv_wgrad.bn_relu_conv_wgrad_,
    reduce=conv_dgrad.conv_dgrad_bn_relu_reduce_,
    apply=conv_dgrad.conv_dgrad_bn_relu_apply_,
    dropout=dropout.dropout_backward_,
)
_TRACED = SimpleNamespace(
    stats=stats.channel_stats,
    fwd=conv_fwd.bn_relu_conv_fwd,
    wgrad=conv_wgrad.bn_relu_conv_wgrad,
    reduce=conv_dgrad.conv_dgrad_bn_relu_reduce,
    apply=conv_dgrad.conv_dgrad_bn_relu_apply,
    dropout=dropout.dropout_backward,
)


def _ops() -> SimpleNamespace:
    return _TRACED if torch.compiler.is_compiling() else _EAGER


def _vec(t: Tensor, dtype: torch.dtype) -> Tensor:
    t = t.detach()
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


class _WeightForms:
    """One block call's weights in the form the kernels read them: computed by its forward,
    kept in its ``ForwardState.weights`` and reused by its backward. (Not rounded to TF32: the
    kernels round weights as they load them.)

    A 1x1 weight is read as it is (``conv_fwd.weight_operand``): nothing is computed when it is
    already contiguous in the buffer dtype (float32 training), else its cast is kept like a
    3x3 weight's taps. Kept per call, not per parameter: a cache that outlived the call would
    have to reference the parameters, weakly so as not to keep them alive, and
    ``torch.utils.swap_tensors`` (``module.to`` under PyTorch's future flag
    ``set_swap_module_params_on_conversion``) refuses a weakly referenced tensor. Each forward
    so computes afresh, which a weight changed through ``.data`` (no version bump) needs anyway.
    Entries are keyed by identity and hold their weight, so an identity is never reused while
    its entry lives (the call's backward holds the weights anyway); a backward given other
    tensors (``saved_tensors_hooks``) or a weight changed in place computes again.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype  # the call's buffer dtype
        self._entries: dict[int, tuple] = {}

    def taps(self, weight: Tensor, site=None, go=None) -> Tensor:
        """``weight`` as the kernels read it; a 3x3 weight's laid out ``[KS, KS, C_in, C_out]``
        (the same memory as ``[KS*KS, C_in, C_out]``; the eager loop passes only the pointer).
        ``site``, ``go``: the eager loop's launch of ``conv_fwd.weight_taps_site`` for this
        weight, and its launcher; used for a contiguous weight in the buffer dtype."""
        dtype = self.dtype
        contiguous = weight.dtype == dtype and weight.is_contiguous()
        # Read in place, or passed to a launch (detached for the interpreter, which takes numpy
        # arrays).
        as_is = weight.detach() if INTERPRETED else weight
        if contiguous and conv_fwd.is_1x1(weight):
            return as_is
        key = weight._version
        entry = self._entries.get(id(weight))
        if entry is not None and entry[0] is weight and entry[1] == key:
            return entry[2]
        if site is not None and contiguous:
            c_out, c_in, kh, kw = weight.shape
            taps = torch.empty((kh, kw, c_in, c_out), dtype=dtype, device=weight.device)
            go(site, as_is, taps)
        else:
            taps = conv_fwd.weight_operand(weight, dtype, flat=False)
        self._entries[id(weight)] = (weight, key, taps)
        return taps


class _Layer:
    """One layer's operands in the form the kernels take."""

    def __init__(self, lv: LayerView, acc: torch.dtype, taps) -> None:
        p = lv.params
        self.lv, self.acc, self.c_in = lv, acc, lv.c_in
        self.bn1 = (
            lv.mean1.contiguous(),
            lv.invstd1.contiguous(),
            _vec(p[0], acc),
            _vec(p[1], acc),
        )
        self.w1 = taps(p[2])
        self.w2 = taps(p[5]) if len(p) > 3 else None
        self._bn2 = None

    def bn2(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """BN2's operands; in forward only valid once conv1 has written the batch statistics.
        (Computed on first use and kept: not a cached_property, whose lock dynamo refuses.)"""
        if self._bn2 is None:
            mean2, invstd2 = self.lv.bn2()
            p, acc = self.lv.params, self.acc
            self._bn2 = (mean2.contiguous(), invstd2.contiguous(), _vec(p[3], acc), _vec(p[4], acc))
        return self._bn2


class TritonBackend(Backend):
    """Fused Triton kernels; CUDA (sm_80+) compiled, or CPU under ``TRITON_INTERPRET=1``."""

    name = "triton"
    supports_sync = False

    def __init__(self) -> None:
        self._plans: dict[tuple, eager.BlockPlan] = {}

    @staticmethod
    def _check(x: Tensor) -> None:
        if x.dtype not in _DTYPES:
            raise TypeError(f"dense_ext triton backend supports {_DTYPES}, got {x.dtype}")
        if x.device.type == "cpu" and not INTERPRETED:
            raise RuntimeError("dense_ext triton backend: CPU tensors need TRITON_INTERPRET=1")

    def _layer(self, layer, params, call, state, dtype) -> _Layer:
        lv = LayerView(layer, params, call, state)
        return _Layer(lv, stats_dtype(dtype), lambda w: conv_fwd.weight_operand(w, dtype))

    def forward(self, x, params, call: BlockCall):
        if call.sync is not LOCAL:
            raise ValueError("dense_ext triton backend does not support synchronised batch norm")
        self._check(x)
        with device_guard(x.device):
            return self._forward(x, params, call)

    def _plan(self, call: BlockCall, shape, dtype, device, dot, seeds: bool) -> eager.BlockPlan:
        key = eager.plan_key(call, shape, dtype, device, dot, seeds)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = eager.build_plan(call, shape, dtype, device, dot, seeds)
        return plan

    def _forward(self, x, params, call: BlockCall):
        if _tracing():
            return self._forward_traced(x, params, call)
        feat = new_feature_buffer(x, call.spec)
        state = new_stats(x, call)
        drop = dropout.new_dropout(call.drop_rates, x.device)
        seeds = state.dropout = None if drop is None else drop.seeds
        dot = dot_config(x.dtype, x.device)
        plan = self._plan(call, feat.shape, x.dtype, x.device, dot, seeds is not None)
        state.weights = _WeightForms(x.dtype)
        eager.run_forward(plan, feat, state, params, call, state.weights.taps, seeds)
        return feat, state

    def _forward_traced(self, x, params, call: BlockCall):
        """The layer loop through the ``triton_op``s (what ``torch.compile`` traces)."""
        ops = _ops()
        spec, save, rates = call.spec, call.save, call.drop_rates
        feat = new_feature_buffer(x, spec)
        dev = x.device
        n, c0, h, w = x.shape
        m = n * h * w
        state = new_stats(x, call)
        if call.stats1_needed:
            ops.stats(
                feat, state.stats1, x_col=0, channels=c0, mean_off=0, var_off=spec.num_features
            )
        drop = dropout.new_dropout(rates, dev)
        state.dropout = None if drop is None else drop.seeds
        keep = save and spec.saves_bottleneck_outputs
        scratch = None
        if spec.has_bottleneck and not keep:
            scratch = torch.empty((m, spec.mid_channels), dtype=x.dtype, device=dev)
        mid, c_total = spec.mid_channels, spec.num_features
        geometry = {"height": h, "width": w}
        for index in range(spec.num_layers):
            layer = self._layer(index, params, call, state, x.dtype)
            c_in = layer.c_in
            new = {  # the 3x3 convolution's output: the layer's channels of the buffer
                "y_col": c_in,
                "mean_off": c_in,
                "var_off": c_total + c_in,
                "layer": index,
                "drop_p": rates[index],
            }
            seeds = state.dropout if rates[index] > 0 else None
            stats1 = state.stats1 if call.stats1_needed else None
            if not spec.has_bottleneck:
                ops.fwd(
                    feat, *layer.bn1, layer.w1, feat, stats1, seeds, x_col=0, c_in=c_in,
                    **new, **geometry,
                )  # fmt: skip
                continue
            y1 = torch.empty((m, mid), dtype=x.dtype, device=dev) if keep else scratch
            stats2 = state.stats2 if layer.lv.norm2.batch_stats else None
            ops.fwd(
                feat, *layer.bn1, layer.w1, y1, stats2, None, x_col=0, c_in=c_in, y_col=0,
                mean_off=index * 2 * mid, var_off=index * 2 * mid + mid, **geometry,
            )  # fmt: skip
            if keep:
                state.bottlenecks.append(y1)
            ops.fwd(
                y1, *layer.bn2(), layer.w2, feat, stats1, seeds, x_col=0, c_in=mid,
                **new, **geometry,
            )  # fmt: skip
        return feat, state

    def backward(self, grad_feat, feat, state, params, call: BlockCall):
        if call.sync is not LOCAL:
            raise ValueError("dense_ext triton backend does not support synchronised batch norm")
        self._check(feat)
        if not grad_feat.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("dense_ext triton backend: grad_feat must be channels_last")
        with device_guard(feat.device):
            return self._backward(grad_feat, feat, state, params, call)

    def _backward(self, grad_feat, feat, state, params, call: BlockCall):
        if _tracing():
            return self._backward_traced(grad_feat, feat, state, params, call)
        dot = dot_config(feat.dtype, feat.device)
        seeds = state.dropout is not None
        plan = self._plan(call, feat.shape, feat.dtype, feat.device, dot, seeds)
        weights = state.weights if state.weights is not None else _WeightForms(feat.dtype)
        return eager.run_backward(plan, grad_feat, feat, state, params, call, weights.taps)

    def _backward_traced(self, grad_feat, feat, state, params, call: BlockCall):
        """The backward layer loop through the ``triton_op``s (what ``torch.compile`` traces)."""
        ops = _ops()
        spec, rates = call.spec, call.drop_rates
        grads: list[Tensor | None] = [None] * len(params)
        dtype, dev = feat.dtype, feat.device
        n, _, h, w = feat.shape
        m = n * h * w
        k, mid = spec.growth_rate, spec.mid_channels
        geometry = {"height": h, "width": w}
        grad_y1 = y1_scratch = None
        if spec.has_bottleneck:
            grad_y1 = torch.empty((m, mid), dtype=dtype, device=dev)
            if not spec.saves_bottleneck_outputs:
                y1_scratch = torch.empty((m, mid), dtype=dtype, device=dev)
        for index in reversed(range(spec.num_layers)):
            layer = self._layer(index, params, call, state, dtype)
            c_in = layer.c_in
            if state.dropout is not None and rates[index] > 0:
                ops.dropout(
                    grad_feat, state.dropout, col=c_in, channels=k, layer=index, p=rates[index]
                )
            # The input gradient of conv1's BN-ReLU goes into the prefix of the buffer.
            into_prefix = {
                "dx_col": 0,
                "batch_stats": layer.lv.norm1.batch_stats,
                "accumulate": True,
            }
            if spec.has_bottleneck:
                if spec.saves_bottleneck_outputs:
                    y1 = state.bottlenecks[index]
                else:
                    y1 = y1_scratch
                    ops.fwd(
                        feat, *layer.bn1, layer.w1, y1, None, None, x_col=0, c_in=c_in, y_col=0,
                        **geometry,
                    )  # fmt: skip
                from_new = {"dy_col": c_in, "x_col": 0, "c_in": mid, **geometry}
                grad_w2 = ops.wgrad(grad_feat, y1, *layer.bn2(), c_out=k, kernel_size=3, **from_new)
                sums2 = ops.reduce(grad_feat, layer.w2, y1, *layer.bn2(), **from_new)
                ops.apply(
                    grad_feat, layer.w2, y1, *layer.bn2(), sums2, grad_y1, dx_col=0,
                    batch_stats=layer.lv.norm2.batch_stats, accumulate=False, **from_new,
                )  # fmt: skip
                from_y1 = {"dy_col": 0, "x_col": 0, "c_in": c_in, **geometry}
                grad_w1 = ops.wgrad(grad_y1, feat, *layer.bn1, c_out=mid, kernel_size=1, **from_y1)
                sums1 = ops.reduce(grad_y1, layer.w1, feat, *layer.bn1, **from_y1)
                ops.apply(
                    grad_y1, layer.w1, feat, *layer.bn1, sums1, grad_feat, **into_prefix, **from_y1
                )
                layer_grads = [sums1[1], sums1[0], grad_w1, sums2[1], sums2[0], grad_w2]
            else:
                from_new = {"dy_col": c_in, "x_col": 0, "c_in": c_in, **geometry}
                grad_w1 = ops.wgrad(grad_feat, feat, *layer.bn1, c_out=k, kernel_size=3, **from_new)
                sums1 = ops.reduce(grad_feat, layer.w1, feat, *layer.bn1, **from_new)
                ops.apply(
                    grad_feat, layer.w1, feat, *layer.bn1, sums1, grad_feat, **into_prefix,
                    **from_new,
                )  # fmt: skip
                layer_grads = [sums1[1], sums1[0], grad_w1]
            first = index * spec.params_per_layer
            for i, g in enumerate(layer_grads):
                grads[first + i] = g.to(params[first + i].dtype)
        return grads


_BACKEND = TritonBackend()


def get_backend() -> TritonBackend:
    return _BACKEND
