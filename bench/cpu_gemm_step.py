"""A training step with the CPU 1x1 products on MKL and on oneDNN, alternately in one process.

    python -m bench.cpu_gemm_step --model densenet121 --batch 4 --variant efficient-cpp-min

``dense_ext._C.set_cpu_gemm`` switches the library of a block's float32 CPU products (the
forward, recompute and gradient GEMMs of the 1x1 convolutions; csrc/cpu/gemm.h) between
steps, so both run in the same process, on the same model and data, with the allocator pinned
as ``bench.paired`` pins it: ``--rounds`` rounds of one step each, in an order alternated from
round to round. Printed: each library's median step and the median over rounds of oneDNN's
step divided by MKL's in the same round. (MKL's sgemm on this project's AMD VM ran some
processes at about 150 GFLOP/s and others at about 190 in isolation, so compare within a
process, as here.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.paired import restart_with_pinned_malloc
from bench.variants import TrainStep, model_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variant", default="efficient-cpp-min")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    restart_with_pinned_malloc(sys.argv[1:] if argv is None else argv, "bench.cpu_gemm_step")
    from dense_ext import _C

    step = TrainStep(
        model_config(args.model), args.variant, args.batch, "fp32", torch.device("cpu")
    )
    libraries = ("mkl", "onednn")
    before = _C.cpu_gemm()
    if not _C.set_cpu_gemm("onednn"):
        sys.exit("oneDNN's matmul is not available in this libtorch or on this CPU")
    try:
        ratios, times = _alternate(step, libraries, args.rounds)
    finally:
        _C.set_cpu_gemm(before)
    median = {lib: 1e3 * statistics.median(t) for lib, t in times.items()}
    print(
        f"{args.model} b{args.batch} {args.variant}, {args.rounds} rounds:"
        f" MKL {median['mkl']:.1f} ms, oneDNN {median['onednn']:.1f} ms;"
        f" oneDNN / MKL median {statistics.median(ratios):.3f}"
        f" (range {min(ratios):.3f}-{max(ratios):.3f})"
    )


def _alternate(step: TrainStep, libraries: tuple[str, str], rounds: int):
    """(oneDNN/MKL ratio per round, step seconds per library) of ``rounds`` alternated rounds."""
    from dense_ext import _C

    times: dict[str, list[float]] = {lib: [] for lib in libraries}
    for lib in libraries:  # warm-up: both libraries' kernels and caches
        assert _C.set_cpu_gemm(lib)
        step()
        step()
    ratios = []
    for r in range(rounds):
        for lib in libraries if r % 2 == 0 else libraries[::-1]:
            assert _C.set_cpu_gemm(lib)
            t0 = time.perf_counter()
            step()
            times[lib].append(time.perf_counter() - t0)
        ratios.append(times["onednn"][-1] / times["mkl"][-1])
    return ratios, times


if __name__ == "__main__":
    main()
