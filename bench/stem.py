"""The fused ImageNet stem (``dense_ext.stem``) against the stem's modules, in one model.

    python -m bench.stem [--model densenet121] [--batch 4] [--variants efficient-cpp-min,...]
        [--rounds 12] [--out bench/results]

For each variant (bench/README.md grammar; efficient variants only) one ``TrainStep`` is built
and stepped with ``model.efficient_stem`` True and False in turn, so the two differ in nothing
but the stem: the activation memory of one full training step (``python_models.memory.peak``,
as ``make bench`` measures it) and step times in paired rounds (``bench.paired``: one step of
each setting per round, rotated; allocator pinned), with the median per-round ratio fused /
modules. The device is the CPU unless ``--device`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from bench.paired import paired_rounds, restart_with_pinned_malloc, timed
from bench.variants import TrainStep, model_config
from bench.worker import device_name
from python_models.memory import peak


def measure(step: TrainStep, rounds: int, warmup: int) -> dict:
    """Peak activation MiB and paired step times of ``step`` with the stem fused and not."""
    model, device = step.model, step.device
    if not hasattr(model, "efficient_stem"):
        raise SystemExit(f"{step.variant} has no efficient_stem attribute (naive model?)")
    memory = {}
    for fused in (True, False):
        model.efficient_stem = fused
        step()  # gradients and optimizer state allocated outside the probe
        memory[fused] = peak(step, device).peak_bytes / 2**20

    def run(fused: bool):
        def one() -> float:
            model.efficient_stem = fused
            return timed(step, device)

        return one

    times = paired_rounds([run(True), run(False)], rounds, warmup)
    ratios = [t[0] / t[1] for t in times]
    return {
        "act_mib_fused": round(memory[True], 1),
        "act_mib_modules": round(memory[False], 1),
        "step_ms_fused": round(statistics.median(t[0] for t in times) * 1e3, 1),
        "step_ms_modules": round(statistics.median(t[1] for t in times) * 1e3, 1),
        "time_ratio_median": round(statistics.median(ratios), 3),
        "time_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variants", default="efficient-cpp-min,efficient-cpp-bottleneck")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="folder for <device>-stem-<date>.json")
    args = parser.parse_args()
    restart_with_pinned_malloc(sys.argv[1:], module="bench.stem")
    device = torch.device(args.device)
    rows = {}
    for variant in args.variants.split(","):
        step = TrainStep(model_config(args.model), variant, args.batch, "fp32", device)
        rows[variant] = row = measure(step, args.rounds, args.warmup)
        print(
            f"{variant}: activations {row['act_mib_fused']} MiB fused, "
            f"{row['act_mib_modules']} MiB modules; step {row['step_ms_fused']} / "
            f"{row['step_ms_modules']} ms, fused/modules median {row['time_ratio_median']}x "
            f"(quartiles {row['time_ratio_quartiles'][0]}-{row['time_ratio_quartiles'][2]}x)"
        )
    result = {
        "command": "python -m bench.stem " + " ".join(sys.argv[1:]),
        "machine": device_name(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "model": args.model,
        "batch": args.batch,
        "rounds": args.rounds,
        "rows": rows,
    }
    if args.out:
        path = Path(args.out) / f"{device.type}-stem-{args.model}-{result['date']}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"written to {path}")


if __name__ == "__main__":
    main()
