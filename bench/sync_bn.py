"""Activation memory per process under DDP with synchronised BN, against one process.

    python -m bench.sync_bn                          # DenseNet-BC-100, batch 16 per process, CPU
    python -m bench.sync_bn --model densenet121 --batch 4 --memory bottleneck
    make bench-sync-bn

Each process of a DDP run with ``--sync-bn`` should hold what one process training alone on
the same per-process batch holds: sync BN exchanges per-channel vectors, never activations,
and keeps every fused module (blocks, transitions, head). The settings, each a fresh set of
processes, the same model (``efficient-reference-<memory>``: the backend that synchronises),
seeds and per-process batch:

* ``single``: one process, what a single-process run of that model holds;
* ``single-sync-path``: one process whose blocks and transitions run the synchronised
  arithmetic with a hook that merges nothing (``StatsSync()``): the like-for-like baseline.
  The reference backend's local BN backward copies each layer's input prefix to a contiguous
  tensor for ATen's fused kernel (ten times faster on it); the synchronised path computes the
  two reductions itself and needs no copy, so it holds less than ``single``;
* ``ddp``: two processes, DistributedDataParallel, local BN;
* ``ddp-sync-bn``: two processes, DDP and ``dense_ext.sync_bn.enable_sync_bn``;
* ``single-cpp`` (context): one process on the cpp backend, which a run without sync BN
  would use on the CPU (the cpp backend does not synchronise).

The step is bench/variants.py's (forward, cross-entropy, backward, SGD); memory is
``python_models.memory.peak`` around one step after two warm-up steps (what was live before,
parameters, gradients, momentum, DDP's buckets and the batch, is not counted), on every rank
at once. One torch thread per process, so the two ranks do not contend for the cores. DDP uses
gloo on the CPU (NCCL on CUDA, one GPU per rank). Writes
``bench/results/<device>-sync-bn-<date>.json`` and prints the table; exits 1 unless every
rank of ``ddp-sync-bn`` is within ``--tolerance`` (10 %) of ``single-sync-path`` and at most
that much above ``single``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.run import git_commit
from bench.variants import TrainStep, model_config
from bench.worker import device_name
from python_models.memory import peak

SETTINGS = ("single", "single-sync-path", "ddp", "ddp-sync-bn", "single-cpp")
WORLD = 2
WARMUP = 2
MIB = 1 << 20


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(setting: str, rank: int, args: argparse.Namespace) -> dict:
    """One rank's row: build, ``WARMUP`` steps, one step under the probe."""
    torch.set_num_threads(1)
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    backend = "cpp" if setting == "single-cpp" else "reference"
    variant = f"efficient-{backend}-{args.memory}"
    step = TrainStep(model_config(args.model), variant, args.batch, "fp32", device, seed=0)
    if setting == "single-sync-path":
        from dense_ext.backends.base import StatsSync

        for module in step.model.modules():
            if hasattr(module, "stats_sync"):  # blocks and transitions
                module.stats_sync = StatsSync()  # not LOCAL: the synchronised code path
    if setting.startswith("ddp"):
        if setting == "ddp-sync-bn":
            from dense_ext.sync_bn import enable_sync_bn

            step.model = enable_sync_bn(step.model)
        ids = [device.index] if device.type == "cuda" else None
        step.run = torch.nn.parallel.DistributedDataParallel(step.model, device_ids=ids)
    for _ in range(WARMUP):
        step()
    result = peak(step, device)
    return {
        "setting": setting,
        "variant": variant,
        "rank": rank,
        "peak_activation_bytes": result.peak_bytes,
        "floor_bytes": step.floor_bytes,
        "memory_method": result.method,
    }


def _rank_main(rank: int, setting: str, args: argparse.Namespace, port: int, out: str) -> None:
    if setting.startswith("ddp"):
        dist.init_process_group(
            "nccl" if args.device == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=WORLD,
        )
    try:
        row = measure(setting, rank, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out, f"{setting}-{rank}.json").write_text(json.dumps(row))


def run_setting(setting: str, args: argparse.Namespace) -> list[dict]:
    """The rows of one setting, one per rank, each measured in a fresh process."""
    processes = WORLD if setting.startswith("ddp") else 1
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank_main, args=(setting, args, _free_port(), out), nprocs=processes, join=True)
        return [json.loads(Path(out, f"{setting}-{r}.json").read_text()) for r in range(processes)]


def summarize(rows: list[dict], tolerance: float) -> dict:
    """Each rank's peak over ``single``'s and ``single-sync-path``'s, and the verdict."""

    def bytes_of(setting: str) -> int:
        return next(r for r in rows if r["setting"] == setting)["peak_activation_bytes"]

    single, like = bytes_of("single"), bytes_of("single-sync-path")
    for r in rows:
        r["ratio_to_single"] = r["peak_activation_bytes"] / single
        r["ratio_to_single_sync_path"] = r["peak_activation_bytes"] / like
    synced = [r for r in rows if r["setting"] == "ddp-sync-bn"]
    to_like = [r["ratio_to_single_sync_path"] for r in synced]
    to_single = [r["ratio_to_single"] for r in synced]
    return {
        "sync_bn_ratio_to_single": [min(to_single), max(to_single)],
        "sync_bn_ratio_to_single_sync_path": [min(to_like), max(to_like)],
        "tolerance": tolerance,
        "within_tolerance": all(abs(v - 1) <= tolerance for v in to_like)
        and max(to_single) <= 1 + tolerance,
    }


def table(doc: dict) -> str:
    lines = [
        f"{doc['model']}, batch {doc['batch']} per process, efficient-reference-{doc['memory']}, "
        f"{doc['device_name']}",
        f"{'setting':<17} {'rank':>4} {'activation MiB':>15} {'vs single':>10} "
        f"{'vs sync path':>13} {'floor MiB':>10}",
    ]
    for r in doc["rows"]:
        lines.append(
            f"{r['setting']:<17} {r['rank']:>4} {r['peak_activation_bytes'] / MIB:>15.1f} "
            f"{r['ratio_to_single']:>9.3f}x {r['ratio_to_single_sync_path']:>12.3f}x "
            f"{r['floor_bytes'] / MIB:>10.1f}"
        )
    s = doc["summary"]
    lo, hi = s["sync_bn_ratio_to_single_sync_path"]
    verdict = "within" if s["within_tolerance"] else "NOT within"
    lines.append(
        f"ddp-sync-bn per rank: {lo:.3f}x-{hi:.3f}x single-sync-path, "
        f"{s['sync_bn_ratio_to_single'][1]:.3f}x single at most ({verdict} {s['tolerance']:.0%})"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sync_bn", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="densenet_bc_100", help="bench model (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="batch per process (default: 16)")
    p.add_argument("--memory", choices=("bottleneck", "min"), default="min")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument(
        "--out", default="bench/results", help="folder of the JSON (default: %(default)s)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < WORLD:
        raise SystemExit(f"--device cuda needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    rows = [row for setting in SETTINGS for row in run_setting(setting, args)]
    torch.set_num_threads(1)
    doc = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.sync_bn", *(argv or sys.argv[1:])]),
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "device": args.device,
        "device_name": device_name(torch.device(args.device)),
        "model": args.model,
        "batch": args.batch,
        "memory": args.memory,
        "world_size": WORLD,
        "warmup_steps": WARMUP,
        "rows": rows,
        "summary": summarize(rows, args.tolerance),
    }
    date = dt.datetime.now(dt.timezone.utc).date().isoformat()
    path = Path(args.out, f"{args.device}-sync-bn-{date}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    print(f"written: {path}")
    return 0 if doc["summary"]["within_tolerance"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
