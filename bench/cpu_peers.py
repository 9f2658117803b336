"""The efficient CPU models against the naive variants a user would pick instead, in one process.

    python -m bench.cpu_peers                      # DenseNet-BC-100 b16 and DenseNet-121 b4
    python -m bench.cpu_peers --models densenet_bc_100 --rounds 9 --no-compile
    python -m bench.cpu_peers --json bench/results/cpu-peers.json

For each model, five variants of the same network (same seed, same weights), each running the
training step of ``make bench`` (forward, cross-entropy, backward, SGD with Nesterov momentum
0.9 and weight decay 1e-4, gradients kept allocated):

* ``naive``: eager PyTorch, ``torch.cat`` per layer, contiguous (NCHW) tensors;
* ``naive-channels_last``: the same model and input in channels_last (oneDNN's preferred layout);
* ``naive-compile``: the naive model under ``torch.compile`` (default options; the first step
  compiles, its time is reported apart);
* ``efficient-cpp-min`` and ``efficient-cpp-bottleneck``: the C++ backend in both memory modes.

After the warm-up the variants take turns, one step each per round, in an order rotated every
round, so a change in machine load during the run hits every variant alike. Reported per
variant: the median step time and, for the efficient variants, the ratio to the best naive
variant, computed per round (step time over the fastest naive step of the same round) and
summarised by its median: the number the target "at most 0.9x the best naive variant" is
about. ``--memory`` also measures each eager variant's activation memory of one step with
``python_models.memory`` (the probe of ``make bench``), in a separate pass.

This is a comparison in one process for a shared or noisy machine; ``make bench`` measures
every variant in its own fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NAIVE = ("naive", "naive-channels_last", "naive-compile")
EFFICIENT = ("efficient-cpp-min", "efficient-cpp-bottleneck")
MODELS = {"densenet_bc_100": (16, 32, 10), "densenet121": (4, 224, 1000)}  # batch, size, classes


@dataclass
class Runner:
    """One variant's model, optimiser and fixed batch; ``step()`` is one training step."""

    name: str
    model: torch.nn.Module
    run: torch.nn.Module
    opt: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    times: list[float] = field(default_factory=list)
    first_step_s: float = 0.0

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.run(self.x), self.y)
        loss.backward()
        del loss
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        return time.perf_counter() - t0


def build(model_name: str, variant: str, batch: int, size: int, classes: int) -> Runner:
    import python_models

    torch.manual_seed(0)
    kwargs: dict = {}
    if variant.startswith("efficient-"):
        _, backend, memory = variant.split("-")
        kwargs = {"efficient": True, "backend": backend, "memory": memory}
    model = python_models.get_model(model_name, **kwargs).train()
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    if variant == "naive-channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model) if variant.endswith("-compile") else model
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    return Runner(variant, model, run, opt, x, y)


def activation_bytes(r: Runner) -> int:
    from python_models.memory import cpu_peak

    return cpu_peak(r.step).peak_bytes


def compare(model_name: str, variants: list[str], rounds: int, warmup: int, memory: bool) -> dict:
    batch, size, classes = MODELS[model_name]
    runners = [build(model_name, v, batch, size, classes) for v in variants]
    for r in runners:
        r.first_step_s = r.step()
        for _ in range(warmup - 1):
            r.step()
    per_round: dict[str, list[float]] = {v: [] for v in variants if v in EFFICIENT}
    naive = [r for r in runners if r.name in NAIVE]
    for i in range(rounds):
        order = runners[i % len(runners) :] + runners[: i % len(runners)]
        for r in order:
            r.times.append(r.step())
        best = min(r.times[-1] for r in naive) if naive else float("nan")
        for r in runners:
            if r.name in per_round:
                per_round[r.name].append(r.times[-1] / best)
    rows = {}
    for r in runners:
        row = {
            "step_s": statistics.median(r.times),
            "step_times_s": r.times,
            "first_step_s": r.first_step_s,
        }
        if r.name.endswith("-compile"):
            row["compile_s"] = r.first_step_s - row["step_s"]
        if r.name in per_round:
            row["vs_best_naive_per_round"] = per_round[r.name]
            row["vs_best_naive"] = statistics.median(per_round[r.name])
        if memory and not r.name.endswith("-compile"):
            row["activation_bytes"] = activation_bytes(r)
        rows[r.name] = row
    best_naive = min((n for n in rows if n in NAIVE), key=lambda n: rows[n]["step_s"], default=None)
    return {
        "model": model_name,
        "batch": batch,
        "image_size": size,
        "rounds": rounds,
        "best_naive_variant": best_naive,
        "variants": rows,
    }


def report(result: dict) -> str:
    lines = [
        f"{result['model']} (batch {result['batch']}, {result['image_size']}x"
        f"{result['image_size']}), {result['rounds']} rounds; best naive (median step): "
        f"{result['best_naive_variant']}",
        f"  {'variant':26s} {'step ms':>9s} {'vs best naive':>14s} {'act. MiB':>9s} "
        f"{'compile s':>9s}",
    ]
    for name, row in result["variants"].items():
        ratio = f"{row['vs_best_naive']:.3f}x" if "vs_best_naive" in row else ""
        mib = f"{row['activation_bytes'] / 2**20:.1f}" if "activation_bytes" in row else ""
        comp = f"{row['compile_s']:.1f}" if "compile_s" in row else ""
        lines.append(f"  {name:26s} {row['step_s'] * 1e3:9.1f} {ratio:>14s} {mib:>9s} {comp:>9s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.cpu_peers", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS)
    )
    p.add_argument("--rounds", type=int, default=7, help="timed steps per variant (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="leave out naive-compile")
    p.add_argument("--memory", action="store_true", help="also probe activation memory")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in NAIVE if not (args.no_compile and v.endswith("-compile"))]
    variants += list(EFFICIENT)
    from dense_ext import _C

    header = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_isa": _C.cpu_isa(),
        "load_average_before": os.getloadavg(),
    }
    print(" ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    results = []
    for model in args.models.split(","):
        if model not in MODELS:
            p.error(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
        results.append(compare(model, variants, args.rounds, args.warmup, args.memory))
        print(report(results[-1]), flush=True)
    header["load_average_after"] = os.getloadavg()
    print(f"load average after: {header['load_average_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "command": sys.argv, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
