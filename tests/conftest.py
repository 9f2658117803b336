"""pytest's setup for tests/: what must happen before any test module is collected. Shared
helpers live in tests/helpers.py (imported as a module; this file is not)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import torch_threads

# Before any test module is collected: whichever imports dense_ext's Triton kernels first (the
# dense block's or the DelugeNet stage's) defines them, and they must be defined for the
# interpreter when there is no GPU. torch.cuda.is_available() creates no CUDA context.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

# `make test` runs the suite in one pytest-xdist worker per core. Each worker runs torch on one
# thread: two workers of two OpenMP threads each on the 2-core CI machine oversubscribe the
# cores, and most tests are small enough that a second thread only adds synchronisation
# (test_triton.py and test_drop_in.py took 1.26x as long; docs/decisions.md has the numbers).
# The modules below test the C++ ops and the models built on them; they keep KERNEL_THREADS
# threads, so the ops' at::parallel_for paths (row chunks, per-tile partial statistics merged
# across threads) run split as on a user's machine.
XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ
KERNEL_THREADS = 2
THREADED_MODULES = frozenset(
    {
        "test_backend_cpp",
        "test_block",
        "test_cpp_ops",
        "test_cpu_kernels",
        "test_deluge_ops",
        "test_deluge_stage",
        "test_delugenet_models",
        "test_function",
        "test_models",
        "test_stem",
    }
)
if XDIST_WORKER:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def kernel_threads(request):
    """KERNEL_THREADS torch threads for THREADED_MODULES' tests in an xdist worker, but for
    those marked ``one_thread``: the float64 gradchecks, which call the ops thousands of times
    on inputs of a few dozen values. There a second thread only waits for the core the other
    worker holds: test_backend_cpp's gradcheck took 46 s in the suite and 3.4 s alone. The
    threaded paths are the same ops, tested on larger inputs by the other tests."""
    module = request.module.__name__.rpartition(".")[2]
    one_thread = request.node.get_closest_marker("one_thread") is not None
    if not XDIST_WORKER or module not in THREADED_MODULES or one_thread:
        yield
        return
    with torch_threads(KERNEL_THREADS):
        yield


def pytest_collection_modifyitems(items):
    """Tests marked ``slow`` (20-80 s each in a worker: cold torch.compile, interpreted float64
    gradchecks, process groups) run first, so that no worker starts one while the other has
    only a few short tests left; the order within each group stays the collection order."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
