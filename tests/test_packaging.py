"""How dense_ext builds and imports: setup.py's switches, the package metadata, the ops.

setup.py is loaded with ``runpy`` under another name than ``__main__``, so its functions run
and nothing is built or installed.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _restore_build_variables(monkeypatch):
    """setup.py's extensions() sets CUDA_HOME and TORCH_CUDA_ARCH_LIST if unset; undo it."""
    for name in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:  # set, then delete: monkeypatch records "was unset" only through a set
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)


def _setup_module() -> dict:
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_no_extension_switch_builds_nothing_and_needs_no_torch():
    code = (
        "import runpy, sys\n"
        "g = runpy.run_path('setup.py', run_name='setup_under_test')\n"
        "print(g['extensions'](), 'torch' in sys.modules)\n"
    )
    out = _python(code, DENSE_EXT_NO_EXTENSION="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "False"]


def test_the_extension_is_built_by_default(monkeypatch):
    monkeypatch.delenv("DENSE_EXT_NO_EXTENSION", raising=False)
    monkeypatch.setenv("DENSE_EXT_CUDA", "0")
    (ext,) = _setup_module()["extensions"](platform="linux")
    assert ext.name == "dense_ext._C"
    assert "-fopenmp" in ext.extra_compile_args["cxx"] and "-fopenmp" in ext.extra_link_args


def test_no_openmp_flags_on_macos(monkeypatch):
    """Apple's clang has no -fopenmp: neither the compile nor the link line may carry it."""
    monkeypatch.setenv("DENSE_EXT_CUDA", "0")
    (ext,) = _setup_module()["extensions"](platform="darwin")
    assert "-fopenmp" not in ext.extra_compile_args["cxx"]
    assert "-fopenmp" not in ext.extra_link_args


def test_cuda_home_is_the_toolkit_of_the_nvcc_on_path(tmp_path, monkeypatch):
    nvcc = tmp_path / "cuda-13.0" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", str(nvcc.parent))
    assert _setup_module()["default_cuda_home"]() == str(tmp_path / "cuda-13.0")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc anywhere
    assert _setup_module()["default_cuda_home"]() == "/usr/local/cuda"


@pytest.mark.parametrize(
    "version,expected",
    [
        ("64.0.0", {"license": "BSD-3-Clause"}),
        ("76.1.0", {"license": "BSD-3-Clause"}),
        ("77.0.3", {"license_expression": "BSD-3-Clause"}),
        ("84.2.1", {"license_expression": "BSD-3-Clause"}),
    ],
)
def test_license_in_the_form_each_setuptools_takes(version, expected):
    assert _setup_module()["license_metadata"](version) == expected


def test_pyproject_leaves_the_license_to_setup_py():
    """A string ``project.license`` stops setuptools < 77 (the GPU image may have one)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "license" not in project and "license" in project["dynamic"]


def test_import_dense_ext_registers_the_ops():
    """``import dense_ext`` alone makes torch.ops.dense_ext.* available when the extension is
    built (a fresh interpreter: nothing else has loaded the library)."""
    if not list((ROOT / "dense_ext").glob("_C*.so")) and not _installed_extension():
        pytest.skip("dense_ext._C is not built (DENSE_EXT_NO_EXTENSION=1 install)")
    code = (
        "import torch, dense_ext\n"
        "print(torch.ops.dense_ext.block_forward, torch.ops.dense_ext.channel_stats)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "dense_ext.block_forward" in out.stdout


def _installed_extension() -> bool:
    import importlib.util

    return importlib.util.find_spec("dense_ext._C") is not None
