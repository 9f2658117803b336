"""Forward convolution with the BN-ReLU prologue and the statistics epilogue.

``Y[:, y_col:y_col+C_out] = conv_KS(relu(bn(X[:, x_col:x_col+C_in]))) (* dropout mask)``

One implicit-GEMM kernel serves both convolutions of a dense layer: ``KS=1`` is the bottleneck
GEMM ``Y1 = relu(X*scale1 + shift1) @ W1^T`` over the buffer prefix, ``KS=3`` the 3x3
convolution (over ``Y1``, or over the prefix for plain layers). ``KS`` is a compile-time
constant, so the 1x1 instance has no tap loop and no bounds arithmetic. What it fuses:

* prologue: the activation operand is loaded from the buffer and normalised + rectified in
  registers; ``relu(bn(X))`` never exists in memory. Taps outside the image contribute 0.
* epilogue: the dropout mask (``dropout.py``, computed from the layer's seed) is applied, the
  tile is stored straight into its channel slice of the destination (the shared feature buffer
  for the 3x3 convolution), and the per-tile channel mean/M2 of the *stored* values are written
  for the statistics merge.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
    round_tf32_,
    round_to,
    row_offsets,
    rows_stride,
    tap_source,
    vec_align,
    weight_layout,
    weight_rows,
)
from dense_ext.backends.triton.configs import conv_fwd_config
from dense_ext.backends.triton.dropout import (
    check_size,
    dropout_keep,
    dropout_scale,
    kernel_args,
)
from dense_ext.backends.triton.stats import (
    TwoLevelMerge,
    merge_site,
    partial_rows,
    tile_stats_epilogue,
)


@kernel
def _bn_relu_conv_fwd_kernel(
    X_ptr,  # rows [M, >= x_col + C_IN], row stride X_row_stride (buffer dtype)
    MEAN_ptr,
    INVSTD_ptr,
    GAMMA_ptr,
    BETA_ptr,  # [C_IN] accumulation dtype
    W_ptr,  # [KS*KS, C_IN, C_OUT] contiguous, or the conv weight [C_OUT, C_IN] (W_AS_CONV)
    Y_ptr,  # rows [M, >= y_col + C_OUT], row stride Y_row_stride (buffer dtype)
    PART_ptr,  # [>= cdiv(M, BLOCK_M), 3, C_OUT] accumulation dtype (if COMPUTE_STATS)
    SEED_ptr,  # [L] int64 dropout seeds (if DROPOUT)
    X_row_stride,
    x_col,
    Y_row_stride,
    y_col,
    M,
    H,
    W,
    C_IN,
    C_OUT,
    layer,
    p,
    scale_hi,
    scale_mid,
    scale_lo,
    KS: tl.constexpr,
    DROPOUT: tl.constexpr,
    COMPUTE_STATS: tl.constexpr,
    NORMALIZE: tl.constexpr,  # False: X already holds relu(bn(.)); the BN tensors are not read
    # KS=1 only: W is the conv weight itself, [C_OUT, C_IN] contiguous (no transposed copy)
    W_AS_CONV: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TF32: tl.constexpr,
    X_ALIGN: tl.constexpr,
    Y_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc_t = MEAN_ptr.dtype.element_ty
    op_t = W_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < M
    n_ok = channels_ok(rn, C_OUT, Y_ALIGN)
    hh = (rm // W) % H
    ww = rm % W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    # One flat loop over (tap, channel chunk): for the small channel counts of a dense layer
    # the pipeliner then overlaps loads across taps, not just within one tap's few chunks.
    num_k = tl.cdiv(C_IN, BLOCK_K)
    for it in range(0, KS * KS * num_k):
        tap = it // num_k
        rk = (it - tap * num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        src, ok = tap_source(rm, row_ok, hh, ww, H, W, tap // KS - KS // 2, tap % KS - KS // 2, KS)
        k_ok = channels_ok(rk, C_IN, X_ALIGN)
        if NORMALIZE:
            mean, invstd, scale, beta = load_bn_params(
                MEAN_ptr, INVSTD_ptr, GAMMA_ptr, BETA_ptr, rk, k_ok
            )
        valid = ok[:, None] & k_ok[None, :]
        x = tl.load(
            X_ptr + row_offsets(src, X_row_stride, x_col, X_ALIGN)[:, None] + rk[None, :],
            mask=valid,
            other=0.0,
        )
        if NORMALIZE:
            z = relu((x.to(acc_t) - mean[None, :]) * scale[None, :] + beta[None, :])
            z = mma_operand(tl.where(valid, z, 0.0), op_t, TF32)
        else:  # the operand as loaded (taps outside the image and masked channels are 0)
            z = mma_operand(x, op_t, TF32)
        w_ok = k_ok[:, None] & n_ok[None, :]
        if W_AS_CONV:  # rows of C_IN channels; X_ALIGN divides C_IN
            tl.static_assert(KS == 1, "W_AS_CONV is the 1x1 weight's layout")
            w_ptrs = W_ptr + weight_rows(rn, C_IN, X_ALIGN)[None, :] + rk[:, None]
        else:
            w_ptrs = W_ptr + (tap * C_IN + rk)[:, None] * C_OUT + rn[None, :]
        w = tl.load(w_ptrs, mask=w_ok, other=0.0)
        if TF32:  # rounded here, not on the host: no tensor operations per weight and step
            w = round_tf32(w)
        acc = dot(z, w, acc, DOT_FP32, INPUT_PRECISION)
    store_ok = row_ok[:, None] & n_ok[None, :]
    if DROPOUT:
        keep = dropout_keep(SEED_ptr, layer, rm[:, None], rn[None, :], C_OUT, p)
        acc = tl.where(keep, acc * dropout_scale(scale_hi, scale_mid, scale_lo, acc_t), 0.0)
    out = round_to(acc, Y_ptr.dtype.element_ty)
    y_ptrs = Y_ptr + row_offsets(rm, Y_row_stride, y_col, Y_ALIGN)[:, None] + rn[None, :]
    tl.store(y_ptrs, out, mask=store_ok)
    if COMPUTE_STATS:
        tile_stats_epilogue(PART_ptr, out.to(acc_t), row_ok, rn, n_ok, pid_m, M, C_OUT, BLOCK_M)


def conv_weight_taps(
    weight: torch.Tensor, dtype: torch.dtype, tf32: bool = False, *, flat: bool = True
) -> torch.Tensor:
    """``[C_out, C_in, KS, KS]`` -> ``[KS*KS, C_in, C_out]`` contiguous, in the buffer dtype;
    with ``tf32`` rounded to TF32 like the in-kernel operands (``_common.round_tf32``). Always a
    new tensor (``permute_copy``), never a view of ``weight``. ``flat=False`` leaves it
    ``[KS, KS, C_in, C_out]`` (the same memory; one operation less)."""
    c_out, c_in, kh, kw = weight.shape
    if torch.is_grad_enabled():
        weight = weight.detach()
    if weight.dtype != dtype:
        weight = weight.to(dtype)
    taps = torch.permute_copy(weight, (2, 3, 1, 0))
    if flat:
        taps = taps.view(kh * kw, c_in, c_out)
    if tf32:
        round_tf32_(taps)
    return taps


@kernel
def _weight_taps_kernel(
    W_ptr,  # [C_out, C_in, KS, KS] contiguous
    TAPS_ptr,  # [KS * KS, C_in, C_out], the same dtype
    C_out,
    C_in,
    TAPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``TAPS[t, c, o] = W[o, c, t]``: ``conv_weight_taps`` in one launch."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < TAPS * C_in * C_out
    o = i % C_out
    c = (i // C_out) % C_in
    t = i // (C_out * C_in)
    tl.store(TAPS_ptr + i, tl.load(W_ptr + (o * C_in + c) * TAPS + t, mask=ok), mask=ok)


TAPS_BLOCK = 1024


@functools.lru_cache(maxsize=4096)
def weight_taps_site(c_out: int, c_in: int, ks: int) -> LaunchSite:
    """The launch of ``conv_weight_taps`` for a contiguous ``[c_out, c_in, ks, ks]`` weight
    already in the buffer dtype, for the eager loop (one launch where ``permute_copy``
    dispatches an ATen copy). Tensors: the weight, the taps ``[ks, ks, c_in, c_out]``."""
    n = ks * ks * c_in * c_out
    if n >= 2**31:
        raise ValueError(f"a {c_out}x{c_in}x{ks}x{ks} weight exceeds int32 offsets")
    grid = (cdiv(n, TAPS_BLOCK),)
    return LaunchSite(
        _weight_taps_kernel, grid, (c_out, c_in), {"TAPS": ks * ks, "BLOCK": TAPS_BLOCK}
    )


def is_1x1(weight: torch.Tensor) -> bool:
    """Whether a conv weight is 1x1: the kernels read those as they are (``W_AS_CONV``)."""
    return weight.shape[-2:] == (1, 1)


def weight_operand(weight: torch.Tensor, dtype: torch.dtype, *, flat: bool = True) -> torch.Tensor:
    """What the kernels read of a conv weight, in the buffer dtype: a 1x1 weight as it is
    (``weight_layout``; cast and made contiguous where it is not already), any other
    ``conv_weight_taps``. Detached."""
    if is_1x1(weight):
        return weight.detach().to(dtype).contiguous()
    return conv_weight_taps(weight, dtype, flat=flat)


_NO_DROPOUT = (0, 0.0, 1.0, 0.0, 0.0)  # layer, p, scale hi/mid/lo


@dataclass(frozen=True)
class FwdSites:
    """The launches of one ``bn_relu_conv_fwd_`` call (``fwd_sites``)."""

    conv: LaunchSite  # tensors: x, mean, invstd, gamma, beta, w_taps, y, partials, seeds
    # tensors: partials, statistics, normalisers (None: no statistics)
    merge: LaunchSite | TwoLevelMerge | None
    part_shape: tuple[int, int, int]  # [stats.partial_rows(tiles), 3, C_out] partial statistics


@functools.lru_cache(maxsize=4096)
def fwd_sites(
    m: int,
    x_stride: int,
    x_col: int,
    y_stride: int,
    y_col: int,
    c_in: int,
    c_out: int,
    ks: int,
    height: int,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
    dot: tuple[bool, str, bool],
    stats: tuple[int, int] | None,
    dropout: tuple[int, float] | None,
    inv: tuple[int, float] | None = None,
    w_as_conv: bool = False,
) -> FwdSites:
    """The launches of ``bn_relu_conv_fwd_`` from integers: ``dot`` is ``dot_config(dtype,
    device)``, ``stats`` the statistics offsets ``(mean_off, var_off)`` or None, ``dropout``
    ``(layer, p)`` or None, ``inv`` where the merge also writes the normalisers
    (``stats.merge_site``), ``w_as_conv`` whether the weight comes as the 1x1 conv weight
    itself (``weight_layout``)."""
    cfg = conv_fwd_config(m, c_in, c_out, dtype, device)
    tiles = cdiv(m, cfg.block_m)
    drop = _NO_DROPOUT
    if dropout is not None:
        check_size(m, c_out)
        drop = tuple(kernel_args(*dropout).values())
    dot_fp32, precision, tf32 = dot
    conv = LaunchSite(
        _bn_relu_conv_fwd_kernel,
        (tiles, cdiv(c_out, cfg.block_n)),
        (x_stride, x_col, y_stride, y_col, m, height, width, c_in, c_out, *drop),
        {
            "KS": ks,
            "DROPOUT": dropout is not None,
            "COMPUTE_STATS": stats is not None,
            "NORMALIZE": True,
            "W_AS_CONV": w_as_conv,
            "DOT_FP32": dot_fp32,
            "INPUT_PRECISION": precision,
            "TF32": tf32,
            "X_ALIGN": vec_align(x_stride, x_col, c_in),
            "Y_ALIGN": vec_align(y_stride, y_col, c_out),
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k,
            "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages,
        },
    )
    merge = None
    if stats is not None:
        merge = merge_site(tiles, c_out, m, cfg.block_m, *stats, inv)
    return FwdSites(conv, merge, (partial_rows(tiles), 3, c_out))


@on_tensor_device
def bn_relu_conv_fwd_(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    w_taps: torch.Tensor,
    y: torch.Tensor,
    stats: torch.Tensor | None,
    seeds: torch.Tensor | None,
    *,
    x_col: int,
    c_in: int,
    y_col: int,
    mean_off: int = 0,
    var_off: int = 0,
    height: int,
    width: int,
    layer: int = 0,
    drop_p: float = 0.0,
) -> None:
    """The launcher behind ``bn_relu_conv_fwd`` (called directly in eager mode)."""
    ks, c_out, w_as_conv = weight_layout(w_taps)
    sites = fwd_sites(
        num_rows(x),
        rows_stride(x, "x"),
        x_col,
        rows_stride(y, "y"),
        y_col,
        c_in,
        c_out,
        ks,
        height,
        width,
        y.dtype,
        y.device,
        dot_config(y.dtype, y.device),
        None if stats is None else (mean_off, var_off),
        None if seeds is None else (layer, drop_p),
        w_as_conv=w_as_conv,
    )
    part = mean
    if sites.merge is not None:
        part = torch.empty(sites.part_shape, dtype=acc_dtype(y.dtype), device=y.device)
    sites.conv(x, mean, invstd, gamma, beta, w_taps, y, part, seeds if seeds is not None else mean)
    if sites.merge is not None:
        sites.merge(part, stats, stats)


@torch.library.triton_op("dense_ext_triton::bn_relu_conv_fwd", mutates_args={"y", "stats"})
def bn_relu_conv_fwd(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    w_taps: torch.Tensor,
    y: torch.Tensor,
    stats: torch.Tensor | None,
    seeds: torch.Tensor | None,
    *,
    x_col: int,
    c_in: int,
    y_col: int,
    mean_off: int = 0,
    var_off: int = 0,
    height: int,
    width: int,
    layer: int = 0,
    drop_p: float = 0.0,
) -> None:
    """``y[:, y_col:y_col+C_out] = conv(relu(bn(x[:, x_col:x_col+c_in]))) (* dropout mask)``.

    ``w_taps`` is ``[KS*KS, c_in, C_out]`` (``conv_weight_taps``) or a 1x1 conv weight
    ``[C_out, c_in, 1, 1]`` as it is (``weight_layout``); ``mean, invstd, gamma, beta``
    are ``[c_in]`` in the accumulation dtype. With ``stats`` given, the batch mean and biased
    variance of the stored channels are written at flat offsets ``mean_off``/``var_off``. With
    ``seeds`` given, layer ``layer``'s dropout mask of rate ``drop_p`` is applied.
    """
    bn_relu_conv_fwd_(
        x,
        mean,
        invstd,
        gamma,
        beta,
        w_taps,
        y,
        stats,
        seeds,
        x_col=x_col,
        c_in=c_in,
        y_col=y_col,
        mean_off=mean_off,
        var_off=var_off,
        height=height,
        width=width,
        layer=layer,
        drop_p=drop_p,
    )
