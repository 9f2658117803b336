"""Builds dense_ext and its C++/CUDA extension ``dense_ext._C``.

The CPU part is always built. The CUDA part (csrc/cuda/*.cu) is built when torch was built with
CUDA and nvcc exists under ``CUDA_HOME`` (default /usr/local/cuda); ``DENSE_EXT_CUDA=1`` forces
it, ``DENSE_EXT_CUDA=0`` disables it. Never ``torch.cuda.is_available()``: a build machine
without a GPU still compiles the CUDA kernels. Architectures come from ``TORCH_CUDA_ARCH_LIST``
(default ``8.0;9.0+PTX``: SASS for A100 and H100, and PTX of the newest, which the driver
JIT-compiles on any later GPU); the list is compiled into the extension (``_C.cuda_sass``,
``_C.cuda_ptx``) so the ``cpp`` backend can tell whether the GPU at hand can run it. The CUDA
headers pip installs with torch (``nvidia/cu*/include``) are added to the include path.
"""

from __future__ import annotations

import glob
import os
import re
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)


def _want_cuda() -> bool:
    flag = os.environ.get("DENSE_EXT_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return torch.version.cuda is not None and os.path.exists(nvcc)


def _pip_cuda_includes() -> list[str]:
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


def extensions():
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp"] if sys.platform != "darwin" else ["-O3"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if _want_cuda():
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["include_dirs"] = _pip_cuda_includes()
        kwargs["define_macros"] = [("DENSE_EXT_WITH_CUDA", None), *_arch_macros()]
        sources += _rel("csrc/cuda/*.cu")
        return [cpp_extension.CUDAExtension("dense_ext._C", sources, **kwargs)]
    return [cpp_extension.CppExtension("dense_ext._C", sources, **kwargs)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
