"""python_models.delugenet: the naive DelugeNet (the oracle of dense_ext.deluge) and builders.

The naive CLDC is checked against what it claims to be, a sum of stock ``nn.BatchNorm2d``
modules (one per input, affine parameters = the CLDC's columns); the builders against the
parameter counts of the authors' models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, assert_close, rel_err
from torch import nn

import python_models
from python_models import MODEL_NAMES, get_model
from python_models.delugenet import CrossLayerDepthwiseConv, DelugeNet, delugenet_cifar


def stock_bns(cldc: CrossLayerDepthwiseConv) -> list[nn.BatchNorm2d]:
    """One nn.BatchNorm2d per CLDC input, holding that input's column of every tensor."""
    bns = []
    for i in range(cldc.num_inputs):
        bn = nn.BatchNorm2d(
            cldc.channels,
            eps=cldc.eps,
            momentum=cldc.momentum,
            track_running_stats=cldc.track_running_stats,
        ).to(cldc.weight.dtype)
        with torch.no_grad():
            bn.weight.copy_(cldc.weight[:, i])
            bn.bias.copy_(cldc.bias[:, i])
            if cldc.running_mean is not None:
                bn.running_mean.copy_(cldc.running_mean[:, i])
                bn.running_var.copy_(cldc.running_var[:, i])
                bn.num_batches_tracked.copy_(cldc.num_batches_tracked)
        bns.append(bn)
    return bns


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
def test_cldc_is_a_sum_of_batch_norms(momentum, track, fmt):
    torch.manual_seed(0)
    cldc = CrossLayerDepthwiseConv(5, 3, momentum=momentum, track_running_stats=track).double()
    with torch.no_grad():
        cldc.weight.uniform_(0.5, 1.5)
        cldc.bias.uniform_(-0.5, 0.5)
        if track:
            cldc.running_mean.uniform_(-0.5, 0.5)
            cldc.running_var.uniform_(0.5, 2.0)
    bns = stock_bns(cldc)
    for training in (True, True, False):
        cldc.train(training)
        for bn in bns:
            bn.train(training)
        xs = [
            (torch.randn(2, 5, 3, 4, dtype=torch.float64) * (i + 1) + i)
            .contiguous(memory_format=fmt)
            .requires_grad_()
            for i in range(3)
        ]
        out = cldc(xs)
        expected = sum(bn(x) for bn, x in zip(bns, xs))
        assert_close(out, expected, TOLERANCE[torch.float64], "CLDC output")
        grad = torch.randn_like(out).contiguous(memory_format=fmt)
        gx = torch.autograd.grad(out, [*xs, cldc.weight, cldc.bias], grad)
        params = [p for bn in bns for p in (bn.weight, bn.bias)]
        gy = torch.autograd.grad(expected, [*xs, *params], grad)
        for i in range(3):
            assert_close(gx[i], gy[i], 1e-10, f"input {i} gradient")
            assert_close(gx[3][:, i], gy[3 + 2 * i], 1e-10, f"weight[:, {i}] gradient")
            assert_close(gx[4][:, i], gy[4 + 2 * i], 1e-10, f"bias[:, {i}] gradient")
            if track:
                assert_close(cldc.running_mean[:, i], bns[i].running_mean, 1e-12, "mean")
                assert_close(cldc.running_var[:, i], bns[i].running_var, 1e-12, "var")
                assert torch.equal(cldc.num_batches_tracked, bns[i].num_batches_tracked)


@pytest.mark.parametrize("training", [True, False])
def test_torch_channels_last_batch_norm_backward_misreads_strided_vectors(training):
    """Why the naive CLDC passes contiguous columns: on the CPU, channels_last input and
    gradient with a strided weight (or, in eval, strided running statistics) give a wrong input
    gradient (torch 2.14). If this starts failing, torch fixed it and the copies in
    CrossLayerDepthwiseConv.forward can go."""
    torch.manual_seed(0)
    table = torch.rand(2, 2, dtype=torch.float64) + 0.5
    x = torch.randn(2, 2, 3, 2, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    grads = []
    for column in (table[:, 0], table[:, 0].contiguous()):
        xi = x.clone().requires_grad_()
        if training:
            y = F.batch_norm(xi, None, None, column, None, True)
        else:
            y = F.batch_norm(xi, column * 0.1, column, None, None, False)
        y.backward(grad)
        grads.append(xi.grad)
    assert rel_err(grads[0], grads[1]) > 1e-3


def test_cldc_wrong_number_of_inputs_raises():
    cldc = CrossLayerDepthwiseConv(4, 2)
    with pytest.raises(ValueError, match="expects 2 inputs, got 3"):
        cldc([torch.randn(2, 4, 3, 3)] * 3)


def test_cldc_one_value_per_channel_raises_in_training():
    cldc = CrossLayerDepthwiseConv(4, 2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cldc([torch.randn(1, 4, 1, 1)] * 2)


# Parameter counts of the authors' models (their README rounds them to 6.7/10.0/20.2M and
# 43.4/51.4/63.6M); ours must agree to 0.5 %.
PARAMETER_COUNTS = [
    ("delugenet146", 10, 6.686e6),
    ("delugenet218", 10, 9.982e6),
    ("wide_delugenet146", 10, 20.151e6),
    ("delugenet92", 1000, 43.40e6),
    ("delugenet104", 1000, 51.35e6),
    ("delugenet122", 1000, 63.62e6),
]


@pytest.mark.parametrize("name, classes, expected", PARAMETER_COUNTS)
def test_parameter_counts(name, classes, expected):
    with torch.device("meta"):
        model = get_model(name, num_classes=classes)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) <= 0.005 * expected, (name, count, expected)


def test_cifar_layout_follows_the_lua_code():
    with torch.device("meta"):
        model = python_models.delugenet146()
        wide = python_models.wide_delugenet146()
    assert model.stage_slots == (8, 17, 25) and model.stage_channels == (64, 128, 256)
    assert wide.stage_channels == (112, 224, 448) and wide.stem.conv.out_channels == 56
    # Three convolutions per composite layer and in the entry, one per transition and the
    # stem: 18n + 3 convolutions and the classifier (the paper's name says 18n + 2).
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs + 1 == 18 * 8 + 4
    stage2 = model.stage2
    assert len(stage2) == 16 and not hasattr(stage2.layer1, "cldc")
    assert stage2.layer16.cldc.weight.shape == (128, 16)
    assert model.transition1.cldc.weight.shape == (64, 8)
    assert model.transition1.conv.stride == (2, 2) and model.transition1.conv.out_channels == 128
    assert model.head.cldc.weight.shape == (256, 25)
    assert model.entry.conv1.in_channels == 32 and model.entry.conv3.out_channels == 64
    layer = stage2.layer3
    assert (layer.conv1.in_channels, layer.conv1.out_channels) == (128, 64)
    assert layer.conv2.kernel_size == (3, 3) and layer.conv3.out_channels == 128


def test_imagenet_layout_follows_the_lua_code():
    with torch.device("meta"):
        model = python_models.delugenet122()
    assert model.stage_slots == (8, 10, 12, 14)
    assert model.stage_channels == (128, 256, 512, 1024)
    assert isinstance(model.entry, nn.Conv2d) and model.entry.kernel_size == (1, 1)
    assert model.stem.conv.kernel_size == (7, 7) and isinstance(model.stem.pool, nn.MaxPool2d)
    assert model.head.cldc.weight.shape == (1024, 14) and model.classifier.out_features == 1000


def test_initialisation_follows_the_lua_code():
    torch.manual_seed(0)
    model = delugenet_cifar(2, 1.0)
    conv = model.stage3.layer2.conv2
    std = math.sqrt(2.0 / (3 * 3 * conv.out_channels))
    assert abs(conv.weight.std().item() - std) < 0.1 * std
    assert conv.bias is None
    cldc = model.stage3.layer4.cldc
    assert torch.equal(cldc.weight, torch.full((256, 4), 0.25))
    assert torch.equal(cldc.bias, torch.zeros(256, 4))
    assert torch.equal(model.stage1.layer1.norm.weight, torch.ones(64))
    assert torch.equal(model.classifier.bias, torch.zeros(10))


def test_forward_shapes_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = DelugeNet((2, 3), (8, 16), 4, num_classes=3)
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    imagenet = DelugeNet((2, 2), (8, 16), 4, num_classes=3, small_inputs=False)
    assert imagenet(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_registry():
    names = {"delugenet146", "delugenet218", "wide_delugenet146"}
    names |= {"delugenet92", "delugenet104", "delugenet122"}
    assert names <= set(MODEL_NAMES)
    with torch.device("meta"):
        for name in names:
            assert isinstance(get_model(name), DelugeNet)
        assert get_model("delugenet146", num_classes=100).classifier.out_features == 100
        # What the training CLI passes to every model.
        small = get_model("delugenet92", small_inputs=True, drop_rate=0.0)
        assert small.stem.conv.kernel_size == (3, 3) and len(small.stem) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda: delugenet_cifar(0, 1.0),
        lambda: delugenet_cifar(2, 0.3),
        lambda: DelugeNet((2, 3), (8, 8), 4),
        lambda: DelugeNet((2, 0), (8, 16), 4),
        lambda: DelugeNet((2,), (7,), 4),
        lambda: DelugeNet((2, 3), (8,), 4),
        lambda: python_models.delugenet146(drop_rate=0.2),
    ],
)
def test_bad_configurations_raise(call):
    with pytest.raises(ValueError):
        call()


def _double_backward_module(case: str, backend: str) -> tuple[nn.Module, tuple[int, ...]]:
    from deluge_helpers import make_stage_pair

    if case == "stage":
        _, stage = make_stage_pair(4, 3, backend)
        return stage, (2, 4, 5, 5)
    model = delugenet_cifar(1, 0.25, efficient=True, backend=backend, memory="min").double()
    return model, (2, 3, 8, 8)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("case", ["stage", "model"])
@pytest.mark.parametrize("how", ["constant_v", "v_requires_grad", "penalty"])
def test_double_backward_raises_one_clear_error(backend, case, how):
    """As for dense blocks (tests/test_drop_in.py): second-order gradients through an efficient
    DelugeNet raise NOT_TWICE_DIFFERENTIABLE in every form, never a silently wrong gradient
    (the stage, CLDC, transition, head and entry Functions used ``once_differentiable``, which
    drops the second-order term when the incoming gradient is a constant)."""
    from helpers import ask_for_second_order, cpu_backend_or_skip

    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    module, shape = _double_backward_module(case, backend)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="dense_ext blocks are not twice differentiable"):
        ask_for_second_order(module, x, how)
