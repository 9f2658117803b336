"""The bench's memory instruments checked on allocations of known size.

    pytest bench/test_memory_probe.py

(``make bench`` also runs ``python_models.memory.self_test`` first and records it in the JSON.)
"""

from __future__ import annotations

import pytest
import torch

from python_models.memory import cpu_peak, self_test


def test_probe_self_test():
    assert self_test()["passed"]


def test_probe_sees_a_cpp_extension_op():
    """Allocations made by C++ code (the cpp backend) are seen, when the extension is built."""
    import dense_ext

    if "cpp" not in dense_ext.available_backends("cpu"):
        pytest.skip("dense_ext._C not built")
    block = dense_ext.EfficientDenseBlock(4, 8, 4, 4, memory="min", backend="cpp").train()
    x = torch.randn(2, 8, 8, 8)
    out = []
    r = cpu_peak(lambda: out.append(block(x)))
    # At least the feature buffer [2, 8 + 4*4, 8, 8] fp32 is allocated inside the C++ driver.
    assert r.peak_bytes >= 2 * 24 * 8 * 8 * 4


def test_probe_counts_saved_activations():
    """What autograd saves for backward stays live: the probe must see it at the end."""
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(1024, 256)
    kept = []
    r = cpu_peak(lambda: kept.append(torch.relu(x @ w)))
    out_bytes = 1024 * 256 * 4
    assert r.end_bytes >= out_bytes  # relu's output (returned) is saved by relu for backward
    assert r.peak_bytes >= 2 * out_bytes  # matmul output + relu output
