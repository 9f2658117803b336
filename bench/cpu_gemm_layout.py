"""Time the CPU weight-gradient GEMM of a bottleneck layer in its two output orientations.

    python -m bench.cpu_gemm_layout [--reps 20] [--rounds 7] [--onednn]

In backward, each bottleneck layer sums ``dW1 = dY1^T Z1`` over chunks of rows (``dY1``:
[rows, mid], ``Z1``: [rows, c_in]; csrc/block.cpp). The product can be asked of ``at::mm``
as the [mid, c_in] result itself or as its transpose ``Z1^T dY1``, [c_in, mid]; the BLAS
call differs (which dimension is the result's rows). Per shape, for chunk shapes of
DenseNet-BC-100 (k=12, mid 48, batch 16, 32x32) and DenseNet-121 (k=32, mid 128, batch 4,
224x224) on the CPU: GFLOP/s of both (accumulating, as every chunk after the first does),
best of ``--rounds`` rounds of ``--reps`` calls, the two timed in turns in one process.

``--onednn`` times instead, on the same shapes, each product of a bottleneck layer's 1x1
convolution as our block runs it (``at::mm`` into a preallocated output: MKL's sgemm) against
the 1x1 convolution the naive channels_last model runs (ATen's, oneDNN on the CPU) on the same
rows as a channels_last [1, c, rows, 1] image: the forward product, the data gradient and the
weight gradient.
"""

from __future__ import annotations

import argparse
import time

import torch

# (model, rows of a chunk, c_in, mid): the chunk rows csrc/block.cpp's chunk_images gives
# (about 2048 rows of whole images), a narrow, a middle and a wide prefix of each block.
SHAPES = [
    ("BC-100 block 1", 2048, 60, 48),
    ("BC-100 block 1", 2048, 204, 48),
    ("BC-100 block 2", 2048, 198, 48),
    ("BC-100 block 3", 1024, 330, 48),
    ("D-121 block 1", 3136, 96, 128),
    ("D-121 block 1", 3136, 224, 128),
    ("D-121 block 2", 1568, 480, 128),
    ("D-121 block 3", 784, 1000, 128),
    ("D-121 block 4", 196, 768, 128),
]


def mean_seconds(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def best_rounds(runs: dict, reps: int, rounds: int) -> dict[str, float]:
    """Per run, the best over ``rounds`` rounds (the runs in turns) of its mean over ``reps``."""
    for fn in runs.values():
        fn()  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for key, fn in runs.items():
            best[key] = min(best[key], mean_seconds(fn, reps))
    return best


def time_shape(rows: int, c_in: int, mid: int, reps: int, rounds: int) -> dict[str, float]:
    """Seconds per accumulating product, best round, for both result orientations."""
    dy1, z1 = torch.randn(rows, mid), torch.randn(rows, c_in)
    direct, transposed = torch.zeros(mid, c_in), torch.zeros(c_in, mid)
    runs = {
        "direct": lambda: direct.addmm_(dy1.t(), z1),
        "transposed": lambda: transposed.addmm_(z1.t(), dy1),
    }
    return best_rounds(runs, reps, rounds)


def time_onednn(rows: int, c_in: int, mid: int, reps: int, rounds: int) -> dict[str, float]:
    """Seconds per call, best round: our products (MKL) and oneDNN's 1x1 convolution."""
    z, w, dy = torch.randn(rows, c_in), torch.randn(mid, c_in), torch.randn(rows, mid)
    y, dz, dwt = torch.empty(rows, mid), torch.empty(rows, c_in), torch.empty(c_in, mid)
    z4 = z.view(1, rows, 1, c_in).permute(0, 3, 1, 2)  # channels_last views, no copies
    dy4 = dy.view(1, rows, 1, mid).permute(0, 3, 1, 2)
    w4 = w.view(mid, c_in, 1, 1)

    def conv_backward(mask):
        return torch.ops.aten.convolution_backward(
            dy4, z4, w4, None, [1], [0], [1], False, [0], 1, mask
        )

    runs = {
        "forward mm": lambda: torch.mm(z, w.t(), out=y),
        "forward conv": lambda: torch.nn.functional.conv2d(z4, w4),
        "dgrad mm": lambda: torch.mm(dy, w, out=dz),
        "dgrad conv": lambda: conv_backward([True, False, False]),
        "wgrad mm": lambda: torch.mm(z.t(), dy, out=dwt),
        "wgrad conv": lambda: conv_backward([False, True, False]),
    }
    return best_rounds(runs, reps, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--onednn", action="store_true", help="MKL products vs oneDNN 1x1 conv")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GFLOP/s")
    if args.onednn:
        print(
            f"{'shape':34s} {'forward mm/conv':>16s} {'dgrad mm/conv':>16s} {'wgrad mm/conv':>16s}"
        )
        for name, rows, c_in, mid in SHAPES:
            best = time_onednn(rows, c_in, mid, args.reps, args.rounds)
            rate = {key: 2 * rows * c_in * mid / t / 1e9 for key, t in best.items()}
            cells = [
                f"{rate[p + ' mm']:7.0f}/{rate[p + ' conv']:<7.0f}"
                for p in ("forward", "dgrad", "wgrad")
            ]
            print(
                f"{name + f' {rows}x{c_in}, mid {mid}':34s} " + " ".join(f"{c:>16s}" for c in cells)
            )
        return
    print(f"{'shape':34s} {'[mid, c_in]':>12s} {'[c_in, mid]':>12s} {'ratio':>7s}")
    for name, rows, c_in, mid in SHAPES:
        best = time_shape(rows, c_in, mid, args.reps, args.rounds)
        rate = {key: 2 * rows * c_in * mid / t / 1e9 for key, t in best.items()}
        label = f"{name} {rows}x{c_in}, mid {mid}"
        print(
            f"{label:34s} {rate['direct']:12.0f} {rate['transposed']:12.0f}"
            f" {best['transposed'] / best['direct']:7.2f}"
        )


if __name__ == "__main__":
    main()
