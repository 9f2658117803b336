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

import pytest

ARCHS = ("sm_80", "sm_90")


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


_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


@functools.cache
def sass(arch: str) -> dict[str, list[tuple[str, str]]]:
    """Kernel (mangled name) -> its SASS instructions as (opcode with modifiers, operands)."""
    kernels: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in run_cuobjdump("-sass", "-arch", arch).splitlines():
        if "Function :" in line:
            current = kernels.setdefault(line.split("Function :")[1].strip(), [])
        elif current is not None:
            m = _INSTRUCTION.search(line)
            if m:
                current.append((m.group(1), m.group(2).strip()))
    assert kernels, f"no {arch} SASS in {extension_file()}"
    return kernels


def kernels_named(arch: str, part: str) -> dict[str, list[tuple[str, str]]]:
    found = {name: code for name, code in sass(arch).items() if part in name}
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
# both are DRAM traffic per thread) and at most 128 registers, so a 256-thread block leaves room
# for two blocks per SM.
MAX_REGISTERS = 128


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
    newest = max(ARCHS, key=lambda a: int(a[3:]))
    assert re.search(rf"kernels\.{newest}\.ptx", listing), listing
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
    assert len({arch for arch, _, _ in kernels}) == len(ARCHS) and len(kernels) >= 20, rows[:3]
    for arch, name, usage in kernels:
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0, (arch, name, usage)
        assert usage["REG"] <= MAX_REGISTERS, (arch, name, usage)


def test_sass_parser_sees_the_kernels():
    """The checks above read real instructions (guards against a parser that finds nothing)."""
    for arch in ARCHS:
        code = kernels_named(arch, "bn_relu_kernel")
        assert all(len(c) > 20 for c in code.values())
        assert any(op.startswith("STG") for c in code.values() for op, _ in c)
