"""Ahead-of-time compile of every kernel for sm_80, sm_86 and sm_90, on any machine (no GPU needed).

Triton ships ``ptxas`` and ``cuobjdump``, so ``triton.compile`` can lower a kernel all the way
to a cubin for a given target without a device. This catches what the interpreter cannot, and
checks per variant:

* it compiles (type errors of the compiled path: float64 ``tl.dot``, constexpr globals, layouts);
* its shared memory fits the target (``configs.shared_limit``);
* it does not spill: local memory (``cuobjdump --dump-resource-usage``: ``LOCAL``/``STACK``) at
  most ``SPILL_LIMIT_BYTES``;
* half precision with activation offsets and channel counts that are multiples of 8 elements
  (``row_offsets``/``channels_ok``): the PTX moves activations in 16-byte accesses;
* float32 with TF32: the PTX rounds the operands (``cvt.rna.tf32.f32``) before the tensor-core
  instruction (``mma``/``wgmma`` ``.tf32``); float32 IEEE has neither.

With ``--as-inductor`` each kernel is first re-emitted as ``torch.compile`` does with a
user-defined Triton kernel (inductor's
``user_defined_triton_kernel_transitive_closure_source_code``: the kernel's source and its
helpers' sources under the names it calls them by, written to a module and imported again)
and that copy is compiled: a helper the copy cannot see (an alias, a Python global of a type
inductor does not carry) fails here instead of on the first GPU run.

    python -m dense_ext.backends.triton.compile_check [--arch 80 90] [--dtypes float32 ...]
        [--as-inductor]

Must run with ``TRITON_INTERPRET`` unset or 0 (kernels defined for compilation).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch

from dense_ext.backends.triton import interpret_requested

if interpret_requested():  # pragma: no cover
    sys.exit("compile_check needs TRITON_INTERPRET unset (kernels must be defined compiled)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dense_ext.backends.triton import configs  # noqa: E402
from dense_ext.backends.triton.conv_dgrad import _conv_dgrad_bn_relu_bwd_kernel  # noqa: E402
from dense_ext.backends.triton.conv_fwd import (  # noqa: E402
    TAPS_BLOCK,
    _bn_relu_conv_fwd_kernel,
    _weight_taps_kernel,
)
from dense_ext.backends.triton.conv_wgrad import (  # noqa: E402
    SUM_BLOCK,
    _bn_relu_conv_wgrad_kernel,
    _sum_splits_kernel,
)
from dense_ext.backends.triton.dropout import _dropout_backward_kernel  # noqa: E402
from dense_ext.backends.triton.stats import (  # noqa: E402
    GROUP_TILES,
    _merge_groups_kernel,
    _merge_stats_kernel,
    _tile_stats_kernel,
)

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
    "INV_ptr",
}


_SMS = 132  # H100 SXM
# Local memory (spills) a kernel may use; every variant today uses none.
SPILL_LIMIT_BYTES = 0
_FLOAT_ARGS = {"count", "p", "scale_hi", "scale_mid", "scale_lo", "eps"}


@dataclass
class Compiled:
    shared: int  # bytes of shared memory
    registers: int
    local: int  # bytes of local memory per thread (register spills)
    ptx: str


def _compile(kernel, dtype, constexprs, cap, num_warps, num_stages) -> Compiled:
    buf = _TRITON_TYPES[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    signature = {}
    # At run time every pointer is 16-byte aligned (fresh allocations), and Triton specialises
    # on that: compile the same way, so registers, spills and vector widths are the real ones.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, param in enumerate(kernel.params)
        if param.name.endswith("_ptr")
    }
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name == "SEED_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (acc if name in _ACC_POINTERS else buf)
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", cap[0] * 10 + cap[1], 32)
    compiled = triton.compile(
        src, target=target, options={"num_warps": num_warps, "num_stages": num_stages}
    )
    registers, local = resource_usage(compiled.asm["cubin"])
    return Compiled(compiled.metadata.shared, registers, local, compiled.asm["ptx"])


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """``(registers, local memory bytes)`` of the one kernel in ``cubin``, read by
    ``cuobjdump``: register spills go to local memory (its call-stack frame, ``STACK``, is a
    different thing and not counted)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {out}")
    registers, stack, local = (int(v) for v in usage.groups())
    return registers, local


def check_tf32(ptx: str, tf32: bool) -> str | None:
    """Why the PTX does not round TF32 operands as it should, or None."""
    rounds = ptx.count("cvt.rna.tf32.f32")
    tf32_mma = re.search(r"\bw?gmma\S*\.tf32|\bmma\.sync\S*\.tf32", ptx) is not None
    if tf32 and not (rounds and tf32_mma):
        return f"TF32 expected: {rounds} cvt.rna.tf32.f32, tf32 mma {tf32_mma}"
    if not tf32 and (rounds or tf32_mma):
        return f"IEEE float32 expected, found {rounds} cvt.rna.tf32.f32, tf32 mma {tf32_mma}"
    return None


# (C_in, bottleneck width, k, M, ALIGN): a 32x32 layer at batch 64 whose buffer and channel
# offsets are multiples of 8 (``row_offsets``), and a 7x7 one (small grids: the row tile
# shrinks, see configs._row_tile) with DenseNet-BC's multiples of 4 (k=12).
SHAPES = ((256, 128, 32, 64 * 32 * 32, 8), (992, 128, 32, 64 * 7 * 7, 4))


def as_inductor_emits(kernel, folder: Path):
    """``kernel`` as inductor re-emits it for a compiled graph, imported from a file in
    ``folder``."""
    import importlib.util

    from torch._inductor.codegen.wrapper import (
        user_defined_triton_kernel_transitive_closure_source_code as closure_source,
    )

    name = kernel.fn.__name__
    source = "import triton\nimport triton.language as tl\n\n@triton.jit\n" + closure_source(kernel)
    path = folder / f"inductor_{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"inductor_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def variants(cap, dtypes):
    """(name, kernel, dtype, constexprs, num_warps, num_stages) of the kernels a block launches,
    each distinct variant once."""
    seen = set()
    for dtype in dtypes:
        precisions = ["tf32", "ieee"] if dtype == torch.float32 else ["ieee"]
        for precision in precisions:
            for shape in SHAPES:
                for v in _conv_variants(cap, dtype, precision, *shape):
                    key = (v[1].fn.__name__, v[2], tuple(sorted(v[3].items())), v[4], v[5])
                    if key not in seen:
                        seen.add(key)
                        yield v
    stats = configs.stats_gpu(32)
    yield (
        "tile_stats",
        _tile_stats_kernel,
        torch.float32,
        {"X_ALIGN": 8, "BLOCK_M": stats.block_m, "BLOCK_C": stats.block_n},
        stats.num_warps,
        2,
    )
    for write_inv in (False, True):  # the eager loop's merges also write the normalisers
        merge = {"WRITE_INV": write_inv, "BLOCK_T": 64, "BLOCK_C": 32}
        name = "merge_stats_inv" if write_inv else "merge_stats"
        yield (name, _merge_stats_kernel, torch.float32, merge, 4, 2)
    groups = {"BLOCK_T": GROUP_TILES, "BLOCK_C": 32}  # the first launch of a two-level merge
    yield ("merge_groups", _merge_groups_kernel, torch.float32, groups, 4, 2)
    for dtype in dtypes:  # the eager loop's weight launches: 3x3 taps, split sums
        yield ("weight_taps", _weight_taps_kernel, dtype, {"TAPS": 9, "BLOCK": TAPS_BLOCK}, 4, 2)
        yield ("sum_splits", _sum_splits_kernel, dtype, {"BLOCK": SUM_BLOCK}, 4, 2)
    for dtype in dtypes:
        yield (
            "dropout_bwd",
            _dropout_backward_kernel,
            dtype,
            {"ACC_FP64": dtype == torch.float64, "BLOCK_M": 128, "BLOCK_C": 32},
            4,
            2,
        )


def _conv_variants(cap, dtype, precision, c_in, mid, k, m, align):
    common = {"DOT_FP32": False, "INPUT_PRECISION": precision, "TF32": precision == "tf32"}
    suffix = "_ieee" if dtype == torch.float32 and precision == "ieee" else ""
    for ks, cin, cout, dropout in ((1, c_in, mid, False), (3, mid, k, True)):
        cfg = configs.conv_fwd_gpu(m, cin, cout, dtype, cap, _SMS)
        # the 3x3 also over an input already normalised (NORMALIZE=False: the roofline's probe
        # of a BN-ReLU pass before a plain convolution)
        for normalize in (True, False) if ks == 3 else (True,):
            yield (
                f"fwd_ks{ks}{suffix}_m{cfg.block_m}{'' if normalize else '_normalised_input'}",
                _bn_relu_conv_fwd_kernel,
                dtype,
                {
                    "KS": ks,
                    "DROPOUT": dropout,
                    "COMPUTE_STATS": True,
                    "NORMALIZE": normalize,
                    "W_AS_CONV": ks == 1,  # the 1x1 weight read as it is, as the backend does
                    **common,
                    "X_ALIGN": align,
                    "Y_ALIGN": align,
                    "BLOCK_M": cfg.block_m,
                    "BLOCK_N": cfg.block_n,
                    "BLOCK_K": cfg.block_k,
                },
                cfg.num_warps,
                cfg.num_stages,
            )
        cfg = configs.conv_dgrad_gpu(m, cin, cout, dtype, cap, _SMS)
        # the 3x3 also with dZ kept between the passes (the roofline's probe)
        for apply, dz_in_dx in product((False, True), (False, True) if ks == 3 else (False,)):
            name = f"dgrad_ks{ks}_{'apply' if apply else 'reduce'}{suffix}_m{cfg.block_m}"
            yield (
                name + ("_dz_in_dx" if dz_in_dx else ""),
                _conv_dgrad_bn_relu_bwd_kernel,
                dtype,
                {
                    "KS": ks,
                    "APPLY": apply,
                    "BATCH_STATS": True,
                    "ACCUMULATE": ks == 1,
                    "DZ_IN_DX": dz_in_dx,
                    "W_AS_CONV": ks == 1,
                    **common,
                    "DY_ALIGN": align,
                    "X_ALIGN": align,
                    "DX_ALIGN": align,
                    "BLOCK_M": cfg.block_m,
                    "BLOCK_N": cfg.block_n,
                    "BLOCK_C": cfg.block_k,
                },
                cfg.num_warps,
                cfg.num_stages,
            )
        cfg = configs.conv_wgrad_gpu(m, cin, cout, ks * ks, dtype, cap, _SMS)
        for normalize in (True, False) if ks == 3 else (True,):  # as for the forward
            yield (
                f"wgrad_ks{ks}{suffix}{'' if normalize else '_normalised_input'}",
                _bn_relu_conv_wgrad_kernel,
                dtype,
                {
                    "KS": ks,
                    "NORMALIZE": normalize,
                    **common,
                    "DY_ALIGN": align,
                    "X_ALIGN": align,
                    "BLOCK_M": cfg.block_m,
                    "BLOCK_N": cfg.block_n,
                    "BLOCK_C": cfg.block_k,
                },
                cfg.num_warps,
                cfg.num_stages,
            )


def check_variant(cap, kernel, dtype, constexprs, warps, stages) -> tuple[Compiled, list[str]]:
    """Compile one variant; the list of its problems (empty when it passes every check)."""
    compiled = _compile(kernel, dtype, constexprs, cap, warps, stages)
    problems = []
    if compiled.shared > configs.shared_limit(cap):
        problems.append(
            f"needs {compiled.shared} B shared memory, sm_{cap[0]}{cap[1]} has "
            f"{configs.shared_limit(cap)} B"
        )
    if compiled.local > SPILL_LIMIT_BYTES:
        problems.append(
            f"spills: {compiled.local} B local memory > {SPILL_LIMIT_BYTES} B "
            f"({compiled.registers} registers)"
        )
    if constexprs.get("X_ALIGN", 1) >= 8 and dtype in (torch.bfloat16, torch.float16):
        sixteen_bytes = (
            # a masked cp.async carries its source size after the copy size: ", 0x10, %r7;"
            r"cp\.async\.cg\.shared\.global[^;]*, 0x10(, %r\d+)?;|[ls][dt]\.global(\.\w+)*\.v4\.b32"
        )
        if not re.search(sixteen_bytes, compiled.ptx):
            problems.append("no 16-byte access although the activation offsets are multiples of 8")
    # an apply pass that reads dZ (DZ_IN_DX) has no product at all: neither TF32 nor IEEE mma
    gemm = not (constexprs.get("DZ_IN_DX") and constexprs.get("APPLY"))
    if "TF32" in constexprs and dtype == torch.float32:
        tf32 = check_tf32(compiled.ptx, constexprs["TF32"] and gemm)
        if tf32 is not None:
            problems.append(tf32)
    ieee = dtype == torch.float32 and constexprs.get("INPUT_PRECISION") == "ieee"
    if ieee and kernel is _bn_relu_conv_wgrad_kernel and not re.search(_ADD_F32, compiled.ptx):
        # The wgrad has no other float32 add: without one, Triton folded the fresh tile of
        # ``dot`` (_common.py) back into one FMA chain over all rows of a split.
        problems.append("IEEE float32 dot sums all rows in one FMA chain (fresh tile folded)")
    return compiled, problems


_ADD_F32 = r"\badd\.(?:rn\.)?f32\b"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[80, 86, 90])
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16", "float16", "float64"]
    )
    parser.add_argument(
        "--as-inductor",
        action="store_true",
        help="compile each kernel as torch.compile re-emits it (see the module docstring)",
    )
    args = parser.parse_args(argv)
    # The re-emitted sources are imported from files; the folder goes when the check ends.
    with tempfile.TemporaryDirectory(prefix="dense_ext_inductor_") as folder:
        return _check_variants(args, Path(folder))


def _check_variants(args: argparse.Namespace, folder: Path) -> int:
    """Compile every variant for each of ``args.arch``; print a line per variant and the
    count; 1 if any failed."""
    dtypes = [getattr(torch, d) for d in args.dtypes]
    failures = total = 0
    for arch in args.arch:
        cap = divmod(arch, 10)
        for name, kernel, dtype, constexprs, warps, stages in variants(cap, dtypes):
            start = time.time()
            total += 1
            try:
                if args.as_inductor:
                    kernel = as_inductor_emits(kernel, folder)
                compiled, problems = check_variant(cap, kernel, dtype, constexprs, warps, stages)
            except Exception as exc:  # report every failure, not only the first
                compiled, problems = None, [f"{type(exc).__name__}: {str(exc)[:2000]}"]
            head = f"sm_{arch} {name:<30} {str(dtype):<15}"
            if problems:
                failures += 1
                print(f"{head} FAILED: {'; '.join(problems)}", flush=True)
                continue
            print(
                f"{head} ok  shared={compiled.shared:>6} B regs={compiled.registers:>3} "
                f"local={compiled.local} B ({time.time() - start:.1f}s)",
                flush=True,
            )
    print(f"{total} variants, {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
