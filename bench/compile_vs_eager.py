"""Eager vs torch.compile of the efficient DenseNet, activation memory and step time, one run.

    python -m bench.compile_vs_eager                       # DenseNet-BC-100, batch 16, CPU, cpp min
    python -m bench.compile_vs_eager --backend reference --memory bottleneck --batch 8

Memory: each variant in its own process (no shared allocator state or compile caches), one
after the other: build (seeded), ``--warmup`` training steps (compilation happens here), one
step under the memory probe of ``python_models.memory`` (peak live allocator bytes above the
level before the step), then ``--steps`` timed steps (median).

Time, paired: a third process holds both models (the compiled one a copy of the eager one) and
times ``--steps`` pairs of steps, one of each, alternating which goes first. On a shared
machine the load drifts by tens of percent within a minute (this project's CPU machine: steps
of one model ranged 313-476 ms in one run); a pair sees the same load, so the median of the
paired ratios is the comparison, the per-process medians only context. The step is bench's:
forward, cross-entropy, backward, SGD with Nesterov momentum; gradients stay allocated between
steps. Ratios are compiled / eager, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = ("eager", "compiled", "paired")


def training_step(args: argparse.Namespace, compiled: bool, model=None):
    """(step function, model): one training step of a fresh seeded model (or of a copy of
    ``model``), compiled or eager, on a fixed batch."""
    import copy

    import torch
    import torch.nn.functional as F

    from python_models import densenet_bc

    device = torch.device(args.device)
    if model is None:
        torch.manual_seed(0)
        kwargs = {"efficient": True, "backend": args.backend, "memory": args.memory}
        if args.naive:
            kwargs = {}
        model = densenet_bc(depth=args.depth, growth_rate=12, **kwargs)
    else:
        model = copy.deepcopy(model)
    model = model.to(device).train()
    run = torch.compile(model, fullgraph=not args.naive) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(args.batch)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    def step() -> float:
        """Seconds the step took."""
        t0 = time.perf_counter()
        loss = F.cross_entropy(run(x), y)
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return step, model


def measure(args: argparse.Namespace) -> dict:
    """One variant in this process: its activation peak and step times."""
    import torch

    from python_models.memory import peak

    step, _ = training_step(args, compiled=args.variant == "compiled")
    for _ in range(args.warmup):
        step()
    peak_bytes = peak(step, torch.device(args.device)).peak_bytes
    times = [step() for _ in range(args.steps)]
    return {
        "variant": args.variant,
        "peak_activation_mib": peak_bytes / 2**20,
        "step_time_ms": 1e3 * statistics.median(times),
        "step_times_ms": [1e3 * t for t in times],
    }


def measure_paired(args: argparse.Namespace) -> dict:
    """Both variants in this process, ``--steps`` pairs of steps, alternating which runs
    first; the compiled / eager ratio of each pair."""
    from bench.paired import paired_rounds

    eager, model = training_step(args, compiled=False)
    compiled, _ = training_step(args, compiled=True, model=model)
    times = paired_rounds([eager, compiled], args.steps, args.warmup)
    ratios = [t_compiled / t_eager for t_eager, t_compiled in times]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {
        "variant": "paired",
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": [quartiles[0], quartiles[-1]],
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--memory", default="min")
    parser.add_argument("--naive", action="store_true", help="the naive model instead")
    parser.add_argument("--device", default="auto", help="auto: cuda when present, else cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process, and pairs")
    parser.add_argument("--out", help="folder for <device>-compile-vs-eager-<date>.json")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variant:
        result = measure_paired(args) if args.variant == "paired" else measure(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "bench.compile_vs_eager", *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        line = next(line for line in out.splitlines() if line.startswith("RESULT "))
        rows[variant] = json.loads(line[len("RESULT ") :])
    eager, compiled, paired = rows["eager"], rows["compiled"], rows["paired"]
    what = "naive" if args.naive else f"efficient {args.backend} {args.memory}"
    print(f"DenseNet-BC-{args.depth}, batch {args.batch}, {args.device}, {what}")
    for row in (eager, compiled):
        print(
            f"  {row['variant']:9s} {row['peak_activation_mib']:7.1f} MiB  "
            f"{row['step_time_ms']:7.1f} ms  (steps {[round(t) for t in row['step_times_ms']]})"
        )
    mem = compiled["peak_activation_mib"] / eager["peak_activation_mib"]
    time_ratio = compiled["step_time_ms"] / eager["step_time_ms"]
    low, high = paired["ratio_quartiles"]
    print(f"  compiled / eager: memory {mem:.2f}x, time {time_ratio:.2f}x (separate processes)")
    print(
        f"  paired steps, compiled / eager: median {paired['ratio_median']:.3f}x, "
        f"quartiles {low:.3f}-{high:.3f}x over {len(paired['ratios'])} pairs"
    )
    if args.out:
        write_result(args, what, rows)


def write_result(args: argparse.Namespace, what: str, rows: dict) -> None:
    """The rows as JSON in ``args.out``, with the machine, commit and command."""
    import torch

    from bench.paired import save_result

    what = f"DenseNet-BC-{args.depth}, batch {args.batch}, {what}: torch.compile vs eager"
    device = torch.device(args.device)
    save_result(args.out, "compile-vs-eager", "bench.compile_vs_eager", what, device, rows=rows)


if __name__ == "__main__":
    main()
