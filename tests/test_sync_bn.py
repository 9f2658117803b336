"""Synchronised batch norm (dense_ext.sync_bn): two gloo processes on their shares of a batch
equal one process on the whole batch, to float64 rounding, for dense blocks, fused
transitions, the fused head and a whole efficient model: outputs, input gradients, parameter
gradients (summed over processes, as DDP's average times the world size) and running
statistics, over two steps (momentum and ``momentum=None``), then in evaluation. Under sync BN
the fused modules stay fused: a step saves the same bytes for backward as without sync.

The two-process tests start real process groups on a free loopback port (127.0.0.1 only).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, FusedHead, assert_close
from naive import randomize_bn
from ranks import spawn_ranks
from torch import nn

from dense_ext import EfficientDenseBlock, EfficientTransition
from dense_ext.backends.base import LOCAL, StatsSync
from dense_ext.sync_bn import DistributedStatsSync, SyncBatchNorm, enable_sync_bn
from python_models import densenet_bc

WORLD = 2
SHARES = (3, 5)  # unequal: the merge must weight each process by its count
DTYPE = torch.float64


def _transition() -> nn.Module:
    t = EfficientTransition(7, 3)
    t.norm.momentum = None  # cumulative average: the factor depends on num_batches_tracked
    return t


def _model() -> nn.Module:
    return densenet_bc(depth=10, growth_rate=3, num_classes=4, efficient=True, backend="reference")


# name -> (builder, input shape without the batch)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "bottleneck block": (
        lambda: EfficientDenseBlock(3, 5, 4, bn_size=2, backend="reference"),
        (5, 5, 6),
    ),
    "plain block, memory=min": (
        lambda: EfficientDenseBlock(2, 5, 4, bn_size=0, memory="min", backend="reference"),
        (5, 4, 4),
    ),
    "transition": (_transition, (7, 5, 6)),
    "head": (lambda: FusedHead(6), (6, 3, 5)),
    "model": (_model, (3, 8, 8)),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    module = CASES[name][0]().to(DTYPE)
    randomize_bn(module, torch.Generator().manual_seed(1))
    return module


def _batches(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` and its output gradient; the processes' shares differ in
    mean and spread, so statistics that are not merged give other numbers."""
    g = torch.Generator().manual_seed(10 + step)
    shape = CASES[name][1]
    x = torch.randn(sum(SHARES), *shape, generator=g, dtype=DTYPE)
    x[: SHARES[0]] = x[: SHARES[0]] * 2 + 1
    module = _build(name).eval()
    with torch.no_grad():
        out_shape = module(x).shape
    return x, torch.randn(out_shape, generator=g, dtype=DTYPE)


def _share(t: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SHARES[:rank])
    return t[start : start + SHARES[rank]]


def _run(module: nn.Module, name: str, rank: int | None) -> dict:
    """Two training steps and one evaluation of ``module`` on this process's share (rank
    None: the whole batch). Returns what each step showed."""
    seen: dict = {}
    for step in range(2):
        x, grad = _batches(name, step)
        if rank is not None:
            x, grad = _share(x, rank), _share(grad, rank)
        x = x.clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        out = module(x)
        seen[f"buffers after forward {step}"] = _buffers(module)
        out.backward(grad)
        seen[f"output {step}"] = out.detach().clone()
        seen[f"input gradient {step}"] = x.grad
        for pname, p in module.named_parameters():
            seen[f"grad of {pname} {step}"] = p.grad.clone()
        seen[f"buffers after backward {step}"] = _buffers(module)
    x, _ = _batches(name, 2)
    with torch.no_grad():
        seen["evaluation output"] = module.eval()(x if rank is None else _share(x, rank))
    return seen


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_hook_changes_nothing_in_the_fused_functions(dtype):
    # A StatsSync that merges nothing (the base class, but not the LOCAL instance) takes the
    # synchronised code path of the transition and head; it must give the local numbers.
    from dense_ext.backends.base import StatsSync

    torch.manual_seed(0)
    t = EfficientTransition(6, 4)
    randomize_bn(t)
    twin = copy.deepcopy(t)
    twin.stats_sync = StatsSync()
    x = (torch.randn(4, 6, 5, 7) * 2 + 1).to(dtype)
    grad = torch.randn(4, 4, 2, 3)
    results = []
    for module in (t, twin):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = module(xi)
        out.float().backward(grad)
        grads = [p.grad for p in module.parameters()]
        results.append([out.float(), xi.grad.float(), *grads, *module.norm.buffers()])
    # Relative to each tensor's largest value: float32 rounding, or two bfloat16 ulps.
    tol = 1e-5 if dtype == torch.float32 else 2 * 2.0**-8
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a.float(), b.float(), tol, f"tensor {i}")


def test_enable_sync_bn_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        enable_sync_bn(_model())


# ----------------------------------------------------------------------------- two processes


def _worker(rank: int, out: str) -> None:
    _check_stats_merge(rank)
    _check_backend_refusal()
    results = {name: _run(enable_sync_bn(_build(name)), name, rank) for name in CASES}
    results["structure"] = _check_fused_and_saved_bytes(rank)
    torch.save(results, f"{out}/rank{rank}.pt")


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

    model = _model()
    model.features.denseblock1.backend = "cpp"
    try:
        enable_sync_bn(model)
    except (ValueError, BackendUnavailableError) as exc:
        assert "cpp" in str(exc)
    else:
        raise AssertionError("enable_sync_bn accepted a backend without sync support")


def _check_fused_and_saved_bytes(rank: int) -> dict:
    """The synchronised model keeps its fused transitions and head, and a forward saves as
    many bytes for backward as the same model without sync (float32, this rank's share)."""
    local = densenet_bc(depth=22, growth_rate=4, num_classes=4, efficient=True, backend="reference")
    synced = enable_sync_bn(copy.deepcopy(local))
    assert isinstance(synced.features.transition1, EfficientTransition)
    assert synced.features.transition1.stats_sync is synced.features.denseblock1.stats_sync
    assert isinstance(synced.features.norm5, SyncBatchNorm) and synced.efficient_head
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(rank))
    return {"local": _saved_bytes(local, x), "synced": _saved_bytes(synced, x)}


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    spawn_ranks(_worker, str(tmp_path), world=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in CASES:
        want = _run(_build(name), name, None)
        got = [r[name] for r in ranks]
        assert got[0].keys() == want.keys(), name
        for key, expected in want.items():
            what = f"{name}: {key}"
            if key.startswith("buffers"):
                for buf, value in expected.items():
                    for r in range(WORLD):  # every process holds the global statistics
                        actual = got[r][key][buf]
                        if value.is_floating_point():
                            assert_close(actual, value, TOLERANCE[DTYPE], f"{what} {buf} ({r})")
                        else:
                            assert torch.equal(actual, value), f"{what} {buf} ({r})"
            elif key.startswith("grad of"):  # local sums; DDP's average is their mean
                actual = sum(g[key] for g in got)
                assert_close(actual, expected, TOLERANCE[DTYPE], what)
            else:  # per-sample outputs and input gradients: the shares, concatenated
                actual = torch.cat([g[key] for g in got])
                assert_close(actual, expected, TOLERANCE[DTYPE], what)
    for r in range(WORLD):
        saved = ranks[r]["structure"]
        assert saved["synced"] == saved["local"], saved


def test_unsynchronised_shares_would_differ():
    # The check above is not vacuous: without merging, the shares' statistics differ.
    name = "transition"
    whole = _run(_build(name), name, None)
    first = _run(_build(name), name, 0)
    n = SHARES[0]
    err = (first["output 0"] - whole["output 0"][:n]).abs().max()
    assert err > 1e-3
    assert not F.mse_loss(first["evaluation output"], whole["evaluation output"][:n]) < 1e-20


def test_bench_verdict_compares_like_for_like():
    # bench/sync_bn.py: sync BN passes when each rank is within the tolerance of the single
    # process on the same (synchronised) code path and not above the plain single process.
    from bench.sync_bn import summarize

    def rows(sync_bn_bytes):
        single = [("single", 100), ("single-sync-path", 80), ("single-cpp", 50)]
        return [{"setting": s, "rank": 0, "peak_activation_bytes": b} for s, b in single] + [
            {"setting": "ddp-sync-bn", "rank": r, "peak_activation_bytes": b}
            for r, b in enumerate(sync_bn_bytes)
        ]

    assert summarize(rows([80, 84]), 0.10)["within_tolerance"]
    assert not summarize(rows([80, 97]), 0.10)["within_tolerance"]  # 1.21x the like-for-like
    assert not summarize(rows([70, 80]), 0.10)["within_tolerance"]  # 0.875x: not equal either
    summary = summarize(rows([80, 84]), 0.10)
    assert summary["sync_bn_ratio_to_single"] == [0.8, 0.84]


class _CountingSync(StatsSync):
    """Merges nothing, counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def stats(self, mean, var, count):
        self.calls += 1
        return mean, var


def test_block_syncs_only_while_training_like_sync_batch_norm():
    # nn.SyncBatchNorm in eval with batch statistics (track_running_stats=False) stays local.
    # (The reference backend is the one with the sync hook: enable_sync_bn refuses cpp.)
    block = EfficientDenseBlock(2, 4, bn_size=2, growth_rate=3, drop_rate=0.0, backend="reference")
    for bn in block.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    block.stats_sync = _CountingSync()
    x = torch.randn(3, 4, 5, 5)
    block.eval()(x)
    assert block.stats_sync.calls == 0
    block.train()(x)
    assert block.stats_sync.calls > 0
