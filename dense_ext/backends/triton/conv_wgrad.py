"""Weight gradient of the convolution with the BN-ReLU operand recomputed as it is loaded.

``dW[o, c, ky, kx] = sum_m (dY * mask)[m, o] * relu(bn(X))[m + d(ky, kx), c]`` with padded taps
contributing 0. ``relu(bn(X))`` is recomputed in registers from the buffer prefix (``dW1``) or
from ``Y1`` (``dW2``), so neither activation is ever stored. The reduction over M is split over
``split_m`` programs per output tile; each writes its partial ``[C_out, C_in, KS, KS]`` block to a
``[split_m, ...]`` buffer that the host sums in order (deterministic, no atomics; the buffer is
weight-sized, i.e. tiny).
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl

from dense_ext.backends.triton._common import (
    LaunchSite,
    acc_dtype,
    cdiv,
    channels_ok,
    dot,
    dot_config,
    kernel,
    load_bn_params,
    mma_operand,
    num_rows,
    on_tensor_device,
    relu,
    round_tf32,
    row_offsets,
    rows_stride,
    tap_source,
    vec_align,
)
from dense_ext.backends.triton.configs import conv_wgrad_config


@kernel
def _bn_relu_conv_wgrad_kernel(
    DY_ptr,  # rows [M, >= dy_col + C_OUT]: gradient of the conv output (dropout applied)
    X_ptr,  # rows [M, >= x_col + C_IN]: the BN input
    MEAN_ptr,
    INVSTD_ptr,
    GAMMA_ptr,
    BETA_ptr,  # [C_IN] accumulation dtype
    PART_ptr,  # [SPLIT, C_OUT, C_IN, KS, KS] accumulation dtype
    DY_row_stride,
    dy_col,
    X_row_stride,
    x_col,
    M,
    H,
    W,
    C_IN,
    C_OUT,
    rows_per_split,
    KS: tl.constexpr,
    NORMALIZE: tl.constexpr,  # False: X already holds relu(bn(.)); the BN tensors are not read
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TF32: tl.constexpr,
    DY_ALIGN: tl.constexpr,
    X_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    split = pid_z // (KS * KS)
    tap = pid_z % (KS * KS)
    dy_off = tap // KS - KS // 2
    dx_off = tap % KS - KS // 2
    acc_t = MEAN_ptr.dtype.element_ty
    op_t = X_ptr.dtype.element_ty
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = channels_ok(rc, C_IN, X_ALIGN)
    n_ok = channels_ok(rn, C_OUT, DY_ALIGN)
    if NORMALIZE:
        mean, invstd, scale, beta = load_bn_params(
            MEAN_ptr, INVSTD_ptr, GAMMA_ptr, BETA_ptr, rc, c_ok
        )
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=acc_t)
    m_lo = split * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < m_hi
        src, ok = tap_source(rm, row_ok, (rm // W) % H, rm % W, H, W, dy_off, dx_off, KS)
        # activation operand, transposed: [BLOCK_C, BLOCK_M]
        valid_x = c_ok[:, None] & ok[None, :]
        x = tl.load(
            X_ptr + row_offsets(src, X_row_stride, x_col, X_ALIGN)[None, :] + rc[:, None],
            mask=valid_x,
            other=0.0,
        )
        if NORMALIZE:
            z = relu((x.to(acc_t) - mean[:, None]) * scale[:, None] + beta[:, None])
            z = mma_operand(tl.where(valid_x, z, 0.0), op_t, TF32)
        else:  # the operand as loaded (taps outside the image and masked channels are 0)
            z = mma_operand(x, op_t, TF32)
        dy = tl.load(
            DY_ptr + row_offsets(rm, DY_row_stride, dy_col, DY_ALIGN)[:, None] + rn[None, :],
            mask=row_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if TF32:
            dy = round_tf32(dy)
        acc = dot(z, dy, acc, DOT_FP32, INPUT_PRECISION)
    # Stored in the weight's own [C_OUT, C_IN, KS, KS] layout: no transpose on the host.
    out = PART_ptr + ((split * C_OUT + rn)[None, :] * C_IN + rc[:, None]) * (KS * KS) + tap
    tl.store(out, acc, mask=c_ok[:, None] & n_ok[None, :])


@functools.lru_cache(maxsize=4096)
def wgrad_site(
    m: int,
    dy_stride: int,
    dy_col: int,
    x_stride: int,
    x_col: int,
    c_in: int,
    c_out: int,
    ks: int,
    hw: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    dot: tuple[bool, str, bool],
) -> tuple[LaunchSite, tuple[int, ...]]:
    """The wgrad launch from integers and its partials shape ``[split, c_out, c_in, ks, ks]``;
    ``dot`` is ``dot_config(dtype, device)``. Tensors: dy, x, mean, invstd, gamma, beta,
    partials."""
    taps = ks * ks
    cfg = conv_wgrad_config(m, c_in, c_out, taps, dtype, device)
    rows_per_split = cdiv(cdiv(m, cfg.split_m), cfg.block_m) * cfg.block_m
    split = cdiv(m, rows_per_split)
    dot_fp32, precision, tf32 = dot
    site = LaunchSite(
        _bn_relu_conv_wgrad_kernel,
        (cdiv(c_in, cfg.block_k), cdiv(c_out, cfg.block_n), split * taps),
        (dy_stride, dy_col, x_stride, x_col, m, *hw, c_in, c_out, rows_per_split),
        {
            "KS": ks,
            "NORMALIZE": True,
            "DOT_FP32": dot_fp32,
            "INPUT_PRECISION": precision,
            "TF32": tf32,
            "DY_ALIGN": vec_align(dy_stride, dy_col, c_out),
            "X_ALIGN": vec_align(x_stride, x_col, c_in),
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "BLOCK_C": cfg.block_k,
            "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages,
        },
    )
    return site, (split, c_out, c_in, ks, ks)


def sum_splits(part: torch.Tensor) -> torch.Tensor:
    """The weight gradient from the wgrad partials ``[split, ...]`` (summed in split order)."""
    return part.sum(dim=0) if part.shape[0] > 1 else part[0]


@kernel
def _sum_splits_kernel(
    PART_ptr,  # [splits, n] contiguous
    OUT_ptr,  # [n]
    n,
    splits,
    BLOCK: tl.constexpr,
):
    """``OUT = PART[0] + PART[1] + ...``, left to right (deterministic)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    acc = tl.load(PART_ptr + i, mask=ok, other=0.0)
    for s in range(1, splits):
        acc += tl.load(PART_ptr + s * n + i, mask=ok, other=0.0)
    tl.store(OUT_ptr + i, acc, mask=ok)


SUM_BLOCK = 1024


@functools.lru_cache(maxsize=4096)
def sum_splits_site(part_shape: tuple[int, ...]) -> LaunchSite | None:
    """The launch that sums wgrad partials of ``part_shape`` over their splits, in the eager
    loop (one launch where ``Tensor.sum`` dispatches an ATen reduction), or None for one split
    (the partial is the gradient). Tensors: partials, the gradient (both the accumulation
    dtype)."""
    splits, n = part_shape[0], 1
    for size in part_shape[1:]:
        n *= size
    if splits == 1:
        return None
    if splits * n >= 2**31:
        raise ValueError(f"wgrad partials {part_shape} exceed int32 offsets")
    return LaunchSite(_sum_splits_kernel, (cdiv(n, SUM_BLOCK),), (n, splits), {"BLOCK": SUM_BLOCK})


@on_tensor_device
def bn_relu_conv_wgrad_(
    dy, x, mean, invstd, gamma, beta, *, dy_col, c_out, x_col, c_in, kernel_size, height, width
) -> torch.Tensor:
    """The launcher behind ``bn_relu_conv_wgrad`` (called directly in eager mode)."""
    site, part_shape = wgrad_site(
        num_rows(x),
        rows_stride(dy, "dy"),
        dy_col,
        rows_stride(x, "x"),
        x_col,
        c_in,
        c_out,
        kernel_size,
        (height, width),
        x.dtype,
        x.device,
        dot_config(x.dtype, x.device),
    )
    part = torch.empty(part_shape, dtype=acc_dtype(x.dtype), device=x.device)
    site(dy, x, mean, invstd, gamma, beta, part)
    return sum_splits(part)


@torch.library.triton_op("dense_ext_triton::bn_relu_conv_wgrad", mutates_args={})
def bn_relu_conv_wgrad(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    dy_col: int,
    c_out: int,
    x_col: int,
    c_in: int,
    kernel_size: int,
    height: int,
    width: int,
) -> torch.Tensor:
    """``[c_out, c_in, KS, KS]`` weight gradient (accumulation dtype) of
    ``conv_KS(relu(bn(x[:, x_col:x_col+c_in])))`` given the output gradient
    ``dy[:, dy_col:dy_col+c_out]`` (dropout mask already applied)."""
    return bn_relu_conv_wgrad_(
        dy,
        x,
        mean,
        invstd,
        gamma,
        beta,
        dy_col=dy_col,
        c_out=c_out,
        x_col=x_col,
        c_in=c_in,
        kernel_size=kernel_size,
        height=height,
        width=width,
    )
