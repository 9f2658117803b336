"""Eager vs torch.compile of the efficient DenseNet, activation memory and step time, one run.

    python -m bench.compile_vs_eager                       # DenseNet-BC-100, batch 16, CPU, cpp min
    python -m bench.compile_vs_eager --backend reference --memory bottleneck --batch 8

Each variant runs in its own process (no shared allocator state or compile caches), one after
the other: build (seeded), ``--warmup`` training steps (compilation happens here), one step
under the memory probe of ``python_models.memory`` (peak live allocator bytes above the level
before the step), then ``--steps`` timed steps (median). The step is bench's: forward,
cross-entropy, backward, SGD with Nesterov momentum; gradients stay allocated between steps.
Ratios are compiled / eager, measured in the same run.
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

VARIANTS = ("eager", "compiled")


def measure(args: argparse.Namespace) -> dict:
    """One variant in this process."""
    import torch
    import torch.nn.functional as F

    from python_models import densenet_bc
    from python_models.memory import peak

    torch.manual_seed(0)
    device = torch.device(args.device)
    kwargs = {"efficient": True, "backend": args.backend, "memory": args.memory}
    if args.naive:
        kwargs = {}
    model = densenet_bc(depth=args.depth, growth_rate=12, **kwargs).to(device).train()
    run = torch.compile(model, fullgraph=not args.naive) if args.variant == "compiled" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(args.batch)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    def step() -> None:
        loss = F.cross_entropy(run(x), y)
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=False)

    for _ in range(args.warmup):
        step()
    peak_bytes = peak(step, device).peak_bytes
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {
        "variant": args.variant,
        "peak_activation_mib": peak_bytes / 2**20,
        "step_time_ms": 1e3 * statistics.median(times),
        "step_times_ms": [1e3 * t for t in times],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--memory", default="min")
    parser.add_argument("--naive", action="store_true", help="the naive model instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "bench.compile_vs_eager", *sys.argv[1:], "--variant", variant]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        line = next(line for line in out.splitlines() if line.startswith("RESULT "))
        rows[variant] = json.loads(line[len("RESULT ") :])
    eager, compiled = rows["eager"], rows["compiled"]
    what = "naive" if args.naive else f"efficient {args.backend} {args.memory}"
    print(f"DenseNet-BC-{args.depth}, batch {args.batch}, {args.device}, {what}")
    for row in (eager, compiled):
        print(
            f"  {row['variant']:9s} {row['peak_activation_mib']:7.1f} MiB  "
            f"{row['step_time_ms']:7.1f} ms  (steps {[round(t) for t in row['step_times_ms']]})"
        )
    mem = compiled["peak_activation_mib"] / eager["peak_activation_mib"]
    time_ratio = compiled["step_time_ms"] / eager["step_time_ms"]
    print(f"  compiled / eager: memory {mem:.2f}x, time {time_ratio:.2f}x")


if __name__ == "__main__":
    main()
