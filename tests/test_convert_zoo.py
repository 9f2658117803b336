"""convert() on the DenseNets people actually fine-tune: timm's (BatchNormAct2d, blur-pool
variants), torchvision's own densenet121, and backbones whose BNs are FrozenBatchNorm2d.

Each converted model keeps every Parameter object and matches the unconverted one in float64:
outputs, input and parameter gradients, buffers after forward and backward (helpers.train_step).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from helpers import TOLERANCE, assert_close, assert_same_step, cpu_backend_or_skip, train_step
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import dense_ext
from dense_ext import EfficientDenseBlock, EfficientTransition

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


def _input() -> torch.Tensor:
    return torch.randn(X, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _converted_matches(
    original: nn.Module, backend: str, memory: str, blocks: int, transitions: int
):
    cpu_backend_or_skip(backend)
    converted = copy.deepcopy(original)
    params_before = [id(p) for p in converted.parameters()]
    assert dense_ext.convert(converted, memory=memory, backend=backend) is converted
    assert [id(p) for p in converted.parameters()] == params_before, "Parameters were replaced"
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(EfficientDenseBlock) == blocks
    assert kinds.count(EfficientTransition) == transitions
    for mode in ("train", "eval"):
        for step in range(2):
            original.train(mode == "train")
            converted.train(mode == "train")
            expected = train_step(original, _input(), seed=step)
            actual = train_step(converted, _input(), seed=step)
            assert_same_step(actual, expected, TOLERANCE[torch.float64], f"{mode} step {step}")
    return converted


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
