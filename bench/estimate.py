"""Activation memory of a training step estimated without allocating.

Where a variant would not fit the machine (a naive DenseNet deep or wide enough), the bench
estimates its peak instead of measuring it, and marks the row ``"estimated": true``. The step
runs under ``FakeTensorMode``: every op produces a tensor with shape, dtype and strides but no
data, so nothing is allocated and nothing is computed. ``MemTracker``
(``torch.distributed._tools.mem_tracker``) follows the lifetime of every storage the step
creates, including those autograd saves for backward and frees during it, and reports the peak.

What it cannot see: workspace that a kernel allocates and frees inside itself (e.g. im2col
columns, oneDNN scratch), because fake kernels only produce outputs. The bench runs the
estimator on rows it also measures (``bench/run.py`` puts both in the JSON) so the gap is
on record beside every estimated row.
"""

from __future__ import annotations

import torch

from bench.variants import ModelConfig, TrainStep


def estimate_activation_bytes(
    config: ModelConfig, variant: str, batch: int, dtype: str, device: torch.device
) -> dict:
    """``{"peak_activation_bytes", "floor_bytes", "params", "method"}`` of one training step.

    Runs with fake tensors of ``device``; if that device cannot be faked here, on fake CPU
    tensors (the same storages; said in ``method``).
    """
    try:
        return _estimate(config, variant, batch, dtype, device)
    except Exception as exc:
        if device.type == "cpu":
            raise
        result = _estimate(config, variant, batch, dtype, torch.device("cpu"))
        result["method"] += f"; run with fake CPU tensors ({type(exc).__name__} on {device})"
        return result


def _estimate(
    config: ModelConfig, variant: str, batch: int, dtype: str, device: torch.device
) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        step = TrainStep(config, variant, batch, dtype, device)
        step()  # creates the optimizer state, as the measured warm-up does
        tracker = MemTracker()
        tracker.track_external(step.model, step.opt, step.x, step.y)
        with tracker:
            before = _total(tracker.get_tracker_snapshot("current"), device)
            step()
            peak = _total(tracker.get_tracker_snapshot("peak"), device)
    return {
        "peak_activation_bytes": int(peak - before),
        "floor_bytes": step.floor_bytes,
        "params": step.params,
        "method": "estimated: FakeTensorMode + torch.distributed._tools.mem_tracker.MemTracker "
        "(storage lifetimes; kernel-internal workspace not seen)",
    }


def _total(snapshot: dict, device: torch.device) -> int:
    for dev, stats in snapshot.items():
        if torch.device(dev).type == device.type:
            return int(stats["Total"])
    return 0
