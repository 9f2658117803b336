"""How much of a training step is GEMM and convolution time, per variant, profiled in turns.

    python -m bench.gemm_share --model densenet121 --batch 4 [--rounds 5] [--target 0.9]

Every variant (``--variants``; bench/README.md grammar) is built in one process, with the
allocator pinned as ``bench.paired`` pins it, and profiled for one step per round in an order
rotated from round to round (``bench.profile_ops.op_times``). Each op's self time goes to one
of two parts: GEMM/convolution (the ops in ``GEMM_OPS``: MKL's and oneDNN's compute-bound
kernels, already near this CPU's peak) or everything else (BN, ReLU, copies, the optimizer,
dispatch). Printed per variant: the medians over rounds of the step's total self time and of
its two parts; then, for every non-naive variant, the time its non-GEMM part would have to fit
in for the step to reach ``--target`` times the fastest naive variant's total, GEMM time as
measured. A budget near or below zero says the target is out of reach without fewer FLOPs
(e.g. DenseNet-121's ``min`` recomputes every 1x1 convolution once in backward).

Profiler self times add up to the step's wall time within a few percent here (the profiler's
own cost per op included), so compare parts and budgets, not these totals with ``make bench``.

``--products N`` also prints, per variant, its N most expensive matrix-product shapes (calls,
ms and GFLOP/s, from one more profiled step): whether the GEMM time is the products' speed or
their number.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys

import torch

from bench.paired import restart_with_pinned_malloc
from bench.profile_ops import op_times
from bench.variants import TrainStep, model_config

# The compute-bound kernels: GEMMs (1x1 convolutions as matrix products, the classifier; MKL
# through ATen, oneDNN through the extension's own record) and ATen convolutions (oneDNN on the
# CPU; the slow path where oneDNN is not used).
GEMM_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::bmm",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_slow_conv2d_forward",
    "aten::_slow_conv2d_backward",
    "aten::mkldnn_linear",
    "dense_ext::onednn_matmul",  # csrc/cpu/gemm.cpp: oneDNN's matmul, no ATen op
}

DEFAULT_VARIANTS = "naive-channels_last,naive,efficient-cpp-min,efficient-cpp-bottleneck"


def split_step(step: TrainStep, warmup: int) -> tuple[float, float]:
    """(GEMM/convolution ms, other ms) of one profiled step."""
    gemm = other = 0.0
    for (op, _shapes), (_calls, ms, _first) in op_times(step, warmup).items():
        if op in GEMM_OPS:
            gemm += ms
        else:
            other += ms  # self times do not overlap: the autograd engine's own time included
    return gemm, other


# Matrix products whose first two inputs are [m, k] and [k, n].
PRODUCT_OPS = {"aten::mm", "dense_ext::onednn_matmul"}


def product_rates(times: dict) -> list[tuple[tuple[int, int, int], int, float, float]]:
    """``((m, k, n), calls, ms, GFLOP/s)`` per product shape of ``op_times``'s result, the most
    expensive first."""
    rates = []
    for (op, shapes), (calls, ms, _first) in times.items():
        if op not in PRODUCT_OPS:
            continue
        a, b = ast.literal_eval(shapes)[:2]
        m, k, n = a[0], a[1], b[1]
        rates.append(((m, k, n), calls, ms, 2 * m * k * n * calls / (ms * 1e6) if ms else 0.0))
    return sorted(rates, key=lambda r: -r[2])


def print_products(name: str, step: TrainStep, top: int) -> None:
    rates = product_rates(op_times(step, 0))
    total = sum(ms for _, _, ms, _ in rates)
    print(f"{name}: matrix products {total:.1f} ms in one profiled step, the {top} largest:")
    for (m, k, n), calls, ms, gflops in rates[:top]:
        print(f"  [{m}, {k}] x [{k}, {n}]  {calls:4d} calls  {ms:7.2f} ms  {gflops:6.1f} GFLOP/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--products", type=int, default=0, help="print the N largest products")
    args = parser.parse_args(argv)
    restart_with_pinned_malloc(sys.argv[1:] if argv is None else argv, "bench.gemm_share")
    names = args.variants.split(",")
    steps = {
        n: TrainStep(model_config(args.model), n, args.batch, "fp32", torch.device("cpu"))
        for n in names
    }
    parts: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            parts[n].append(split_step(steps[n], args.warmup if r == 0 else 0))
    med = {
        n: (statistics.median(g for g, _ in p), statistics.median(o for _, o in p))
        for n, p in parts.items()
    }
    print(f"{args.model}, batch {args.batch}, fp32, cpu, {torch.get_num_threads()} threads:")
    print(f"medians of {args.rounds} profiled steps per variant (ms of op self time)")
    print(f"{'variant':28s} {'total':>8s} {'GEMM/conv':>10s} {'other':>8s}")
    for n, (g, o) in med.items():
        print(f"{n:28s} {g + o:8.1f} {g:10.1f} {o:8.1f}")
    for n in names if args.products else []:
        print_products(n, steps[n], args.products)
    naive = [n for n in names if n.startswith("naive")]
    if not naive:
        return
    best = min(naive, key=lambda n: sum(med[n]))
    goal = args.target * sum(med[best])
    print(f"{args.target}x the fastest naive ({best}, {sum(med[best]):.1f}) = {goal:.1f} ms:")
    for n in names:
        if n in naive:
            continue
        g, o = med[n]
        print(f"  {n:26s} other ops must fit in {goal - g:7.1f} ms (now {o:.1f})")


if __name__ == "__main__":
    main()
