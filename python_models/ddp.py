"""Process-group setup for training under ``torchrun`` (DDP): gloo on CPU, NCCL on GPU.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is a no-op and
training runs in one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, checkpoints and the progress bar."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device for ``--device`` (``auto``: this rank's GPU if there is one, else CPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_distributed(device_name: str = "auto", timeout_s: float = 3600.0) -> DistInfo:
    """Join the process group torchrun describes, or return a one-process ``DistInfo``.

    The backend follows the device: NCCL for CUDA, gloo for CPU. The timeout is long
    because the other ranks wait while rank 0 runs ``--batch-size auto``'s probes.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name, local_rank)
    if world_size <= 1:
        return DistInfo(device=device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup(info: DistInfo) -> None:
    """Leave the process group (if this process joined one)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` when distributed, else unchanged."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for checkpoints and evaluation)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few scalars (loss sums, counts) over all ranks."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(info))
    dist.all_reduce(t)
    return t.tolist()


def broadcast_int(value: int, info: DistInfo) -> int:
    """Rank 0's ``value`` on every rank (e.g. the batch size rank 0 found)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device(info))
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in one process)."""
    if info.distributed:
        dist.barrier()


def _collective_device(info: DistInfo) -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU tensors.
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")
