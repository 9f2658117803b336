"""``@triton.jit`` helpers shared by the convolution kernels, and the host helpers that wrap
kernels for ``torch.library``.

Conventions of every kernel in this package:

* A "rows" operand is a ``[M, C]`` matrix with row stride ``*_row_stride`` and unit channel
  stride: the ``rows`` view of a channels_last ``[N, C, H, W]`` buffer or a contiguous 2-D
  scratch tensor; row ``m`` is the pixel ``(n, h, w)`` with ``m = (n*H + h)*W + w``.
* Convolution weights are passed as ``[KS*KS, C_in, C_out]`` contiguous (tap-major).
* A 3x3 tap ``(ky, kx)`` reads the pixel ``(h + ky - 1, w + kx - 1)``; outside the image the
  *post-activation* value is 0 (zero padding of ``relu(bn(x))``, not of ``x``).
* BN-ReLU is ``max((x - mean) * (gamma * invstd) + beta, 0)`` in the accumulation dtype
  (float32, float64 for float64 buffers): the same arithmetic as the reference backend,
  which keeps the result exact to rounding on data with a large mean (``x*scale + shift``
  would cancel catastrophically there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dense_ext.backends.triton import interpret_requested

INTERPRETED = interpret_requested()
# Triton's interpreter converts float32 to bfloat16 by truncation; compiled kernels round to
# nearest even. Under the interpreter ``round_to`` rounds explicitly so both give the same bits.
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even also under the interpreter."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tap_source(rm, row_ok, hh, ww, H, W, dy, dx, KS: tl.constexpr):
    """Rows read by tap offset (dy, dx) for output rows ``rm`` and whether they lie in the image."""
    if KS == 1:
        return rm, row_ok
    else:
        src = rm + dy * W + dx
        ok = row_ok & (hh + dy >= 0) & (hh + dy < H) & (ww + dx >= 0) & (ww + dx < W)
        return src, ok


@triton.jit
def load_bn_params(MEAN_ptr, INVSTD_ptr, GAMMA_ptr, BETA_ptr, rc, c_ok):
    """Per-channel ``mean, invstd, scale = gamma*invstd, beta`` (accumulation dtype)."""
    mean = tl.load(MEAN_ptr + rc, mask=c_ok, other=0.0)
    invstd = tl.load(INVSTD_ptr + rc, mask=c_ok, other=0.0)
    gamma = tl.load(GAMMA_ptr + rc, mask=c_ok, other=0.0)
    beta = tl.load(BETA_ptr + rc, mask=c_ok, other=0.0)
    return mean, invstd, gamma * invstd, beta


@triton.jit
def dropout_mask(MASK_ptr, rows, cols, ok, HW, C_MASK):
    """Dropout multiplier of (row, channel) from a contiguous NCHW ``[N, C_MASK, H, W]`` mask."""
    rows64 = rows.to(tl.int64)
    img = rows64 // HW
    pix = rows64 % HW
    offs = img * (C_MASK * HW) + pix + cols.to(tl.int64) * HW
    return tl.load(MASK_ptr + offs, mask=ok, other=0.0)


def wrap(kernel):
    """``torch.library.wrap_triton(kernel)`` for compiled kernels; interpreted ones run as is."""
    if INTERPRETED:
        return kernel
    return torch.library.wrap_triton(kernel)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype of a buffer dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_config(dtype: torch.dtype) -> tuple[bool, str]:
    """``(DOT_FP32, INPUT_PRECISION)`` for a buffer dtype.

    float32 follows ``torch.backends.cudnn.allow_tf32`` (PyTorch's default for convolutions:
    True), so the fused block rounds its GEMM operands like the cuDNN convolutions of the naive
    model it replaces. The interpreter cannot multiply bfloat16 blocks correctly, so there the
    operands (already rounded to bfloat16) are multiplied in float32: the same products.
    """
    if dtype == torch.float32:
        return False, ("tf32" if torch.backends.cudnn.allow_tf32 and not INTERPRETED else "ieee")
    return (INTERPRETED and dtype == torch.bfloat16), "ieee"


def rows_stride(t: torch.Tensor, what: str) -> int:
    """Row stride of a rows operand (channels_last 4-D buffer or contiguous 2-D matrix)."""
    if t.dim() == 4:
        if not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(
                f"dense_ext triton: {what} must be channels_last, got strides {t.stride()}"
            )
        return t.shape[1]
    if t.dim() == 2:
        if not t.is_contiguous():
            raise ValueError(f"dense_ext triton: {what} must be a contiguous [M, C] matrix")
        return t.shape[1]
    raise ValueError(
        f"dense_ext triton: {what} must be [N, C, H, W] or [M, C], got {tuple(t.shape)}"
    )


def num_rows(t: torch.Tensor) -> int:
    return t.shape[0] * t.shape[2] * t.shape[3] if t.dim() == 4 else t.shape[0]
