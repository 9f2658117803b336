"""Every parameter gradient has its parameter's strides (PyTorch's gradient layout contract as
``DistributedDataParallel`` checks it: every stride, size-1 dimensions included), for every
model, naive and efficient, every backend that runs here, contiguous and channels_last; and a
two-process DDP step prints no "Grad strides do not match bucket view strides" warning."""

from __future__ import annotations

import copy
import os
import pickle
import warnings

# The Triton case runs interpreted on the CPU; like test_triton, before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_backend_or_skip, swap_on_conversion, torch_threads
from ranks import spawn_ranks
from torch import nn

from dense_ext.grad_layout import grad_like_param
from dense_ext.sync_bn import enable_sync_bn
from python_models import MODEL_NAMES, DenseNet, delugenet_cifar, densenet_bc, get_model

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
IMAGENET = ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264")


@pytest.fixture(autouse=True)
def one_thread():
    # Many tiny convolutions: OpenMP threads only contend here (x50 slower on a loaded machine).
    with torch_threads(1):
        yield


def mismatched_strides(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Parameters whose gradient strides differ from their own after one training step."""
    model.zero_grad(set_to_none=True)
    logits = model(x)
    F.cross_entropy(logits, torch.arange(len(x)) % logits.shape[1]).backward()
    return [
        f"{name}: parameter {tuple(p.stride())}, gradient {tuple(p.grad.stride())}"
        for name, p in model.named_parameters()
        if p.grad is None or p.grad.stride() != p.stride()
    ]


# ATen's CPU convolution takes the oneDNN path, whose 1x1 weight gradients follow a
# channels_last input, for batches of 16 or more (or more than one thread); smaller batches on
# one thread take a path that returns contiguous gradients and would hide the problem.
BATCH = 16


def check_model(model: nn.Module, size: int, fmt: str) -> None:
    torch.manual_seed(0)
    model = model.to(memory_format=FORMATS[fmt])
    x = torch.randn(BATCH, 3, size, size).contiguous(memory_format=FORMATS[fmt])
    assert mismatched_strides(model, x) == []


DENSENETS = tuple(name for name in MODEL_NAMES if "deluge" not in name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", ["naive", "reference", "cpp"])
def test_delugenet_parameter_gradients_have_the_parameter_strides(variant, fmt):
    # The CIFAR DelugeNet at its smallest (n=1, a quarter of the width): every layer type of
    # the named DelugeNets (stem, entry, CLDC stages, transitions, head) is in it.
    kwargs: dict = {}
    if variant != "naive":
        cpu_backend_or_skip(variant)
        kwargs.update(efficient=True, backend=variant, memory="min")
    torch.manual_seed(0)
    check_model(delugenet_cifar(1, width=0.25, **kwargs), 8, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", ["naive", "reference", "cpp"])
@pytest.mark.parametrize("name", DENSENETS)
def test_every_parameter_gradient_has_the_parameter_strides(name, variant, fmt):
    # Every named configuration at its full depth, narrowed (growth rate 2) to stay fast: the
    # layouts depend on the layer types and the backend, not on the widths.
    kwargs: dict = dict(growth_rate=2)
    if name in IMAGENET:
        kwargs["num_init_features"] = 4
    if variant != "naive":
        cpu_backend_or_skip(variant)
        kwargs.update(efficient=True, backend=variant, memory="min")
    torch.manual_seed(0)
    # The smallest images every stage can take: ImageNet models downsample 32 times.
    check_model(get_model(name, **kwargs), 32 if name in IMAGENET else 8, fmt)


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_gradients_have_the_parameter_strides(fmt):
    # Interpreted on the CPU, on a model small enough for the interpreter.
    cpu_backend_or_skip("triton")
    torch.manual_seed(0)
    model = DenseNet(
        growth_rate=4,
        block_config=(2, 2),
        num_init_features=6,
        num_classes=3,
        small_inputs=True,
        efficient=True,
        backend="triton",
    )
    check_model(model, 4, fmt)


def test_grad_like_param_restrides_size_one_dimensions_without_a_copy():
    param = torch.empty(6, 5, 1, 1)  # strides (5, 1, 1, 1)
    # What ATen's convolution backward returns for a channels_last input.
    grad = torch.empty(6, 5, 1, 1, memory_format=torch.channels_last).normal_()
    assert grad.stride() == (5, 1, 5, 5)
    out = grad_like_param(grad, param)
    assert out.stride() == param.stride() and out.data_ptr() == grad.data_ptr()
    assert torch.equal(out, grad)


def test_grad_like_param_copies_other_layouts():
    param = torch.empty(6, 5, 3, 3)
    grad = torch.randn(6, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    out = grad_like_param(grad, param)
    assert out.stride() == param.stride() and torch.equal(out, grad)
    cl_param = param.contiguous(memory_format=torch.channels_last)
    assert grad_like_param(grad.contiguous(), cl_param).stride() == cl_param.stride()
    # A parameter with gaps (not dense): AccumulateGrad's rule, contiguous.
    gappy = torch.empty(6, 10)[:, ::2]
    assert grad_like_param(torch.randn(5, 6).t(), gappy).is_contiguous()


def test_unfused_transitions_keep_the_layout():
    # A hook on a transition's BN: the transition calls its modules one by one, the conv on the
    # block's channels_last output.
    model = densenet_bc(depth=10, growth_rate=4, efficient=True, backend="reference")
    for name, module in model.named_modules():
        if name.endswith("transition1.norm"):
            module.register_forward_hook(lambda m, args, out: out)
    check_model(model, 8, "contiguous")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_compiled_models_keep_the_layout(backend):
    # A traced convolution's gradient has its meta function's strides, not the kernel's.
    cpu_backend_or_skip(backend)
    model = densenet_bc(depth=10, growth_rate=4, efficient=True, backend=backend)
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, 8, 8)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(compiled(x), torch.arange(BATCH) % 10).backward()
    assert [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()] == []


def test_models_whose_parameters_were_swapped_keep_the_layout():
    # Under PyTorch's future flag, module.to swaps each parameter's contents
    # (torch.utils.swap_tensors), which refuses weakly referenced tensors and leaves the
    # parameter's own hooks behind.
    model = densenet_bc(depth=10, growth_rate=4, efficient=True, backend="reference")
    check_model(model, 8, "contiguous")
    with swap_on_conversion():
        model.double().float()
    check_model(model, 8, "contiguous")


def test_copied_models_keep_the_layout():
    model = densenet_bc(depth=10, growth_rate=4, efficient=True, backend="reference")
    check_model(copy.deepcopy(model), 8, "contiguous")
    check_model(pickle.loads(pickle.dumps(model)), 8, "contiguous")


# ----------------------------------------------------------------------------- DDP

WORLD = 2


def _ddp_worker(rank: int) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for backend in ("reference", "cpp"):
            _ddp_step(get_model("densenet_bc_10", growth_rate=4, efficient=True, backend=backend))
        # With synchronised BN (the --sync-bn run): fused transitions and head, synced.
        model = get_model("densenet_bc_10", growth_rate=4, efficient=True, backend="reference")
        _ddp_step(enable_sync_bn(model))
    layout = [str(w.message) for w in seen if "Grad strides" in str(w.message)]
    assert layout == [], layout[0]
    # The capture works: a stock 1x1 convolution on a channels_last input does warn
    # (pytorch/pytorch#157862; the warning is once per process, hence last).
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        conv = nn.Sequential(nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 64, 3))
        _ddp_step(conv, channels=8, channels_last=True)
    assert any("Grad strides" in str(w.message) for w in seen)


def _ddp_step(model: nn.Module, channels: int = 3, channels_last: bool = False) -> None:
    ddp = nn.parallel.DistributedDataParallel(model)
    x = torch.randn(BATCH, channels, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    F.cross_entropy(ddp(x), torch.arange(BATCH) % 3).backward()


@pytest.mark.slow
def test_two_process_ddp_step_prints_no_layout_warning():
    cpu_backend_or_skip("cpp")
    spawn_ranks(_ddp_worker, world=WORLD)
