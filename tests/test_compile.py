"""torch.compile(fullgraph=True): blocks, transitions and whole models compile without graph
breaks, cold (the backend resolved for the first time inside the trace), forward and backward,
and match eager."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch._dynamo.testing
from helpers import (
    assert_close,
    assert_same_step,
    cpu_backend_or_skip,
    cuda_or_skip,
    float64_oracle,
    ieee_fp32,
    observables,
    rel_err,
    train_step,
)
from naive import randomize_bn

import dense_ext.backends as backends
import dense_ext.deluge.backends as stage_backends
from dense_ext import EfficientDenseBlock
from python_models import DenseNet, densenet_bc
from python_models.delugenet import delugenet_cifar
from python_models.densenet import ChannelsLastMaxPool2d


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


def compiled_within_eager_error(module, x, tol):
    """``compiled_matches_eager`` where eager's own rounding exceeds ``tol`` (TF32): each
    observable of two compiled steps within ``max(tol, 2 * eager's error)`` of eager's, eager's
    error measured against the same model in float64 stepping alongside. Two results each as
    close to the exact one as eager is differ by at most twice eager's error; a bug moves a
    result by far more than the rounding of the precision it runs at."""
    oracle = float64_oracle(module)
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, fullgraph=True)
    for seed in range(2):
        expected = train_step(eager, x, seed=seed)
        exact = train_step(oracle, x.double(), expected.grad_output.double(), seed=seed)
        actual = train_step(compiled, x, expected.grad_output, seed=seed)
        exact_seen, actual_seen = observables(exact), observables(actual)
        for name, value in observables(expected).items():
            if value.is_floating_point():
                bound = max(tol, 2 * rel_err(value, exact_seen[name].to(value.dtype)))
                assert_close(actual_seen[name], value, bound, f"step {seed}: {name}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
def test_block_compiles_fullgraph_cold(cold_backends, backend, memory):
    """Also silently: no warning from compiling or running (Dynamo warned at every compile
    about an lru_cache in dense_ext's gradient-layout check)."""
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    block = EfficientDenseBlock(3, 4, 3, 2, memory=memory, backend=backend)
    randomize_bn(block)
    x = torch.randn(2, 4, 5, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled_matches_eager(block, x, 1e-5)
    ours = [w for w in caught if not _torch_deprecates_itself(w)]
    assert not ours, [f"{w.filename}: {w.message}" for w in ours]


@pytest.mark.slow
def test_compiled_block_takes_new_batch_and_map_sizes(cold_backends):
    """The last batch of an epoch is smaller, and evaluation may run at another resolution:
    a compiled block (cpp backend) given new sizes recompiles with them dynamic (Dynamo's
    automatic dynamic shapes: the ops' fake implementations take symbolic sizes) and matches
    eager, forward and backward; a further new size reuses that graph instead of compiling
    once per size."""
    backend = cpu_backend_or_skip("cpp")
    torch.manual_seed(0)
    block = EfficientDenseBlock(2, 4, 3, 2, memory="min", backend=backend).double()
    randomize_bn(block)
    eager = copy.deepcopy(block)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    for i, shape in enumerate([(2, 4, 5, 5), (3, 4, 5, 5), (5, 4, 7, 6), (4, 4, 6, 9)]):
        compiles = counter.frame_count
        x = torch.randn(shape, dtype=torch.float64)
        expected = train_step(eager, x, seed=i)
        actual = train_step(compiled, x, seed=i)
        assert_same_step(actual, expected, 1e-10, f"input {shape}")
    assert counter.frame_count == compiles, f"input {shape} compiled again"


def _torch_deprecates_itself(w: warnings.WarningMessage) -> bool:
    """A DeprecationWarning that torch raises inside its own code: torch 2.11's compiler
    imports modules that call the deprecated ``torch.jit.script_method`` (nothing of ours)."""
    torch_dir = os.path.dirname(torch.__file__)
    return issubclass(w.category, DeprecationWarning) and w.filename.startswith(torch_dir)


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
def test_imagenet_stem_model_compiles_fullgraph_cold(cold_backends):
    """The efficient ImageNet stem's channels_last max pool (an autograd.Function that hands
    the gradient back in NCHW) compiles into the same graph, forward and backward."""
    cpu_backend_or_skip("cpp")
    torch.manual_seed(0)
    model = DenseNet(
        growth_rate=4,
        block_config=(2, 2),
        num_init_features=8,
        bn_size=2,
        num_classes=5,
        efficient=True,
        backend="cpp",
        memory="min",
    )
    randomize_bn(model)
    assert isinstance(model.features.pool0, ChannelsLastMaxPool2d)
    compiled_matches_eager(model, torch.randn(2, 3, 21, 18), 1e-4)


def delugenet_with_frozen_bns(backend: str) -> torch.nn.Module:
    """A small efficient DelugeNet, every BN on running statistics, the CLDCs training."""
    torch.manual_seed(0)
    model = delugenet_cifar(1, 0.25, efficient=True, backend=backend, memory="min")
    randomize_bn(model)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_delugenet_compiles_fullgraph_cold(cold_backends, monkeypatch, backend):
    """A whole efficient DelugeNet (stages, transitions, head) under the same rule. Its BNs
    evaluate on running statistics (the CLDCs still train): a CLDC followed by a training BN
    has weight and bias gradients that are zero up to rounding (the BN removes any per-channel
    affine map), which no relative tolerance can compare."""
    cpu_backend_or_skip(backend)
    model = delugenet_with_frozen_bns(backend)
    fused = fused_stage_calls(monkeypatch)
    compiled_matches_eager(model, torch.randn(2, 3, 8, 8), 1e-4)
    assert fused, "the compiled DelugeNet ran unfused (the naive formulas), not the fused stages"


def fused_stage_calls(monkeypatch) -> list[str]:
    """The backends the DelugeNet modules' fused paths pick while torch.compile traces them
    (torch 2.11's Dynamo, taking every trace for torch.export, sent them all unfused)."""
    from dense_ext.deluge import modules

    calls: list[str] = []
    pick = modules._backend

    def spy(name, device):
        if torch.compiler.is_compiling():
            calls.append(name)
        return pick(name, device)

    monkeypatch.setattr(modules, "_backend", spy)
    return calls


def test_is_exporting_only_under_torch_export():
    """dense_ext's is_exporting: False under torch.compile (torch 2.11's
    torch.compiler.is_exporting() said True there), True under torch.export, strict or not."""
    from dense_ext.tracing import is_exporting

    class Probe(torch.nn.Module):
        def forward(self, x):
            return x + (1.0 if is_exporting() else 2.0)

    x = torch.zeros(1)
    assert Probe()(x).item() == 2.0
    assert torch.compile(Probe(), fullgraph=True)(x).item() == 2.0
    for strict in (False, True):
        exported = torch.export.export(Probe(), (x,), strict=strict).module()
        assert exported(x).item() == 1.0, f"strict={strict}"


# ----------------------------------------------------------------------------- CUDA
def cuda_backend_or_fail(name: str) -> None:
    """Skip without a CUDA device; fail when one is present and ``name`` cannot run on it
    (except the Triton backend on GPUs older than sm_80, which it does not support)."""
    cuda_or_skip()
    reason = backends.unavailable_reason(name, "cuda")
    if reason is not None and "below sm_80" in reason:
        pytest.skip(f"{name} unavailable on cuda: {reason}")
    if reason is not None:
        pytest.fail(f"CUDA device present but {name} cannot run on it: {reason}")


def fp32_tolerance() -> float:
    """Compiled and eager run the same kernels, but inductor fuses the transitions' BN and
    ReLU in its own order: float32 rounding (1e-4 relative after a few layers), or TF32's
    (unit roundoff 2^-11 = 4.9e-4) when cuDNN convolutions may use it."""
    from dense_ext.backends.triton._common import conv_fp32_precision

    return 2e-3 if conv_fp32_precision() == "tf32" else 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cuda_model_compiles_fullgraph(cold_backends, backend):
    """DenseNet-BC-22 on CUDA, float32, compiled with fullgraph=True, forward and backward:
    the same step as eager (outputs, gradients, running statistics), two seeds."""
    cuda_backend_or_fail(backend)
    torch.manual_seed(0)
    model = densenet_bc(depth=22, growth_rate=4, efficient=True, backend=backend, memory="min")
    randomize_bn(model)
    compiled_matches_eager(model.cuda(), torch.randn(4, 3, 8, 8, device="cuda"), fp32_tolerance())


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cuda_delugenet_compiles_fullgraph(cold_backends, monkeypatch, backend):
    """The CPU DelugeNet test on CUDA (BNs on running statistics, CLDCs training) with TF32
    allowed: the compiled model runs the fused stages and each observable (output, every
    gradient, running statistics) is within twice eager's own error of eager's
    (``compiled_within_eager_error``). A fixed 2e-3 failed here for
    triton on the H200 (run9: entry.norm2.bias's gradient 2.26e-3 from eager's) while the IEEE
    test below passed at 1e-4: TF32 rounding, which this bound measures instead of guessing."""
    cuda_backend_or_fail(backend)
    model = delugenet_with_frozen_bns(backend)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    fused = fused_stage_calls(monkeypatch)
    compiled_within_eager_error(model.cuda(), x, 1e-4)
    assert fused, "the compiled DelugeNet ran unfused (the naive formulas), not the fused stages"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cuda_compiled_delugenet_matches_eager_in_ieee_fp32(cold_backends, monkeypatch, backend):
    """The same in IEEE float32 at 1e-4, where TF32's rounding cannot hide a small bug: the
    H200 (run7) showed a compiled triton DelugeNet 2.3e-3 off eager with TF32 on, and earlier
    an input gradient off by a relative 20 (strides of sliced buffers baked into a launch;
    docs/gpu_runs.md)."""
    cuda_backend_or_fail(backend)
    model = delugenet_with_frozen_bns(backend)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    fused = fused_stage_calls(monkeypatch)
    with ieee_fp32():
        compiled_matches_eager(model.cuda(), x, fp32_tolerance())
    assert fused, "the compiled DelugeNet ran unfused (the naive formulas), not the fused stages"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cuda_reduce_overhead_matches_eager(cold_backends, backend):
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs replayed by inductor): three
    training steps of a block, each equal to eager."""
    cuda_backend_or_fail(backend)
    torch.manual_seed(0)
    block = EfficientDenseBlock(3, 8, 4, 2, memory="min", backend=backend).cuda()
    randomize_bn(block)
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(2, 8, 9, 9, device="cuda")
    for seed in range(3):
        expected = train_step(eager, x, seed=seed)
        actual = train_step(compiled, x, seed=seed)
        assert_same_step(actual, expected, fp32_tolerance(), f"step {seed}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cuda_reduce_overhead_draws_fresh_dropout_masks(cold_backends, backend):
    """Under ``mode="reduce-overhead"`` every replay draws a new dropout mask (the seeds come
    from a graph-safe op, not a Python int baked into the graph), at the requested rate."""
    cuda_backend_or_fail(backend)
    torch.manual_seed(0)
    block = EfficientDenseBlock(2, 8, 8, 2, 0.3, memory="min", backend=backend).cuda()
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, 8, 9, 9, device="cuda", requires_grad=True)
    masks = []
    for _ in range(5):  # the first calls warm up and record; the last ones replay
        # Gradients set to None each step, as zero_grad() does: accumulating into a gradient
        # a previous replay produced reads memory the next replay overwrites (PyTorch's rule).
        x.grad = None
        block.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(x)
        out.sum().backward()
        masks.append(out[:, 8:].detach() == 0)  # new features are exact zeros only where dropped
    for mask in masks:
        assert 0.25 < mask.float().mean().item() < 0.35
    assert not torch.equal(masks[-1], masks[-2]), "a replay repeated the previous mask"
    assert not torch.equal(masks[-1], masks[-3])
