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
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


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
    args = parser.parse_args(argv)
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
    print(f"{args.model}, batch {args.batch}, {args.dtype}, {device}: {args.rounds} rounds")
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
