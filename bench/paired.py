"""Step time of several variants of one model, measured in paired rounds, one process.

    python -m bench.paired --model densenet121 --batch 4 \\
        --variants naive-channels_last,naive-compile,efficient-cpp-min,efficient-cpp-bottleneck

``make bench`` times each variant in its own process, one after the other: right for memory
(no shared allocator state), but on a shared machine the load drifts by tens of percent within
minutes (this project's 2-core CPU: one model's steps ranged 313-476 ms in one run), so two
rows of one table can differ by more than the effect being compared. Here every variant is
built in one process (``bench.variants.TrainStep``: the same model, batch, step and optimizer
as the benchmark), warmed up, then timed in ``--rounds`` rounds; each round runs one step of
every variant, in an order rotated from round to round, so every variant sees the same load.
Reported per variant: the median step time, and the median and quartiles over rounds of its
time divided by the first variant's time *in the same round* (the comparison). Time only: the
memory columns are ``make bench``'s.

The allocator is held fixed (``PINNED_MALLOC``; ``--default-malloc`` leaves glibc's defaults):
glibc serves large blocks with fresh ``mmap``s, page faults and zeroing included, until freeing
such blocks has raised its threshold, so a process's history decides how much of a naive step
goes to page faults. On this project's 2-core CPU naive channels_last (DenseNet-BC-100, b16)
took 380-400 ms in processes that had compiled a model first and 480-600 ms in processes that
had not, while the efficient models (a few large buffers per step) took the same either way.
Pinned, every variant runs as in a process tuned for it (or under jemalloc/tcmalloc): the
comparison with the fastest naive peer is the strict one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# glibc reads these at process start (mallopt's M_MMAP_THRESHOLD, at its 64-bit maximum of
# 32 MiB, and M_TRIM_THRESHOLD): blocks up to 32 MiB come from the heap and freed memory stays.
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def malloc_pinned() -> bool:
    """Whether this process started with ``PINNED_MALLOC``."""
    return all(os.environ.get(k) == v for k, v in PINNED_MALLOC.items())


def restart_with_pinned_malloc(argv: Sequence[str], module: str = "bench.paired") -> None:
    """Replace this process by ``python -m MODULE ARGV`` with ``PINNED_MALLOC`` set (glibc
    reads it only at start); returns only when it is set already."""
    if malloc_pinned():
        return
    sys.stdout.flush()
    env = {**os.environ, **PINNED_MALLOC}
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``step`` took (the device synchronised after it)."""
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def paired_rounds(steps: Sequence[Callable[[], float]], rounds: int, warmup: int) -> list[list]:
    """``times[r][i]``: seconds of step ``i`` in round ``r``. Round ``r`` starts with step
    ``r % len(steps)`` and goes on in order, so no step always runs first or last."""
    for _ in range(warmup):
        for step in steps:
            step()
    n = len(steps)
    times = []
    for r in range(rounds):
        row = [0.0] * n
        for k in range(n):
            i = (r + k) % n
            row[i] = steps[i]()
        times.append(row)
    return times


def summarise(names: Sequence[str], times: list[list]) -> list[dict]:
    """Per variant: median step ms, and its per-round ratio to the first variant (median,
    quartiles)."""
    rows = []
    for i, name in enumerate(names):
        own = [t[i] for t in times]
        ratios = [t[i] / t[0] for t in times]
        quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        rows.append(
            {
                "variant": name,
                "step_ms_median": 1e3 * statistics.median(own),
                "vs_first_median": statistics.median(ratios),
                "vs_first_quartiles": [quart[0], quart[-1]],
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet_bc_100")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--variants",
        default="naive-channels_last,naive,naive-compile,efficient-cpp-min,efficient-cpp-bottleneck",
        help="comma list (bench/README.md grammar); ratios are to the first",
    )
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto: cuda when present, else cpu")
    parser.add_argument("--out", help="folder for <device>-paired-<model>-<date>.json")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default (history-dependent) large-block behaviour",
    )
    args = parser.parse_args(argv)
    if not args.default_malloc:
        restart_with_pinned_malloc(sys.argv[1:] if argv is None else argv)
    from bench.variants import TrainStep, model_config

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_type if args.device == "auto" else args.device)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if len(names) < 2:
        parser.error("--variants: at least two, the first is the reference")
    config = model_config(args.model)
    steps = []
    for name in names:
        step = TrainStep(config, name, args.batch, args.dtype, device)
        steps.append(lambda step=step: timed(step, device))
    malloc = "pinned (PINNED_MALLOC)" if malloc_pinned() else "glibc defaults"
    print(
        f"{args.model}, batch {args.batch}, {args.dtype}, {device}: {args.rounds} rounds, {malloc}"
    )
    rows = summarise(names, paired_rounds(steps, args.rounds, args.warmup))
    for row in rows:
        low, high = row["vs_first_quartiles"]
        print(
            f"  {row['variant']:32s} {row['step_ms_median']:8.1f} ms  vs {names[0]}: "
            f"median {row['vs_first_median']:.3f}x (quartiles {low:.3f}-{high:.3f}x)"
        )
    if args.out:
        save_result(
            args.out,
            f"paired-{args.model}",
            "bench.paired",
            f"{args.model}, batch {args.batch}, {args.dtype}: step time in paired rounds",
            device,
            rounds=args.rounds,
            malloc=malloc,
            rows=rows,
        )


def save_result(
    out_dir: str, name: str, module: str, what: str, device: torch.device, **fields
) -> Path:
    """``<device type>-<name>-<date>.json`` in ``out_dir``: ``what``, the command (``python -m
    <module>`` and this process's arguments), machine, torch, commit, date, then ``fields``."""
    from bench.report import unused_path
    from bench.run import git_commit
    from bench.worker import device_name

    now = datetime.datetime.now(datetime.timezone.utc)
    out = unused_path(Path(out_dir), f"{device.type}-{name}-{now.date().isoformat()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "what": what,
        "command": f"python -m {module} " + " ".join(sys.argv[1:]),
        "machine": device_name(device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        **fields,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"  written to {out}")
    return out


if __name__ == "__main__":
    main()
