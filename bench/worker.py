"""Measures one job (one model, variant, batch, dtype, device) in its own process.

``python -m bench.worker '<job json>'`` (a ``bench.jobs.Job``) prints one line
``RESULT <row json>`` on stdout. bench/run.py starts one such process per job, so no variant
inherits another's allocator state, caches or compiled kernels.

Order inside the process: build (seeded), ``warmup`` steps (the first creates the optimizer's
momentum buffers, primes kernel caches and, for compiled variants, compiles: its time is
reported as ``first_step_s``), then the memory pass (one step under the probe), then the
timing pass (``steps`` steps, no profiler, median). The probe and the timer never run
together: the profiler slows a step down several times.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

from bench.jobs import Job
from bench.memory import peak as probe_peak
from bench.variants import TrainStep, model_config, parse_variant


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with core and thread counts."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _timed_steps(step: TrainStep, n: int) -> tuple[list[float], str]:
    if step.device.type == "cuda":
        times = []
        for _ in range(n):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(step.device)
            times.append(start.elapsed_time(end) / 1e3)
        return times, "CUDA events around each step, median"
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times, "time.perf_counter around each step, median"


def _max_batch(step: TrainStep, budget: int, first: tuple[int, int]) -> dict:
    """Largest batch whose measured activation peak fits ``budget_bytes``.

    Method: activation memory is affine in the batch, so the probe at two batches gives a
    line and its prediction ``n``; then the probe itself decides: a binary search over the
    batch, started from the bracket around ``n`` (usually two probes: ``n`` fits, ``n+1`` does
    not). Every probe is a full training step at that batch under the memory probe.
    """
    probes: dict[int, int | None] = {first[0]: first[1]}  # None: out of device memory

    def measure(n: int) -> float:
        if n not in probes:
            step.set_batch(n)
            try:
                probes[n] = probe_peak(step, step.device).peak_bytes
            except torch.OutOfMemoryError:
                step.opt.zero_grad(set_to_none=False)
                torch.cuda.empty_cache()
                probes[n] = None
        return math.inf if probes[n] is None else probes[n]

    def fits(n: int) -> bool:
        return measure(n) <= budget

    b1 = first[0]
    b2 = max(1, b1 // 2) if b1 > 1 else 2
    m1, m2 = measure(b1), measure(b2)
    slope = (m1 - m2) / (b1 - b2)
    intercept = m1 - slope * b1
    predicted = max(1, math.floor((budget - intercept) / slope)) if slope > 0 else b1
    limit = 1 << 16
    # Bracket [lo, hi): lo fits, hi does not (lo = 0 means nothing fits yet).
    if fits(predicted):
        lo, hi, gap = predicted, predicted + 1, 1
        while hi <= limit and fits(hi):
            lo, gap = hi, gap * 2
            hi = lo + gap
    else:
        hi, lo, gap = predicted, predicted - 1, 1
        while lo >= 1 and not fits(lo):
            hi, gap = lo, gap * 2
            lo = max(0, hi - gap)
        lo = max(lo, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    step.set_batch(first[0])
    return {
        "budget_bytes": budget,
        "max_batch": lo,
        "linear_prediction": predicted,
        "bytes_per_sample": slope,
        "probes": [
            {"batch": b, "peak_activation_bytes": p, "fits": p is not None and p <= budget}
            for b, p in sorted(probes.items())
        ],
        "method": "probe at 2 batches -> affine fit -> binary search with the probe from the "
        "predicted bracket; each probe one full training step",
    }


def run_job(job: Job) -> dict:
    """Measures ``job`` in this process; the row of the result JSON (bench/README.md)."""
    device = torch.device(job.device)
    config = model_config(job.model)
    v = parse_variant(job.variant)
    row: dict = {
        **job.ident(),
        "model_label": config.label,
        "image_size": config.image_size,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "git_commit": job.git_commit,
        "backend": v.backend,
        "memory_mode": v.memory,
        "compiled": v.compile,
        "estimated": False,
    }
    if job.estimate_only:
        from bench.estimate import estimate_activation_bytes

        est = estimate_activation_bytes(config, job.variant, job.batch, job.dtype, device)
        row.update(
            estimated=True,
            peak_activation_bytes=est["peak_activation_bytes"],
            floor_bytes=est["floor_bytes"],
            params=est["params"],
            memory_method=est["method"],
            estimate_reason=job.reason,
            estimate_s=est["seconds"],
        )
        return row
    step = TrainStep(config, job.variant, job.batch, job.dtype, device, seed=job.seed)
    row["params"] = step.params
    row["torch_threads"] = torch.get_num_threads()
    t0 = time.perf_counter()
    for i in range(job.warmup):
        step()
        _sync(device)
        if i == 0:
            row["first_step_s"] = time.perf_counter() - t0
    row["warmup_s"] = time.perf_counter() - t0
    row["floor_bytes"] = step.floor_bytes
    if job.memory:
        result = probe_peak(step, device)
        row["peak_activation_bytes"] = result.peak_bytes
        row["memory_method"] = result.method
        if job.max_batch_bytes:
            row["max_batch"] = _max_batch(step, job.max_batch_bytes, (job.batch, result.peak_bytes))
    if job.steps > 0:
        times, method = _timed_steps(step, job.steps)
        row["step_times_s"] = times
        row["step_time_s"] = statistics.median(times)
        row["time_method"] = method
        row["warmup_steps"] = job.warmup
        if v.compile and "first_step_s" in row:
            # What the first call costs beyond a steady-state step: tracing and compiling.
            row["compile_s"] = row["first_step_s"] - row["step_time_s"]
    return row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    job = Job.from_json(sys.argv[1])
    try:
        row = run_job(job)
    except torch.OutOfMemoryError as exc:  # GPU: the runner estimates it instead
        row = {**job.ident(), "oom": str(exc).splitlines()[0]}
    except Exception as exc:
        traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else ""
        row = {**job.ident(), "error": f"{type(exc).__name__}: {message}"}
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
