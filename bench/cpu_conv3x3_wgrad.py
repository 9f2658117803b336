"""Time the CPU weight gradient of a dense layer's 3x3 convolution: ours against oneDNN's.

    python -m bench.cpu_conv3x3_wgrad [--reps 5] [--rounds 7]

Per 3x3 convolution shape of DenseNet-121 (batch 4, 224x224: 128 -> 32 channels at 56, 28, 14
and 7 pixels) and DenseNet-BC-100 (batch 16, 32x32: 48 -> 12 channels at 32, 16 and 8 pixels),
channels_last float32 on the CPU, in one process with the calls in turns:

* ``ours``: ``torch.ops.dense_ext.conv3x3_weight_grad`` (csrc/cpu/conv3x3.h), what the cpp
  backend's CPU block backward computes the weight gradient with;
* ``onednn wgrad``: ATen's ``convolution_backward`` for the weight gradient only (oneDNN on the
  CPU), what the naive model's backward runs for it;
* ``onednn forward``: the forward convolution of the same shape (the same FLOPs), for scale;
* ``onednn dgrad``: the input gradient, which the block still asks of ATen.

Each is the best over ``--rounds`` rounds of its mean over ``--reps`` calls, in ms, with GFLOP/s
(2 * rows * c_in * c_out * 9 FLOPs).
"""

from __future__ import annotations

import argparse

import torch

from bench.cpu_gemm_layout import best_rounds

# (model, batch, pixels per side, c_in, c_out)
SHAPES = [
    ("DenseNet-121 block 1", 4, 56, 128, 32),
    ("DenseNet-121 block 2", 4, 28, 128, 32),
    ("DenseNet-121 block 3", 4, 14, 128, 32),
    ("DenseNet-121 block 4", 4, 7, 128, 32),
    ("DenseNet-BC-100 block 1", 16, 32, 48, 12),
    ("DenseNet-BC-100 block 2", 16, 16, 48, 12),
    ("DenseNet-BC-100 block 3", 16, 8, 48, 12),
]
CONV = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)


def runs_for(n: int, hw: int, c_in: int, c_out: int) -> dict:
    cl = torch.channels_last
    x = torch.randn(n, c_in, hw, hw).contiguous(memory_format=cl)
    g = torch.randn(n, c_out, hw, hw).contiguous(memory_format=cl)
    w = torch.randn(c_out, c_in, 3, 3)
    out = torch.empty_like(w)
    backward = torch.ops.aten.convolution_backward
    return {
        "ours": lambda: torch.ops.dense_ext.conv3x3_weight_grad(g, x, out),
        "onednn wgrad": lambda: backward(g, x, w, None, *CONV, [False, True, False]),
        "onednn forward": lambda: torch.nn.functional.conv2d(x, w, padding=1),
        "onednn dgrad": lambda: backward(g, x, w, None, *CONV, [True, False, False]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_conv3x3_wgrad", description=__doc__)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    import dense_ext  # noqa: F401  (registers torch.ops.dense_ext)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, ms (GFLOP/s)")
    names = list(runs_for(1, 1, 1, 1))
    print(f"{'shape':42s}" + "".join(f"{name:>20s}" for name in names) + "   ours/wgrad")
    for model, n, hw, c_in, c_out in SHAPES:
        best = best_rounds(runs_for(n, hw, c_in, c_out), args.reps, args.rounds)
        flops = 2 * n * hw * hw * c_in * c_out * 9
        cells = "".join(f"{best[k] * 1e3:10.2f} ({flops / best[k] / 1e9:5.0f})" for k in names)
        label = f"{model} {n}x{c_in}x{hw}x{hw} -> {c_out}"
        print(f"{label:42s}{cells}   {best['ours'] / best['onednn wgrad']:.2f}x")


if __name__ == "__main__":
    main()
