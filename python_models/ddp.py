"""Process-group setup for training under ``torchrun`` (DDP): gloo on CPU, NCCL on GPU.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything here is a no-op and
training runs in one process.
"""

from __future__ import annotations

import datetime
import os
import sys
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


class LaunchError(ValueError):
    """The device or the torchrun environment cannot be used."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device for ``--device`` (``auto``: this rank's GPU if there is one, else CPU).

    Raises ``LaunchError`` for a name that is not a device, a device type other than cpu
    and cuda, or a GPU this machine does not have.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LaunchError(
            f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise LaunchError(f"--device {name}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LaunchError(f"--device {name}: no CUDA GPU is available on this machine")
        count = torch.cuda.device_count()
        if device.index is None:
            device = torch.device("cuda", local_rank % count)
        elif device.index >= count:
            raise LaunchError(f"--device {name}: this machine has {count} CUDA GPU(s)")
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


def cleanup(info: DistInfo, finished: bool = False) -> None:
    """Leave the process group (if this process joined one). After a run every rank
    ``finished``, the ranks first meet at a barrier, so that none tears its connections down
    while a peer still uses them (gloo can abort a process then); after a failure a peer may
    never arrive, so the rank just leaves."""
    if info.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def exit_finished_process() -> None:
    """End this process after a finished distributed run, without tearing the group down.

    For the command line only (``python -m python_models.train`` under torchrun): the ranks
    meet at a barrier, so every collective is done, then the process flushes its output and
    leaves with ``os._exit(0)``. gloo's teardown (``destroy_process_group`` or the
    interpreter's exit) aborted a finished CPU run about once in tens of CI runs, with
    "terminate called without an active exception" and exit status 1 after the summary was
    written; a process that does not tear down cannot abort there. The test helpers'
    ranks (tests/ranks.py) leave through it too. Nothing is left to close: the run log's files
    are closed after each write, checkpoints are written whole, and DataLoader workers notice
    their parent is gone and exit.
    """
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def gather_objects(obj: object, info: DistInfo) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (None on the others); pickled between
    this run's own processes."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in one process)."""
    if info.distributed:
        dist.barrier()


def _collective_device(info: DistInfo) -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU tensors.
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")
