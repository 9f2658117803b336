"""Dropout masks of the Triton backend: a pure function of (seed, layer, element), never stored.

The contract (the same on CPU and CUDA): each forward draws one int64 seed per layer with
``torch.randint`` from the device's default generator, so ``torch.manual_seed`` makes runs
repeatable and every CUDA-graph replay draws fresh seeds (``randint`` is graph-safe; the seeds
stay in a device tensor, never in a Python int). Element ``(row m, new channel c)`` of layer
``l`` is kept when ``philox(seeds[l], m * k + c) >= p`` (``tl.rand``) and then scaled by
``1 / (1 - p)``. The forward applies the mask in the convolution epilogue; the backward
multiplies the layer's slice of the gradient buffer by the same mask in place before the
convolution gradients read it. These are *not* ``F.dropout``'s masks (that is a different
stream): same distribution, independent bits. ``dropout_mask`` materialises a mask, for tests
that inject it into a naive model.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dense_ext.backends.triton._common import (
    LaunchSite,
    cdiv,
    kernel,
    next_pow2,
    num_rows,
    on_tensor_device,
    round_to,
    rows_stride,
)

_SEED_HIGH = 2**31 - 1
_MAX_ELEMENTS = 2**31  # philox offsets are int32


@triton.jit
def dropout_keep(SEED_ptr, layer, rows, cols, C, p):
    """Whether element (row, channel) of ``layer``'s ``C`` new channels survives dropout."""
    seed = tl.load(SEED_ptr + layer)
    return tl.rand(seed, rows * C + cols) >= p


@triton.jit
def dropout_scale(scale_hi, scale_mid, scale_lo, acc_t: tl.constexpr):
    """``1 / (1 - p)`` in the accumulation dtype. Triton passes Python floats as float32, so
    the host splits the float64 scale into three float32 parts whose sum is exact."""
    return (tl.cast(scale_hi, acc_t) + tl.cast(scale_mid, acc_t)) + tl.cast(scale_lo, acc_t)


@kernel
def _dropout_backward_kernel(
    G_ptr,  # rows [M, >= g_col + C], row stride G_row_stride: multiplied in place
    SEED_ptr,  # [L] int64
    G_row_stride,
    g_col,
    M,
    C,
    layer,
    p,
    scale_hi,
    scale_mid,
    scale_lo,
    ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    acc_t: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.arange(0, BLOCK_C)
    ok = (rm < M)[:, None] & (rc < C)[None, :]
    ptrs = G_ptr + rm.to(tl.int64)[:, None] * G_row_stride + (g_col + rc)[None, :]
    g = tl.load(ptrs, mask=ok, other=0.0).to(acc_t)
    keep = dropout_keep(SEED_ptr, layer, rm[:, None], rc[None, :], C, p)
    g = tl.where(keep, g * dropout_scale(scale_hi, scale_mid, scale_lo, acc_t), 0.0)
    tl.store(ptrs, round_to(g, G_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class Dropout:
    """One forward's dropout: the device tensor of per-layer seeds and the per-layer rates."""

    seeds: torch.Tensor
    rates: tuple[float, ...]


def kernel_args(layer: int, p: float) -> dict:
    """The kernels' dropout arguments for ``layer`` at rate ``p``: the scale ``1/(1-p)`` split
    into float32 ``hi + mid + lo`` (see ``dropout_scale``)."""
    scale = 1.0 / (1.0 - p)
    hi = _float32(scale)
    mid = _float32(scale - hi)
    return {"layer": layer, "p": p, "scale_hi": hi, "scale_mid": mid, "scale_lo": scale - hi - mid}


def _float32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def draw_seeds(num_layers: int, device: torch.device | str) -> torch.Tensor:
    """One dropout seed per layer from ``device``'s default generator (graph-safe)."""
    return torch.randint(0, _SEED_HIGH, (num_layers,), dtype=torch.int64, device=device)


def new_dropout(rates: Sequence[float], device: torch.device) -> Dropout | None:
    """The forward's dropout state (seeds drawn now), or None when no layer drops anything."""
    if not any(p > 0.0 for p in rates):
        return None
    for p in rates:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dense_ext triton: dropout rate must be in [0, 1), got {p}")
    return Dropout(draw_seeds(len(rates), device), tuple(float(p) for p in rates))


def check_size(rows: int, channels: int) -> None:
    """Refuse layers whose mask would need philox offsets beyond int32."""
    if rows * channels >= _MAX_ELEMENTS:
        raise ValueError(
            f"dense_ext triton: dropout over {rows} x {channels} values per layer exceeds the "
            f"{_MAX_ELEMENTS} a mask stream can index"
        )


@functools.lru_cache(maxsize=4096)
def dropout_site(m: int, g_stride: int, col: int, channels: int, layer: int, p: float, fp64: bool):
    """The in-place backward mask launch from integers; tensors: the gradient, the seeds."""
    check_size(m, channels)
    block_c = next_pow2(max(channels, 1))
    block_m = max(16, min(256, 4096 // block_c))
    return LaunchSite(
        _dropout_backward_kernel,
        (cdiv(m, block_m),),
        (g_stride, col, m, channels, *kernel_args(layer, p).values()),
        {"ACC_FP64": fp64, "BLOCK_M": block_m, "BLOCK_C": block_c},
    )


@on_tensor_device
def dropout_backward_(
    grad: torch.Tensor, seeds: torch.Tensor, *, col: int, channels: int, layer: int, p: float
) -> None:
    """The launcher behind ``dropout_backward`` (called directly in eager mode)."""
    fp64 = grad.dtype == torch.float64
    site = dropout_site(num_rows(grad), rows_stride(grad, "grad"), col, channels, layer, p, fp64)
    site(grad, seeds)


@torch.library.triton_op("dense_ext_triton::dropout_backward", mutates_args={"grad"})
def dropout_backward(
    grad: torch.Tensor, seeds: torch.Tensor, *, col: int, channels: int, layer: int, p: float
) -> None:
    """``grad[:, col:col+channels] *= mask`` in place: layer ``layer``'s dropout mask at rate
    ``p`` (``grad`` a rows operand: channels_last buffer or ``[M, C]``)."""
    dropout_backward_(grad, seeds, col=col, channels=channels, layer=layer, p=p)


def dropout_mask(
    seeds: torch.Tensor, layer: int, p: float, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """The contiguous ``[N, k, H, W]`` multiplier (0 or ``1/(1-p)``) that layer ``layer``
    applied, for ``seeds`` as the forward drew them (``draw_seeds``)."""
    n, k, h, w = shape
    ones = torch.ones((n, k, h, w), dtype=dtype, device=seeds.device)
    ones = ones.contiguous(memory_format=torch.channels_last)
    dropout_backward_(ones, seeds, col=0, channels=k, layer=layer, p=p)
    return ones.contiguous()
