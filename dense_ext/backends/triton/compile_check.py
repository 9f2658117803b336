"""Ahead-of-time compile of every kernel for sm_80, sm_86 and sm_90, on any machine (no GPU needed).

Triton ships ``ptxas``, so ``triton.compile`` can lower a kernel all the way to a cubin for a
given target without a device. This catches what the interpreter cannot: type errors of the
compiled path (e.g. float64 ``tl.dot``, constexpr globals, layouts) and shared-memory overflow
of the configurations in ``configs.py`` at the target's limits.

    python -m dense_ext.backends.triton.compile_check [--arch 80 90] [--quick]

Must run with ``TRITON_INTERPRET`` unset (kernels defined for compilation).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dense_ext.backends.triton import interpret_requested

if interpret_requested():  # pragma: no cover
    sys.exit("compile_check needs TRITON_INTERPRET unset (kernels must be defined compiled)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dense_ext.backends.triton import configs  # noqa: E402
from dense_ext.backends.triton.conv_dgrad import _conv_dgrad_bn_relu_bwd_kernel  # noqa: E402
from dense_ext.backends.triton.conv_fwd import _bn_relu_conv_fwd_kernel  # noqa: E402
from dense_ext.backends.triton.conv_wgrad import _bn_relu_conv_wgrad_kernel  # noqa: E402
from dense_ext.backends.triton.stats import _merge_stats_kernel, _tile_stats_kernel  # noqa: E402

_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}
_ACC_POINTERS = {
    "MEAN_ptr",
    "INVSTD_ptr",
    "GAMMA_ptr",
    "BETA_ptr",
    "SUMS_ptr",
    "PART_ptr",
    "OUT_ptr",
}


def _compile(kernel, dtype, constexprs, cap, num_warps, num_stages):
    buf = _TRITON_TYPES[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (acc if name in _ACC_POINTERS else buf)
        elif name == "count":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(kernel, signature, constexprs=constexprs)
    target = GPUTarget("cuda", cap[0] * 10 + cap[1], 32)
    compiled = triton.compile(
        src, target=target, options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return compiled.metadata.shared


def variants(cap, dtypes, c_in=256, mid=128, k=32, m=64 * 32 * 32):
    """(name, kernel, dtype, constexprs, num_warps, num_stages) of the kernels a block launches."""
    for dtype in dtypes:
        dot_fp32 = False
        precision = "tf32" if dtype == torch.float32 else "ieee"
        yield from _conv_variants(cap, dtype, dot_fp32, precision, c_in, mid, k, m)
    stats = configs.stats_gpu(k)
    yield (
        "tile_stats",
        _tile_stats_kernel,
        torch.float32,
        {"BLOCK_M": stats.block_m, "BLOCK_C": stats.block_n},
        stats.num_warps,
        2,
    )
    yield ("merge_stats", _merge_stats_kernel, torch.float32, {"BLOCK_C": 32}, 4, 2)


def _conv_variants(cap, dtype, dot_fp32, precision, c_in, mid, k, m):
    common = {"DOT_FP32": dot_fp32, "INPUT_PRECISION": precision}
    for ks, cin, cout, mask in ((1, c_in, mid, False), (3, mid, k, True)):
        cfg = configs.conv_fwd_gpu(cin, cout, dtype, cap)
        yield (
            f"fwd_ks{ks}",
            _bn_relu_conv_fwd_kernel,
            dtype,
            {
                "KS": ks,
                "HAS_MASK": mask,
                "COMPUTE_STATS": True,
                **common,
                "BLOCK_M": cfg.block_m,
                "BLOCK_N": cfg.block_n,
                "BLOCK_K": cfg.block_k,
            },
            cfg.num_warps,
            cfg.num_stages,
        )
        cfg = configs.conv_dgrad_gpu(cin, cout, dtype, cap)
        for apply in (False, True):
            yield (
                f"dgrad_ks{ks}_{'apply' if apply else 'reduce'}",
                _conv_dgrad_bn_relu_bwd_kernel,
                dtype,
                {
                    "KS": ks,
                    "HAS_MASK": mask,
                    "APPLY": apply,
                    "BATCH_STATS": True,
                    "ACCUMULATE": ks == 1,
                    **common,
                    "BLOCK_M": cfg.block_m,
                    "BLOCK_N": cfg.block_n,
                    "BLOCK_C": cfg.block_k,
                },
                cfg.num_warps,
                cfg.num_stages,
            )
        cfg = configs.conv_wgrad_gpu(m, cin, cout, ks * ks, dtype, cap, 132)
        yield (
            f"wgrad_ks{ks}",
            _bn_relu_conv_wgrad_kernel,
            dtype,
            {
                "KS": ks,
                "HAS_MASK": mask,
                **common,
                "BLOCK_M": cfg.block_m,
                "BLOCK_N": cfg.block_n,
                "BLOCK_C": cfg.block_k,
            },
            cfg.num_warps,
            cfg.num_stages,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[80, 86, 90])
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16", "float16", "float64"]
    )
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    failures = 0
    for arch in args.arch:
        cap = divmod(arch, 10)
        for name, kernel, dtype, constexprs, warps, stages in variants(cap, dtypes):
            start = time.time()
            try:
                shared = _compile(kernel, dtype, constexprs, cap, warps, stages)
                if shared > configs.shared_limit(cap):
                    raise RuntimeError(
                        f"needs {shared} B shared memory, sm_{arch} has "
                        f"{configs.shared_limit(cap)} B"
                    )
                print(
                    f"sm_{arch} {name:<20} {str(dtype):<15} ok  shared={shared:>6} B "
                    f"({time.time() - start:.1f}s)",
                    flush=True,
                )
            except Exception as exc:  # report every failure, not only the first
                failures += 1
                print(
                    f"sm_{arch} {name:<20} {str(dtype):<15} FAILED: {type(exc).__name__}: "
                    f"{str(exc)[:2000]}",
                    flush=True,
                )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
