"""Memory probes: peak live allocator bytes during a piece of work, above what was live before.

One instrument for the benchmark's activation memory and max batch (``bench``) and for the
training CLI's ``--batch-size auto`` (``python_models.max_batch``).

CPU: there is no ``torch.cuda.max_memory_allocated`` for the c10 CPU allocator, so the probe runs
the work under ``torch.profiler.profile(profile_memory=True)``. The c10 CPU allocator reports every
allocation and free to the profiler, whoever asked for it: Python, an ATen kernel's internal
workspace (e.g. the im2col buffer of a convolution), or a C++ extension calling ``at::empty``.
The probe replays the ``[memory]`` events in time order and keeps the running maximum of the
net bytes: the peak live bytes above the level when profiling started. Memory that was live
before (parameters, optimizer state, gradients, input) is not counted; memory allocated
during the work and never freed is counted while it is live.

What the probe does not see: memory that bypasses the c10 allocator (a library calling
``malloc`` directly, e.g. a BLAS thread's private scratch). Those allocations are the same for
the naive and the efficient model (same GEMM library), and small.

GPU: ``torch.cuda.reset_peak_memory_stats()`` then ``max_memory_allocated() - memory_allocated()``
around the synchronised work.

The profiler slows the work down several times: never time a step under the CPU probe.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

GIB = 1024**3


@dataclass
class ProbeResult:
    """What a probe saw while the work ran."""

    peak_bytes: int  # max live bytes above the starting level during the work
    end_bytes: int  # net bytes still live (allocated during the work) at its end
    events: int  # allocator events seen (allocations + frees); -1 on CUDA
    method: str


@contextlib.contextmanager
def _quiet_stderr():
    """Silences the C-level stderr (fd 2) and Python warnings for the duration.

    Kineto prints start/stop lines and, without a GPU, a harmless device-count error when the
    profiler starts and stops. They carry nothing about the measurement; only the profiler's
    start and stop run under this, never the measured work.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak(work: Callable[[], object]) -> ProbeResult:
    """Peak live bytes of the c10 CPU allocator while ``work()`` runs, above the starting level."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        work()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    events = prof.profiler.kineto_results.events()
    deltas = [
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(events)
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    deltas.sort()
    live = peak_bytes = 0
    for _, _, nbytes in deltas:
        live += nbytes
        peak_bytes = max(peak_bytes, live)
    method = "torch.profiler memory events (c10 CPU allocator)"
    return ProbeResult(peak_bytes, live, len(deltas), method)


def cuda_peak(work: Callable[[], object], device: torch.device) -> ProbeResult:
    """``max_memory_allocated`` above the level before ``work()``, synchronised."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    work()
    torch.cuda.synchronize(device)
    peak_bytes = torch.cuda.max_memory_allocated(device) - before
    end = torch.cuda.memory_allocated(device) - before
    method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
    return ProbeResult(peak_bytes, end, -1, method)


def peak(work: Callable[[], object], device: torch.device | str) -> ProbeResult:
    """The probe of ``device``'s type (``cpu_peak`` or ``cuda_peak``) around ``work()``."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak(work, device)
    if device.type == "cpu":
        return cpu_peak(work)
    raise ValueError(f"no memory probe for device type {device.type!r}")


def self_test() -> dict:
    """Checks the CPU probe against allocations of known size; returns what it saw.

    1. Python-level: 1 MiB, then 3 MiB, free the 1 MiB, then 2 MiB: the peak must be 5 MiB
       exactly and nothing may remain.
    2. Inside an ATen C++ kernel: a float64 3x3 convolution runs ``slow_conv2d``, which
       allocates an im2col buffer of ``C*9*H*W`` elements internally and frees it before
       returning. The probe must see a peak of at least output + that buffer, while only the
       output is live at the end.
    Raises AssertionError if the probe misses either.
    """
    mib = 1 << 20

    def known():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(3 * mib, dtype=torch.uint8)
        del a
        c = torch.empty(2 * mib, dtype=torch.uint8)
        del b, c

    r1 = cpu_peak(known)
    assert r1.peak_bytes == 5 * mib and r1.end_bytes == 0, f"probe self-test 1 failed: {r1}"

    x = torch.randn(1, 16, 64, 64, dtype=torch.float64)
    w = torch.randn(8, 16, 3, 3, dtype=torch.float64)
    keep = []
    r2 = cpu_peak(lambda: keep.append(torch.nn.functional.conv2d(x, w, padding=1)))
    out_bytes = keep[0].numel() * 8
    columns = 16 * 9 * 64 * 64 * 8
    assert r2.end_bytes == out_bytes, f"probe self-test 2 (end) failed: {r2}, output {out_bytes}"
    assert r2.peak_bytes >= out_bytes + columns, (
        f"probe self-test 2 failed: peak {r2.peak_bytes} < output {out_bytes} + im2col {columns}"
    )
    return {
        "known_allocations_peak_bytes": r1.peak_bytes,
        "known_allocations_expected_bytes": 5 * mib,
        "aten_internal_peak_bytes": r2.peak_bytes,
        "aten_internal_lower_bound_bytes": out_bytes + columns,
        "passed": True,
    }


# ----------------------------------------------------------------------------- budgets


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(device: torch.device, processes: int = 1) -> int:
    """The GPU's free memory, or half of the available RAM shared by ``processes``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_ram_bytes() // 2 // processes


def current_memory(device: torch.device) -> str:
    """Memory for progress lines: peak allocated on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / GIB:.2f}G"
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return f"{pages * os.sysconf('SC_PAGE_SIZE') / GIB:.2f}G"
    except (OSError, ValueError, IndexError):
        return "?"


if __name__ == "__main__":
    print(self_test())
