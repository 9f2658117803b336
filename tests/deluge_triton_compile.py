"""Compiles every CLDC Triton kernel to sm_80 and sm_90 cubins without a GPU, and each kernel
once more for sm_90 as torch.compile re-emits it (see dense_ext.backends.triton.compile_check,
``--as-inductor``); one line each.

Run with TRITON_INTERPRET unset (the kernels must be defined for compilation); used by
tests/test_deluge_triton.py.
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dense_ext.deluge.backends.triton import kernels

TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}
# Pointers to the [k, C] tables and partial sums: the accumulation dtype.
ACC_POINTERS = {
    "MEAN_ptr",
    "SCALE_ptr",
    "SHIFT_ptr",
    "PART_ptr",
    "ALPHA_ptr",
    "BETA_ptr",
    "GAMMA_ptr",
}
KERNELS = {
    "cldc_forward": kernels._cldc_forward_kernel,
    "cldc_sums": kernels._cldc_sums_kernel,
    "cldc_apply": kernels._cldc_apply_kernel,
}


def compile_kernel(kernel, dtype: torch.dtype, arch: int) -> None:
    acc = "fp64" if dtype == torch.float64 else "fp32"
    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = "*" + (acc if param.name in ACC_POINTERS else TYPES[dtype])
        else:
            signature[param.name] = "i32"
    source = ASTSource(kernel, signature, constexprs={"BLOCK_M": 64, "BLOCK_C": 32})
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


def main() -> int:
    if kernels.INTERPRETED:
        print("TRITON_INTERPRET is set: kernels are defined for the interpreter")
        return 2
    import tempfile
    from pathlib import Path

    from dense_ext.backends.triton.compile_check import as_inductor_emits

    failures = 0
    # The re-emitted sources are imported from files; the folder goes when they are compiled.
    with tempfile.TemporaryDirectory(prefix="dense_ext_inductor_") as folder:
        for name, kernel in KERNELS.items():
            try:
                compile_kernel(as_inductor_emits(kernel, Path(folder)), torch.float32, 90)
                print(f"sm_90 inductor {name} {torch.float32} ok", flush=True)
            except Exception as exc:  # report every failure
                failures += 1
                print(f"sm_90 inductor {name} {torch.float32} FAILED: {type(exc).__name__}: {exc}")
    for arch in (80, 90):
        for name, kernel in KERNELS.items():
            for dtype in TYPES:
                try:
                    compile_kernel(kernel, dtype, arch)
                    print(f"sm_{arch} {name} {dtype} ok", flush=True)
                except Exception as exc:  # report every failure
                    failures += 1
                    print(f"sm_{arch} {name} {dtype} FAILED: {type(exc).__name__}: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
