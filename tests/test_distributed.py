"""DDP training on CPU (gloo): two processes with sync BN train like one on the whole batch, the
CLI under torchrun, exact resume on every rank; FSDP2 over the efficient blocks. Sync BN itself:
tests/test_sync_bn.py.

The two-process tests start real process groups on a free loopback port (127.0.0.1 only).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port, torch_threads
from ranks import spawn_ranks
from torch import nn

from dense_ext.sync_bn import SyncBatchNorm, enable_sync_bn
from python_models import densenet_bc

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return densenet_bc(depth=10, growth_rate=4, num_classes=3, efficient=True, backend="reference")


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


# ----------------------------------------------------------------------------- two processes


def _worker(rank: int, out: str) -> None:
    losses, state = _train_ddp(rank)
    if rank == 0:
        torch.save({"losses": losses, "state": state}, out)


def _train_ddp(rank: int):
    model = enable_sync_bn(_tiny_model())
    # Fused transitions and head stay (tests/test_sync_bn.py checks them exactly).
    assert model.features.transition1.stats_sync is not None
    assert isinstance(model.features.norm5, SyncBatchNorm) and model.efficient_head
    assert model.features.denseblock1.stats_sync is not None
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x, y = _global_batch()
    half = slice(4 * rank, 4 * rank + 4)
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(ddp(x[half]), y[half])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def _train_single(model: nn.Module | None = None):
    model = _tiny_model() if model is None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x, y = _global_batch()
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.slow
def test_two_process_sync_bn_matches_one_process_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "rank0.pt")
    spawn_ranks(_worker, out, world=WORLD)
    got = torch.load(out, weights_only=True)
    want_losses, want_state = _train_single()
    torch.testing.assert_close(got["losses"], want_losses, rtol=1e-5, atol=1e-6)
    assert got["state"].keys() == want_state.keys()
    for key, want in want_state.items():
        torch.testing.assert_close(got["state"][key], want, rtol=1e-4, atol=1e-5, msg=key)


def _fsdp_worker(rank: int, out: str) -> None:
    """FSDP2 (``fully_shard``) over every dense block and the model; each rank trains on the
    whole batch, so the sharded steps are one process's steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import dense_ext.function

    model = _tiny_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for name, module in model.features.named_children():
        if name.startswith("denseblock"):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fused = []
    forward = dense_ext.function.DenseBlockFunction.forward

    def counted(*args, **kwargs):
        fused.append(1)
        return forward(*args, **kwargs)

    dense_ext.function.DenseBlockFunction.forward = staticmethod(counted)
    losses, state = _train_single(model)
    # Parameters are sharded (all ranks gather them), buffers not.
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
    if rank == 0:
        torch.save({"losses": losses, "state": state, "fused": len(fused)}, out)


@pytest.mark.slow
def test_fsdp2_sharded_blocks_train_like_one_process(tmp_path):
    """FSDP2 shards each efficient block's parameters and gathers them around its forward and
    backward (hooks on the block itself, which leave it fused): two ranks on the same batch
    end bit for bit where one process does, and every block ran fused."""
    out = str(tmp_path / "rank0.pt")
    spawn_ranks(_fsdp_worker, out, world=WORLD)
    got = torch.load(out, weights_only=True)
    # One thread, as each rank runs (tests/ranks.py): the same reductions, so bit for bit (with
    # two threads here the first loss moves by an ulp).
    with torch_threads(1):
        want_losses, want_state = _train_single()
    assert got["fused"] == 3 * 3  # three blocks, three steps
    assert got["losses"] == want_losses
    assert got["state"].keys() == want_state.keys()
    for key, want in want_state.items():
        assert torch.equal(got["state"][key], want), key


class _Crash(Exception):
    """The machine goes down (raised on every rank right after a checkpoint)."""


def _phases(tmp: str) -> list[tuple[list[str], bool]]:
    common = [
        *("--model", "densenet_bc_10", "--growth-rate", "4", "--image-size", "8"),
        *("--batch-size", "8", "--drop-rate", "0.2", "--epochs", "2", "--steps-per-epoch", "3"),
        "--quiet",
    ]
    return [
        ([*common, "--out-dir", f"{tmp}/full"], False),  # uninterrupted
        ([*common, "--save-steps", "2", "--out-dir", f"{tmp}/run"], True),  # dies at step 2
        (["--resume", f"{tmp}/run", "--quiet"], False),  # continues inside epoch 1
    ]


def _train_worker(rank: int, ports: list[int], tmp: str) -> None:
    # Each rank runs the CLI in-process, as torchrun would start it, three times in a row.
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1"
    )
    from python_models import train, trainer

    real_save = trainer.save_checkpoints

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Crash

    for port, (argv, crash) in zip(ports, _phases(tmp)):
        os.environ["MASTER_PORT"] = str(port)
        trainer.save_checkpoints = save_then_crash if crash else real_save
        try:
            train.run(train.parse_args(argv))
        except _Crash:
            assert crash
    trainer.save_checkpoints = real_save


@pytest.mark.slow
def test_two_process_resume_with_dropout_is_bit_for_bit_on_every_rank(tmp_path):
    ports = [free_port() for _ in range(3)]
    mp.spawn(_train_worker, args=(ports, str(tmp_path)), nprocs=WORLD, join=True)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert full["step"] == resumed["step"] == 6
    # The global loss of every step: each rank's dropout masks and batches enter it.
    assert _read_lines(tmp_path / "run" / "steps.csv") == _read_lines(
        tmp_path / "full" / "steps.csv"
    )
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    # Every rank's generators end where the uninterrupted run's did (and differ by rank).
    states = [[r["rng"]["torch"] for r in s["ranks"]] for s in (full, resumed)]
    assert len(states[0]) == len(states[1]) == WORLD
    assert all(torch.equal(a, b) for a, b in zip(*states))
    assert not torch.equal(states[0][0], states[0][1])


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _read_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "steps.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _cli(tmp_path: Path, name: str, batch: int) -> list[str]:
    return [
        "-m",
        "python_models.train",
        "--model",
        "densenet_bc_10",
        "--growth-rate",
        "4",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "3",
        "--batch-size",
        str(batch),
        "--image-size",
        "8",
        "--out-dir",
        str(tmp_path / name),
        "--quiet",
        "--no-checkpoint",
        "--backend",
        "reference",
    ]


@pytest.mark.slow
def test_torchrun_sync_bn_matches_one_process(tmp_path):
    # TMPDIR: torchrun leaves an empty torchelastic_* folder behind in it on every run.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    two = subprocess.run(
        [*torchrun, *_cli(tmp_path, "ddp", 8), "--sync-bn"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and "sync BN" in two.stdout
    one = subprocess.run(
        [sys.executable, *_cli(tmp_path, "single", 16)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    want, got = _read_losses(tmp_path / "single"), _read_losses(tmp_path / "ddp")
    assert len(got) == len(want) == 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _failing_worker(rank: int) -> None:
    if rank == 1:
        raise AssertionError("rank 1 fails on purpose")


@pytest.mark.slow
def test_a_failing_rank_fails_the_spawning_test():
    # tests/ranks.py leaves successful ranks with os._exit(0): a failure must still surface,
    # as rank 1's own error or as rank 0's barrier losing its peer, whichever mp.spawn sees first.
    with pytest.raises(mp.ProcessRaisedException, match="fails on purpose|Connection"):
        spawn_ranks(_failing_worker, world=WORLD)
