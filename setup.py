"""Builds dense_ext and its C++/CUDA extension ``dense_ext._C``.

Switches (environment variables):

* ``DENSE_EXT_NO_EXTENSION=1``: a pure-Python install, no compiler needed and torch not
  imported at build time. The blocks then run on the ``reference`` backend (``auto`` falls
  back with one warning; ``backend="cpp"`` raises).
* ``DENSE_EXT_CUDA=1`` / ``0``: force the CUDA kernels (csrc/cuda) on / off. By default
  they are built when torch was built with CUDA and nvcc exists under ``CUDA_HOME``; never
  decided by ``torch.cuda.is_available()``, since a build machine without a GPU still compiles
  them.
* ``CUDA_HOME``: the CUDA toolkit; default: the one whose ``nvcc`` is on ``PATH``, else
  /usr/local/cuda.
* ``TORCH_CUDA_ARCH_LIST``: architectures (default ``8.0;9.0+PTX``: SASS for A100 and H100,
  and PTX of the newest, which the driver JIT-compiles on any later GPU). The list is compiled
  into the extension (``_C.cuda_sass``, ``_C.cuda_ptx``) so that the ``cpp`` backend can tell
  whether the GPU at hand can run it. The CUDA headers pip installs with torch
  (``nvidia/cu*/include``) are added to the include path.

OpenMP (``-fopenmp``) is used on Linux only: Apple's clang has no ``-fopenmp``; the CPU
kernels then run single-threaded loops inside ATen's thread pool.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str | None:
    """``"0"`` or ``"1"`` when the environment variable ``name`` says so, else None."""
    value = os.environ.get(name, "").strip()
    return value if value in ("0", "1") else None


def is_cuda_home(home: str) -> bool:
    """Whether ``home`` looks like a CUDA toolkit: ``bin/nvcc`` and a CUDA runtime library."""
    libs = [os.path.join(home, d) for d in ("lib64", "lib")]
    libs += glob.glob(os.path.join(home, "targets", "*", "lib"))
    has_runtime = any(glob.glob(os.path.join(d, "libcudart*")) for d in libs)
    return os.path.exists(os.path.join(home, "bin", "nvcc")) and has_runtime


def default_cuda_home() -> str:
    """The toolkit of the ``nvcc`` on PATH (``<home>/bin/nvcc``) if it is one, else
    /usr/local/cuda. (An ``nvcc`` on PATH may be a wrapper script in /usr/local/bin, whose
    parent folder holds no CUDA runtime.)"""
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if is_cuda_home(home):
            return home
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


def _arch_macros() -> list[tuple[str, str]]:
    """DENSE_EXT_CUDA_SASS / _PTX ("80_90" / "90") from TORCH_CUDA_ARCH_LIST, for the runtime
    check of the device; none when an entry is not numeric (e.g. "Hopper"): then unknown."""
    sass, ptx = [], []
    for entry in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"].strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)(\+PTX)?", entry)
        if m is None:
            return []
        cc = str(int(m.group(1)) * 10 + int(m.group(2)))
        sass.append(cc)
        if m.group(3):
            ptx.append(cc)
    # "_"-separated: nvcc splits -D values at commas.
    return [("DENSE_EXT_CUDA_SASS", "_".join(sass)), ("DENSE_EXT_CUDA_PTX", "_".join(ptx))]


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions(platform: str = sys.platform) -> list:
    """The extension modules to build: none under ``DENSE_EXT_NO_EXTENSION=1``."""
    if _flag("DENSE_EXT_NO_EXTENSION") == "1":
        return []
    # torch.utils.cpp_extension reads both variables when it is imported.
    os.environ.setdefault("CUDA_HOME", default_cuda_home())
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
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
        kwargs["define_macros"] = [("DENSE_EXT_WITH_CUDA", None), *_arch_macros()]
        # The CUDA registrations of the device-generic drivers (csrc/cuda/*.cpp) hold no
        # kernels: g++ compiles them in a fifth of nvcc's time (nvcc parses every header once
        # per GPU target).
        sources += _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
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
