"""convert() on the DenseNets people actually fine-tune: timm's (BatchNormAct2d, blur-pool
variants), torchvision's own densenet121, MONAI's 2-D DenseNet121 (each layer's modules in a
``layers`` Sequential), mmpretrain's DenseNet (a list of layers sharing one ReLU module each),
pytorchcv's (dense units as a stage's children, after its transition), and backbones whose BNs
are FrozenBatchNorm2d.

Each converted model keeps every Parameter object and matches the unconverted one in float64:
outputs, input and parameter gradients, buffers after forward and backward (helpers.train_step).
"""

from __future__ import annotations

import copy
import functools
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import (
    TOLERANCE,
    Step,
    assert_close,
    assert_same_step,
    cpu_backend_or_skip,
    swap_on_conversion,
    train_step,
)
from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict
from monai.networks.nets import DenseNet121 as MonaiDenseNet121
from pytorchcv.models import densenet as pytorchcv_densenet
from pytorchcv.models import densenet_cifar as pytorchcv_cifar
from pytorchcv.models import preresnet as pytorchcv_preresnet
from pytorchcv.models import xdensenet_cifar as pytorchcv_xdensenet_cifar
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.nn.utils import prune
from torch.utils.checkpoint import checkpoint
from torchvision.ops.misc import FrozenBatchNorm2d

import dense_ext
from dense_ext import EfficientDenseBlock, EfficientTransition
from dense_ext.convert import ConvertedStage

with warnings.catch_warnings():  # mmcv-lite: "Fail to import MultiScaleDeformableAttention"
    warnings.simplefilter("ignore")
    from mmpretrain.models import ImageClassifier
    from mmpretrain.models.backbones import DenseNet as MmpretrainDenseNet

BACKENDS = [("reference", "min"), ("cpp", "min"), ("cpp", "bottleneck")]
# 64x64: the last block sees 2x2 pixels, so its training-mode BNs average 8 values, not 2
# (with 2 the float64 rounding of the two models is amplified past 1e-10 through 120 layers).
X = (2, 3, 64, 64)


def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial norms (any module with running statistics), float64."""
    g = torch.Generator().manual_seed(1)
    model = model.double()
    for m in model.modules():
        if getattr(m, "running_var", None) is not None and getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def _input(shape: tuple[int, ...] = X) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _converted_matches(
    original: nn.Module,
    backend: str,
    memory: str,
    blocks: int,
    transitions: int,
    rename: Callable[[str], str] = lambda name: name,
    shape: tuple[int, ...] = X,
    unfusable: str | None = None,
):
    """``rename``: an original parameter or buffer name as the converted model names it;
    ``shape``: the input's; ``unfusable``: what convert's warning about blocks that cannot
    run fused must say (by default convert must not give it)."""
    cpu_backend_or_skip(backend)
    converted = copy.deepcopy(original)
    params_before = [id(p) for p in converted.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dense_ext.convert(converted, memory=memory, backend=backend) is converted
    told = [str(w.message) for w in caught if "fused kernels do not model" in str(w.message)]
    if unfusable is None:
        assert not told, told
    else:
        assert len(told) == 1 and re.search(unfusable, told[0]), told
    assert [id(p) for p in converted.parameters()] == params_before, "Parameters were replaced"
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(EfficientDenseBlock) == blocks
    assert kinds.count(EfficientTransition) == transitions
    for mode in ("train", "eval"):
        for step in range(2):
            original.train(mode == "train")
            converted.train(mode == "train")
            expected = _renamed(train_step(original, _input(shape), seed=step), rename)
            actual = train_step(converted, _input(shape), seed=step)
            assert_same_step(actual, expected, TOLERANCE[torch.float64], f"{mode} step {step}")
    return converted


def _renamed(step: Step, rename: Callable[[str], str]) -> Step:
    def names(tensors: dict) -> dict:
        return {rename(name): value for name, value in tensors.items()}

    step.grads = names(step.grads)
    step.buffers_after_forward = names(step.buffers_after_forward)
    step.buffers_after_backward = names(step.buffers_after_backward)
    return step


@pytest.mark.slow
@pytest.mark.parametrize("backend, memory", BACKENDS)
@pytest.mark.parametrize("name", ["densenet121", "densenetblur121d"])
def test_timm_densenet_converts_in_place(name, backend, memory):
    """timm's DenseBlock/DenseLayer with BatchNormAct2d (BN and ReLU in one module) and its
    transitions (norm, conv, pool: the ReLU inside the norm); densenetblur121d adds a deep stem
    and a blur pool, which stay as they are."""
    torch.manual_seed(0)
    model = _randomize(timm.create_model(name, pretrained=False, num_classes=5))
    _converted_matches(model, backend, memory, blocks=4, transitions=3)


@pytest.mark.slow
@pytest.mark.parametrize("backend, memory", BACKENDS[:2])
def test_torchvision_densenet121_converts_in_place(backend, memory):
    torch.manual_seed(0)
    model = _randomize(torchvision.models.densenet121(weights=None, num_classes=5))
    _converted_matches(model, backend, memory, blocks=4, transitions=3)


@pytest.mark.slow
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_torchvision_builds_its_densenet_with_the_efficient_block(monkeypatch, memory_efficient):
    """torchvision's DenseNet with EfficientDenseBlock in place of its _DenseBlock (and
    EfficientTransition in place of _Transition): the way to use the block in code copied
    from torchvision's, where the block is built with every argument by keyword,
    torchvision's ``memory_efficient`` among them (before: a TypeError, "unexpected keyword
    argument 'memory_efficient'"). The model computes what torchvision's own computes from
    the same state_dict, in float64; ``memory_efficient=True`` selects ``memory="min"``."""
    densenet = torchvision.models.densenet
    naive = _randomize(densenet.densenet121(weights=None, num_classes=5))
    block = functools.partial(EfficientDenseBlock, backend="cpp")
    monkeypatch.setattr(densenet, "_DenseBlock", block)
    monkeypatch.setattr(densenet, "_Transition", EfficientTransition)  # the same arguments
    cpu_backend_or_skip("cpp")
    model = densenet.densenet121(weights=None, num_classes=5, memory_efficient=memory_efficient)
    monkeypatch.undo()
    model = model.double()
    assert sum(isinstance(m, EfficientTransition) for m in model.modules()) == 3
    blocks = [m for m in model.modules() if isinstance(m, EfficientDenseBlock)]
    assert [b.memory for b in blocks] == ["min" if memory_efficient else "bottleneck"] * 4
    explicit = EfficientDenseBlock(2, 8, 4, memory="bottleneck", memory_efficient=True)
    assert explicit.memory == "bottleneck"  # a memory given wins
    model.load_state_dict(naive.state_dict())
    for mode in ("train", "eval"):
        naive.train(mode == "train")
        model.train(mode == "train")
        expected = train_step(naive, _input())
        actual = train_step(model, _input())
        assert_same_step(actual, expected, TOLERANCE[torch.float64], mode)


def _freeze_batch_norms(module: nn.Module) -> nn.Module:
    """Every nn.BatchNorm2d replaced by a FrozenBatchNorm2d with its values (what detection
    backbones do)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).double()
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batch_norms(child)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("backend, memory", BACKENDS[:2])
def test_frozen_batch_norm_backbone_converts(backend, memory):
    torch.manual_seed(0)
    model = _randomize(torchvision.models.densenet121(weights=None, num_classes=5))
    model = _freeze_batch_norms(model)
    converted = _converted_matches(model, backend, memory, blocks=4, transitions=3)
    block = converted.features.denseblock1
    assert isinstance(block.denselayer1.norm1, FrozenBatchNorm2d)
    assert block.denselayer1.norm1.weight.grad is None  # frozen: a buffer, no gradient


def test_feature_extractor_of_a_converted_model():
    """torchvision's create_feature_extractor (torch.fx symbolic tracing) on a converted model:
    the traced graph runs the modules as torchvision's, and gives the same features."""
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = _randomize(torchvision.models.densenet121(weights=None)).eval()
    converted = dense_ext.convert(copy.deepcopy(model), memory="min", backend="reference")
    nodes = {"features.denseblock2": "block2", "features.transition2": "transition2"}
    expected = create_feature_extractor(model, return_nodes=nodes)(_input())
    actual = create_feature_extractor(converted, return_nodes=nodes)(_input())
    for key, value in expected.items():
        assert_close(actual[key], value, TOLERANCE[torch.float64], key)


def test_sync_batch_norm_in_a_block_raises_clearly():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.densenet121(weights=None))
    with pytest.raises(ValueError, match="denselayer1.norm1 is a SyncBatchNorm"):
        dense_ext.convert(model)


def test_timm_norm_with_another_activation_raises_clearly():
    model = timm.create_model("densenet121", pretrained=False, act_layer="silu")
    with pytest.raises(ValueError, match="norm1 is a BatchNormAct2d"):
        dense_ext.convert(model)


@pytest.mark.parametrize("feature_cls", ["getter", "hook"])
def test_timm_features_only_converts(feature_cls):
    """timm's features_only models: "getter" runs the model's modules itself, "hook"
    (FeatureHookNet) collects the maps with forward hooks registered on the blocks when the
    model is built, before convert() replaces them (before the fix: 2 of 5 maps)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "densenet121", pretrained=False, features_only=True, feature_cls=feature_cls
    )
    model = _randomize(model)
    converted = dense_ext.convert(copy.deepcopy(model), memory="min", backend="reference")
    assert sum(isinstance(m, EfficientDenseBlock) for m in converted.modules()) == 4
    expected = model(_input())
    actual = converted(_input())
    assert len(actual) == len(expected) == 5
    for i, (got, want) in enumerate(zip(actual, expected)):
        assert_close(got, want, TOLERANCE[torch.float64], f"feature map {i}")


def _monai_densenet121(**kwargs) -> nn.Module:
    return MonaiDenseNet121(spatial_dims=2, in_channels=3, out_channels=5, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("backend, memory", BACKENDS)
def test_monai_densenet_converts_in_place(backend, memory):
    """MONAI's 2-D DenseNet121: its blocks are Sequentials of layers that keep their modules
    in a ``layers`` Sequential and return ``cat([x, layers(x)])`` (before: the transitions
    were converted and the blocks silently left as they were). The converted model keeps
    MONAI's state_dict keys, in order, both ways; its parameter names lose the ``layers``
    level (the modules are the converted layer's own)."""
    torch.manual_seed(0)
    model = _randomize(_monai_densenet121())
    flat = functools.partial(re.sub, r"(denselayer\d+)\.layers\.", r"\1.")
    converted = _converted_matches(model, backend, memory, 4, 3, rename=flat)
    saved = _checkpoints_load_both_ways(model, converted, _monai_densenet121, memory, backend)
    assert "features.denseblock1.denselayer1.layers.conv1.weight" in saved


def _checkpoints_load_both_ways(
    model, converted, build, memory, backend, loaders=(nn.Module.load_state_dict,)
) -> dict:
    """The converted model saves the library's keys, in order, which a fresh library model
    loads strictly; the library model's checkpoint loads strictly (with each of ``loaders``)
    into a freshly converted one. Returns the converted model's state_dict."""
    saved = converted.state_dict()
    assert list(saved) == list(model.state_dict())
    fresh = build().double()
    fresh.load_state_dict(saved)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    for load in loaders:
        again = dense_ext.convert(build().double(), memory=memory, backend=backend)
        load(again, model.state_dict(), strict=True)
        for key, value in again.state_dict().items():
            assert torch.equal(value, model.state_dict()[key]), key
    return saved


def test_monai_block_hooks_see_monai_keys():
    """state_dict hooks registered on a MONAI block before converting see (and load) the
    nested keys they were written for."""
    model = _monai_densenet121(block_config=(2, 2), init_features=16, growth_rate=8)
    block = model.features.denseblock1
    seen = {}

    def saving(module, state, prefix, meta):
        seen["save"] = [k for k in state if k.startswith(prefix)]

    def loading(module, state, prefix, *args):
        seen["load"] = [k for k in state if k.startswith(prefix)]

    block.register_state_dict_post_hook(saving)
    block.register_load_state_dict_pre_hook(loading)
    keys = list(block.state_dict())
    dense_ext.convert(model, backend="reference")
    assert isinstance(model.features.denseblock1, EfficientDenseBlock)
    state = model.state_dict()
    assert "features.denseblock1.denselayer2.layers.norm2.running_var" in seen["save"]
    model.load_state_dict(state)
    assert "features.denseblock1.denselayer2.layers.norm2.running_var" in seen["load"]
    # The replaced block shares its hook dicts with the new one; its own keys stay its own.
    assert list(block.state_dict()) == keys
    block.load_state_dict(block.state_dict())


def test_monai_channel_dropout_raises_clearly():
    """MONAI's dropout_prob puts a Dropout2d (whole channels) in each layer: not what a fused
    block's element-wise dropout computes."""
    with pytest.raises(ValueError, match=r"denselayer1.layers.dropout is a Dropout2d\(p=0.2\)"):
        dense_ext.convert(_monai_densenet121(dropout_prob=0.2))


def test_monai_layer_with_other_modules_or_hooks_raises_clearly():
    model = _monai_densenet121(block_config=(2, 2), init_features=16, growth_rate=8)
    model.features.denseblock1.denselayer2.layers.add_module("extra", nn.Identity())
    with pytest.raises(ValueError, match=r"denselayer2.layers holds \[.*'extra'\]"):
        dense_ext.convert(model)
    model = _monai_densenet121(block_config=(2, 2), init_features=16, growth_rate=8)
    model.features.denseblock2.denselayer1.layers.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="denselayer1.layers has hooks"):
        dense_ext.convert(model)


def test_monai_3d_densenet_raises_clearly():
    model = MonaiDenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    with pytest.raises(ValueError, match="found no torchvision-structured dense block"):
        dense_ext.convert(model)


def _add_bottleneck_modules(layer: nn.Module, c_in: int, growth_rate: int, bn_size: int) -> None:
    """torchvision's six modules of a bottleneck dense layer, in its order and names."""
    mid = bn_size * growth_rate
    layer.add_module("norm1", nn.BatchNorm2d(c_in))
    layer.add_module("relu1", nn.ReLU(inplace=True))
    layer.add_module("conv1", nn.Conv2d(c_in, mid, kernel_size=1, bias=False))
    layer.add_module("norm2", nn.BatchNorm2d(mid))
    layer.add_module("relu2", nn.ReLU(inplace=True))
    layer.add_module("conv2", nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False))


class _OldDenseLayer(nn.Sequential):
    """torchvision's dense layer before 0.3, as torchxrayvision and many research repositories
    still copy it: an nn.Sequential whose forward adds the dropout and the concatenation."""

    def __init__(self, c_in: int, growth_rate: int, bn_size: int, drop_rate: float):
        super().__init__()
        _add_bottleneck_modules(self, c_in, growth_rate, bn_size)
        self.drop_rate = drop_rate

    def forward(self, x):
        new_features = super().forward(x)
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return torch.cat([x, new_features], 1)


def _small_densenet(
    make_block: Callable[[int, int, int], nn.Module],
    final_norm: str = "norm5",
    block_config=(3, 4),
    c0=16,
    k=8,
) -> nn.Module:
    """A small DenseNet of ``make_block(layers, c0, k)`` blocks and torchvision's transitions,
    ending in ``final_norm``, a ReLU, a global pool and a flatten."""
    features = nn.Sequential()
    features.add_module("conv0", nn.Conv2d(3, c0, 3, padding=1, bias=False))
    channels = c0
    for b, layers in enumerate(block_config):
        features.add_module(f"denseblock{b + 1}", make_block(layers, channels, k))
        channels += layers * k
        if b + 1 < len(block_config):
            transition = nn.Sequential()
            transition.add_module("norm", nn.BatchNorm2d(channels))
            transition.add_module("relu", nn.ReLU(inplace=True))
            transition.add_module("conv", nn.Conv2d(channels, channels // 2, 1, bias=False))
            transition.add_module("pool", nn.AvgPool2d(2, stride=2))
            features.add_module(f"transition{b + 1}", transition)
            channels //= 2
    features.add_module(final_norm, nn.BatchNorm2d(channels))
    return nn.Sequential(features, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _old_dense_block(layers: int, c0: int, k: int) -> nn.Sequential:
    block = nn.Sequential()  # torchvision's _DenseBlock before 0.3
    for i in range(layers):
        block.add_module(f"denselayer{i + 1}", _OldDenseLayer(c0 + i * k, k, 4, 0.0))
    return block


def _old_torchvision_densenet() -> nn.Module:
    return _small_densenet(_old_dense_block)


class _DenseLayer04(_OldDenseLayer):
    """torchvision 0.3-0.4's dense layer: the same nn.Sequential, whose forward takes the
    earlier features and returns only the new ones (its block concatenates)."""

    def forward(self, *prev_features):
        bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(prev_features, 1))))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock04(nn.Module):
    """torchvision 0.3-0.4's dense block: a plain nn.Module of layers."""

    def __init__(self, layers: int, c0: int, k: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer04(c0 + i * k, k, 4, 0.0))

    def forward(self, init_features):
        features = [init_features]
        for layer in self.children():
            features.append(layer(*features))
        return torch.cat(features, 1)


def _torchvision_04_densenet() -> nn.Module:
    return _small_densenet(_DenseBlock04)


@pytest.mark.parametrize("backend, memory", BACKENDS)
def test_old_torchvision_densenet_converts_in_place(backend, memory):
    """Blocks and layers that are nn.Sequentials (torchvision before 0.3, torchxrayvision):
    before, their transitions were converted and their blocks silently left as they were.
    The state_dict keys are torchvision's already, and stay."""
    torch.manual_seed(0)
    model = _randomize(_old_torchvision_densenet())
    converted = _converted_matches(model, backend, memory, blocks=2, transitions=1)
    assert list(converted.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("backend, memory", BACKENDS)
def test_torchvision_0_4_densenet_converts_in_place(backend, memory):
    """torchvision 0.3-0.4's blocks (plain nn.Modules whose forward concatenates) and layers
    (nn.Sequentials taking the earlier features): before, only the transitions converted."""
    torch.manual_seed(0)
    model = _randomize(_torchvision_04_densenet())
    converted = _converted_matches(model, backend, memory, blocks=2, transitions=1)
    assert list(converted.state_dict()) == list(model.state_dict())


class _CheckpointedDenseLayer(nn.Module):
    """The dense layer of gpleiss/efficient_densenet_pytorch, the checkpointing implementation
    people move from: a plain nn.Module taking the earlier features, its bottleneck recomputed
    in backward (torch.utils.checkpoint) when ``efficient``."""

    def __init__(self, c_in: int, growth_rate: int, bn_size: int, efficient: bool):
        super().__init__()
        _add_bottleneck_modules(self, c_in, growth_rate, bn_size)
        self.efficient = efficient

    def _bottleneck(self, *prev_features):
        return self.conv1(self.relu1(self.norm1(torch.cat(prev_features, 1))))

    def forward(self, *prev_features):
        if self.efficient and any(f.requires_grad for f in prev_features):
            out = checkpoint(self._bottleneck, *prev_features, use_reentrant=False)
        else:
            out = self._bottleneck(*prev_features)
        return self.conv2(self.relu2(self.norm2(out)))


class _CheckpointedDenseBlock(nn.Module):
    def __init__(self, layers: int, c0: int, k: int, efficient: bool):
        super().__init__()
        for i in range(layers):
            self.add_module(
                f"denselayer{i + 1}", _CheckpointedDenseLayer(c0 + i * k, k, 4, efficient)
            )

    def forward(self, init_features):
        features = [init_features]
        for layer in self.children():
            features.append(layer(*features))
        return torch.cat(features, 1)


def _checkpointed_densenet(efficient: bool) -> nn.Module:
    """gpleiss/efficient_densenet_pytorch's DenseNet-BC with ``small_inputs``: blocks of
    checkpointed layers, torchvision's transitions, ``norm_final``."""

    def block(layers: int, c0: int, k: int) -> nn.Module:
        return _CheckpointedDenseBlock(layers, c0, k, efficient)

    return _small_densenet(block, final_norm="norm_final")


@pytest.mark.parametrize("backend, memory", BACKENDS)
def test_checkpointing_densenet_converts_in_place(backend, memory):
    """gpleiss/efficient_densenet_pytorch's model (plain nn.Module layers in a plain nn.Module
    block): the converted model computes what it computes without checkpointing, keys
    unchanged."""
    torch.manual_seed(0)
    model = _randomize(_checkpointed_densenet(efficient=False))
    converted = _converted_matches(model, backend, memory, blocks=2, transitions=1)
    assert list(converted.state_dict()) == list(model.state_dict())


# (model with checkpointing on, its layers' flag, BN1's counter of its first layer)
_CHECKPOINTING = {
    "efficient_densenet_pytorch": (
        lambda: _checkpointed_densenet(efficient=True),
        "efficient",
        "0.denseblock1.denselayer1.norm1.num_batches_tracked",
    ),
    "torchvision": (
        lambda: torchvision.models.densenet121(weights=None, memory_efficient=True),
        "memory_efficient",
        "features.denseblock1.denselayer1.norm1.num_batches_tracked",
    ),
    "timm": (
        lambda: timm.create_model("densenet121", pretrained=False, memory_efficient=True),
        "grad_checkpointing",
        "features.denseblock1.denselayer1.norm1.num_batches_tracked",
    ),
}


@pytest.mark.parametrize("library", list(_CHECKPOINTING))
def test_a_converted_checkpointing_densenet_updates_bn_statistics_once(library):
    """With checkpointing on (gpleiss/efficient_densenet_pytorch's ``efficient``,
    torchvision's and timm's ``memory_efficient``), a layer recomputes its bottleneck in
    backward, BN1 included, in training mode: BN1's running statistics move twice per step and
    its counter counts 2. The converted model moves them once, as the model without
    checkpointing does: a user moving from checkpointing sees different, intended, BN
    statistics."""
    build, flag, counter = _CHECKPOINTING[library]
    torch.manual_seed(0)
    checkpointed = _randomize(build())
    plain = copy.deepcopy(checkpointed)
    for layer in plain.modules():
        if hasattr(layer, flag):
            setattr(layer, flag, False)
    converted = dense_ext.convert(copy.deepcopy(checkpointed), backend="reference")
    steps = [train_step(m, _input()) for m in (checkpointed, plain, converted)]
    assert [int(step.buffers_after_backward[counter]) for step in steps] == [2, 1, 1]
    assert_same_step(steps[2], steps[1], TOLERANCE[torch.float64], "converted vs plain")
    # Only the statistics differ: the checkpointing model's output and gradients are the same.
    tol = TOLERANCE[torch.float64]
    assert_close(steps[0].output, steps[1].output, tol, "output")
    assert_close(steps[0].input_grad, steps[1].input_grad, tol, "input gradient")
    for name, grad in steps[1].grads.items():
        assert_close(steps[0].grads[name], grad, tol, name)


def test_a_sequential_of_plain_sequentials_is_no_dense_block():
    """Layers that are plain nn.Sequentials chain their modules without the concatenation:
    not a dense block, whatever their names."""
    torch.manual_seed(0)
    block = nn.Sequential()
    block.add_module(
        "denselayer1", nn.Sequential(OrderedDict(_OldDenseLayer(8, 8, 4, 0.0)._modules))
    )
    with pytest.raises(ValueError, match="found no torchvision-structured dense block"):
        dense_ext.convert(nn.Sequential(block))
    assert type(block.denselayer1) is nn.Sequential


def test_transitions_without_a_recognised_block_warn():
    """A DenseNet whose transitions convert recognises but whose blocks it does not (here: no
    block at all): the transitions convert, and a warning says no block did (before: silence,
    and a model that looked converted)."""
    transition = _old_torchvision_densenet().get_submodule("0.transition1")
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), transition)
    with pytest.warns(UserWarning, match="no dense block that convert recognises"):
        dense_ext.convert(model, backend="reference")
    assert isinstance(model[1], EfficientTransition)
    # Blocks already efficient: nothing to warn about.
    model = nn.Sequential(EfficientDenseBlock(2, 32, 8, backend="reference"), transition)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense_ext.convert(model)


@pytest.mark.slow
@pytest.mark.parametrize("backend, memory", BACKENDS[:2])
def test_segmentation_models_pytorch_unet_converts_in_place(backend, memory):
    """segmentation_models_pytorch's Unet with a densenet121 encoder (torchvision's DenseNet,
    whose forward calls each transition's norm, relu, conv and pool itself to keep the ReLU's
    output as a skip connection)."""
    torch.manual_seed(0)
    model = _randomize(smp.Unet("densenet121", encoder_weights=None, classes=2))
    _converted_matches(model, backend, memory, blocks=4, transitions=3)


class _TransitionWithSkip(nn.Module):
    """How segmentation_models_pytorch before 0.4 (and code copied from it) walks a torchvision
    transition: as the nn.Sequential it is, keeping the ReLU's output."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        for module in self.module:
            x = module(x)
            if isinstance(module, nn.ReLU):
                skip = x
        return x, skip


def test_a_converted_transition_is_walked_as_torchvision_s_sequential():
    """torchvision's _Transition is an nn.Sequential: iterating, indexing and slicing a
    converted one give its modules in torchvision's order (before: a TypeError, "not
    iterable"), and walking them computes what walking the original does."""
    torch.manual_seed(0)
    original = _randomize(torchvision.models.densenet121(weights=None)).features.transition1
    converted = dense_ext.convert(copy.deepcopy(original), backend="reference")
    assert isinstance(converted, EfficientTransition)
    assert len(converted) == len(original) == 4
    assert [type(m) for m in converted] == [type(m) for m in original]
    assert converted[2] is converted.conv and converted[-1] is converted.pool
    head = converted[:2]
    assert isinstance(head, nn.Sequential) and list(head) == [converted.norm, converted.relu]
    with pytest.raises(IndexError):
        converted[4]
    with pytest.raises(TypeError):
        converted["conv"]
    x = torch.randn(2, 256, 8, 8, dtype=torch.float64)
    seen = []
    for transition in (original, converted):
        x_in = x.clone().requires_grad_()
        out, skip = _TransitionWithSkip(transition)(x_in)
        (out.square().sum() + skip.sin().sum()).backward()
        seen.append([out, skip, x_in.grad, *(p.grad for p in transition.parameters())])
    names = ["output", "skip", "input gradient", "norm.weight", "norm.bias", "conv.weight"]
    for name, want, got in zip(names, *seen, strict=True):
        assert_close(got, want, TOLERANCE[torch.float64], name)


def _mmpretrain_classifier(**backbone) -> nn.Module:
    """An mmpretrain classifier as its configs build one (DenseNet-121 by default)."""
    return ImageClassifier(
        backbone=dict(type="DenseNet", **{"arch": "121", **backbone}),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=5, in_channels=1024),
    )


def _mmpretrain_names(name: str) -> str:
    """An mmpretrain parameter name as the converted model names it (block.0 -> denselayer1)."""
    return re.sub(r"\.block\.(\d+)\.", lambda m: f".denselayer{int(m[1]) + 1}.", name)


@pytest.mark.slow
@pytest.mark.parametrize("backend, memory", BACKENDS)
def test_mmpretrain_densenet_converts_in_place(backend, memory):
    """mmpretrain's ImageClassifier on its DenseNet-121 backbone, with its first stage frozen
    (``frozen_stages=1``: its train() puts that stage back in eval mode and its parameters
    stay without gradients). Each DenseBlock keeps its layers in a ModuleList ``block``, each
    layer one ``act`` ReLU for both positions, and the transitions name their ReLU ``act``
    (before: "found no torchvision-structured dense block or transition"). The converted
    model keeps mmpretrain's state_dict keys, in order, both ways, through torch's and
    mmengine's loaders."""
    torch.manual_seed(0)
    model = _randomize(_mmpretrain_classifier(frozen_stages=1))
    converted = _converted_matches(model, backend, memory, 4, 3, rename=_mmpretrain_names)
    backbone = converted.backbone
    converted.train()
    assert not backbone.stages[0].training and backbone.stages[1].training
    assert not any(p.requires_grad for p in backbone.stages[0].parameters())
    loaders = (nn.Module.load_state_dict, mmengine_load_state_dict)
    build = _mmpretrain_classifier
    saved = _checkpoints_load_both_ways(model, converted, build, memory, backend, loaders)
    assert "backbone.stages.2.block.23.conv2.weight" in saved


def _small_mmpretrain_densenet(**kwargs) -> nn.Module:
    return MmpretrainDenseNet(arch=dict(growth_rate=4, depths=[2, 3], init_channels=8), **kwargs)


# (model, a layer key no layer takes, the layer key it copies, a key to leave out)
_KEYED_BLOCKS = {
    "mmpretrain": (
        lambda: _small_mmpretrain_densenet(drop_rate=0.2),
        "stages.1.block.3.norm1.weight",
        "stages.1.block.2.norm1.weight",
        "stages.0.block.1.conv2.weight",
    ),
    "pytorchcv": (
        lambda: _small_pytorchcv_cifar_densenet(bottleneck=True),
        "features.stage2.unit3.conv1.bn.weight",
        "features.stage2.unit2.conv1.bn.weight",
        "features.stage1.unit2.conv2.conv.weight",
    ),
    "monai": (
        lambda: _monai_densenet121(block_config=(2, 2), init_features=16, growth_rate=8),
        "features.denseblock2.denselayer3.layers.norm1.weight",
        "features.denseblock2.denselayer2.layers.norm1.weight",
        "features.denseblock1.denselayer2.layers.conv2.weight",
    ),
}


@pytest.mark.parametrize("library", list(_KEYED_BLOCKS))
def test_incompatible_keys_are_those_of_the_library_s_model(library):
    """Loading a state_dict with a key no layer takes, a stray key and a missing key into a
    converted mmpretrain or MONAI model reports the keys the unconverted model reports, in its
    names (the block renames the library's keys before looking, and its layers' missing keys
    back): the same lists, and the same strict error."""
    build, extra, copied, left_out = _KEYED_BLOCKS[library]
    original = build()
    converted = dense_ext.convert(copy.deepcopy(original), backend="reference")
    state = original.state_dict()
    state[extra] = state[copied]
    stray = left_out.rsplit(".", 4)[0] + ".stray"  # a key of the block itself
    state[stray] = torch.zeros(1)
    del state[left_out]
    want = original.load_state_dict(copy.copy(state), strict=False)
    assert want.missing_keys == [left_out]
    assert sorted(want.unexpected_keys) == sorted([extra, stray])
    got = converted.load_state_dict(copy.copy(state), strict=False)
    assert got.missing_keys == want.missing_keys
    assert sorted(got.unexpected_keys) == sorted(want.unexpected_keys)
    errors = []
    for model in (original, converted):
        with pytest.raises(RuntimeError) as error:
            model.load_state_dict(copy.copy(state))
        errors.append(str(error.value).split(":", 1)[1])  # after "... for <class>:"
    assert sorted(errors[0].split()) == sorted(errors[1].split())


def test_mmpretrain_layers_of_another_kind_raise_clearly_or_stay():
    model = dense_ext.convert(_small_mmpretrain_densenet(drop_rate=0.2), backend="reference")
    assert model.stages[1].denselayer3.drop_rate == 0.2  # dropout on new features converts
    with pytest.raises(ValueError, match=r"block.0.act is a SiLU"):
        dense_ext.convert(_small_mmpretrain_densenet(act_cfg=dict(type="SiLU")))
    with pytest.raises(ValueError, match=r"block.0.norm1 is a GroupNorm"):
        dense_ext.convert(_small_mmpretrain_densenet(norm_cfg=dict(type="GN", num_groups=2)))
    model = _small_mmpretrain_densenet()
    model.stages[0].block.register_forward_pre_hook(lambda *a: None)
    with pytest.raises(ValueError, match="block has hooks"):
        dense_ext.convert(model)
    # A list of layers under another name, or layers of other modules, is not a dense block.
    model = _small_mmpretrain_densenet()
    model.stages[0].layers = model.stages[0].block
    del model.stages[0].block
    model.stages[1].block[0].add_module("extra", nn.Identity())
    with pytest.warns(UserWarning, match="no dense block that convert recognises"):
        dense_ext.convert(model, backend="reference")
    assert not any(isinstance(m, EfficientDenseBlock) for m in model.modules())


def _pytorchcv_channels(init: int, growth_rate: int, units: list[int]) -> list[list[int]]:
    """pytorchcv's ``channels`` argument: each unit's output channels, stage by stage (its
    transitions halve the channels)."""
    stages, c = [], init
    for i, count in enumerate(units):
        c = c // 2 if i else c
        stages.append([c + growth_rate * (j + 1) for j in range(count)])
        c = stages[-1][-1]
    return stages


def _small_pytorchcv_cifar_densenet(bottleneck: bool, **kwargs) -> nn.Module:
    channels = _pytorchcv_channels(8, 4, [2, 2, 2])
    return pytorchcv_cifar.CIFARDenseNet(channels, 8, bottleneck, in_size=(32, 32), **kwargs)


def _pytorchcv_names(name: str) -> str:
    """A pytorchcv parameter or buffer name as the converted model names it."""
    for unit_part, layer_part in (
        ("conv1.bn", "norm1"),
        ("conv1.conv", "conv1"),
        ("conv2.bn", "norm2"),
        ("conv2.conv", "conv2"),
        ("conv.bn", "norm1"),  # the plain unit's one block
        ("conv.conv", "conv1"),
    ):
        name = re.sub(rf"\.unit(\d+)\.{unit_part}\.", rf".block.denselayer\1.{layer_part}.", name)
    name = re.sub(r"\.(trans\d+)\.conv\.bn\.", r".\1.norm.", name)
    return re.sub(r"\.(trans\d+)\.conv\.conv\.", r".\1.conv.", name)


_PYTORCHCV_MODELS = {
    # name: (build, input shape, dense blocks, transitions)
    "densenet40_k12_bc_cifar10": (pytorchcv_cifar.densenet40_k12_bc_cifar10, (2, 3, 32, 32), 3, 2),
    "densenet40_k12_cifar10": (pytorchcv_cifar.densenet40_k12_cifar10, (2, 3, 32, 32), 3, 2),
    "imagenet DenseNet, 3 stages": (
        lambda: pytorchcv_densenet.DenseNet(
            _pytorchcv_channels(16, 8, [2, 3, 4]), 16, in_size=(112, 112), num_classes=5
        ),
        (2, 3, 112, 112),
        3,
        2,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend, memory", BACKENDS)
@pytest.mark.parametrize("name", list(_PYTORCHCV_MODELS))
def test_pytorchcv_densenet_converts_in_place(name, backend, memory):
    """pytorchcv's DenseNets (osmr/imgclsmob: CIFAR DenseNet-BC and DenseNet, ImageNet
    DenseNet): a stage is an nn.Sequential of its transition ``trans<i>`` and its units, each
    unit's forward adding the concatenation, each position a pre-activation block (bn, activ,
    conv). Before: "found no torchvision-structured dense block or transition". Each stage
    becomes a ConvertedStage (the transition converted, the units one block) that keeps
    pytorchcv's state_dict keys, in order, both ways."""
    build, shape, blocks, transitions = _PYTORCHCV_MODELS[name]
    torch.manual_seed(0)
    model = _randomize(build())
    converted = _converted_matches(
        model, backend, memory, blocks, transitions, rename=_pytorchcv_names, shape=shape
    )
    stage = converted.features.stage2
    assert isinstance(stage, ConvertedStage) and list(stage._modules) == ["trans2", "block"]
    saved = _checkpoints_load_both_ways(model, converted, build, memory, backend)
    unit = "conv1" if "bc" in name or "imagenet" in name else "conv"  # the plain unit's: conv
    assert f"features.stage3.unit1.{unit}.bn.running_var" in saved
    assert "features.stage2.trans2.conv.conv.weight" in saved


def test_pytorchcv_stage_keeps_hooks_pickles_and_refuses_what_it_cannot_model():
    model = _small_pytorchcv_cifar_densenet(bottleneck=True, dropout_rate=0.2)
    seen = []
    model.features.stage2.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    converted = dense_ext.convert(copy.deepcopy(model), backend="reference")
    assert converted.features.stage2.block.denselayer2.drop_rate == 0.2  # nn.Dropout converts
    converted(torch.randn(2, 3, 32, 32))
    assert seen == [(2, 16, 16, 16)]  # the stage's hook moved to the converted stage
    # A whole-model pickle (what torch.save(model) writes) round trip keeps the key renaming.
    model = _small_pytorchcv_cifar_densenet(bottleneck=True)
    converted = dense_ext.convert(copy.deepcopy(model), backend="reference")
    again = pickle.loads(pickle.dumps(converted))
    assert list(again.state_dict()) == list(model.state_dict())

    def refused(change: Callable[[nn.Module], object], match: str) -> None:
        model = _small_pytorchcv_cifar_densenet(bottleneck=True, dropout_rate=0.2)
        change(model)
        with pytest.raises(ValueError, match=match):
            dense_ext.convert(model)

    refused(
        lambda m: setattr(m.features.stage1.unit2.conv1, "activ", nn.SiLU()),
        r"unit2.conv1.activ is a SiLU",
    )
    refused(
        lambda m: setattr(m.features.stage2.unit1, "dropout", nn.Dropout2d(0.2)),
        r"unit1.dropout is a Dropout2d",
    )
    refused(
        lambda m: m.features.stage1.unit1.conv2.register_forward_hook(lambda *a: None),
        r"unit1.conv2 has hooks",
    )
    refused(
        lambda m: m.features.stage1.unit1.dropout.register_forward_hook(lambda *a: None),
        r"unit1.dropout has hooks",
    )
    # A hook on the transition's pre-activation block keeps that transition as it is (and its
    # keys); the stage's dense units still convert.
    model = _small_pytorchcv_cifar_densenet(bottleneck=True)
    model.features.stage2.trans2.conv.register_forward_hook(lambda *a: None)
    converted = dense_ext.convert(copy.deepcopy(model), backend="reference")
    assert type(converted.features.stage2.trans2) is type(model.features.stage2.trans2)
    assert list(converted.state_dict()) == list(model.state_dict())
    # A pre-activation ResNet's stages have units of one width: no dense block.
    with pytest.raises(ValueError, match="found no torchvision-structured"):
        dense_ext.convert(pytorchcv_preresnet.preresnet10())


def test_converted_feature_maps_are_channels_last_where_view_differs():
    """README, "Layout": the converted model's feature maps are channels_last (the block's
    buffer and what follows it), the same values; ``.view`` across their spatial dimensions
    raises where the naive model's contiguous map allows it, and works on a 1x1 pooled map."""
    model = torchvision.models.densenet121(num_classes=3).eval()
    converted = dense_ext.convert(copy.deepcopy(model), backend="reference")
    x = torch.randn(1, 3, 64, 64)
    expected, actual = model.features(x), converted.features(x)
    assert expected.is_contiguous()
    assert actual.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual.reshape(1, -1), expected.view(1, -1))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        actual.view(1, -1)
    pooled = F.adaptive_avg_pool2d(actual, 1)
    torch.testing.assert_close(pooled.view(1, -1), F.adaptive_avg_pool2d(expected, 1).view(1, -1))


@pytest.mark.slow
def test_a_block_of_masked_convolutions_converts_with_a_warning_and_computes_the_same():
    """pytorchcv's X-DenseNet has the DenseNet's structure with expander convolutions, an
    ``nn.Conv2d`` subclass (``XConv2d``) that masks its weight in forward. The fused kernels
    compute a plain convolution, so the converted blocks run their layers one by one (the
    same results) and convert says so, once, naming each block."""
    model = _randomize(pytorchcv_xdensenet_cifar.xdensenet40_2_k24_bc_cifar10())
    blocks = r"features.stage1.block \(denselayer1: conv1 is a XConv2d.*stage3.block"
    _converted_matches(
        model, "cpp", "min", 3, 2, rename=_pytorchcv_names, shape=(2, 3, 32, 32), unfusable=blocks
    )


_LAYERS_CALLED_OTHERWISE = {
    "monai": lambda: _monai_densenet121(block_config=(2, 2), init_features=16, growth_rate=8),
    "torchvision before 0.3": lambda: _old_torchvision_densenet(),
    "pytorchcv": lambda: _small_pytorchcv_cifar_densenet(bottleneck=True),
    # (forward(*prev_features): its hooks see one argument per feature map, a converted
    # layer's one list; a pre-hook saw two tensors, then a list)
    "torchvision 0.3-0.4": lambda: _torchvision_04_densenet(),
    "gpleiss": lambda: _checkpointed_densenet(efficient=True),
}


@pytest.mark.parametrize("library", list(_LAYERS_CALLED_OTHERWISE))
@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward"])
def test_hooks_on_a_layer_called_otherwise_than_the_converted_one_raise(library, hook):
    """MONAI's layers, torchvision's before 0.3 and pytorchcv's units return their input and
    new features concatenated; a converted layer returns the new features (the block
    concatenates into its buffer). A hook on such a layer would see other tensors after
    converting (a forward hook on MONAI's first layer saw [1, 24, 8, 8], then [1, 8, 8, 8]),
    so convert refuses it, naming the layer. So for layers called with the features as
    separate arguments (torchvision 0.3-0.4, gpleiss's)."""
    model = _LAYERS_CALLED_OTHERWISE[library]()
    layer = next(
        child
        for module in model.modules()
        for name, child in module.named_children()
        if name in ("denselayer1", "unit1")
    )
    getattr(layer, f"register_{hook}_hook")(lambda *args: None)
    with pytest.raises(ValueError, match=r"(denselayer1|unit1) has hooks .* (concatenated|list)"):
        dense_ext.convert(model)


def test_a_block_with_a_pruned_convolution_converts_with_a_warning_and_computes_the_same():
    """torch.nn.utils.prune masks a weight through a forward pre-hook on its convolution; a
    block holding one runs its layers one by one while the mask stays, and convert says so,
    naming the block and the module."""
    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=3).eval()
    converted = copy.deepcopy(model)
    for m in (model, converted):
        prune.l1_unstructured(m.features.denseblock2.denselayer3.conv1, "weight", amount=0.3)
    with pytest.warns(UserWarning, match=r"1 converted dense block.*features.denseblock2 "):
        dense_ext.convert(converted, backend="reference")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(converted(x), model(x))


@pytest.mark.parametrize("library", list(_KEYED_BLOCKS))
def test_distributed_checkpoint_state_dicts_need_module_path_keys(library):
    """torch.distributed.checkpoint's state_dict API (``get_model_state_dict``, what FSDP2
    training loops save with) resolves every key as an attribute path, so a model that keeps
    a library's keys fails there; ``convert(..., library_keys=False)`` names the keys by
    module path, and the API saves and loads them."""
    build = _KEYED_BLOCKS[library][0]
    model = build()
    with pytest.raises(AttributeError):
        get_model_state_dict(dense_ext.convert(copy.deepcopy(model), backend="reference"))
    converted = dense_ext.convert(copy.deepcopy(model), backend="reference", library_keys=False)
    state = get_model_state_dict(converted)
    paths = [name for name, _ in converted.named_parameters()]
    paths += [name for name, _ in converted.named_buffers()]
    assert sorted(state) == sorted(paths)
    assert list(state) == list(converted.state_dict())
    fresh = dense_ext.convert(build(), backend="reference", library_keys=False)
    set_model_state_dict(fresh, state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("library", list(_KEYED_BLOCKS))
def test_swapping_conversions_of_library_models_after_a_step(library):
    """Under PyTorch's future flag ``set_swap_module_params_on_conversion``, ``module.to`` and
    ``load_state_dict`` swap each parameter's contents (``torch.utils.swap_tensors``), which
    refuses weakly referenced tensors; after a training step, both work on a converted model
    whose keys are the library's, and its next step equals the unconverted model's."""
    torch.manual_seed(0)
    model = _KEYED_BLOCKS[library][0]().double()
    converted = dense_ext.convert(copy.deepcopy(model), backend="reference")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    outputs = []
    for m in (model, converted):
        m.train()
        torch.manual_seed(1)  # the same dropout masks: the reference backend draws F.dropout's
        _first(m(x)).sum().backward()
        state = copy.deepcopy(m.state_dict())
        with swap_on_conversion():
            m.float().double()
            m.load_state_dict(state)
        m.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        out = _first(m(x))
        out.square().sum().backward()
        outputs.append((out.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = outputs
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-12)
    assert len(grads_a) == len(grads_b)
    for (name, a), b in zip(grads_a.items(), grads_b.values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=name)


def _first(out):
    """A model's output tensor (mmpretrain's backbones return a tuple of stages)."""
    return out[-1] if isinstance(out, (tuple, list)) else out
