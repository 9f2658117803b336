"""Static checks of the CUDA kernels in the built extension, no GPU needed.

cuobjdump (from ``CUDA_HOME``, else the copy in the triton wheel) extracts the SASS, PTX and
resource usage of ``dense_ext/_C*.so``; the tests read them. They are skipped, saying why, only
when the extension was built without CUDA or no cuobjdump exists. What only a GPU run can
confirm is listed in docs/cuda_kernels.md.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import pytest

ARCHS = ("sm_80", "sm_90")  # the default build's; a test of one the build lacks skips
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def extension_file() -> str:
    try:
        from dense_ext import _C
    except Exception as exc:  # the registration test in test_cpp_ops.py fails for this
        pytest.skip(f"dense_ext._C does not load: {exc}")
    if not _C.with_cuda:
        pytest.skip("dense_ext._C was built without CUDA kernels (DENSE_EXT_CUDA=0 or no nvcc)")
    return _C.__file__


@functools.cache
def cuobjdump() -> str:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    candidates += [shutil.which("cuobjdump") or ""]
    try:
        import triton

        candidates.append(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        )
    except ImportError:
        pass
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip("no cuobjdump found (CUDA_HOME/bin or the triton wheel)")


def run_cuobjdump(*args: str) -> str:
    result = subprocess.run(
        [cuobjdump(), *args, extension_file()], capture_output=True, text=True, check=False
    )
    return result.stdout + result.stderr


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


@functools.cache
def built_archs() -> list[str]:
    """The SASS architectures in the fatbin, e.g. ["sm_80", "sm_90"]."""
    return sorted(set(re.findall(r"kernels\.(sm_\d+)\.cubin", run_cuobjdump("-lelf"))))


@functools.cache
def sass_with_addresses(arch: str) -> dict[str, list[tuple[int, str, str]]]:
    """Kernel (mangled name) -> its SASS as (address, opcode with modifiers, operands). Skips
    when the build has no SASS for ``arch`` (a TORCH_CUDA_ARCH_LIST without it)."""
    if arch not in built_archs():
        pytest.skip(f"no {arch} SASS in this build ({built_archs()}): TORCH_CUDA_ARCH_LIST")
    kernels: dict[str, list[tuple[int, str, str]]] = {}
    current = None
    for line in run_cuobjdump("-sass", "-arch", arch).splitlines():
        if "Function :" in line:
            current = kernels.setdefault(line.split("Function :")[1].strip(), [])
        elif current is not None:
            m = _INSTRUCTION.search(line)
            if m:
                current.append((int(m.group(1), 16), m.group(2), m.group(3).strip()))
    assert kernels, f"no {arch} SASS in {extension_file()}"
    return kernels


def sass(arch: str) -> dict[str, list[tuple[str, str]]]:
    """Kernel (mangled name) -> its SASS instructions as (opcode with modifiers, operands)."""
    return {
        name: [(op, args) for _, op, args in code]
        for name, code in sass_with_addresses(arch).items()
    }


def kernels_named(arch: str, part: str) -> dict[str, list[tuple[int, str, str]]]:
    found = {name: code for name, code in sass_with_addresses(arch).items() if part in name}
    assert found, f"no {arch} kernel whose name contains {part!r}"
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_no_nan_dropping_min_max(arch):
    """relu must keep NaN: no float min/max instruction without the .NAN modifier (FMNMX returns
    the non-NaN operand; `y > 0 ? y : 0` compiled to exactly that in bn_relu_kernel)."""
    offenders = [
        (name, op)
        for name, code in sass(arch).items()
        for op, _ in code
        if op.split(".")[0] in ("FMNMX", "DMNMX", "HMNMX2") and ".NAN" not in op
    ]
    assert not offenders, offenders[:5]


# --- what the fatbin holds -------------------------------------------------------------------

# Per-thread limits every kernel must meet: no local memory (register spills or stack frames;
# both are DRAM traffic per thread) and at most 64 registers, which __launch_bounds__(256, 4)
# asks of ptxas: four 256-thread blocks fit on an SM.
MAX_REGISTERS = 64


def resource_usage() -> list[tuple[str, str, dict[str, int]]]:
    """(arch, kernel, {"REG": .., "STACK": .., "LOCAL": .., "SHARED": ..}) for every kernel."""
    rows, arch = [], None
    lines = run_cuobjdump("-res-usage").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        if line.strip().startswith("Function ") and i + 1 < len(lines):
            name = line.strip()[len("Function ") :].rstrip(":")
            usage = {
                k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", lines[i + 1])
            }
            rows.append((arch, name, usage))
    return rows


def test_fatbin_embeds_ptx_of_the_newest_arch():
    """SASS runs only on its own GPU generation; PTX is JIT-compiled by the driver on any newer
    GPU (sm_100, sm_120), so the newest arch ships as PTX too."""
    from dense_ext import _C

    listing = run_cuobjdump("-lptx")
    newest = max(built_archs(), key=lambda a: int(a[3:]))
    assert re.search(rf"kernels\.{newest}\.ptx", listing), (
        f"no PTX for {newest}: the extension would not run on newer GPUs; build with "
        f"TORCH_CUDA_ARCH_LIST ending in +PTX (setup.py's default). {listing}"
    )
    ptx = run_cuobjdump("-ptx")
    assert ".entry" in ptx and "bn_relu_kernel" in ptx
    # The arch list compiled into the module (the runtime device check) matches the fatbin.
    elves = set(re.findall(r"kernels\.(sm_\d+)\.cubin", run_cuobjdump("-lelf")))
    assert elves == {f"sm_{a}" for a in _C.cuda_sass.split("_")}, (elves, _C.cuda_sass)
    assert set(re.findall(r"kernels\.(sm_\d+)\.ptx", listing)) == {
        f"sm_{a}" for a in _C.cuda_ptx.split("_")
    }


def test_no_kernel_spills_registers():
    rows = resource_usage()
    kernels = [r for r in rows if "_kernel" in r[1]]
    assert {arch for arch, _, _ in kernels} == set(built_archs()) and len(kernels) >= 20, rows[:3]
    for arch, name, usage in kernels:
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0, (arch, name, usage)
        assert usage["REG"] <= MAX_REGISTERS, (arch, name, usage)


# --- the kernels' main loops, from the SASS (issue 11, items 3-5) --------------------------


def header_constant(name: str) -> int:
    text = open(os.path.join(ROOT, "csrc", "cuda", "tiling.cuh")).read()
    return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))


def loops(code: list[tuple[int, str, str]]) -> list[list[tuple[int, str, str]]]:
    """The instructions of each loop: from a backward branch's target to the branch."""
    found = []
    for addr, op, args in code:
        m = re.search(r"0x([0-9a-f]+)", args) if op.startswith("BRA") else None
        if m and int(m.group(1), 16) < addr:
            target = int(m.group(1), 16)
            found.append([ins for ins in code if target <= ins[0] <= addr])
    return found


def main_loop(code):
    """The loop with the most global loads (the row loop; ties: the longest)."""
    candidates = loops(code)
    assert candidates, "no loop"
    return max(candidates, key=lambda body: (count(body, "LDG"), len(body)))


def count(body, prefix: str) -> int:
    return sum(op.startswith(prefix) for _, op, _ in body)


def channels_per_thread(name: str) -> int:
    """V, the kernels' channels-per-thread template argument, from the mangled name (1 for a
    kernel without one)."""
    m = re.search(r"Li([12])E", name)
    return int(m.group(1)) if m else 1


# Kernel -> (tensor operands it loads per element at most, SASS instructions per element in its
# row loop at most). The pre-rewrite kernels ran 77 (bn_relu) to 95 (bn_grad_input)
# instructions per element and loaded 4 BN parameters per element (docs/cuda_kernels.md).
ELEMENTWISE = {
    "bn_relu_kernel": (1, 18),
    "bn_backward_apply_kernel": (2, 22),
    "bn_grad_input_kernel": (3, 30),
    "dropout_store_kernel": (1, 48),  # the mask hash (two 64-bit mixes) is most of it
}
REDUCTIONS = {"stats_partial_kernel": (1, 26), "bn_backward_reduce_kernel": (3, 30)}


def kernel_loops(arch: str, families: dict):
    for family, limits in families.items():
        for name, code in kernels_named(arch, family).items():
            yield family, name, main_loop(code), limits


@pytest.mark.parametrize("arch", ARCHS)
def test_row_loops_load_each_operand_once_per_element(arch):
    """The per-channel BN constants are computed once per thread, outside the row loop: the
    loop loads only the tensors, kUnroll rows of each per iteration (V channels per load)."""
    unroll = header_constant("kUnroll")
    for family, name, body, (operands, _) in kernel_loops(arch, {**ELEMENTWISE, **REDUCTIONS}):
        loads = count(body, "LDG")
        assert loads % unroll == 0 and unroll <= loads <= operands * unroll, (family, name, loads)
        assert count(body, "MUFU") == 0 or family == "stats_partial_kernel", (family, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_instructions_per_element(arch):
    unroll = header_constant("kUnroll")
    for family, name, body, (_, limit) in kernel_loops(arch, {**ELEMENTWISE, **REDUCTIONS}):
        per_element = len(body) / (unroll * channels_per_thread(name))
        if family == "dropout_store_kernel" and "ELb0E" in name:
            limit = 12  # p = 0: a copy
        assert per_element <= limit, (family, name, per_element)


@pytest.mark.parametrize("arch", ARCHS)
def test_reductions_keep_several_loads_in_flight(arch):
    """A reduction's row loop issues a load for each of its kUnroll rows before the first
    floating-point instruction (the pre-rewrite loop used each value before the next load)."""
    unroll = header_constant("kUnroll")
    for family, name, body, _ in kernel_loops(arch, REDUCTIONS):
        ops = [op for _, op, _ in body]
        first_fp = next(
            i for i, op in enumerate(ops) if op[0] in "FDH" and op[1:3] in ("AD", "FM", "MU")
        )
        assert sum(op.startswith("LDG") for op in ops[:first_fp]) >= unroll, (family, name, ops)


@pytest.mark.parametrize("arch", ARCHS)
def test_16_bit_kernels_load_channel_pairs(arch):
    """V = 2 instantiations for half/bfloat16 read two channels per 32-bit load."""
    seen = 0
    for _, name, body, _ in kernel_loops(arch, {**ELEMENTWISE, **REDUCTIONS}):
        if channels_per_thread(name) == 2:
            assert "Half" in name or "BFloat16" in name, name
            widths = {op for _, op, _ in body if op.startswith("LDG")}
            assert all(".U16" not in w and ".64" not in w for w in widths), (name, widths)
            seen += 1
    assert seen >= 2 * (len(ELEMENTWISE) + len(REDUCTIONS)), seen


def test_no_64_bit_division_in_any_kernel():
    """No 64-bit integer division or remainder in the PTX (each is a ~70-instruction call to
    __cuda_sm20_div_s64 / rem in SASS): the pre-rewrite elementwise kernels divided every
    element index by C, and a tail loop's trip count would divide once per thread."""
    ptx = run_cuobjdump("-ptx")
    entries = re.split(r"\.entry ", ptx)[1:]
    assert len(entries) >= 20, "no PTX entries"
    offenders = [e.split("(")[0] for e in entries if re.search(r"\b(div|rem)\.[su]64\b", e)]
    assert not offenders, offenders


@pytest.mark.parametrize("arch", ARCHS)
def test_finalize_kernels_merge_partials_as_a_block_tree(arch):
    """stats_finalize / bn_backward_finalize: 8 lanes per channel walk the (at most
    kMaxPartials) partials, then merge in shared memory; the pre-rewrite kernel walked up to 528
    partials serially in one thread per channel."""
    assert header_constant("kMaxPartials") <= 256
    for family in ("stats_finalize_kernel", "bn_backward_finalize_kernel"):
        for name, code in kernels_named(arch, family).items():
            assert count(code, "BAR.SYNC") >= 3, (name, "no block-wide tree")
            assert count(code, "STS") >= 1 and count(code, "LDS") >= 1, name


def test_dropout_kernels_take_the_seed_by_pointer():
    """The seed is a device pointer argument (`const long*`, PKl in the mangled name), read by
    the kernel: a kernel parameter would be frozen into a captured CUDA graph."""
    for arch in built_archs():
        names = kernels_named(arch, "dropout_store_kernel")
        assert all(re.search(r"TilingEPKl", name) for name in names), list(names)


def compiler() -> str:
    for cxx in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return shutil.which(cxx)
    pytest.skip("no C++ compiler for the host emulation")


@pytest.mark.slow
def test_host_emulation_of_the_cuda_grid(tmp_path):
    """tests/cuda_emulation.cpp runs csrc/cuda/tiling.cuh (the kernels' launch configuration,
    per-thread indexing and the channel_stats thread loop) on the host over 5000+ odd shapes,
    strides, offsets and SM counts: every element visited once, in bounds, aligned; statistics
    match float64 truth. Needs no GPU and no CUDA build."""
    from torch.utils.cpp_extension import include_paths

    exe = tmp_path / "cuda_emulation"
    build = [compiler(), "-std=c++17", "-O2", "-o", str(exe)]
    build += [f"-I{p}" for p in include_paths()]
    build.append(os.path.join(ROOT, "tests", "cuda_emulation.cpp"))
    built = subprocess.run(build, capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, check=False)
    assert ran.returncode == 0 and ran.stdout.startswith("ok:"), ran.stdout[-3000:]


def test_sass_parser_sees_the_kernels():
    """The checks above read real instructions (guards against a parser that finds nothing)."""
    for arch in built_archs():
        code = kernels_named(arch, "bn_relu_kernel")
        assert all(len(c) > 20 for c in code.values())
        assert any(op.startswith("STG") for c in code.values() for _, op, _ in c)


def report(arch: str = "sm_90") -> None:
    """Prints each kernel's row loop: instructions, loads, instructions per element."""
    unroll = header_constant("kUnroll")
    for family, name, body, _ in kernel_loops(arch, {**ELEMENTWISE, **REDUCTIONS}):
        args = re.sub(r"EEEv.*|EEv.*", "", name.split(family)[1])  # template arguments
        elements = unroll * channels_per_thread(name)
        print(
            f"{arch} {family:26s} {args:24s} {len(body):4d} instructions, "
            f"{count(body, 'LDG'):2d} LDG, {len(body) / elements:5.1f} per element"
        )


if __name__ == "__main__":  # python tests/test_cuda_static.py [sm_80|sm_90]: the loop table
    sys.path.insert(0, ROOT)  # this checkout's dense_ext, as pytest would import it
    report(*sys.argv[1:])
