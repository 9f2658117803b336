"""Activation memory of a training step estimated without allocating.

Where a variant would not fit the machine (a naive DenseNet deep or wide enough), the bench
estimates its peak instead of measuring it, and marks the row ``"estimated": true``. The step
runs under ``FakeTensorMode``: every op produces a tensor with shape, dtype and strides but no
data, so nothing is allocated and nothing is computed. ``LiveBytes``, a dispatch mode under
the fake mode, sees every storage an op creates (forward, backward and optimizer ops alike,
including those autograd saves for backward), adds its bytes when it is created and subtracts
them when the storage is freed (a ``weakref.finalize`` on the storage), and keeps the maximum:
the peak of live bytes allocated during the step, which is what the CPU probe measures.

It does the same bookkeeping as ``torch.distributed._tools.mem_tracker.MemTracker`` (the
tests compare the two), in time linear in the number of ops: MemTracker re-sums every live
storage after every op, which made the naive DenseNet-BC-1000 estimate take many minutes.

What it cannot see: workspace that a kernel allocates and frees inside itself (e.g. im2col
columns, oneDNN scratch, the cpp backend's per-layer scratch), because fake kernels only
produce outputs. The bench runs the estimator on rows it also measures (``bench/run.py`` puts
both in the JSON) so the gap is on record beside every estimated row.
"""

from __future__ import annotations

import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bench.variants import ModelConfig, TrainStep, parse_variant

METHOD = (
    "estimated: FakeTensorMode + storage lifetimes (bench.estimate.LiveBytes); kernel-internal "
    "workspace not seen"
)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created while active and still alive, above zero at entry.

    Storages that existed before entering are not counted, in either direction; a view or an
    in-place op creates no storage and costs nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._alive:
            return
        nbytes = storage.nbytes()
        self._alive.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, nbytes)


def estimate_activation_bytes(
    config: ModelConfig, variant: str, batch: int, dtype: str, device: torch.device
) -> dict:
    """``{"peak_activation_bytes", "floor_bytes", "params", "method", "seconds"}`` of one
    training step.

    Runs with fake tensors of ``device``; if that device cannot be faked here, on fake CPU
    tensors (the same storages; said in ``method``). Compiled variants are refused: what the
    compiled graph keeps is decided by the compiler, which a fake eager step does not run.
    """
    if parse_variant(variant).compile:
        raise ValueError(f"cannot estimate the compiled variant {variant!r}")
    t0 = time.perf_counter()
    try:
        result = _estimate(config, variant, batch, dtype, device)
    except Exception as exc:
        if device.type == "cpu":
            raise
        result = _estimate(config, variant, batch, dtype, torch.device("cpu"))
        result["method"] += f"; run with fake CPU tensors ({type(exc).__name__} on {device})"
    result["seconds"] = time.perf_counter() - t0
    return result


def _estimate(
    config: ModelConfig, variant: str, batch: int, dtype: str, device: torch.device
) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        step = TrainStep(config, variant, batch, dtype, device)
        step()  # creates the optimizer state, as the measured warm-up does
        tracker = LiveBytes()
        with tracker:
            step()
    return {
        "peak_activation_bytes": int(tracker.peak),
        "floor_bytes": step.floor_bytes,
        "params": step.params,
        "method": METHOD,
    }
