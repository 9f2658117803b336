"""The largest batch whose training step fits a memory budget.

One search for both users of the question: the training CLI's ``--batch-size auto`` (the
whole step: parameters, gradients, optimiser state and activations, against the device's
memory) and the benchmark's "max batch in 1 GiB" (activation memory only, ``bench.worker``).
Each passes its own ``measure(batch) -> bytes``; both measure with ``python_models.memory``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dense_ext.backends.base import LOCAL
from python_models.memory import GIB, peak

METHOD = (
    "secant search: each probe aims where the line through the two nearest measurements "
    "meets the budget (memory is affine in the batch), bisection when a guess leaves the "
    "bracket; every probe is one full training step under the memory probe"
)


class MemoryBudgetError(ValueError):
    """Not even the smallest batch fits the memory budget."""


@dataclass
class SearchResult:
    """What ``find_max_batch`` found, and every probe it took on the way."""

    max_batch: int
    budget_bytes: int
    probes: dict[int, int | None] = field(default_factory=dict)  # None: out of memory

    @property
    def bytes_per_sample(self) -> float | None:
        """Slope of the least-squares line through the measured probes (None below two)."""
        pts = [(b, m) for b, m in self.probes.items() if m is not None]
        if len(pts) < 2:
            return None
        mb = sum(b for b, _ in pts) / len(pts)
        mm = sum(m for _, m in pts) / len(pts)
        var = sum((b - mb) ** 2 for b, _ in pts)
        return sum((b - mb) * (m - mm) for b, m in pts) / var if var else None

    def as_dict(self) -> dict:
        """A JSON-ready record (the benchmark stores it in its row)."""
        return {
            "budget_bytes": self.budget_bytes,
            "max_batch": self.max_batch,
            "bytes_per_sample": self.bytes_per_sample,
            "probes": [
                {"batch": b, "bytes": m, "fits": m is not None and m <= self.budget_bytes}
                for b, m in sorted(self.probes.items())
            ],
            "method": METHOD,
        }


def find_max_batch(
    measure: Callable[[int], int | None],
    budget: int,
    cap: int,
    start: int = 2,
    known: dict[int, int | None] | None = None,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """The largest batch in ``[1, cap]`` whose ``measure(batch)`` (bytes; None: out of
    memory) is at most ``budget``.

    Starts at ``start`` (searching down from it when it does not fit); ``known`` holds
    measurements already taken, which are not repeated. Memory grows linearly with the
    batch, so each probe aims at the batch where the line through the two nearest
    measurements meets the budget (secant steps); bisection takes over when a guess falls
    outside the bracket. Typically 4-6 probes. Raises ``MemoryBudgetError`` when batch 1
    does not fit.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    result = SearchResult(0, budget, dict(known or {}))

    def fits(b: int) -> bool:
        if b not in result.probes:
            result.probes[b] = measure(b)
            if log is not None:
                log(f"  batch {b:>6}: {_fmt_bytes(result.probes[b])}")
        bytes_ = result.probes[b]
        return bytes_ is not None and bytes_ <= budget

    start = max(1, min(start, cap))
    # The bracket: lo fits (0: nothing known to fit yet), hi does not (or is past the cap).
    lo, hi = (start, cap + 1) if fits(start) else (0, start)
    while hi - lo > 1:
        guess = _secant_guess(result.probes, lo, hi, budget)
        if not lo < guess < hi:
            guess = (lo + hi) // 2
        if fits(guess):
            lo = guess
        else:
            hi = guess
    if lo == 0:
        raise MemoryBudgetError(
            f"batch 1 needs {_fmt_bytes(result.probes[1])}, more than the memory budget "
            f"of {budget / GIB:.3g} GiB"
        )
    result.max_batch = lo
    return result


def _secant_guess(probes: dict[int, int | None], lo: int, hi: int, budget: int) -> int:
    # The line through the bracket's ends when both were measured (regula falsi), else
    # through the nearest measured points; with fewer than two, double up or halve down.
    points = {b: m for b, m in probes.items() if m is not None}
    ends = [b for b in (lo, hi) if b in points]
    others = sorted((b for b in points if b not in ends), key=lambda b: abs(b - (lo or hi)))
    pair = (ends + others)[:2]
    if len(pair) < 2:
        return 2 * lo if lo else hi // 2
    b1, b2 = pair
    slope = (points[b2] - points[b1]) / (b2 - b1)
    if slope <= 0:
        return 2 * lo if lo else hi // 2
    if lo in points:  # at least one step up from the batch known to fit
        return lo + max(1, int((budget - points[lo]) // slope))
    anchor = min(pair, key=lambda b: abs(b - hi))
    return anchor + int((budget - points[anchor]) // slope)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "out of memory"
    return f"{n / GIB:.3f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- training step


class _Precision(Protocol):
    memory_format: torch.memory_format

    def autocast(self, device: torch.device): ...


def state_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def local_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose synchronised batch norms (if any) are local."""
    synced = {m: m.stats_sync for m in model.modules() if hasattr(m, "stats_sync")}
    try:
        for m in synced:
            m.stats_sync = LOCAL  # process groups cannot (and must not) be copied
        # The memo keeps LOCAL itself (not a copy): blocks test ``sync is LOCAL``.
        return copy.deepcopy(model, memo={id(LOCAL): LOCAL})
    finally:
        for m, sync in synced.items():
            m.stats_sync = sync


def step_bytes(
    model: nn.Module,
    batch: int,
    sample_shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
    precision: _Precision,
) -> int | None:
    """Bytes one training step at ``batch`` needs: parameters, buffers, gradients, momentum,
    input and the activation peak. None if it runs out of memory (CUDA).

    ``precision`` gives the autocast context and the memory format of the input. Runs on a
    copy of the model with its own SGD optimiser and forked RNG, so training is not affected
    by the probe; the copy's batch norms are local (only one rank probes).
    """
    probe = local_copy(model).train()
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0, momentum=0.9, nesterov=True)

    def step() -> None:
        x = torch.randn(batch, *sample_shape, device=device)
        x = x.contiguous(memory_format=precision.memory_format)
        y = torch.randint(0, num_classes, (batch,), device=device)
        with precision.autocast(device):
            loss = F.cross_entropy(probe(x), y)
        loss.backward()
        optimizer.step()

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        try:
            return state_bytes(probe) + peak(step, device).peak_bytes
        except torch.OutOfMemoryError:
            return None
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
