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
import os
import statistics
import sys
import time
import traceback

import torch

from bench.jobs import Job
from bench.variants import TrainStep, model_config, parse_variant
from python_models.max_batch import MemoryBudgetError, find_max_batch
from python_models.memory import peak as probe_peak


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with core and thread counts and torch's CPU capability
    (AVX2, AVX512, ...): "AMD EPYC" alone names CPUs with and without AVX-512, whose oneDNN
    paths (float32 matmul, bfloat16 convolution) and speeds differ."""
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
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {capability})"


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

    The training CLI's ``--batch-size auto`` search (``python_models.max_batch``), here with
    the activation peak of this job's step as the measure, starting from the job's batch
    (already measured: ``first``). Every probe is a full training step under the probe.
    """

    def measure(n: int) -> int | None:
        step.set_batch(n)
        try:
            return probe_peak(step, step.device).peak_bytes
        except torch.OutOfMemoryError:
            step.opt.zero_grad(set_to_none=False)
            torch.cuda.empty_cache()
            return None

    try:
        result = find_max_batch(
            measure, budget, 1 << 16, start=first[0], known={first[0]: first[1]}
        )
    except MemoryBudgetError as exc:  # not even batch 1 fits: a result, not a failure
        return {"budget_bytes": budget, "max_batch": 0, "note": str(exc)}
    finally:
        step.set_batch(first[0])
    return result.as_dict()


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
    _warm_up(step, job, row)
    if job.memory:
        result = probe_peak(step, device)
        row["peak_activation_bytes"] = result.peak_bytes
        row["memory_method"] = result.method
        row["floor_bytes"] = step.floor_bytes  # of the probed step, at the job's batch
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
    row.setdefault("floor_bytes", step.floor_bytes)
    return row


def _warm_up(step: TrainStep, job: Job, row: dict) -> None:
    """``job.warmup`` steps (at ``job.warmup_batch`` if set), then back to the job's batch."""
    if job.warmup_batch is not None:
        step.set_batch(job.warmup_batch)
        row["warmup_batch"] = job.warmup_batch
    t0 = time.perf_counter()
    for i in range(job.warmup):
        step()
        _sync(step.device)
        if i == 0:
            row["first_step_s"] = time.perf_counter() - t0
    row["warmup_s"] = time.perf_counter() - t0
    if job.warmup_batch is not None:
        step.set_batch(job.batch)
        step.block_out_bytes.clear()  # the floor is of the job's batch


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
