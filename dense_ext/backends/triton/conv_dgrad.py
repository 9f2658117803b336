"""Data gradient of the convolution fused with the backward of the BN-ReLU before it.

For a layer step ``Z = relu(bn(X))``, ``Y = conv_KS(Z, W)`` and an incoming gradient ``dY``
(the dropout mask already applied in place, ``dropout.py``), the kernel computes a tile of
``dZ = conv_KS^T(dY, W)`` in registers (implicit GEMM; ``KS=1`` is ``dZ1 = dY1 @ W1``) and,
still in registers, turns it into the BN-ReLU gradient. ``g = dZ * !(Z <= 0)`` with ``Z``
recomputed from ``X``. With batch statistics ``dX = scale * (g - mean(g) - xhat * mean(g *
xhat))`` needs two channel sums over all M rows, so the kernel runs twice:

* ``REDUCE``: per-tile sums of ``g`` and ``g * xhat`` to a ``[tiles, 2, C]`` buffer (summed in
  tile order on the host: deterministic). They are also ``grad_beta`` and ``grad_gamma``.
* ``APPLY``: recomputes the tile and writes ``dX``, either stored (the bottleneck gradient
  ``dY1``) or added into the gradient buffer prefix (``grad_feat[:, :C_in] += dX``).

Recomputing the GEMM instead of storing ``dZ`` keeps the per-layer scratch at zero for the
``C_in``-wide gradient; the reduction depth (``k`` or ``4k`` channels times taps) is small.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton.language as tl

from dense_ext.backends.triton._common import (
    LaunchSite,
    cdiv,
    channels_ok,
    dot,
    dot_config,
    kernel,
    load_bn_params,
    num_rows,
    on_tensor_device,
    round_tf32,
    round_to,
    row_offsets,
    rows_stride,
    tap_source,
    vec_align,
    weight_layout,
    weight_rows,
)
from dense_ext.backends.triton.configs import conv_dgrad_config


@kernel
def _conv_dgrad_bn_relu_bwd_kernel(
    DY_ptr,  # rows [M, >= dy_col + C_OUT], row stride DY_row_stride: gradient of the conv output
    W_ptr,  # [KS*KS, C_IN, C_OUT] contiguous, or the conv weight [C_OUT, C_IN] (W_AS_CONV)
    X_ptr,  # rows [M, >= x_col + C_IN]: the BN input
    MEAN_ptr,
    INVSTD_ptr,
    GAMMA_ptr,
    BETA_ptr,  # [C_IN] accumulation dtype
    SUMS_ptr,  # [2, C_IN]: sum(g), sum(g * xhat) (APPLY with BATCH_STATS)
    PART_ptr,  # [cdiv(M, BLOCK_M), 2, C_IN] (REDUCE)
    DX_ptr,  # rows [M, >= dx_col + C_IN] (APPLY)
    DY_row_stride,
    dy_col,
    X_row_stride,
    x_col,
    DX_row_stride,
    dx_col,
    M,
    H,
    W,
    C_IN,
    C_OUT,
    count,
    KS: tl.constexpr,
    APPLY: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    # dZ kept in DX between the passes: REDUCE stores it there, APPLY reads it there (no GEMM)
    # and overwrites it with dX. False: each pass computes dZ (what the backend launches).
    DZ_IN_DX: tl.constexpr,
    # KS=1 only: W is the conv weight itself, [C_OUT, C_IN] contiguous (no transposed copy)
    W_AS_CONV: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TF32: tl.constexpr,
    DY_ALIGN: tl.constexpr,
    X_ALIGN: tl.constexpr,
    DX_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Channel tiles vary fastest: the CTAs that share a row tile of dY (the reduction operand,
    # re-read once per channel tile) run together, so the re-reads hit L2 even when dY is
    # larger than L2 (the 1x1 dgrad of a wide layer).
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    acc_t = MEAN_ptr.dtype.element_ty
    op_t = W_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rm < M
    c_ok = channels_ok(rc, C_IN, X_ALIGN)  # X_ALIGN divides C_IN (and so does DX_ALIGN)
    hh = (rm // W) % H
    ww = rm % W
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=acc_t)
    # dZ[i] = sum_tap dY[i - d(tap)] @ W[tap]^T (the transposed convolution), as one flat loop
    # over (tap, channel chunk).
    num_n = tl.cdiv(C_OUT, BLOCK_N)
    if DZ_IN_DX and APPLY:
        num_n = 0  # dZ is read from DX below
    for it in range(0, KS * KS * num_n):
        tap = it // num_n
        rn = (it - tap * num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        src, ok = tap_source(rm, row_ok, hh, ww, H, W, KS // 2 - tap // KS, KS // 2 - tap % KS, KS)
        n_ok = channels_ok(rn, C_OUT, DY_ALIGN)
        valid = ok[:, None] & n_ok[None, :]
        dy = tl.load(
            DY_ptr + row_offsets(src, DY_row_stride, dy_col, DY_ALIGN)[:, None] + rn[None, :],
            mask=valid,
            other=0.0,
        )
        if TF32:
            dy = round_tf32(dy)
        w_ok = n_ok[:, None] & c_ok[None, :]
        if W_AS_CONV:  # rows of C_IN channels; X_ALIGN divides C_IN
            tl.static_assert(KS == 1, "W_AS_CONV is the 1x1 weight's layout")
            w_ptrs = W_ptr + weight_rows(rn, C_IN, X_ALIGN)[:, None] + rc[None, :]
        else:
            w_ptrs = W_ptr + (tap * C_IN + rc)[None, :] * C_OUT + rn[:, None]
        w = tl.load(w_ptrs, mask=w_ok, other=0.0)
        if TF32:
            w = round_tf32(w)
        acc = dot(dy, w, acc, DOT_FP32, INPUT_PRECISION)
    tile_ok = row_ok[:, None] & c_ok[None, :]
    # The conv consumed Z rounded to the buffer dtype; its gradient arrives in that dtype too.
    if DZ_IN_DX:
        dz_ptrs = DX_ptr + row_offsets(rm, DX_row_stride, dx_col, DX_ALIGN)[:, None] + rc[None, :]
        if APPLY:
            dz = tl.load(dz_ptrs, mask=tile_ok, other=0.0).to(acc_t)
        else:
            tl.store(dz_ptrs, round_to(acc, DX_ptr.dtype.element_ty), mask=tile_ok)
            dz = round_to(acc, op_t).to(acc_t)
    else:
        dz = round_to(acc, op_t).to(acc_t)
    mean, invstd, scale, beta = load_bn_params(MEAN_ptr, INVSTD_ptr, GAMMA_ptr, BETA_ptr, rc, c_ok)
    x_ptrs = X_ptr + row_offsets(rm, X_row_stride, x_col, X_ALIGN)[:, None] + rc[None, :]
    x = tl.load(x_ptrs, mask=tile_ok, other=0.0).to(acc_t)
    z = (x - mean[None, :]) * scale[None, :] + beta[None, :]
    # torch's ReLU backward zeroes where the output is <= 0, so NaN lets the gradient through
    g = tl.where(tile_ok & ~(z <= 0), dz, 0.0)
    xhat = (x - mean[None, :]) * invstd[None, :]
    if APPLY:
        if BATCH_STATS:
            mean_g = tl.load(SUMS_ptr + rc, mask=c_ok, other=0.0) / count
            mean_gx = tl.load(SUMS_ptr + C_IN + rc, mask=c_ok, other=0.0) / count
            dx = (g - mean_g[None, :] - xhat * mean_gx[None, :]) * scale[None, :]
        else:
            dx = g * scale[None, :]
        dx_ptrs = DX_ptr + row_offsets(rm, DX_row_stride, dx_col, DX_ALIGN)[:, None] + rc[None, :]
        if ACCUMULATE:
            dx = dx + tl.load(dx_ptrs, mask=tile_ok, other=0.0).to(acc_t)
        tl.store(dx_ptrs, round_to(dx, DX_ptr.dtype.element_ty), mask=tile_ok)
    else:
        base = PART_ptr + pid_m * 2 * C_IN
        tl.store(base + rc, tl.sum(g, axis=0), mask=c_ok)
        tl.store(base + C_IN + rc, tl.sum(tl.where(tile_ok, g * xhat, 0.0), axis=0), mask=c_ok)


@dataclass(frozen=True)
class _Pass:
    """What one launch of the dgrad kernel does (see the module docstring)."""

    apply: bool  # False: the reduce pass (channel sums); True: the apply pass (writes dX)
    batch_stats: bool = False  # apply: subtract the two batch-statistics terms
    accumulate: bool = False  # apply: add into dX instead of storing


_REDUCE = _Pass(apply=False)


@functools.lru_cache(maxsize=4096)
def dgrad_site(
    m: int,
    strides: tuple[int, int, int],
    cols: tuple[int, int, int],
    c_in: int,
    c_out: int,
    ks: int,
    hw: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    dot: tuple[bool, str, bool],
    what: _Pass,
    w_as_conv: bool = False,
) -> tuple[LaunchSite, tuple[int, int, int]]:
    """One pass of the dgrad kernel from integers, and the reduce pass's partials shape
    ``[tiles, 2, c_in]``. ``strides``/``cols`` are the row strides and first channels of
    ``(dy, x, dx)`` (``dx``: 0, 0 in the reduce pass), ``dot`` is ``dot_config(dtype, device)``,
    ``w_as_conv`` whether the weight is the 1x1 conv weight itself (``weight_layout``).
    Tensors: dy, w_taps, x, mean, invstd, gamma, beta, sums, partials, dx."""
    cfg = conv_dgrad_config(m, c_in, c_out, dtype, device)
    dot_fp32, precision, tf32 = dot
    dy_stride, x_stride, dx_stride = strides
    dy_col, x_col, dx_col = cols
    site = LaunchSite(
        _conv_dgrad_bn_relu_bwd_kernel,
        (cdiv(c_in, cfg.block_k), cdiv(m, cfg.block_m)),
        (dy_stride, dy_col, x_stride, x_col, dx_stride, dx_col, m, *hw, c_in, c_out, float(m)),
        {
            "KS": ks,
            "APPLY": what.apply,
            "BATCH_STATS": what.batch_stats,
            "ACCUMULATE": what.accumulate,
            "DZ_IN_DX": False,
            "W_AS_CONV": w_as_conv,
            "DOT_FP32": dot_fp32,
            "INPUT_PRECISION": precision,
            "TF32": tf32,
            "DY_ALIGN": vec_align(dy_stride, dy_col, c_out),
            "X_ALIGN": vec_align(x_stride, x_col, c_in),
            "DX_ALIGN": vec_align(dx_stride, dx_col, c_in),
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "BLOCK_C": cfg.block_k,
            "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages,
        },
    )
    return site, (cdiv(m, cfg.block_m), 2, c_in)


def _site(dy, w_taps, x, dx, *, what: _Pass, cols, c_in, hw):
    """``dgrad_site`` of tensors; ``cols = (dy_col, x_col, dx_col)``, ``hw = (height, width)``."""
    ks, c_out, w_as_conv = weight_layout(w_taps)
    dx_stride = rows_stride(dx, "dx") if dx is not None else 0
    strides = (rows_stride(dy, "dy"), rows_stride(x, "x"), dx_stride)
    dot = dot_config(x.dtype, x.device)
    m, dtype, device = num_rows(x), x.dtype, x.device
    return dgrad_site(m, strides, cols, c_in, c_out, ks, hw, dtype, device, dot, what, w_as_conv)


@on_tensor_device
def conv_dgrad_bn_relu_reduce_(
    dy, w_taps, x, mean, invstd, gamma, beta, *, dy_col, x_col, c_in, height, width
) -> torch.Tensor:
    """The launcher behind ``conv_dgrad_bn_relu_reduce`` (called directly in eager mode)."""
    site, part_shape = _site(
        dy, w_taps, x, None, what=_REDUCE, cols=(dy_col, x_col, 0), c_in=c_in, hw=(height, width)
    )
    part = torch.empty(part_shape, dtype=mean.dtype, device=x.device)
    site(dy, w_taps, x, mean, invstd, gamma, beta, mean, part, x)
    return part.sum(dim=0)


@torch.library.triton_op("dense_ext_triton::conv_dgrad_bn_relu_reduce", mutates_args={})
def conv_dgrad_bn_relu_reduce(
    dy: torch.Tensor,
    w_taps: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    dy_col: int,
    x_col: int,
    c_in: int,
    height: int,
    width: int,
) -> torch.Tensor:
    """``[2, c_in]``: ``sum(g)`` (= grad_beta) and ``sum(g * xhat)`` (= grad_gamma) over all rows,
    where ``g = conv^T(dy[:, dy_col:]) * (relu(bn(x[:, x_col:x_col+c_in])) > 0)``."""
    return conv_dgrad_bn_relu_reduce_(
        dy,
        w_taps,
        x,
        mean,
        invstd,
        gamma,
        beta,
        dy_col=dy_col,
        x_col=x_col,
        c_in=c_in,
        height=height,
        width=width,
    )


@on_tensor_device
def conv_dgrad_bn_relu_apply_(
    dy,
    w_taps,
    x,
    mean,
    invstd,
    gamma,
    beta,
    sums,
    dx,
    *,
    dy_col,
    x_col,
    c_in,
    dx_col,
    batch_stats,
    accumulate,
    height,
    width,
) -> None:
    """The launcher behind ``conv_dgrad_bn_relu_apply`` (called directly in eager mode)."""
    if dx.dtype != x.dtype:
        raise ValueError(f"dense_ext triton: dx dtype {dx.dtype} != x dtype {x.dtype}")
    what = _Pass(apply=True, batch_stats=batch_stats, accumulate=accumulate)
    site, _ = _site(
        dy, w_taps, x, dx, what=what, cols=(dy_col, x_col, dx_col), c_in=c_in, hw=(height, width)
    )
    site(dy, w_taps, x, mean, invstd, gamma, beta, sums.contiguous(), mean, dx)


@torch.library.triton_op("dense_ext_triton::conv_dgrad_bn_relu_apply", mutates_args={"dx"})
def conv_dgrad_bn_relu_apply(
    dy: torch.Tensor,
    w_taps: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    sums: torch.Tensor,
    dx: torch.Tensor,
    *,
    dy_col: int,
    x_col: int,
    c_in: int,
    dx_col: int,
    batch_stats: bool,
    accumulate: bool,
    height: int,
    width: int,
) -> None:
    """Write (or, with ``accumulate``, add) the BN-ReLU input gradient into
    ``dx[:, dx_col:dx_col+c_in]``; ``sums`` comes from ``conv_dgrad_bn_relu_reduce``."""
    conv_dgrad_bn_relu_apply_(
        dy,
        w_taps,
        x,
        mean,
        invstd,
        gamma,
        beta,
        sums,
        dx,
        dy_col=dy_col,
        x_col=x_col,
        c_in=c_in,
        dx_col=dx_col,
        batch_stats=batch_stats,
        accumulate=accumulate,
        height=height,
        width=width,
    )
