"""Host emulation of the rounding of an IEEE float32 Triton dot over many rows (no GPU).

On the GPU, ``tl.dot(a, b, acc, input_precision="ieee")`` lowers to one FMA per product into
each accumulator element: a reduction over M rows is a chain of M roundings. This script
emulates that chain exactly (a float32 product is exact in float64, so ``fma`` is the float64
sum rounded once to float32) for the weight gradient of the H200 test that missed its bound
(``test_cuda_within_twice_pytorch_error[plain_layer-*-ieee]``: 1024 rows, split in 2), and
compares it with the kernel's fresh tile per row block (``dense_ext/backends/triton/_common.py``,
``dot``): a BLOCK-term chain per block, then one add per block into the running sum.

    python tools/emulate_fp32_dot_chain.py [--rows 1024] [--split 2] [--outputs 2000]

Prints the error of each scheme as ``max |error| / max |exact|``, the measure the tests use.
"""

from __future__ import annotations

import argparse

import numpy as np


def fma_chain(products: np.ndarray) -> np.ndarray:
    """Sum each row of float64 ``products`` left to right, rounding to float32 after every
    step: one FMA per product."""
    acc = np.zeros(products.shape[0], np.float32)
    for k in range(products.shape[1]):
        acc = (acc.astype(np.float64) + products[:, k]).astype(np.float32)
    return acc


def kernel_sum(products: np.ndarray, split: int, block: int | None) -> np.ndarray:
    """The wgrad's reduction: rows split over ``split`` programs, each one FMA chain
    (``block`` None) or fresh ``block``-row chains added into its sum; the host then adds the
    split partials in order."""
    partials = []
    for rows in np.array_split(np.arange(products.shape[1]), split):
        part = products[:, rows]
        if block is None:
            partials.append(fma_chain(part))
            continue
        acc = np.zeros(products.shape[0], np.float32)
        for lo in range(0, part.shape[1], block):
            acc = (acc + fma_chain(part[:, lo : lo + block])).astype(np.float32)
        partials.append(acc)
    total = partials[0]
    for p in partials[1:]:
        total = (total + p).astype(np.float32)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--split", type=int, default=2)
    p.add_argument("--outputs", type=int, default=2000, help="weight-gradient elements")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.outputs, args.rows)
    relu_bn = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    grad = rng.standard_normal(shape).astype(np.float32)
    products = relu_bn.astype(np.float64) * grad.astype(np.float64)  # exact
    exact = products.sum(axis=1)

    def error(result: np.ndarray) -> float:
        return float(np.abs(result - exact).max() / np.abs(exact).max())

    print(f"float32 eps {np.finfo(np.float32).eps:.3g}; {args.rows} rows, split {args.split}")
    print(f"one FMA chain per split:        {error(kernel_sum(products, args.split, None)):.3g}")
    for block in (64, 128, 256):
        result = kernel_sum(products, args.split, block)
        print(f"fresh {block:>3}-row tiles + adds:  {error(result):.3g}")


if __name__ == "__main__":
    main()
