"""torch.compile(fullgraph=True): blocks, transitions and whole models compile without graph
breaks, cold (the backend resolved for the first time inside the trace), forward and backward,
and match eager."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_step, cpu_backend_or_skip, train_step
from naive import randomize_bn

import dense_ext.backends as backends
import dense_ext.deluge.backends as stage_backends
from dense_ext import EfficientDenseBlock
from python_models import densenet_bc
from python_models.delugenet import delugenet_cifar


@pytest.fixture
def cold_backends(monkeypatch):
    """No backend resolved yet in this process, as in a fresh program."""
    for registry in (backends._REGISTRY, stage_backends._REGISTRY):
        monkeypatch.setattr(registry, "_resolved", {})
        monkeypatch.setattr(registry, "_instances", {})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_matches_eager(module, x, tol):
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, fullgraph=True)
    for seed in range(2):
        expected = train_step(eager, x, seed=seed)
        actual = train_step(compiled, x, seed=seed)
        assert_same_step(actual, expected, tol, f"step {seed}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
def test_block_compiles_fullgraph_cold(cold_backends, backend, memory):
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    block = EfficientDenseBlock(3, 4, 3, 2, memory=memory, backend=backend)
    randomize_bn(block)
    x = torch.randn(2, 4, 5, 5)
    compiled_matches_eager(block, x, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("norms", ["training", "frozen"])
def test_model_compiles_fullgraph_cold(cold_backends, backend, norms):
    """``frozen``: the model trains with every BN in evaluation (frozen-BN fine-tuning). Before
    the fix the compiled transitions wrote the BN weight gradient into running_mean."""
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    model = densenet_bc(depth=22, growth_rate=4, efficient=True, backend=backend, memory="min")
    randomize_bn(model)
    if norms == "frozen":
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
    x = torch.randn(2, 3, 8, 8)
    compiled_matches_eager(model, x, 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_delugenet_compiles_fullgraph_cold(cold_backends, backend):
    """A whole efficient DelugeNet (stages, transitions, head) under the same rule. Its BNs
    evaluate on running statistics (the CLDCs still train): a CLDC followed by a training BN
    has weight and bias gradients that are zero up to rounding (the BN removes any per-channel
    affine map), which no relative tolerance can compare."""
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    model = delugenet_cifar(1, 0.25, efficient=True, backend=backend, memory="min")
    randomize_bn(model)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    x = torch.randn(2, 3, 8, 8)
    compiled_matches_eager(model, x, 1e-4)
