"""Microbenchmarks: one dense block, forward + backward, per backend and memory mode.

    pytest bench/ --benchmark-only                    # all devices present
    pytest bench/ --benchmark-only -k cpu --benchmark-json out.json

Separate from the test suite (``pytest`` alone collects ``tests/`` only). The block is the
first dense block of DenseNet-BC-100 (16 layers, 24 input channels, k=12, bottleneck 4x) at
32x32; the baseline is the naive ``_DenseBlock`` of python_models (``torch.cat`` per layer).
Each round builds nothing: it runs forward, sums the output and runs backward.
"""

from __future__ import annotations

import pytest
import torch

from dense_ext import EfficientDenseBlock, available_backends

LAYERS, C0, K, BN_SIZE, HW = 16, 24, 12, 4, 32
BATCH = {"cpu": 16, "cuda": 64}
CASES = [("naive", None)] + [
    (b, m) for b in ("reference", "cpp", "triton") for m in ("bottleneck", "min")
]


def _devices() -> list[str]:
    # Queried when a test runs, never at collection, so a CPU-only machine collects cleanly.
    return ["cpu", "cuda"]


def _block(device: str, backend: str, memory: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    if backend == "naive":
        from python_models.densenet import _DenseBlock

        block = _DenseBlock(LAYERS, C0, BN_SIZE, K, 0.0)
    else:
        block = EfficientDenseBlock(LAYERS, C0, K, BN_SIZE, memory=memory, backend=backend)
    return block.to(device).train()


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize(
    "backend,memory", CASES, ids=[b if m is None else f"{b}-{m}" for b, m in CASES]
)
def test_block_forward_backward(benchmark, device, backend, memory):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend != "naive" and backend not in available_backends(device):
        pytest.skip(f"backend {backend!r} unavailable on {device}")
    block = _block(device, backend, memory)
    x = torch.randn(BATCH[device], C0, HW, HW, device=device, requires_grad=True)

    def step():
        block(x).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(
        device=device,
        backend=backend,
        memory=memory,
        batch=BATCH[device],
        layers=LAYERS,
        torch=torch.__version__,
    )
    benchmark.pedantic(step, rounds=10 if device == "cuda" else 5, warmup_rounds=1, iterations=1)
