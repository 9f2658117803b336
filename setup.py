"""Builds dense_ext and its C++/CUDA extension ``dense_ext._C``.

Switches (environment variables):

* ``DENSE_EXT_NO_EXTENSION=1``: a pure-Python install, no compiler needed and torch not
  imported at build time. The blocks then run on the ``reference`` backend (``auto`` falls
  back with one warning; ``backend="cpp"`` raises).
* ``DENSE_EXT_CUDA=1`` / ``0``: force the CUDA kernels (csrc/cuda/*.cu) on / off. By default
  they are built when torch was built with CUDA and nvcc exists under ``CUDA_HOME``; never
  decided by ``torch.cuda.is_available()``, since a build machine without a GPU still compiles
  them.
* ``CUDA_HOME``: the CUDA toolkit; default: the one whose ``nvcc`` is on ``PATH``, else
  /usr/local/cuda.
* ``TORCH_CUDA_ARCH_LIST``: architectures (default ``8.0;9.0``). The CUDA headers pip installs
  with torch (``nvidia/cu*/include``) are added to the include path.

OpenMP (``-fopenmp``) is used on Linux only: Apple's clang has no ``-fopenmp``; the CPU
kernels then run single-threaded loops inside ATen's thread pool.
"""

from __future__ import annotations

import glob
import os
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str | None:
    """``"0"`` or ``"1"`` when the environment variable ``name`` says so, else None."""
    value = os.environ.get(name, "").strip()
    return value if value in ("0", "1") else None


def default_cuda_home() -> str:
    """The toolkit of the ``nvcc`` on PATH (``<home>/bin/nvcc``), else /usr/local/cuda."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return "/usr/local/cuda"


def openmp_flags(platform: str) -> list[str]:
    """Compile and link flags for OpenMP: none on macOS (Apple clang lacks -fopenmp)."""
    return [] if platform == "darwin" else ["-fopenmp"]


def _want_cuda(torch) -> bool:
    flag = _flag("DENSE_EXT_CUDA")
    if flag is not None:
        return flag == "1"
    nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return torch.version.cuda is not None and os.path.exists(nvcc)


def _pip_cuda_includes(torch) -> list[str]:
    dirs = []
    for base in [*site.getsitepackages(), os.path.dirname(os.path.dirname(torch.__file__))]:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return sorted(set(dirs))


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions(platform: str = sys.platform) -> list:
    """The extension modules to build: none under ``DENSE_EXT_NO_EXTENSION=1``."""
    if _flag("DENSE_EXT_NO_EXTENSION") == "1":
        return []
    # torch.utils.cpp_extension reads both variables when it is imported.
    os.environ.setdefault("CUDA_HOME", default_cuda_home())
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    import torch
    from torch.utils import cpp_extension

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    omp = openmp_flags(platform)
    kwargs: dict = dict(
        extra_compile_args={"cxx": ["-O3", *omp]},
        extra_link_args=list(omp),
    )
    if _want_cuda(torch):
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["include_dirs"] = _pip_cuda_includes(torch)
        kwargs["define_macros"] = [("DENSE_EXT_WITH_CUDA", None)]
        sources += _rel("csrc/cuda/*.cu")
        return [cpp_extension.CUDAExtension("dense_ext._C", sources, **kwargs)]
    return [cpp_extension.CppExtension("dense_ext._C", sources, **kwargs)]


def license_metadata(setuptools_version: str) -> dict:
    """BSD-3-Clause in the form this setuptools takes: an SPDX ``license_expression`` from
    77 on; before, the free-text ``license`` (77's string ``project.license`` stops older
    versions, and 77+ deprecates the table form). pyproject.toml marks it dynamic."""
    major = int(setuptools_version.split(".")[0])
    if major >= 77:
        return {"license_expression": "BSD-3-Clause"}
    return {"license": "BSD-3-Clause"}


def _cmdclass(ext_modules: list) -> dict:
    if not ext_modules:
        return {}
    from torch.utils import cpp_extension

    return {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__ (pip and setup.py alike)
    import setuptools

    ext_modules = extensions()
    setup(
        ext_modules=ext_modules,
        cmdclass=_cmdclass(ext_modules),
        **license_metadata(setuptools.__version__),
    )
