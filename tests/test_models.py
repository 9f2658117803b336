"""python_models: naive vs efficient DenseNets, keys, builders, registry, checkpointing.

The naive model (torch.cat per layer, torchvision's transition order) is the oracle: an
efficient model loaded with its state_dict must give the same output, input gradient, every
parameter gradient and running statistics (after forward and after backward), in train and
eval mode, for both memory modes, bottleneck and plain layers, both stems.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TOLERANCE, assert_close, check_step, cpu_backend_or_skip, float64_oracle
from naive import randomize_bn
from torch import nn

import python_models
from dense_ext.backends import available_backends
from dense_ext.block import EfficientDenseBlock
from dense_ext.transition import EfficientTransition
from python_models import MODEL_NAMES, DelugeNet, DenseNet, get_model
from python_models.densenet import ChannelsLastMaxPool2d, _DenseBlock, _Transition

TINY = dict(growth_rate=4, block_config=(2, 3), num_init_features=6, num_classes=5)


def make_pair(dtype, memory="bottleneck", backend="reference", seed=0, **config):
    """A naive tiny DenseNet with random BN state and an efficient copy of it."""
    config = {**TINY, **config}
    torch.manual_seed(seed)
    naive = DenseNet(**config).to(dtype)
    randomize_bn(naive)
    efficient = DenseNet(**config, efficient=True, memory=memory, backend=backend).to(dtype)
    efficient.load_state_dict(naive.state_dict())
    return naive, efficient


def compare(naive, efficient, x, oracle=None, seed=7):
    """One training step of both models agrees in every observable, by the rule of x's dtype
    (tests/helpers.py): float64 directly, lower precision against ``oracle``."""
    check_step(efficient, naive, x, oracle=oracle, seed=seed)


def image(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 2 + 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [4, None])
def test_efficient_matches_naive_cifar_stem(dtype, memory, bn_size):
    naive, efficient = make_pair(
        dtype, memory, bn_size=bn_size, small_inputs=True, compression=0.5 if bn_size else 1.0
    )
    oracle = float64_oracle(naive)
    x = image((3, 3, 9, 7), dtype)  # odd H/W: the transition floors to 4x3
    compare(naive, efficient, x, oracle)
    compare(naive, efficient, x * 0.5, oracle)  # from updated running stats


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_efficient_matches_naive_imagenet_stem(dtype):
    naive, efficient = make_pair(dtype, "min")
    compare(naive, efficient, image((2, 3, 19, 17), dtype), float64_oracle(naive))


@pytest.mark.parametrize("memory", ["bottleneck", "min"])
def test_efficient_matches_naive_eval(memory):
    naive, efficient = make_pair(torch.float64, memory, small_inputs=True)
    naive.eval()
    efficient.eval()
    compare(naive, efficient, image((2, 3, 8, 8), torch.float64))
    with torch.no_grad():
        x = image((2, 3, 8, 8), torch.float64, seed=3)
        assert_close(efficient(x), naive(x), TOLERANCE[torch.float64], "no_grad eval output")


def test_cumulative_momentum_and_untracked_stats():
    naive, efficient = make_pair(torch.float64, small_inputs=True)
    for model in (naive, efficient):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    x = image((2, 3, 8, 6), torch.float64)
    compare(naive, efficient, x)
    compare(naive, efficient, x - 1)
    config = {**TINY, "small_inputs": True}
    torch.manual_seed(0)
    naive = DenseNet(**config)
    efficient = DenseNet(**config, efficient=True, backend="reference")
    for model in (naive, efficient):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
    efficient.load_state_dict(naive.state_dict())
    naive.eval()
    efficient.eval()
    compare(naive, efficient, image((2, 3, 8, 6), torch.float32), float64_oracle(naive))


def test_dropout_masks_match_seeded_naive():
    # Both draw each layer's mask from the default generator in the same order.
    naive, efficient = make_pair(torch.float64, small_inputs=True, drop_rate=0.3)
    compare(naive, efficient, image((2, 3, 8, 8), torch.float64))


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_every_cpu_backend(backend):
    cpu_backend_or_skip(backend)
    naive, efficient = make_pair(torch.float64, "min", backend=backend, small_inputs=True)
    compare(naive, efficient, image((2, 3, 7, 9), torch.float64))


@pytest.mark.parametrize("bn_size", [4, None])
def test_checkpointed_naive_matches_naive(bn_size):
    # torchvision's memory_efficient variant, the "checkpointing" benchmark baseline. Its
    # running statistics must be updated once although checkpointing recomputes the BN.
    config = dict(bn_size=bn_size, small_inputs=True)
    naive, _ = make_pair(torch.float64, **config)
    ckpt = DenseNet(**TINY, **config, memory_efficient=True).double()
    ckpt.load_state_dict(naive.state_dict())
    assert all(layer.memory_efficient for layer in ckpt.modules() if hasattr(layer, "bn_function"))
    compare(naive, ckpt, image((2, 3, 8, 8), torch.float64))


def test_structure_and_types():
    naive, efficient = make_pair(torch.float32)
    assert isinstance(naive.features.denseblock1, _DenseBlock)
    assert isinstance(naive.features.transition1, _Transition)
    assert isinstance(efficient.features.denseblock2, EfficientDenseBlock)
    assert isinstance(efficient.features.transition1, EfficientTransition)
    assert not hasattr(naive.features, "transition2"), "no transition after the last block"
    assert efficient.features.denseblock1.memory == "bottleneck"
    names = [n for n, _ in naive.features.named_children()]
    assert names == [
        "conv0",
        "norm0",
        "relu0",
        "pool0",
        "denseblock1",
        "transition1",
        "denseblock2",
        "norm5",
    ]
    small = DenseNet(**TINY, small_inputs=True)
    assert [n for n, _ in small.features.named_children()][:2] == ["conv0", "denseblock1"]
    assert small.features.conv0.weight.shape == (6, 3, 3, 3)
    assert small.features.conv0.stride == (1, 1)


@pytest.mark.parametrize("ties", [False, True])
def test_efficient_stem_pools_in_channels_last_exactly_as_the_naive_pool(ties):
    """The efficient ImageNet stem's max pool runs in channels_last on the CPU; its output and
    input gradient are nn.MaxPool2d's on NCHW bit for bit, ties (which element receives the
    gradient) and NaN included, and the gradient comes back in NCHW. Integer gradients make
    every sum exact in any order."""
    naive, efficient = make_pair(torch.float32)
    assert type(naive.features.pool0) is nn.MaxPool2d
    pool = efficient.features.pool0
    assert isinstance(pool, ChannelsLastMaxPool2d)
    g = torch.Generator().manual_seed(1)
    shape = (3, 5, 13, 11)  # odd sizes: padded windows at both edges
    if ties:
        x = torch.randint(0, 3, shape, generator=g).float()
    else:
        x = torch.randn(shape, generator=g)
    x[1, 2, 6, 4] = float("nan")
    x, x_ref = x.requires_grad_(), x.detach().clone().requires_grad_()
    out, ref = pool(x), naive.features.pool0(x_ref)
    assert x.is_contiguous() and out.is_contiguous(memory_format=torch.channels_last)
    assert out.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())
    grad = torch.randint(-8, 9, ref.shape, generator=g).float()
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert x.grad.is_contiguous()  # back in NCHW: the stem ReLU's backward needs one layout


def test_efficient_stem_pool_saves_what_nn_maxpool2d_saves():
    """The channels_last copy the efficient stem pools is not kept for backward: the pool saves
    its NCHW input itself (in the stem also the ReLU's saved output) and the indices, the same
    bytes as nn.MaxPool2d (keeping the copy cost DenseNet-121 b4 12 MiB of activations)."""

    def saved_by(pool, x):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            pool(x)
        return saved

    x = torch.randn(2, 4, 9, 10, requires_grad=True)
    ours = saved_by(ChannelsLastMaxPool2d(3, 2, 1), x)
    theirs = saved_by(nn.MaxPool2d(3, 2, 1), x)
    assert any(t is x for t in ours)
    assert sorted(t.nbytes for t in ours) == sorted(t.nbytes for t in theirs)


def test_efficient_imagenet_stem_matches_naive_with_eval_flags_hooks_and_nan():
    """The ImageNet stem (its channels_last pool) is drop-in: with the stem BN evaluating while
    the rest trains, forward hooks on the pool and pre-hooks on the first block, the step
    agrees with the naive model's; in evaluation a NaN pixel makes its image's logits NaN and
    leaves the other image's as naive's."""
    naive, efficient = make_pair(torch.float64, "min")
    seen: dict[str, list] = {"naive": [], "efficient": []}
    for key, model in (("naive", naive), ("efficient", efficient)):
        model.features.norm0.eval()
        model.features.pool0.register_forward_hook(
            lambda m, args, out, key=key: seen[key].append(out.detach().clone())
        )
        model.features.denseblock1.register_forward_pre_hook(lambda m, args: None)
    compare(naive, efficient, image((2, 3, 19, 17), torch.float64))
    assert len(seen["efficient"]) == len(seen["naive"]) > 0
    for a, b in zip(seen["efficient"], seen["naive"]):
        assert torch.equal(a, b)  # the pool's output: same values, any layout
    x = image((2, 3, 19, 17), torch.float64, seed=2)
    x[1, 0, 5, 5] = float("nan")
    naive.eval(), efficient.eval()  # running statistics: the NaN stays in its image
    with torch.no_grad():
        out, ref = efficient(x), naive(x)
    assert ref[1].isnan().all() and out[1].isnan().all() and not out[0].isnan().any()
    assert_close(out[0], ref[0], TOLERANCE[torch.float64], "the image without NaN")


def test_state_dict_round_trip():
    naive, efficient = make_pair(torch.float32, bn_size=None, compression=1.0)
    assert list(naive.state_dict()) == list(efficient.state_dict())
    back = DenseNet(**TINY, bn_size=None, compression=1.0)
    back.load_state_dict(efficient.state_dict())
    for (name, a), b in zip(naive.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_compression_floors_and_plain_layers():
    model = DenseNet(
        growth_rate=3,
        block_config=(2, 2, 1),
        num_init_features=5,
        compression=0.5,
        bn_size=None,
        small_inputs=True,
    )
    # 5 + 2*3 = 11 -> floor(5.5) = 5; 5 + 6 = 11 -> 5; 5 + 3 = 8 features at the head.
    assert model.features.transition1.conv.weight.shape == (5, 11, 1, 1)
    assert model.features.transition2.conv.weight.shape == (5, 11, 1, 1)
    assert model.classifier.in_features == 8
    layer = model.features.denseblock1.denselayer1
    assert layer.conv1.weight.shape == (3, 5, 3, 3) and not hasattr(layer, "norm2")


def test_initialisation_like_torchvision():
    torch.manual_seed(0)
    model = DenseNet(**TINY)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)
    assert torch.equal(model.classifier.bias, torch.zeros(5))
    conv = model.features.denseblock2.denselayer3.conv1.weight  # fan_in 14: std sqrt(2/14)
    assert abs(conv.std().item() - (2 / 14) ** 0.5) < 0.25 * (2 / 14) ** 0.5


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# torchvision's documented num_params (weights tables of torchvision.models.densenet*).
@pytest.mark.parametrize(
    "name,expected",
    [
        ("densenet121", 7_978_856),
        ("densenet161", 28_681_000),
        ("densenet169", 14_149_480),
        ("densenet201", 20_013_928),
    ],
)
def test_imagenet_parameter_counts(name, expected):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        assert num_params(get_model(name)) == expected
        assert num_params(get_model(name, efficient=True)) == expected


# Huang et al. 2017, Table 2 (millions of parameters, one decimal), 10 classes.
@pytest.mark.parametrize(
    "name,kwargs,millions",
    [
        ("densenet_bc_100", {}, 0.8),
        ("densenet_bc_250", {}, 15.3),
        ("densenet_bc_190", {}, 25.6),
        ("densenet_40", {}, 1.0),
        ("densenet_100", {}, 7.0),
        ("densenet_100", {"growth_rate": 24}, 27.2),
    ],
)
def test_cifar_parameter_counts(name, kwargs, millions):
    with torch.device("meta"):
        assert round(num_params(get_model(name, **kwargs)) / 1e6, 1) == millions


def test_densenet121_keys_are_torchvision_keys():
    with torch.device("meta"):
        keys = list(python_models.densenet121().state_dict())
    # conv0 + norm0 (5 entries per BN) + 58 layers x (2 BNs + 2 convs) + 3 transitions x
    # (BN + conv) + norm5 + classifier weight and bias.
    assert len(keys) == 1 + 5 + 58 * 12 + 3 * 6 + 5 + 2
    for key in (
        "features.conv0.weight",
        "features.norm0.running_var",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock4.denselayer16.conv2.weight",
        "features.transition3.norm.num_batches_tracked",
        "features.transition3.conv.weight",
        "features.norm5.bias",
        "classifier.weight",
        "classifier.bias",
    ):
        assert key in keys, key


def test_builders_layout():
    with torch.device("meta"):
        bc = python_models.densenet_bc(depth=100, growth_rate=12)
        plain = python_models.densenet(depth=40, growth_rate=12)
    assert len(bc.features.denseblock3) == 16
    assert bc.features.conv0.out_channels == 24
    assert bc.features.transition1.conv.out_channels == (24 + 16 * 12) // 2
    assert len(plain.features.denseblock1) == 12
    assert plain.features.conv0.out_channels == 16
    assert plain.features.transition1.conv.out_channels == 16 + 12 * 12
    assert plain.features.denseblock1.denselayer1.conv1.kernel_size == (3, 3)


def test_registry():
    assert {"densenet_bc_100", "densenet_40", "densenet121", "densenet264"} <= set(MODEL_NAMES)
    with torch.device("meta"):
        for name in MODEL_NAMES:
            assert isinstance(get_model(name), (DenseNet, DelugeNet))
        bc190 = get_model("densenet_bc_190")
        assert bc190.features.denseblock1.denselayer1.conv2.out_channels == 40
        m = get_model(
            "densenet_bc_100",
            growth_rate=24,
            num_classes=100,
            efficient=True,
            memory="min",
            backend="reference",
        )
        assert m.features.denseblock1.spec.growth_rate == 24 and m.classifier.out_features == 100
        assert m.features.denseblock1.memory == "min"
        assert len(get_model("densenet_bc_40").features.denseblock1) == 6
        assert len(get_model("densenet_28").features.denseblock1) == 8


@pytest.mark.parametrize(
    "call",
    [
        lambda: get_model("resnet50"),
        lambda: get_model("densenet_bc_101"),
        lambda: python_models.densenet_bc(depth=99),
        lambda: python_models.densenet_bc(depth=4),
        lambda: python_models.densenet(depth=41),
        lambda: DenseNet(**TINY, compression=0.0),
        lambda: DenseNet(**TINY, compression=1.5),
        lambda: DenseNet(**{**TINY, "block_config": ()}),
        lambda: DenseNet(**{**TINY, "growth_rate": 0}),
        lambda: DenseNet(**TINY, efficient=True, memory_efficient=True),
        lambda: DenseNet(**TINY, efficient=True, memory="none"),
    ],
)
def test_bad_configurations_raise(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("efficient", [False, True])
def test_a_transition_without_output_channels_is_refused(efficient):
    """2 + 1 channels at compression 0.3 floor to 0: the naive model used to build a zero-channel
    transition (and the efficient one failed in its block spec, naming no transition)."""
    config = dict(growth_rate=1, block_config=(1, 1), num_init_features=2, num_classes=3)
    with pytest.raises(ValueError, match=r"transition1 floor\(0.3 \* 3\) = 0 output channels"):
        DenseNet(**config, compression=0.3, efficient=efficient)


def test_efficient_head_matches_naive_head_on_converted_features():
    naive, efficient = make_pair(torch.float64, small_inputs=True)
    efficient.efficient_head = False  # same blocks, naive head: must agree too
    compare(naive, efficient, image((2, 3, 8, 8), torch.float64))
    twin = copy.deepcopy(efficient)
    twin.efficient_head = True
    x = image((2, 3, 8, 8), torch.float64, seed=5)
    efficient.eval(), twin.eval()
    with torch.no_grad():
        assert_close(twin(x), efficient(x), TOLERANCE[torch.float64], "fused head")


def saved_activation_shapes(model, x):
    """Shapes of the distinct storages autograd saves in a forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sorted(saved.values())


def test_efficient_model_saves_only_block_buffers():
    # Linear memory: besides the image, only each block's feature buffer and each
    # transition's pooled activation are kept, plus O(channels) statistics.
    _, efficient = make_pair(torch.float32, "min", small_inputs=True)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    big = [s for s in saved_activation_shapes(efficient, x) if torch.Size(s).numel() > 100]
    # block1: 6 + 2*4 = 14 channels at 8x8; transition1's 1x1 conv keeps its pooled input
    # (14 channels at 4x4); block2: 7 + 3*4 = 19 channels at 4x4.
    assert big == sorted([(2, 3, 8, 8), (2, 14, 8, 8), (2, 14, 4, 4), (2, 19, 4, 4)])


def test_bf16_autocast_step_takes_less_memory_per_sample_than_float32():
    """Under bfloat16 autocast the efficient model's training step must take less activation
    memory per sample than in float32, as naive's does (half). It took more (2.64 against 2.30
    MiB per sample on DenseNet-BC-100, and on an H200): the transitions' backward recomputed
    the ReLU mask of the whole block output in float32. Per sample: the slope of the step's
    peak between two batches, so fixed costs cancel.

    Needs oneDNN's bfloat16 convolution (x86: AVX-512 or AVX-NE-CONVERT): without it ATen
    runs bfloat16 3x3 convolutions through its im2col path, whose transient workspace (0.86 MB
    per image for DenseNet-BC-40's 48-channel 3x3 inputs at 32x32, naive's convolutions alike)
    outweighs what autocast halves: 1.53 against 1.36 MiB per sample on an AVX2-only EPYC."""
    from python_models.memory import peak

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bfloat16 convolution on this CPU: ATen's im2col path instead")

    torch.manual_seed(0)
    model = python_models.densenet_bc(depth=40, growth_rate=12, efficient=True, memory="min")

    def per_sample(autocast: bool) -> float:
        peaks = []
        for n in (8, 16):
            x = torch.randn(n, 3, 32, 32)

            def step(x=x):
                with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                    out = model(x)
                out.float().sum().backward()

            step()  # gradients allocated outside the probe
            peaks.append(peak(step, "cpu").peak_bytes)
        return (peaks[1] - peaks[0]) / 8

    fp32, bf16 = per_sample(False), per_sample(True)
    assert bf16 <= 0.6 * fp32, f"bf16 {bf16 / 2**20:.3f} MiB per sample, fp32 {fp32 / 2**20:.3f}"
