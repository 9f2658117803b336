"""Synchronised batch norm and DDP on CPU (gloo): two processes must equal one on the whole batch.

The two-process tests start real process groups on a free loopback port (127.0.0.1 only).
"""

from __future__ import annotations

import copy
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dense_ext.backends.base import LOCAL
from dense_ext.distributed import (
    DistributedStatsSync,
    SyncBatchNorm,
    SyncTransition,
    enable_sync_bn,
)
from python_models import densenet_bc

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return densenet_bc(depth=10, growth_rate=4, num_classes=3, efficient=True, backend="reference")


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


# ----------------------------------------------------------------------------- one process


def test_sync_batch_norm_without_peers_is_batch_norm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5, momentum=None)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    sync = SyncBatchNorm.from_batch_norm(copy.deepcopy(bn), LOCAL)
    x = (torch.randn(4, 5, 3, 3) * 3 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    grad = torch.randn(4, 5, 3, 3)
    for _ in range(2):  # twice: momentum=None averages over num_batches_tracked
        (bn(x) * grad).sum().backward()
        (sync(x2) * grad).sum().backward()
    torch.testing.assert_close(sync(x2), bn(x))
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sync.weight.grad, bn.weight.grad)
    torch.testing.assert_close(sync.bias.grad, bn.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(sync, name), getattr(bn, name))
    sync.eval()
    bn.eval()
    torch.testing.assert_close(sync(x2), bn(x))


def test_sync_batch_norm_is_stable_with_a_large_mean():
    # Against float64, its float32 error is at most about that of nn.BatchNorm2d in float32.
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3, 3) * 0.5 + 4000
    grad = torch.randn(4, 5, 3, 3)
    outputs = {}
    for name, module, dtype in (
        ("sync", SyncBatchNorm(5), torch.float32),
        ("bn", nn.BatchNorm2d(5), torch.float32),
        ("exact", nn.BatchNorm2d(5).double(), torch.float64),
    ):
        xi = x.to(dtype).detach().clone().requires_grad_()
        y = module(xi)
        (y * grad.to(dtype)).sum().backward()
        outputs[name] = (y.double(), xi.grad.double(), module.running_var.double())
    for i, what in enumerate(("output", "input gradient", "running variance")):
        err_sync = (outputs["sync"][i] - outputs["exact"][i]).abs().max()
        err_bn = (outputs["bn"][i] - outputs["exact"][i]).abs().max()
        assert err_sync <= 2 * err_bn + 1e-6, (what, err_sync.item(), err_bn.item())


def test_enable_sync_bn_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        enable_sync_bn(_tiny_model())


# ----------------------------------------------------------------------------- two processes


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        _check_stats_merge(rank)
        _check_backend_refusal()
        losses, state = _train_ddp(rank)
        if rank == 0:
            torch.save({"losses": losses, "state": state}, out)
    finally:
        dist.destroy_process_group()


def _check_stats_merge(rank: int) -> None:
    # Unequal shares (2 and 6 samples) and a mean 1e4 times the spread: the merge must still
    # give the whole batch's statistics to float32 rounding.
    g = torch.Generator().manual_seed(2)
    full = torch.randn(8, 5, 3, 3, generator=g, dtype=torch.float64) * 0.5 + 5000
    part = full[:2] if rank == 0 else full[2:]
    var, mean = torch.var_mean(part.float(), dim=(0, 2, 3), correction=0)
    sync = DistributedStatsSync()
    g_mean, g_var = sync.stats(mean, var, part.numel() // 5)
    want_var, want_mean = torch.var_mean(full, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(g_mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_var.double(), want_var, rtol=2e-3, atol=0)
    assert sync.world_count(part.numel() // 5) == 72
    sums = sync.grad_sums(torch.full((2, 5), float(rank + 1)))
    assert torch.equal(sums, torch.full((2, 5), 3.0))


def _check_backend_refusal() -> None:
    from dense_ext.backends import BackendUnavailableError

    model = _tiny_model()
    model.features.denseblock1.backend = "cpp"
    try:
        enable_sync_bn(model)
    except (ValueError, BackendUnavailableError) as exc:
        assert "cpp" in str(exc)
    else:
        raise AssertionError("enable_sync_bn accepted a backend without sync support")


def _train_ddp(rank: int):
    model = enable_sync_bn(_tiny_model())
    assert isinstance(model.features.transition1, SyncTransition)
    assert isinstance(model.features.norm5, SyncBatchNorm) and not model.efficient_head
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


def _train_single():
    model = _tiny_model()
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
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)
    want_losses, want_state = _train_single()
    torch.testing.assert_close(got["losses"], want_losses, rtol=1e-5, atol=1e-6)
    assert got["state"].keys() == want_state.keys()
    for key, want in want_state.items():
        torch.testing.assert_close(got["state"][key], want, rtol=1e-4, atol=1e-5, msg=key)


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
    ports = [_free_port() for _ in range(3)]
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
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
