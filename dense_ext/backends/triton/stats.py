"""Per-channel batch statistics (mean, biased variance) over the rows of a channel range.

Numerically stable in two steps, both deterministic (no atomics):
1. every program reduces one tile of rows to a per-channel ``(mean, M2)`` pair (the mean as a
   compensated ``hi + lo`` pair), written to a small ``[tiles, 3, C]`` partial buffer (the
   convolution epilogues write the same partials);
2. ``_merge_stats_kernel`` merges the tiles in order (in float64) with Chan's parallel formula
   ``M2 = M2_a + M2_b + delta^2 * n_a*n_b/n`` and writes ``mean`` and ``M2 / M``.
Deviations are taken from the tile mean, so a large common offset (e.g. values ~1000 with
spread 0.1 in float32) costs no precision, unlike ``E[x^2] - E[x]^2``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dense_ext.backends.triton._common import acc_dtype, num_rows, rows_stride, wrap
from dense_ext.backends.triton.configs import stats_config


@triton.jit
def tile_stats_epilogue(PART_ptr, values, row_ok, rc, c_ok, pid_m, M, C, BLOCK_M: tl.constexpr):
    """Write the tile's per-channel ``(mean_hi, mean_lo, M2)`` of ``values`` [BLOCK_M, BLOCK_C].

    The tile mean is kept as an unevaluated sum ``mean_hi + mean_lo``: ``mean_hi`` is the plain
    average, ``mean_lo = sum(v - mean_hi) / n`` its correction, computed from small deviations
    and so accurate to the working precision *of the spread*, not of the offset. Without it a
    float32 tile mean of values ~1000 is off by ~1e-4 absolute, which for a spread of 0.1 is a
    percent-level error in the between-tile term of the merge.
    """
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(values.dtype)
    v = tl.where(row_ok[:, None], values, 0.0)
    hi = tl.sum(v, axis=0) / count
    d = tl.where(row_ok[:, None], v - hi[None, :], 0.0)
    s = tl.sum(d, axis=0)
    lo = s / count
    m2 = tl.sum(d * d, axis=0) - s * lo
    base = PART_ptr + pid_m * 3 * C
    tl.store(base + rc, hi, mask=c_ok)
    tl.store(base + C + rc, lo, mask=c_ok)
    tl.store(base + 2 * C + rc, m2, mask=c_ok)


@triton.jit
def _tile_stats_kernel(
    X_ptr,  # rows [M, >= col + C], row stride X_row_stride
    PART_ptr,  # [tiles, 3, C] accumulation dtype
    X_row_stride,
    x_col,
    M,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rm < M
    c_ok = rc < C
    ptrs = X_ptr + rm.to(tl.int64)[:, None] * X_row_stride + (x_col + rc)[None, :]
    x = tl.load(ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    x = x.to(PART_ptr.dtype.element_ty)
    tile_stats_epilogue(PART_ptr, x, row_ok, rc, c_ok, pid_m, M, C, BLOCK_M)


@triton.jit
def _merge_stats_kernel(
    PART_ptr,  # [tiles, 3, C]: mean_hi, mean_lo, M2 per tile
    OUT_ptr,  # statistics tensor; mean at OUT_ptr + mean_off + c, variance at + var_off + c
    mean_off,
    var_off,
    num_tiles,
    tile_rows,
    M,
    C,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rc = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    # The merge is O(tiles * C): done in float64 so it adds no error of its own.
    n_a = tl.zeros((BLOCK_C,), dtype=tl.float64)
    mean_a = tl.zeros((BLOCK_C,), dtype=tl.float64)
    m2_a = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for t in range(0, num_tiles):
        n_b = tl.minimum(M - t * tile_rows, tile_rows).to(tl.float64)
        base = PART_ptr + t * 3 * C + rc
        mean_b = tl.load(base, mask=c_ok, other=0.0).to(tl.float64) + tl.load(
            base + C, mask=c_ok, other=0.0
        ).to(tl.float64)
        m2_b = tl.load(base + 2 * C, mask=c_ok, other=0.0).to(tl.float64)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    tl.store(OUT_ptr + mean_off + rc, mean_a.to(OUT_ptr.dtype.element_ty), mask=c_ok)
    tl.store(OUT_ptr + var_off + rc, (m2_a / M).to(OUT_ptr.dtype.element_ty), mask=c_ok)


def merge_partials(
    part: torch.Tensor, m: int, tile_rows: int, out: torch.Tensor, mean_off: int, var_off: int
) -> None:
    """Chan-merge ``part`` [tiles, 3, C] into ``out`` at element offsets mean_off, var_off."""
    tiles, _, c = part.shape
    block_c = 16 if c <= 16 else 32
    wrap(_merge_stats_kernel)[(triton.cdiv(c, block_c),)](
        part,
        out,
        mean_off,
        var_off,
        tiles,
        tile_rows,
        m,
        c,
        BLOCK_C=block_c,
    )


@torch.library.triton_op("dense_ext_triton::channel_stats", mutates_args={"out"})
def channel_stats(
    x: torch.Tensor, x_col: int, channels: int, out: torch.Tensor, mean_off: int, var_off: int
) -> None:
    """Mean and biased variance of channels ``[x_col, x_col + channels)`` of the rows of ``x``.

    ``out`` receives the means at flat offsets ``mean_off + c`` and the variances at
    ``var_off + c`` (e.g. the two rows of a contiguous ``[2, C_total]`` statistics tensor).
    """
    if not out.is_contiguous():
        raise ValueError("dense_ext triton: statistics output must be contiguous")
    m = num_rows(x)
    cfg = stats_config(m, channels, x.device)
    tiles = triton.cdiv(m, cfg.block_m)
    part = torch.empty((tiles, 3, channels), dtype=acc_dtype(x.dtype), device=x.device)
    grid = (tiles, triton.cdiv(channels, cfg.block_n))
    wrap(_tile_stats_kernel)[grid](
        x,
        part,
        rows_stride(x, "x"),
        x_col,
        m,
        channels,
        BLOCK_M=cfg.block_m,
        BLOCK_C=cfg.block_n,
        num_warps=cfg.num_warps,
    )
    merge_partials(part, m, cfg.block_m, out, mean_off, var_off)
