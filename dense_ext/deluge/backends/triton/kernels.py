"""Triton kernels of the cross-layer depthwise convolution, and their launchers.

The buffer ``X`` holds ``k`` slots of ``C`` channels per row (``[M, >= k*C]`` rows, row stride
``X_row_stride``: the rows view of a channels_last slot buffer). Per-(slot, channel) tables
(``MEAN``, ``SCALE``, ...) are ``[k, C]`` contiguous in the accumulation dtype. Same arithmetic
as the C++ kernels (csrc/kernels/cldc_math.cuh):

* forward ``y = shift + sum_i scale_i * (x_i - mean_i)``;
* backward sums ``S_i = sum_rows g * (x_i - mean_i)`` (``i < k``) and ``S_k = sum_rows g``, per
  row tile, merged over tiles on the host in a fixed order (deterministic, no atomics);
* backward apply ``grad_x_i += alpha_i * g - beta_i - gamma_i * (x_i - mean_i)``, one program
  per row tile reading ``g`` once for all ``k`` slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dense_ext.backends.triton import interpret_requested

INTERPRETED = interpret_requested()


def _blocks() -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): small under the interpreter (ragged edges in small tests)."""
    return (16, 16) if INTERPRETED else (64, 32)


def _wrap(kernel):
    return kernel if INTERPRETED else torch.library.wrap_triton(kernel)


@triton.jit
def _cldc_forward_kernel(
    X_ptr,  # rows [M, >= K*C], row stride X_row_stride
    MEAN_ptr,  # [K, C] accumulation dtype
    SCALE_ptr,  # [K, C]
    SHIFT_ptr,  # [C]
    OUT_ptr,  # rows [M, C], row stride OUT_row_stride
    X_row_stride,
    OUT_row_stride,
    M,
    C,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rm < M)[:, None] & c_ok[None, :]
    rows = rm.to(tl.int64)[:, None]
    shift = tl.load(SHIFT_ptr + rc, mask=c_ok, other=0.0)
    y = tl.zeros((BLOCK_M, BLOCK_C), dtype=SHIFT_ptr.dtype.element_ty) + shift[None, :]
    for i in range(0, K):
        mean = tl.load(MEAN_ptr + i * C + rc, mask=c_ok, other=0.0)
        scale = tl.load(SCALE_ptr + i * C + rc, mask=c_ok, other=0.0)
        x = tl.load(X_ptr + rows * X_row_stride + (i * C + rc)[None, :], mask=ok, other=0.0)
        y += scale[None, :] * (x.to(y.dtype) - mean[None, :])
    tl.store(OUT_ptr + rows * OUT_row_stride + rc[None, :], y.to(OUT_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _cldc_sums_kernel(
    G_ptr,  # rows [M, C], row stride G_row_stride
    X_ptr,  # rows [M, >= K*C]
    MEAN_ptr,  # [K, C]
    PART_ptr,  # [K + 1, tiles, C] accumulation dtype
    G_row_stride,
    X_row_stride,
    M,
    C,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    i = tl.program_id(2)  # slot; i == K: the sum of g alone
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rm < M)[:, None] & c_ok[None, :]
    rows = rm.to(tl.int64)[:, None]
    acc_t = PART_ptr.dtype.element_ty
    g = tl.load(G_ptr + rows * G_row_stride + rc[None, :], mask=ok, other=0.0).to(acc_t)
    slot = tl.minimum(i, K - 1)  # i == K reads a valid slot and ignores it
    mean = tl.load(MEAN_ptr + slot * C + rc, mask=c_ok, other=0.0)
    x = tl.load(X_ptr + rows * X_row_stride + (slot * C + rc)[None, :], mask=ok, other=0.0)
    centred = tl.where(ok, x.to(acc_t) - mean[None, :], 0.0)
    term = tl.where(i < K, g * centred, g)
    tiles = tl.num_programs(0)
    tl.store(PART_ptr + (i * tiles + pid_m) * C + rc, tl.sum(term, axis=0), mask=c_ok)


@triton.jit
def _cldc_apply_kernel(
    G_ptr,  # rows [M, C]
    X_ptr,  # rows [M, >= K*C]
    MEAN_ptr,  # [K, C]
    ALPHA_ptr,  # [K, C]
    BETA_ptr,  # [K, C]
    GAMMA_ptr,  # [K, C]
    DX_ptr,  # rows [M, >= K*C], accumulated into
    G_row_stride,
    X_row_stride,
    DX_row_stride,
    M,
    C,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    ok = (rm < M)[:, None] & c_ok[None, :]
    rows = rm.to(tl.int64)[:, None]
    acc_t = MEAN_ptr.dtype.element_ty
    g = tl.load(G_ptr + rows * G_row_stride + rc[None, :], mask=ok, other=0.0).to(acc_t)
    for i in range(0, K):
        cols = (i * C + rc)[None, :]
        mean = tl.load(MEAN_ptr + i * C + rc, mask=c_ok, other=0.0)[None, :]
        alpha = tl.load(ALPHA_ptr + i * C + rc, mask=c_ok, other=0.0)[None, :]
        beta = tl.load(BETA_ptr + i * C + rc, mask=c_ok, other=0.0)[None, :]
        gamma = tl.load(GAMMA_ptr + i * C + rc, mask=c_ok, other=0.0)[None, :]
        x = tl.load(X_ptr + rows * X_row_stride + cols, mask=ok, other=0.0).to(acc_t)
        dx_ptrs = DX_ptr + rows * DX_row_stride + cols
        dx = tl.load(dx_ptrs, mask=ok, other=0.0).to(acc_t)
        dx += alpha * g - beta - gamma * (x - mean)
        tl.store(dx_ptrs, dx.to(DX_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """(M, row stride) of a channels_last [N, C, H, W] tensor or channel slice of one."""
    n, _, h, w = t.shape
    if t.dim() != 4 or t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"dense_ext triton: expected a channels_last tensor, got {t.stride()}")
    ld = t.stride(3) if w > 1 else t.stride(2) if h > 1 else t.stride(0) if n > 1 else t.shape[1]
    return n * h * w, ld


def _check_tables(x: torch.Tensor, mean: torch.Tensor, *tables: torch.Tensor) -> tuple[int, int]:
    k, c = mean.shape
    if x.shape[1] < k * c:
        raise ValueError(f"dense_ext triton: x has {x.shape[1]} channels, tables are {k}x{c}")
    for t in (mean, *tables):
        if t.shape != (k, c) or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"dense_ext triton: bad [k, C] table {tuple(t.shape)}")
    return k, c


# The two ops that produce a new tensor return it rather than fill one the caller allocated:
# under torch.compile, "allocate, let an op mutate it, read it" is what torch 2.11's inductor
# misordered (dense_ext/deluge/cldc_ops.py). Only cldc_grad_apply mutates, accumulating into
# the caller's gradient buffer.


@torch.library.triton_op("dense_ext_triton::cldc_forward", mutates_args={})
def cldc_forward(
    x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``shift + sum_i scale_i * (x_i - mean_i)`` over the first k slots of the
    [N, >= k*C, H, W] channels_last ``x``: a fresh [N, C, H, W] channels_last tensor of
    ``x``'s dtype."""
    k, c = _check_tables(x, mean, scale)
    n, _, h, w = x.shape
    out = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device)
    out = out.contiguous(memory_format=torch.channels_last)
    m, ld = _rows(x)
    _, ld_out = _rows(out)
    block_m, block_c = _blocks()
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
    _wrap(_cldc_forward_kernel)[grid](
        x, mean, scale, shift, out, ld, ld_out, m, c, k, BLOCK_M=block_m, BLOCK_C=block_c
    )
    return out


@torch.library.triton_op("dense_ext_triton::cldc_grad_sums", mutates_args={})
def cldc_grad_sums(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Fresh [k + 1, C] ``sums``: ``sums[i] = sum_rows grad_y * (x_i - mean_i)`` (``i < k``),
    ``sums[k] = sum grad_y``, in ``mean``'s dtype."""
    k, c = _check_tables(x, mean)
    m, ld = _rows(x)
    _, ld_g = _rows(grad_y)
    block_m, block_c = _blocks()
    tiles = triton.cdiv(m, block_m)
    part = torch.empty((k + 1, tiles, c), dtype=mean.dtype, device=x.device)
    grid = (tiles, triton.cdiv(c, block_c), k + 1)
    _wrap(_cldc_sums_kernel)[grid](
        grad_y, x, mean, part, ld_g, ld, m, c, k, BLOCK_M=block_m, BLOCK_C=block_c
    )
    return part.sum(dim=1)


@torch.library.triton_op("dense_ext_triton::cldc_grad_apply", mutates_args={"grad_x"})
def cldc_grad_apply(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    grad_x: torch.Tensor,
) -> None:
    """``grad_x_i += alpha_i * grad_y - beta_i - gamma_i * (x_i - mean_i)``."""
    k, c = _check_tables(x, mean, alpha, beta, gamma)
    m, ld = _rows(x)
    _, ld_g = _rows(grad_y)
    _, ld_d = _rows(grad_x)
    block_m, block_c = _blocks()
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
    _wrap(_cldc_apply_kernel)[grid](
        grad_y,
        x,
        mean,
        alpha,
        beta,
        gamma,
        grad_x,
        ld_g,
        ld,
        ld_d,
        m,
        c,
        k,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
    )
