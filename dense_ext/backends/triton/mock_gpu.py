"""The compiled-kernel host path without a GPU: a Triton driver that reports one sm_90 device
and launches nothing.

Everything Triton does on the host for a launch runs for real (argument binding,
specialisation, cache lookup, the first compile to an sm_90 cubin with Triton's own ``ptxas``);
only loading the cubin and the driver's launch call are replaced by a recorder. With CPU tensors
standing in for CUDA ones this measures the host overhead of the backend and counts its launches
on a machine without a GPU (``bench/triton_roofline.py --host``). Needs ``TRITON_INTERPRET``
unset or 0 (compiled kernels). A compiled kernel keeps the launcher of the driver that was
active when it was first launched: launches are counted by that ``MockDriver``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch

_SM90 = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536}


@dataclass
class MockDriver:
    """Stands in for Triton's CUDA driver (``triton.runtime.driver``)."""

    arch: int = 90
    device: int = 0
    launches: Counter = field(default_factory=Counter)
    last: dict = field(default_factory=dict)  # kernel name -> (grid, stream, arguments)
    log: list | None = None  # when a list: every launch, as (kernel name, grid, arguments)

    def __post_init__(self) -> None:
        from types import SimpleNamespace

        self.utils = SimpleNamespace(
            load_binary=lambda name, kernel, shared, device: (1, 1, 0, 0, 1024),
            get_device_properties=lambda device: dict(_SM90),
        )

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return self.device

    def set_current_device(self, device: int) -> None:
        self.device = device

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        name = getattr(getattr(src, "fn", None), "__name__", str(src))
        driver = self

        def launch(grid_x, grid_y, grid_z, stream, function, packed, meta, enter, exit_, *args):
            driver.launches[name] += 1
            driver.last[name] = ((grid_x, grid_y, grid_z), stream, args)
            if driver.log is not None:
                driver.log.append((name, (grid_x, grid_y, grid_z), args))

        return launch


@contextlib.contextmanager
def mocked_gpu(arch: int = 90):
    """Make Triton launch compiled kernels into a ``MockDriver`` (yielded) while inside."""
    from triton.runtime.driver import driver as config

    from dense_ext.backends.triton import _common

    if _common.INTERPRETED:
        raise RuntimeError("mocked_gpu needs compiled kernels: TRITON_INTERPRET must be 0")
    mock = MockDriver(arch=arch)
    previous = config._active
    config.set_active(mock)
    try:
        yield mock
    finally:
        config._active = previous
