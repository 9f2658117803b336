"""A torch.profiler trace of one training step per backend, for reading where the time goes.

    python -m bench.profile_step --device cuda --out DIR      # bench/gpu_suite.sh's profile step
    python -m bench.profile_step --device cpu --model densenet_bc_16 --batch 2 --out DIR

For each variant (naive, and every available backend in ``memory="min"``) the step of
``bench/variants.py`` runs ``--warmup`` times, then once under ``torch.profiler`` (CPU and,
on a GPU, CUDA activity). Written into ``--out``:

* ``trace-<variant>.json.gz``: the Chrome trace (open in https://ui.perfetto.dev or
  chrome://tracing; both read gzip);
* ``ops-<variant>.txt``: the profiler's operator table, sorted by device (or CPU) time;
* ``profile.json``: per variant the step's wall time under the profiler and the trace's size.

Each variant runs in this one process, one after the other: this is for reading a step, not
for comparing variants (``make bench`` compares, in fresh processes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.variants import TrainStep, model_config


def variants_for(device: str) -> list[str]:
    """naive and each backend that can run on ``device``, in ``memory="min"``."""
    import dense_ext

    return ["naive", *(f"efficient-{b}-min" for b in dense_ext.available_backends(device))]


def profile_variant(step: TrainStep, out: Path, name: str, warmup: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    _sync(step.device)
    activities = [ProfilerActivity.CPU]
    if step.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        step()
        _sync(step.device)
        wall = time.perf_counter() - t0
    sort = "cuda_time_total" if step.device.type == "cuda" else "cpu_time_total"
    (out / f"ops-{name}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60))
    trace = out / f"trace-{name}.json.gz"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return {
        "variant": name,
        "step_wall_s_under_profiler": wall,
        "trace_bytes": trace.stat().st_size,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="densenet_bc_100")
    p.add_argument("--batch", type=int, help="default: 64 on CUDA, 16 on CPU")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", help="comma list (default: naive + each backend's min mode)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 16)
    names = args.variants.split(",") if args.variants else variants_for(device.type)
    summary = {
        "model": args.model,
        "batch": batch,
        "dtype": args.dtype,
        "device": str(device),
        "torch_version": torch.__version__,
        "variants": [],
    }
    failed = 0
    for name in names:
        try:
            step = TrainStep(model_config(args.model), name, batch, args.dtype, device)
            summary["variants"].append(profile_variant(step, out, name, args.warmup))
            del step
        except Exception as exc:  # one backend failing must not lose the others' traces
            failed += 1
            summary["variants"].append({"variant": name, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(summary["variants"][-1]), flush=True)
        (out / "profile.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
