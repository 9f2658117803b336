"""Measures one job (one model, variant, batch, dtype, device) in its own process.

``python -m bench.worker '<job json>'`` prints one line ``RESULT <row json>`` on stdout.
bench/run.py starts one such process per job, so no variant inherits another's allocator
state, caches or compiled kernels.

Order inside the process: build (seeded), ``warmup`` steps (the first creates the optimizer's
momentum buffers and primes kernel caches), then the memory pass (one step under the probe),
then the timing pass (``steps`` steps, no profiler, median). The probe and the timer never
run together: the profiler slows a step down several times.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

import torch

from bench.variants import TrainStep, model_config, parse_variant
from python_models.max_batch import find_max_batch
from python_models.memory import peak as probe_peak


def _device_name(device: torch.device) -> str:
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


def _max_batch(step: TrainStep, job: dict, first: tuple[int, int]) -> dict:
    """Largest batch whose measured activation peak fits ``budget_bytes``.

    The training CLI's ``--batch-size auto`` search (``python_models.max_batch``), here with
    the activation peak of this job's step as the measure, starting from the job's batch
    (already measured: ``first``). Every probe is a full training step under the probe.
    """
    budget = int(job["max_batch"]["budget_bytes"])

    def measure(n: int) -> int | None:
        step.set_batch(n)
        try:
            return probe_peak(step, step.device).peak_bytes
        except torch.OutOfMemoryError:
            step.opt.zero_grad(set_to_none=False)
            torch.cuda.empty_cache()
            return None

    cap = int(job["max_batch"].get("max_search", 1 << 16))
    result = find_max_batch(measure, budget, cap, start=first[0], known={first[0]: first[1]})
    step.set_batch(first[0])
    return result.as_dict()


def run_job(job: dict) -> dict:
    device = torch.device(job["device"])
    config = model_config(job["model"])
    v = parse_variant(job["variant"])
    row: dict = {
        "variant": job["variant"],
        "model": job["model"],
        "model_label": config.label,
        "image_size": config.image_size,
        "batch": job["batch"],
        "dtype": job["dtype"],
        "device": device.type,
        "device_name": _device_name(device),
        "torch_version": torch.__version__,
        "git_commit": job.get("git_commit"),
        "suite": job.get("suite"),
        "backend": v.get("backend"),
        "memory_mode": v.get("memory"),
        "estimated": False,
    }
    if job.get("estimate") in ("first", "only"):
        from bench.estimate import estimate_activation_bytes

        est = estimate_activation_bytes(config, job["variant"], job["batch"], job["dtype"], device)
        limit = job.get("measure_limit_bytes")
        over = limit is not None and est["peak_activation_bytes"] > limit
        if job["estimate"] == "only" or over:
            row.update(
                estimated=True,
                peak_activation_bytes=est["peak_activation_bytes"],
                floor_bytes=est["floor_bytes"],
                params=est["params"],
                memory_method=est["method"],
                estimate_reason=(
                    f"estimated {est['peak_activation_bytes'] / 2**30:.2f} GiB exceeds the "
                    f"measuring limit {limit / 2**30:.2f} GiB"
                    if over
                    else job.get("reason", "")
                ),
            )
            return row
    step = TrainStep(
        config, job["variant"], job["batch"], job["dtype"], device, seed=job.get("seed", 0)
    )
    row["params"] = step.params
    row["torch_threads"] = torch.get_num_threads()
    t0 = time.perf_counter()
    for _ in range(job.get("warmup", 2)):
        step()
    row["warmup_s"] = time.perf_counter() - t0
    row["floor_bytes"] = step.floor_bytes
    if job.get("memory", True):
        result = probe_peak(step, device)
        row["peak_activation_bytes"] = result.peak_bytes
        row["memory_method"] = result.method
        if job.get("max_batch"):
            row["max_batch"] = _max_batch(step, job, (job["batch"], result.peak_bytes))
    if job.get("steps", 0) > 0:
        times, method = _timed_steps(step, job["steps"])
        row["step_times_s"] = times
        row["step_time_s"] = statistics.median(times)
        row["time_method"] = method
        row["warmup_steps"] = job.get("warmup", 2)
    return row


def main() -> None:
    job = json.loads(sys.argv[1])
    try:
        row = run_job(job)
    except torch.OutOfMemoryError as exc:  # GPU: estimate without allocating instead
        row = {
            "variant": job["variant"],
            "model": job["model"],
            "batch": job["batch"],
            "oom": str(exc).splitlines()[0],
        }
    except Exception as exc:
        traceback.print_exc()
        row = {
            "variant": job["variant"],
            "model": job["model"],
            "batch": job["batch"],
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        }
    print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
