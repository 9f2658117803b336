"""Per-channel batch statistics (mean, biased variance) over the rows of a channel range.

Numerically stable in two steps, both deterministic (no atomics):
1. every program reduces one tile of rows to a per-channel ``(mean, M2)`` pair (the mean as a
   compensated ``hi + lo`` pair), written to a small ``[tiles, 3, C]`` partial buffer (the
   convolution epilogues write the same partials);
2. ``_merge_stats_kernel`` merges the tiles (in float64) in two vectorised passes over
   ``[tiles, channels]`` blocks: the mean, then ``M2 = sum(M2_t + n_t * (mean_t - mean)^2)``
   (Chan's parallel formula in closed form), and writes ``mean`` and ``M2 / M``.
   Its grid is one program per 32 channels, so past a few blocks of tiles it is a serial loop
   of dependent loads on 1-4 SMs (DenseNet-121's first block at batch 64: 1568 tiles, 25 blocks
   per pass). There the merge takes two launches (``TwoLevelMerge``): ``_merge_groups_kernel``
   merges each group of ``GROUP_TILES`` tiles in its own program, one block each, into one
   more partial row, and ``_merge_stats_kernel`` merges those rows.
Deviations are taken from the tile mean, so a large common offset (e.g. values ~1000 with
spread 0.1 in float32) costs no precision, unlike ``E[x^2] - E[x]^2``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dense_ext.backends.triton._common import (
    LaunchSite,
    acc_dtype,
    cdiv,
    channels_ok,
    kernel,
    next_pow2,
    num_rows,
    on_tensor_device,
    row_offsets,
    rows_stride,
    vec_align,
)
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


@kernel
def _tile_stats_kernel(
    X_ptr,  # rows [M, >= col + C], row stride X_row_stride
    PART_ptr,  # [tiles, 3, C] accumulation dtype
    X_row_stride,
    x_col,
    M,
    C,
    X_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rm < M
    c_ok = channels_ok(rc, C, X_ALIGN)
    ptrs = X_ptr + row_offsets(rm, X_row_stride, x_col, X_ALIGN)[:, None] + rc[None, :]
    x = tl.load(ptrs, mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    x = x.to(PART_ptr.dtype.element_ty)
    tile_stats_epilogue(PART_ptr, x, row_ok, rc, c_ok, pid_m, M, C, BLOCK_M)


@kernel
def _merge_stats_kernel(
    PART_ptr,  # [rows, 3, C]: mean_hi, mean_lo, M2 per tile, the tiles from row part_row
    OUT_ptr,  # statistics tensor; mean at OUT_ptr + mean_off + c, variance at + var_off + c
    INV_ptr,  # with WRITE_INV: rsqrt(variance + eps) at INV_ptr + inv_off + c
    part_row,
    mean_off,
    var_off,
    inv_off,
    eps,
    num_tiles,
    tile_rows,
    M,
    C,
    WRITE_INV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Two vectorised passes over ``[BLOCK_T tiles, BLOCK_C channels]`` blocks, in float64:
    the mean ``sum_t n_t * mean_t / M``, then ``M2 = sum_t M2_t + n_t * (mean_t - mean)^2``
    (the closed form of Chan's merge). Fixed summation order: deterministic.

    With ``WRITE_INV`` also the BN normaliser ``rsqrt(var + eps)`` of the stored (rounded)
    variance, as ``torch.add(var, eps).rsqrt_()`` computes it in float32: the eager layer loop
    then launches nothing else before the next layer reads these channels. float32 statistics
    only (``eps`` arrives as a float32 argument)."""
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    part = PART_ptr + part_row * 3 * C
    total = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for t0 in range(0, num_tiles, BLOCK_T):
        n_t, mean_t, _ = _tile_block(part, t0, rc, c_ok, num_tiles, tile_rows, M, C, BLOCK_T)
        total += tl.sum(n_t[:, None] * mean_t, axis=0)
    mean = total / M
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for t0 in range(0, num_tiles, BLOCK_T):
        n_t, mean_t, m2_t = _tile_block(part, t0, rc, c_ok, num_tiles, tile_rows, M, C, BLOCK_T)
        d = mean_t - mean[None, :]
        m2 += tl.sum(m2_t + n_t[:, None] * d * d, axis=0)
    var = (m2 / M).to(OUT_ptr.dtype.element_ty)
    tl.store(OUT_ptr + mean_off + rc, mean.to(OUT_ptr.dtype.element_ty), mask=c_ok)
    tl.store(OUT_ptr + var_off + rc, var, mask=c_ok)
    if WRITE_INV:
        tl.store(INV_ptr + inv_off + rc, tl.math.rsqrt(var + eps), mask=c_ok)


@kernel
def _merge_groups_kernel(
    PART_ptr,  # [num_tiles + groups, 3, C]: the tiles' (mean_hi, mean_lo, M2), then the groups'
    num_tiles,
    tile_rows,
    M,
    C,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The first launch of ``TwoLevelMerge``: group ``g`` (tiles ``[g * BLOCK_T, (g + 1) *
    BLOCK_T)``) merged as ``_merge_stats_kernel`` merges all tiles, in float64 from one load of
    the block, and written as partial row ``num_tiles + g``: its mean as ``mean_hi + mean_lo``
    (the float64 value to about 48 bits in float32 partials), its M2 rounded to the partials'
    dtype. A group is a tile of ``BLOCK_T * tile_rows`` rows for the second launch."""
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    group = tl.program_id(1)
    n_t, mean_t, m2_t = _tile_block(
        PART_ptr, group * BLOCK_T, rc, c_ok, num_tiles, tile_rows, M, C, BLOCK_T
    )
    mean = tl.sum(n_t[:, None] * mean_t, axis=0) / tl.sum(n_t, axis=0)
    d = mean_t - mean[None, :]
    m2 = tl.sum(m2_t + n_t[:, None] * d * d, axis=0)
    part_t = PART_ptr.dtype.element_ty
    hi = mean.to(part_t)
    base = PART_ptr + (num_tiles + group) * 3 * C
    tl.store(base + rc, hi, mask=c_ok)
    tl.store(base + C + rc, (mean - hi.to(tl.float64)).to(part_t), mask=c_ok)
    tl.store(base + 2 * C + rc, m2.to(part_t), mask=c_ok)


@triton.jit
def _tile_block(PART_ptr, t0, rc, c_ok, num_tiles, tile_rows, M, C, BLOCK_T: tl.constexpr):
    """Rows per tile, tile means and M2 of tiles ``[t0, t0 + BLOCK_T)`` (0 past the end)."""
    rt = t0 + tl.arange(0, BLOCK_T)
    t_ok = rt < num_tiles
    n_t = tl.where(t_ok, tl.minimum(M - rt * tile_rows, tile_rows), 0).to(tl.float64)
    ok = t_ok[:, None] & c_ok[None, :]
    base = PART_ptr + (rt * 3 * C)[:, None] + rc[None, :]
    hi = tl.load(base, mask=ok, other=0.0).to(tl.float64)
    lo = tl.load(base + C, mask=ok, other=0.0).to(tl.float64)
    m2 = tl.load(base + 2 * C, mask=ok, other=0.0).to(tl.float64)
    return n_t, hi + lo, m2


# Tiles per group of the two-level merge: one [GROUP_TILES, 32] block per program.
GROUP_TILES = 64
# Up to this many tiles one launch merges them (at most two blocks per pass on each program).
ONE_LAUNCH_TILES = 2 * GROUP_TILES


def partial_rows(tiles: int) -> int:
    """Rows of the ``[rows, 3, C]`` partials a merge of ``tiles`` tiles needs: one per tile,
    and with the two-level merge one per group after them."""
    return tiles if tiles <= ONE_LAUNCH_TILES else tiles + cdiv(tiles, GROUP_TILES)


class TwoLevelMerge:
    """A merge of more than ``ONE_LAUNCH_TILES`` tiles: the groups' launch, then the final
    merge of the groups' rows. Called like the one ``LaunchSite`` it replaces, with the
    partials, the statistics tensor and the normalisers' tensor."""

    __slots__ = ("groups", "final")

    def __init__(self, groups: LaunchSite, final: LaunchSite) -> None:
        self.groups = groups
        self.final = final

    def __call__(self, part, out, inv) -> None:
        self.groups(part)
        self.final(part, out, inv)

    def own(self) -> TwoLevelMerge:
        return TwoLevelMerge(self.groups.own(), self.final.own())

    def bound(self, stream: int, part, out, inv) -> None:
        self.groups.bound(stream, part)
        self.final.bound(stream, part, out, inv)


def _block_c(c: int) -> int:
    return 16 if c <= 16 else 32


@functools.lru_cache(maxsize=4096)
def merge_site(
    tiles: int,
    c: int,
    m: int,
    tile_rows: int,
    mean_off: int,
    var_off: int,
    inv: tuple[int, float] | None = None,
) -> LaunchSite | TwoLevelMerge:
    """The launch that merges partials ``[partial_rows(tiles), 3, c]`` (tiles of ``tile_rows``
    of ``m`` rows) into a statistics tensor at element offsets ``mean_off``, ``var_off``, and
    with ``inv = (inv_off, eps)`` the normalisers ``rsqrt(var + eps)`` into a float32 tensor at
    ``inv_off``; tensors: the partials, the statistics tensor, the normalisers' tensor (the
    statistics tensor again without ``inv``: not written). Past ``ONE_LAUNCH_TILES`` tiles, two
    launches (``TwoLevelMerge``) called the same way."""
    if tiles <= ONE_LAUNCH_TILES:
        return _final_merge(0, tiles, c, m, tile_rows, mean_off, var_off, inv)
    groups = cdiv(tiles, GROUP_TILES)
    first = LaunchSite(
        _merge_groups_kernel,
        (cdiv(c, _block_c(c)), groups),
        (tiles, tile_rows, m, c),
        {"BLOCK_T": GROUP_TILES, "BLOCK_C": _block_c(c)},
    )
    rows = GROUP_TILES * tile_rows
    return TwoLevelMerge(first, _final_merge(tiles, groups, c, m, rows, mean_off, var_off, inv))


def _final_merge(part_row, tiles, c, m, tile_rows, mean_off, var_off, inv) -> LaunchSite:
    """``_merge_stats_kernel`` over the ``tiles`` partial rows from ``part_row``."""
    block_t = max(2, min(64, next_pow2(tiles)))
    inv_off, eps = (0, 0.0) if inv is None else inv
    return LaunchSite(
        _merge_stats_kernel,
        (cdiv(c, _block_c(c)),),
        (part_row, mean_off, var_off, inv_off, float(eps), tiles, tile_rows, m, c),
        {"WRITE_INV": inv is not None, "BLOCK_T": block_t, "BLOCK_C": _block_c(c)},
    )


@functools.lru_cache(maxsize=4096)
def stats_sites(
    m: int,
    x_stride: int,
    x_col: int,
    channels: int,
    mean_off: int,
    var_off: int,
    device,
    inv: tuple[int, float] | None = None,
) -> tuple[LaunchSite, LaunchSite | TwoLevelMerge, tuple[int, int, int]]:
    """``(tile statistics, merge, partials shape)`` of ``channel_stats_``; tensors: ``x`` and the
    partials, then the partials, the output and the normalisers' tensor (``merge_site``, which
    also says what ``inv`` does)."""
    cfg = stats_config(m, channels, device)
    tiles = cdiv(m, cfg.block_m)
    tile = LaunchSite(
        _tile_stats_kernel,
        (tiles, cdiv(channels, cfg.block_n)),
        (x_stride, x_col, m, channels),
        {
            "X_ALIGN": vec_align(x_stride, x_col, channels),
            "BLOCK_M": cfg.block_m,
            "BLOCK_C": cfg.block_n,
            "num_warps": cfg.num_warps,
        },
    )
    merge = merge_site(tiles, channels, m, cfg.block_m, mean_off, var_off, inv)
    return tile, merge, (partial_rows(tiles), 3, channels)


@on_tensor_device
def channel_stats_(
    x: torch.Tensor, out: torch.Tensor, *, x_col: int, channels: int, mean_off: int, var_off: int
) -> None:
    """The launcher behind ``channel_stats`` (called directly in eager mode)."""
    if not out.is_contiguous():
        raise ValueError("dense_ext triton: statistics output must be contiguous")
    x_stride = rows_stride(x, "x")
    tile, merge, part_shape = stats_sites(
        num_rows(x), x_stride, x_col, channels, mean_off, var_off, x.device
    )
    part = torch.empty(part_shape, dtype=acc_dtype(x.dtype), device=x.device)
    tile(x, part)
    merge(part, out, out)


@torch.library.triton_op("dense_ext_triton::channel_stats", mutates_args={"out"})
def channel_stats(
    x: torch.Tensor, out: torch.Tensor, *, x_col: int, channels: int, mean_off: int, var_off: int
) -> None:
    """Mean and biased variance of channels ``[x_col, x_col + channels)`` of the rows of ``x``.

    ``out`` receives the means at flat offsets ``mean_off + c`` and the variances at
    ``var_off + c`` (e.g. the two rows of a contiguous ``[2, C_total]`` statistics tensor).
    """
    channel_stats_(x, out, x_col=x_col, channels=channels, mean_off=mean_off, var_off=var_off)
