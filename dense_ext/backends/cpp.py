"""The ``cpp`` backend: the block's layer loop in the C++/CUDA extension ``dense_ext._C``.

One ``torch.ops.dense_ext.block_forward`` call runs the whole forward, one ``block_backward``
call the whole backward (csrc/block.cpp); no Python code runs per layer. The extension is
optional: if it is not built or fails to load, ``unavailable_reason`` says why and ``auto``
falls back to the reference backend; importing this module never fails because of it.

Dropout masks are a pure function of ``(seed, layer, element)`` (csrc/kernels/math.cuh), so
``ForwardState.dropout`` is just the seed, a one-element int64 tensor drawn on the buffer's
device from its default generator (so ``torch.manual_seed`` makes runs repeatable). They are
not ``F.dropout``'s masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dense_ext.backends.base import Backend, BlockCall, ForwardState, stats_dtype

OPS = (
    "channel_stats",
    "bn_relu",
    "bn_relu_backward",
    "bn_relu_grad_acc",
    "bn_grad_correct",
    "dropout_store",
    "block_forward",
    "block_backward",
)

try:
    from dense_ext import _C  # noqa: F401  (loading the library registers the ops)

    _LOAD_ERROR: str | None = None
except Exception as exc:  # not built, or built against another torch
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``dense_ext::op`` has a kernel registered for ``dispatch_key`` (e.g. "CUDA")."""
    return _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"dense_ext::{op}", dispatch_key
    )


def unavailable_reason(device: torch.device) -> str | None:
    if _LOAD_ERROR is not None:
        return f"the C++ extension dense_ext._C is not built or failed to load ({_LOAD_ERROR})"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not all(has_kernel(op, "CUDA") for op in OPS):
            return "dense_ext._C was built without CUDA kernels"
        return None
    return f"dense_ext._C has no kernels for device type {device.type!r}"


def draw_seed(device: torch.device | str = "cpu") -> Tensor:
    """A one-element int64 dropout seed on ``device``, drawn from that device's default
    generator (repeatable under ``torch.manual_seed``; a tensor rather than a Python int, so
    ``torch.compile`` and CUDA-graph replays draw a fresh seed every step)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _no_seed(like: Tensor) -> Tensor:
    return like.new_zeros((1,), dtype=torch.int64)


def dropout_mask(
    seed: int | Tensor,
    layer: int,
    shape: Sequence[int],
    p: float,
    dtype=torch.float32,
    device="cpu",
) -> Tensor:
    """The mask (0 or 1/(1-p)) the backend applies to layer ``layer``'s new features."""
    ones = torch.ones(shape, dtype=dtype, device=device).contiguous(
        memory_format=torch.channels_last
    )
    mask = torch.empty_like(ones)
    torch.ops.dense_ext.dropout_store(ones, p, int(seed), layer, mask)
    return mask


def unflatten_grads(bn_grads: Tensor, weight_grads: Tensor, params: Sequence[Tensor]):
    """Per-parameter views of block_backward's two flat gradient buffers (parameter order)."""
    bn = [p for p in params if p.dim() == 1]
    weights = [p for p in params if p.dim() != 1]
    bn_parts = iter(torch.split(bn_grads, [p.numel() for p in bn]))
    weight_parts = iter(torch.split(weight_grads, [p.numel() for p in weights]))
    grads = []
    for p in params:
        g = next(bn_parts if p.dim() == 1 else weight_parts).view(p.shape)
        grads.append(g if g.dtype == p.dtype else g.to(p.dtype))
    return grads


class CppBackend(Backend):
    """The block through ``torch.ops.dense_ext.block_forward`` / ``block_backward``."""

    name = "cpp"
    supports_sync = False

    def forward(self, x, params, call: BlockCall):
        spec = call.spec
        seed = draw_seed(x.device) if call.dropout else _no_seed(x)
        feat, stats1, stats2, bottlenecks = torch.ops.dense_ext.block_forward(
            x,
            list(params),
            call.running_tensors(x),
            [norm.eps for norm in call.norms],
            [norm.batch_stats for norm in call.norms],
            [float(p) for p in call.drop_rates],
            seed,
            spec.growth_rate,
            spec.bn_size,
            spec.keeps_bottleneck,
            call.save,
        )
        dropout = seed if call.dropout else None
        return feat, ForwardState(stats1, stats2, list(bottlenecks), dropout)

    def backward(self, grad_feat, feat, state: ForwardState, params, call: BlockCall):
        spec = call.spec
        seed = state.dropout if state.dropout is not None else _no_seed(feat)
        bn_grads, weight_grads = torch.ops.dense_ext.block_backward(
            grad_feat,
            feat,
            state.stats1,
            state.stats2,
            list(state.bottlenecks),
            list(params),
            call.running_tensors(feat),
            [norm.eps for norm in call.norms],
            [norm.batch_stats for norm in call.norms],
            [float(p) for p in call.drop_rates],
            seed,
            spec.growth_rate,
            spec.bn_size,
        )
        return unflatten_grads(bn_grads, weight_grads, params)


_BACKEND = CppBackend()


def get_backend() -> CppBackend:
    return _BACKEND


# Fake (meta) kernels: shapes, dtypes and strides of every op's outputs, so torch.compile and
# FakeTensor tracing go through the ops without running them. Mutating ops return nothing.
if _LOAD_ERROR is None:

    def _cl(shape, like: Tensor, dtype=None) -> Tensor:
        return torch.empty(
            shape, dtype=dtype or like.dtype, device=like.device, memory_format=torch.channels_last
        )

    @torch.library.register_fake("dense_ext::channel_stats")
    def _(x, stats, lo):
        return None

    @torch.library.register_fake("dense_ext::bn_relu")
    def _(x, mean, var, gamma, beta, eps, out):
        return None

    @torch.library.register_fake("dense_ext::bn_relu_backward")
    def _(
        grad_z,
        x,
        mean,
        var,
        gamma,
        beta,
        eps,
        batch_stats,
        accumulate,
        grad_x,
        grad_gamma,
        grad_beta,
    ):
        return None

    @torch.library.register_fake("dense_ext::bn_relu_grad_acc")
    def _(grad_z, x, mean, var, gamma, beta, eps, grad_x, sums):
        return None

    @torch.library.register_fake("dense_ext::bn_grad_correct")
    def _(x, mean, var, gamma, beta, eps, sums, count, grad_x):
        return None

    @torch.library.register_fake("dense_ext::dropout_store")
    def _(src, p, seed, key, dst):
        return None

    @torch.library.register_fake("dense_ext::block_forward")
    def _(
        x,
        params,
        running,
        eps,
        batch_stats,
        drop_rates,
        seed,
        growth_rate,
        bn_size,
        keep_bottleneck,
        save,
    ):
        n, c0, h, w = x.shape
        per_layer = 6 if bn_size > 0 else 3
        layers = len(params) // per_layer
        total, mid = c0 + layers * growth_rate, bn_size * growth_rate
        acc = stats_dtype(x.dtype)
        feat = _cl((n, total, h, w), x)
        bns = 2 if bn_size > 0 else 1
        stats1_needed = any(batch_stats[0::bns])
        stats2_needed = bn_size > 0 and any(batch_stats[1::bns])
        stats1 = x.new_empty((2, total) if stats1_needed else (0,), dtype=acc)
        stats2 = x.new_empty((layers, 2, mid) if stats2_needed else (0,), dtype=acc)
        keep = keep_bottleneck and save and bn_size > 0
        bottlenecks = [_cl((n, mid, h, w), x) for _ in range(layers)] if keep else []
        return feat, stats1, stats2, bottlenecks

    @torch.library.register_fake("dense_ext::block_backward")
    def _(
        grad_feat,
        feat,
        stats1,
        stats2,
        bottlenecks,
        params,
        running,
        eps,
        batch_stats,
        drop_rates,
        seed,
        growth_rate,
        bn_size,
    ):
        bn = sum(p.numel() for p in params if p.dim() == 1)
        weights = sum(p.numel() for p in params if p.dim() != 1)
        return feat.new_empty((bn,), dtype=stats_dtype(feat.dtype)), feat.new_empty((weights,))
