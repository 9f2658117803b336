"""Self time of the ops of one training step, per op and input shapes, from torch.profiler.

    python -m bench.profile_ops --model densenet121 --batch 4 --variant efficient-cpp-bottleneck \\
        --first-input 4x64x112x112,4x3x224x224,4x64x56x56      # the ImageNet stem's ops

The step of ``bench/variants.py`` runs ``--warmup`` times, then once under the profiler (CPU
activity, shapes recorded). Printed: every ``aten::`` op whose first input has one of the
``--first-input`` shapes (all ops when not given) with its self time summed over calls of the
same input shapes, then the total. For reading where a step's time goes, one process and one
step: compare two versions of the code by running each a few times, in turns.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from bench.variants import TrainStep, model_config


def parse_shapes(text: str) -> set[tuple[int, ...]]:
    """``"4x64x112x112,4x3x224x224"`` -> {(4, 64, 112, 112), (4, 3, 224, 224)}."""
    return {tuple(int(d) for d in s.split("x")) for s in text.split(",") if s}


def op_times(step: TrainStep, warmup: int) -> dict[tuple[str, str], list]:
    """(op, input shapes) -> [calls, self ms, first input's shape] of one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    times: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0, ()])
    for event in prof.key_averages(group_by_input_shape=True):
        entry = times[(event.key, str(event.input_shapes))]
        entry[0] += event.count
        entry[1] += event.self_cpu_time_total / 1e3
        entry[2] = tuple(event.input_shapes[0]) if event.input_shapes else ()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variant", default="efficient-cpp-bottleneck")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--first-input", default="", help="comma list of NxCxHxW shapes")
    args = parser.parse_args()
    step = TrainStep(
        model_config(args.model), args.variant, args.batch, args.dtype, torch.device("cpu")
    )
    wanted = parse_shapes(args.first_input)
    total = 0.0
    for (op, shapes), (calls, ms, first) in sorted(op_times(step, args.warmup).items()):
        if not op.startswith("aten::") or (wanted and first not in wanted):
            continue
        total += ms
        print(f"{op:45s} {int(calls):5d} {ms:8.2f} ms  {shapes[:90]}")
    print(f"total {total:.2f} ms ({args.variant}, {args.model}, batch {args.batch})")


if __name__ == "__main__":
    main()
