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


def test_sass_parser_sees_the_kernels():
    """The checks above read real instructions (guards against a parser that finds nothing)."""
    for arch in ARCHS:
        code = kernels_named(arch, "bn_relu_kernel")
        assert all(len(c) > 20 for c in code.values())
        assert any(op.startswith("STG") for c in code.values() for op, _ in c)
