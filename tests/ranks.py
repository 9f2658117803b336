"""Run a test's worker in several fresh processes joined in one gloo process group.

One place for the process-group lifecycle the multi-process tests share. The rendezvous goes
through a file (no TCP port to race for). A rank whose worker succeeded meets the others at a
barrier and then leaves with ``os._exit(0)``, skipping the process group's teardown: gloo's
context destruction right after a barrier can abort a participant (pytorch/gloo#155), which
CI saw now and then as "terminate called without an active exception" in a rank whose work
had passed. A rank whose worker raised tears down normally, so its exception reaches
``mp.spawn`` and the test fails with it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from python_models.ddp import exit_finished_process


def spawn_ranks(worker: Callable[..., None], *args: Any, world: int = 2) -> None:
    """``worker(rank, *args)`` in ``world`` spawned processes inside a gloo process group
    (one thread each); raises when any rank fails. ``worker`` must be a module-level function
    (it is pickled by name)."""
    with tempfile.TemporaryDirectory() as folder:
        init = f"file://{folder}/rendezvous"
        mp.spawn(_rank_main, args=(worker, world, init, args), nprocs=world, join=True)


def _rank_main(
    rank: int, worker: Callable[..., None], world: int, init: str, args: tuple[Any, ...]
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        worker(rank, *args)
    except BaseException:
        dist.destroy_process_group()  # (a peer may never arrive at a barrier: just leave)
        raise
    exit_finished_process()
