"""The ``cpp`` stage backend: the stage's layer loop in the C++/CUDA extension ``dense_ext._C``.

One ``torch.ops.dense_ext.deluge_stage_forward`` call runs a whole stage forward, one
``deluge_stage_backward`` call its backward (csrc/deluge.cpp); the CLDC of transitions and the
head runs through the ``cldc_forward`` / ``cldc_grad_sums`` / ``cldc_grad_apply`` ops. The
extension is optional: if it is not built or lacks these ops, ``unavailable_reason`` says why
and ``auto`` falls back to the reference backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dense_ext.backends import cpp as block_cpp
from dense_ext.deluge.backends.base import (
    StageBackend,
    StageCall,
    StageState,
    add_running_stats_cldc_grad,
    stats_dtype,
)

OPS = (
    "channel_stats",
    "bn_relu",
    "bn_relu_backward",
    "cldc_forward",
    "cldc_grad_sums",
    "cldc_grad_apply",
    "cldc_grad_step",
    "cldc_grad_correct",
    "deluge_stage_forward",
    "deluge_stage_backward",
)


def unavailable_reason(device: torch.device) -> str | None:
    reason = block_cpp.unavailable_reason(device)
    if reason is not None:
        return reason
    key = "CUDA" if device.type == "cuda" else "CPU"
    missing = [op for op in OPS if not block_cpp.has_kernel(op, key)]
    if missing:
        return f"dense_ext._C has no {key} kernels for {', '.join(missing)}"
    return None


def norm_arguments(call: StageCall) -> tuple[list[Tensor], list[float], list[bool]]:
    """``(running, eps, batch_stats)`` of the stage drivers: 4 entries per layer (cldc, norm,
    norm1, norm2; the cldc entry of layer 1 unused) and the running (mean, var) of each
    normalisation without batch statistics, in that order."""
    running: list[Tensor] = []
    eps: list[float] = []
    flags: list[bool] = []
    for ln in call.layers:
        for norm in (ln.cldc, ln.norm, ln.norm1, ln.norm2):
            if norm is None:  # layer 1 has no CLDC
                eps.append(0.0)
                flags.append(False)
                continue
            eps.append(norm.eps)
            flags.append(norm.batch_stats)
            if not norm.batch_stats:
                running += list(norm.running())
    return running, eps, flags


def unflatten_grads(affine: Tensor, weights: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Per-parameter views of the stage backward's two flat gradient buffers."""
    affine_parts = iter(torch.split(affine, [p.numel() for p in params if p.dim() != 4]))
    weight_parts = iter(torch.split(weights, [p.numel() for p in params if p.dim() == 4]))
    grads = []
    for p in params:
        g = next(weight_parts if p.dim() == 4 else affine_parts).view(p.shape)
        grads.append(g if g.dtype == p.dtype else g.to(p.dtype))
    return grads


class CppStageBackend(StageBackend):
    """The stage through ``deluge_stage_forward`` / ``deluge_stage_backward``."""

    name = "cpp"

    def stage_forward(self, x0, params, call):
        running, eps, flags = norm_arguments(call)
        buf, slot_stats, layer_stats, kept = torch.ops.dense_ext.deluge_stage_forward(
            x0,
            list(params),
            running,
            eps,
            flags,
            call.spec.num_slots,
            call.spec.keeps_bottleneck,
            call.save,
        )
        return buf, StageState(slot_stats, layer_stats, list(kept))

    def stage_backward(self, grad_buf, buf, state, params, call):
        running, eps, flags = norm_arguments(call)
        affine, weights = torch.ops.dense_ext.deluge_stage_backward(
            grad_buf,
            buf,
            state.slot_stats,
            state.layer_stats,
            list(state.kept),
            list(params),
            running,
            eps,
            flags,
        )
        return unflatten_grads(affine, weights, params)

    def slot_stats(self, buf, channels):
        stats = buf.new_empty((2, buf.shape[1]), dtype=stats_dtype(buf.dtype))
        torch.ops.dense_ext.channel_stats(buf, stats, 0)
        return stats

    def cldc_forward(self, buf, mean, invstd, weight, bias):
        c, k = weight.shape
        acc = mean.dtype
        scale = (weight.to(acc).t() * invstd).contiguous()
        shift = bias.to(acc).sum(dim=1).contiguous()
        n, _, h, w = buf.shape
        out = torch.empty((n, c, h, w), dtype=buf.dtype, device=buf.device)
        out = out.contiguous(memory_format=torch.channels_last)
        # The first k slots (the contract: the buffer may hold more, as a stage's does).
        torch.ops.dense_ext.cldc_forward(buf[:, : k * c], mean, scale, shift, out)
        return out

    def cldc_backward(self, grad_y, buf, mean, invstd, weight, batch_stats, grad_buf):
        c, k = weight.shape
        acc = mean.dtype
        sums = mean.new_empty((k + 1, c))
        buf = buf[:, : k * c]  # the first k slots, as in cldc_forward
        torch.ops.dense_ext.cldc_grad_sums(grad_y, buf, mean, sums)
        sum_x, sum_g = sums[:k], sums[k]
        alpha = (weight.to(acc).t() * invstd).contiguous()
        if batch_stats:
            count = grad_y.numel() // c
            beta = (alpha * (sum_g / count)).contiguous()
            gamma = (alpha * invstd * invstd * sum_x / count).contiguous()
            torch.ops.dense_ext.cldc_grad_apply(
                grad_y, buf, mean, alpha, beta, gamma, grad_buf[:, : k * c]
            )
        else:
            add_running_stats_cldc_grad(grad_y, alpha, grad_buf)
        grad_w = (invstd * sum_x).t().contiguous()
        grad_b = sum_g[:, None].expand(c, k).contiguous()
        return grad_w, grad_b


_BACKEND = CppStageBackend()


def get_backend() -> CppStageBackend:
    return _BACKEND


# Fake (meta) kernels, so torch.compile and FakeTensor tracing go through the ops.
if block_cpp._LOAD_ERROR is None and hasattr(torch.ops.dense_ext, "cldc_forward"):

    @torch.library.register_fake("dense_ext::cldc_forward")
    def _(x, mean, scale, shift, out):
        return None

    @torch.library.register_fake("dense_ext::cldc_grad_sums")
    def _(grad_y, x, mean, sums):
        return None

    @torch.library.register_fake("dense_ext::cldc_grad_apply")
    def _(grad_y, x, mean, alpha, beta, gamma, grad_x):
        return None

    @torch.library.register_fake("dense_ext::cldc_grad_step")
    def _(grad_y, x, mean, alpha, grad_x, sums, next_mean, next_scale, next_shift, next_out):
        return None

    @torch.library.register_fake("dense_ext::cldc_grad_correct")
    def _(x, mean, beta, gamma, grad_x):
        return None

    @torch.library.register_fake("dense_ext::deluge_stage_forward")
    def _(x0, params, running, eps, batch_stats, num_slots, keep_bottleneck, save):
        n, c, h, w = x0.shape
        acc = stats_dtype(x0.dtype)
        cl = torch.channels_last
        buf = x0.new_empty((n, num_slots * c, h, w)).contiguous(memory_format=cl)
        slot_stats = x0.new_empty((2, num_slots * c), dtype=acc)
        layer_stats = x0.new_empty((num_slots - 1, 2, 2 * c), dtype=acc)
        keep = keep_bottleneck and save
        kept = [
            x0.new_empty((n, c // 2, h, w)).contiguous(memory_format=cl)
            for _ in range(num_slots - 1)
        ]
        return buf, slot_stats, layer_stats, kept if keep else []

    @torch.library.register_fake("dense_ext::deluge_stage_backward")
    def _(grad_buf, buf, slot_stats, layer_stats, kept, params, running, eps, batch_stats):
        affine = sum(p.numel() for p in params if p.dim() != 4)
        weights = sum(p.numel() for p in params if p.dim() == 4)
        return (
            buf.new_empty((affine,), dtype=stats_dtype(buf.dtype)),
            buf.new_empty((weights,)),
        )
