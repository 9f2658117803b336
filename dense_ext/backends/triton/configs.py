"""Block sizes per kernel, chosen from the problem shape and the GPU generation.

Dense-block problems are tall and thin: ``M = N*H*W`` is large (10^4..10^6 rows) while every
channel dimension is small (``k`` = 12..48 new channels, ``4k`` bottleneck channels, ``C_in`` up
to ~1000). So tiles are long in M (128 rows) and as wide in channels as the (power-of-two
rounded) channel count allows, capped where register pressure starts to hurt. The reduction
over M of the weight gradient is split across programs so the grid fills the GPU.

Choices are static (no run-time autotuning: ``triton.autotune`` would re-benchmark every new
``C_in`` of every layer, and a block has dozens) and cached per shape, since host time per
launch counts at these kernel sizes. sm_90 gets one more pipeline stage than sm_80
(larger shared memory); float64 gets smaller tiles. Under the interpreter, tiles are small so
that tests with a few dozen channels exercise several tiles and masked edges.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dense_ext.backends.triton._common import INTERPRETED, cdiv, next_pow2


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int  # output channels (fwd), reduced channels (dgrad), output channels (wgrad)
    block_k: int  # reduced channels (fwd), input channels (dgrad, wgrad)
    num_warps: int = 4
    num_stages: int = 2
    split_m: int = 1  # wgrad only


# Largest dynamic shared memory per block (bytes) by compute capability; default: sm_86/89 size.
SHARED_MEMORY_LIMIT = {(8, 0): 166912, (8, 7): 166912, (9, 0): 232448}
_SMALL_SHARED = 101376


def shared_limit(cap: tuple[int, int]) -> int:
    return SHARED_MEMORY_LIMIT.get(cap, _SMALL_SHARED)


def _stages(cap: tuple[int, int]) -> int:
    """Software-pipeline depth: 4 on sm_90 (227 KiB shared), 3 on sm_80 (163 KiB), 2 on the
    consumer parts (sm_86/89, 99 KiB)."""
    if cap >= (9, 0):
        return 4
    return 3 if shared_limit(cap) > _SMALL_SHARED else 2


def _width(channels: int, cap: int) -> int:
    return max(16, min(cap, next_pow2(channels)))


@functools.lru_cache(maxsize=4096)
def _gpu(device: torch.device) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor), props.multi_processor_count


def _on_cpu(device: torch.device) -> bool:
    return INTERPRETED or device.type != "cuda"


@functools.lru_cache(maxsize=4096)
def conv_fwd_config(
    m: int, c_in: int, c_out: int, dtype: torch.dtype, device: torch.device
) -> Config:
    if _on_cpu(device):
        return Config(64, 16, 16)
    cap, sms = _gpu(device)
    return conv_fwd_gpu(m, c_in, c_out, dtype, cap, sms)


def _row_tile(m: int, column_tiles: int, sms: int) -> int:
    """128 rows per tile, halved (down to 32) while the grid would leave SMs idle: at 7x7 and
    8x8 a batch of 64 has 25-32 row tiles of 128 for 132 SMs."""
    block_m = 128
    while block_m > 32 and cdiv(m, block_m) * column_tiles < sms:
        block_m //= 2
    return block_m


def conv_fwd_gpu(
    m: int, c_in: int, c_out: int, dtype: torch.dtype, cap: tuple[int, int], sms: int
) -> Config:
    if dtype == torch.float64:
        return Config(64, _width(c_out, 32), 16, num_warps=4, num_stages=2)
    wide = dtype != torch.float32
    block_n = _width(c_out, 128 if wide else 64)
    block_k = _width(c_in, 64 if wide else 32)
    block_m = _row_tile(m, cdiv(c_out, block_n), sms)
    stages = _stages(cap)
    # 8 warps: the BN-ReLU prologue holds a [128, BLOCK_K] float32 tile in registers; with 4
    # warps the 3x3 variants spill (compile_check reads the cubin's local memory).
    return Config(block_m, block_n, block_k, num_warps=8 if block_m >= 64 else 4, num_stages=stages)


@functools.lru_cache(maxsize=4096)
def conv_dgrad_config(
    m: int, c_in: int, c_out: int, dtype: torch.dtype, device: torch.device
) -> Config:
    """``block_n`` tiles the reduced (gradient-source) channels, ``block_k`` the produced ones."""
    if _on_cpu(device):
        return Config(64, 16, 16)
    cap, sms = _gpu(device)
    return conv_dgrad_gpu(m, c_in, c_out, dtype, cap, sms)


def conv_dgrad_gpu(
    m: int, c_in: int, c_out: int, dtype: torch.dtype, cap: tuple[int, int], sms: int
) -> Config:
    if dtype == torch.float64:
        return Config(64, _width(c_out, 32), _width(c_in, 32), num_warps=4, num_stages=2)
    wide = dtype != torch.float32
    stages = _stages(cap)
    # BLOCK_K <= 64: the apply pass keeps several [128, BLOCK_K] float32 tiles live (dZ, X,
    # xhat, dX); at 128 channels they spill.
    block_k = _width(c_in, 64)
    block_m = _row_tile(m, cdiv(c_in, block_k), sms)
    return Config(
        block_m,
        _width(c_out, 64 if wide else 32),
        block_k,
        num_warps=8 if block_k >= 64 and block_m >= 64 else 4,
        num_stages=stages,
    )


@functools.lru_cache(maxsize=4096)
def conv_wgrad_config(
    m: int, c_in: int, c_out: int, taps: int, dtype: torch.dtype, device: torch.device
) -> Config:
    """``block_n`` tiles output channels, ``block_k`` input channels, ``block_m`` the reduction."""
    if _on_cpu(device):
        return Config(32, 16, 16, split_m=2)
    cap, sms = _gpu(device)
    return conv_wgrad_gpu(m, c_in, c_out, taps, dtype, cap, sms)


def conv_wgrad_gpu(
    m: int, c_in: int, c_out: int, taps: int, dtype: torch.dtype, cap: tuple[int, int], sms: int
) -> Config:
    if dtype == torch.float64:
        block_n, block_k, block_m = _width(c_out, 32), _width(c_in, 32), 32
    else:
        block_n, block_k, block_m = _width(c_out, 64), _width(c_in, 64), 64
    tiles = cdiv(c_out, block_n) * cdiv(c_in, block_k) * taps
    split = max(1, min(cdiv(m, 8 * block_m), cdiv(4 * sms, tiles)))
    stages = _stages(cap)
    warps = 8 if dtype == torch.float32 and taps == 9 else 4  # 4 warps spill there
    return Config(block_m, block_n, block_k, num_warps=warps, num_stages=stages, split_m=split)


@functools.lru_cache(maxsize=4096)
def stats_config(m: int, c: int, device: torch.device) -> Config:
    if _on_cpu(device):
        return Config(64, 16, 16)
    return stats_gpu(c)


def stats_gpu(c: int) -> Config:
    return Config(256, _width(c, 32), 16, num_warps=4)
