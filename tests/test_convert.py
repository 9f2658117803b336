"""EfficientTransition, the fused head and ``dense_ext.convert``.

EfficientTransition is compared with torchvision's transition order (BN-ReLU-Conv1x1-Pool,
stock modules) loaded with the same state: output, input and parameter gradients, running
statistics after forward and after backward, including odd H/W, eval mode, cumulative
momentum and untracked statistics. What it saves for backward is inspected directly.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from helpers import TOLERANCE, Autocast, FusedHead, assert_close, check_step, float64_oracle
from hypothesis_compat import HealthCheck, given, settings, st
from naive import NaiveDenseBlock, randomize_bn
from torch import Tensor, nn

from dense_ext.block import EfficientDenseBlock
from dense_ext.convert import convert
from dense_ext.transition import EfficientTransition, norm_relu_pool
from python_models import DenseNet

TINY = dict(growth_rate=4, block_config=(2, 3), num_init_features=6, num_classes=5)


def naive_transition(c_in, c_out):
    return nn.Sequential(
        OrderedDict(
            [
                ("norm", nn.BatchNorm2d(c_in)),
                ("relu", nn.ReLU(inplace=True)),
                ("conv", nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)),
                ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
            ]
        )
    )


def transition_pair(c_in, c_out, dtype, **bn_kwargs):
    torch.manual_seed(0)
    naive = naive_transition(c_in, c_out)
    naive.norm = nn.BatchNorm2d(c_in, **bn_kwargs)
    randomize_bn(naive)
    naive = naive.to(dtype)
    efficient = EfficientTransition(c_in, c_out).to(dtype)
    efficient.norm = nn.BatchNorm2d(c_in, **bn_kwargs).to(dtype)
    efficient.load_state_dict(naive.state_dict())
    return naive, efficient


def compare_modules(naive, efficient, x, oracle=None):
    """One training step of both transitions (each keeps its running statistics): every
    observable agrees, by the rule of x's dtype (tests/helpers.py); under autocast (the
    ``Autocast`` wrapper) the rule's precision is bfloat16's, float32 results included."""
    precision = torch.bfloat16 if isinstance(naive, Autocast) else None
    check_step(efficient, naive, x, oracle=oracle, seed=3, precision=precision)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (5, 4), (2, 3)])
@pytest.mark.parametrize("train", [True, False])
def test_transition_matches_naive(dtype, hw, train):
    naive, efficient = transition_pair(7, 3, dtype)
    naive.train(train), efficient.train(train)
    oracle = float64_oracle(naive)
    x = torch.randn(3, 7, *hw, dtype=dtype) * 1.5 + 0.7
    compare_modules(naive, efficient, x, oracle)
    compare_modules(naive, efficient, x - 0.3, oracle)  # from updated statistics


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3),
    c_in=st.integers(1, 9),
    c_out=st.integers(1, 5),
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    train=st.booleans(),
    seed=st.integers(0, 99),
)
def test_transition_random_shapes(n, c_in, c_out, h, w, train, seed):
    naive, efficient = transition_pair(c_in, c_out, torch.float64)
    naive.train(train), efficient.train(train)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64) * 3 - 1
    compare_modules(naive, efficient, x)


@pytest.mark.parametrize(
    "bn_kwargs",
    [
        {"momentum": None},
        {"track_running_stats": False},
        {"affine": False},
        {"eps": 1e-2},
    ],
)
def test_transition_bn_variants(bn_kwargs):
    for train in (True, False):
        naive, efficient = transition_pair(6, 4, torch.float64, **bn_kwargs)
        naive.train(train), efficient.train(train)
        x = torch.randn(2, 6, 7, 5, dtype=torch.float64) + 1
        for _ in range(3):
            compare_modules(naive, efficient, x)


@pytest.mark.parametrize("train", [True, False])
def test_transition_backward_over_several_batch_slices(train):
    """The in-place BN-ReLU backward works a slice of the batch at a time (about 2**20
    values per slice): inputs larger than one slice must give the same result."""
    naive, efficient = transition_pair(8, 4, torch.float64)
    naive.train(train), efficient.train(train)
    x = torch.randn(5, 8, 256, 258, dtype=torch.float64) * 2 + 0.5  # 3 slices of 2 samples
    compare_modules(naive, efficient, x)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16_params"])
def test_transition_low_precision_over_several_mask_slices(train, autocast):
    """bfloat16 input, under autocast (float32 statistics: the ReLU mask is recomputed in
    float32 a batch slice at a time, here 17 samples in slices of 3) or with bfloat16
    parameters: within the tolerance rule of naive."""
    naive, efficient = transition_pair(6, 3, torch.float32 if autocast else torch.bfloat16)
    if autocast:
        naive, efficient = Autocast(naive), Autocast(efficient)
    naive.train(train), efficient.train(train)
    oracle = float64_oracle(naive)
    x = (torch.randn(17, 6, 6, 4) * 1.5 + 0.3).to(torch.bfloat16)
    compare_modules(naive, efficient, x, oracle)


class _NaiveHead(FusedHead):
    def forward(self, x):
        return torch.relu(self.norm(x)).mean(dim=(2, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("pool", ["avg2x2", "global"])
def test_half_precision_model_in_evaluation(dtype, layout, pool):
    """A float16 or bfloat16 model (half-precision running statistics) in evaluation, as when
    fine-tuning with frozen BNs. The backward used to copy the running statistics in their
    own dtype and so summed and recomputed the ReLU mask in half precision: here input
    gradients 6-91 % off (a flipped mask lets a whole gradient value through), PyTorch's
    within 0.4 %. Now within the tolerance rule of naive, for the transition and the head."""
    torch.manual_seed(0)
    if pool == "avg2x2":
        naive, efficient = transition_pair(16, 5, dtype)
    else:
        naive, efficient = _NaiveHead(16), FusedHead(16)
        randomize_bn(naive.norm)
        efficient.load_state_dict(naive.state_dict())
        naive, efficient = naive.to(dtype), efficient.to(dtype)
    naive.eval(), efficient.eval()
    oracle = float64_oracle(naive)
    x = (torch.randn(8, 16, 16, 16) * 1.5 + 0.3).to(dtype).contiguous(memory_format=layout)
    compare_modules(naive, efficient, x, oracle)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_transition_autocast_backward_holds_no_float32_copy_of_the_input(layout):
    """Under bfloat16 autocast on the CPU, the backward's peak live bytes: the pool's gradient
    (the input's size, then the input gradient in place: the extension's kernel for a
    channels_last input, float32 slices otherwise). Before, the ReLU mask's float32 recompute
    of the whole input and ATen's kernel held 5.25x the input's bytes: a bfloat16 DenseNet's
    `min` step took more memory per sample than float32's."""
    from python_models.memory import peak

    _, efficient = transition_pair(128, 32, torch.float32)
    x = torch.randn(128, 128, 32, 32).to(torch.bfloat16)  # 16 Mi values
    x = x.contiguous(memory_format=layout).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        out = efficient(x)
    grad = torch.ones_like(out)
    probe = peak(lambda: out.backward(grad), "cpu")
    input_bytes = x.numel() * x.element_size()
    assert probe.peak_bytes <= 2 * input_bytes, (
        f"backward peak {probe.peak_bytes / input_bytes:.2f}x the input's bytes"
    )


def test_relu_mask_of_low_precision_input_is_recomputed_a_slice_at_a_time():
    """The GPU's low-precision path masks the pool's gradient before ATen's BN backward: its
    float32 recompute holds at most one of 8 batch slices (whole: two float32 copies, 4x the
    bfloat16 input's bytes)."""
    from dense_ext.transition import _mask_relu_gradient_
    from python_models.memory import peak

    x = torch.randn(128, 128, 32, 32).to(torch.bfloat16)
    g = torch.randn_like(x)
    mean, invstd = torch.full((128,), 0.1), torch.full((128,), 2.0)
    weight, bias = torch.randn(128), torch.randn(128)
    expected = g.masked_fill(
        x.float() * (weight * invstd)[:, None, None]
        + (bias - mean * weight * invstd)[:, None, None]
        <= 0,
        0,
    )
    probe = peak(lambda: _mask_relu_gradient_(g, x, weight, bias, mean, invstd), "cpu")
    assert probe.peak_bytes <= 0.5 * x.numel() * x.element_size()
    assert torch.equal(g, expected)


@pytest.mark.parametrize(
    "dtype,layout,autocast",
    [
        (torch.float64, torch.contiguous_format, False),
        (torch.float32, torch.contiguous_format, False),
        (torch.float32, torch.channels_last, False),  # the extension's fused backward
        (torch.float32, torch.channels_last, True),  # bfloat16 input, float32 statistics
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_transition_passes_nan_and_inf_gradients_as_naive(dtype, layout, autocast, train):
    """A NaN and an Inf in the incoming gradient reach the input gradient where naive's
    reach it: ReLU's backward zeroes them where the ReLU was inactive. Multiplying by the
    mask kept them there (NaN * 0), in every path but the extension's fused one."""
    naive, efficient = transition_pair(4, 3, dtype)
    naive.train(train), efficient.train(train)
    if autocast:
        naive, efficient = Autocast(naive), Autocast(efficient)
    x = torch.randn(2, 4, 6, 6, dtype=dtype).contiguous(memory_format=layout)
    x = x.to(torch.bfloat16) if autocast else x
    expected = same_nonfinite_input_gradients(naive, efficient, x)
    assert 0 < int(expected.isnan().sum()) < expected.numel()  # the case is not vacuous


def same_nonfinite_input_gradients(naive, efficient, x):
    """Backward of both modules with a NaN and an Inf in the incoming gradient: the input
    gradients have NaN and Inf in the same places. Returns naive's input gradient."""
    grads = []
    for module in (naive, efficient):
        leaf = x.clone().requires_grad_()
        out = module(leaf)
        g = torch.ones_like(out)
        g[0, 0, 0, 0], g[1, 2, 1, 2] = float("nan"), float("inf")
        out.backward(g)
        grads.append(leaf.grad)
    expected, actual = grads
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.isinf(), expected.isinf())
    return expected


def fused_backward_calls(monkeypatch) -> list[torch.dtype]:
    """The input dtypes of the transition backwards that ran the extension's kernel."""
    from dense_ext import transition

    calls: list[torch.dtype] = []
    fused = transition._bn_relu_backward_fused

    def spy(g, x, *args):
        calls.append(x.dtype)
        return fused(g, x, *args)

    monkeypatch.setattr(transition, "_bn_relu_backward_fused", spy)
    return calls


def test_transition_autocast_backward_on_channels_last_runs_the_extension(monkeypatch):
    """A channels_last bfloat16 input under autocast (float32 statistics), as a block's buffer
    arrives: one call of the extension's BN-ReLU backward, not a loop over slices."""
    calls = fused_backward_calls(monkeypatch)
    naive, efficient = transition_pair(6, 3, torch.float32)
    oracle = float64_oracle(Autocast(naive))
    x = torch.randn(4, 6, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    compare_modules(Autocast(naive), Autocast(efficient), x, oracle)
    assert calls == [torch.bfloat16]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_transition_backward_is_a_few_ops_whatever_the_batch(autocast):
    """The channels_last backward (the path CUDA takes too) is a fixed handful of ATen ops:
    the Python paths run a few per batch slice of 2**20 values (DenseNet-121 b32: 1,417 ops in
    the three transitions against 21), each a kernel launch on a GPU."""
    from helpers import RecordOps

    _, efficient = transition_pair(16, 8, torch.float32)
    x = torch.randn(48, 16, 64, 64).contiguous(memory_format=torch.channels_last)  # 3 Mi
    x = (x.to(torch.bfloat16) if autocast else x).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = efficient(x)
    recorded = RecordOps()
    with recorded:
        torch.autograd.grad(out, x, torch.ones_like(out))
    assert len(recorded.calls) <= 12, recorded.calls


def test_cuda_transitions_take_the_extension_path_where_the_cpu_does(monkeypatch):
    """Which inputs get the extension's in-place BN-ReLU backward, decided without a GPU (tensor
    stand-ins on a "cuda" device, the CUDA kernels taken as built): channels_last, ``g`` in
    ``x``'s dtype, statistics in its accumulation dtype; CUDA as the CPU (CUDA took the Python
    paths before: float32 a loop over batch slices, bfloat16 ATen's kernel)."""
    from types import SimpleNamespace

    from dense_ext import transition
    from dense_ext.backends import cpp

    monkeypatch.setattr(cpp, "unavailable_reason", lambda device: None)

    def stand_in(dtype, device="cuda", channels_last=True):
        return SimpleNamespace(
            device=torch.device(device),
            dtype=dtype,
            is_contiguous=lambda memory_format: channels_last,
        )

    applies = transition._fused_backward_applies
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    for device in ("cuda", "cpu"):
        assert applies(stand_in(f32, device), stand_in(f32, device), stand_in(f32, device))
        assert applies(stand_in(bf16, device), stand_in(bf16, device), stand_in(f32, device))
        assert applies(stand_in(f64, device), stand_in(f64, device), stand_in(f64, device))
        assert not applies(stand_in(bf16, device), stand_in(bf16, device), stand_in(bf16, device))
        assert not applies(stand_in(f32, device), stand_in(bf16, device), stand_in(f32, device))
        flat = stand_in(f32, device, channels_last=False)
        assert not applies(flat, flat, stand_in(f32, device))
    assert not applies(stand_in(f32, "meta"), stand_in(f32, "meta"), stand_in(f32, "meta"))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("train", [True, False])
def test_cuda_transition_matches_naive(monkeypatch, layout, autocast, train):
    """The transition on CUDA against naive's on CUDA, by the tolerance rule (IEEE float32, or
    bfloat16 autocast), with a NaN and an Inf in the incoming gradient checked too: the
    extension's kernel for channels_last inputs (in place, asserted), the batch-sliced paths
    otherwise."""
    from helpers import cuda_or_skip, ieee_fp32

    cuda_or_skip()
    calls = fused_backward_calls(monkeypatch)
    naive, efficient = transition_pair(6, 3, torch.float32)
    naive, efficient = naive.cuda().train(train), efficient.cuda().train(train)
    if autocast:
        naive, efficient = Autocast(naive), Autocast(efficient)
    x = (torch.randn(9, 6, 10, 6, device="cuda") * 1.5 + 0.3).contiguous(memory_format=layout)
    x = x.to(torch.bfloat16) if autocast else x
    with ieee_fp32():
        compare_modules(naive, efficient, x, float64_oracle(naive))
    fused = layout == torch.channels_last
    assert calls == ([x.dtype] if fused else []), calls
    same_nonfinite_input_gradients(naive, efficient, x)


def test_transition_channels_last_input():
    naive, efficient = transition_pair(5, 2, torch.float64)
    x = (torch.randn(2, 5, 6, 6, dtype=torch.float64)).to(memory_format=torch.channels_last)
    compare_modules(naive, efficient, x)


def test_transition_saves_nothing_of_input_size_but_the_input():
    _, efficient = transition_pair(8, 4, torch.float32)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = efficient(x)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big and all(t.data_ptr() == x.data_ptr() for t in big), "only x may be x-sized"
    pooled = [t for t in saved if t.shape == (2, 8, 5, 5)]
    assert pooled, "the convolution saves the pooled activation"
    assert (
        sum(t.numel() for t in saved if t.data_ptr() != x.data_ptr())
        <= x.numel() // 4 + 4 * 8 + efficient.conv.weight.numel()
    )
    out.sum().backward()
    assert x.grad is not None


def test_transition_in_place_change_before_backward_is_caught():
    _, efficient = transition_pair(4, 2, torch.float32)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    y = x * 1  # a non-leaf that the user then changes in place
    out = efficient(y)
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (torch.randn(3, 6, 6), ValueError, "4-D"),
        (torch.randn(2, 5, 6, 6), ValueError, "channels"),
        (torch.ones(2, 4, 6, 6, dtype=torch.int64), TypeError, "floating"),
        (torch.randn(2, 4, 1, 6), ValueError, "H, W >= 2"),
        ([1.0], TypeError, "Tensor"),
    ],
)
def test_transition_rejects_bad_input(bad, error, match):
    transition = EfficientTransition(4, 2)
    with pytest.raises(error, match=match):
        transition(bad)


def test_training_needs_more_than_one_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value"):
        norm_relu_pool(torch.randn(1, 3, 1, 1), nn.BatchNorm2d(3), pool="global")
    with pytest.raises(ValueError, match="pool"):
        norm_relu_pool(torch.randn(2, 3, 4, 4), nn.BatchNorm2d(3), pool="max")


@pytest.mark.parametrize("train", [True, False])
def test_global_head_matches_naive(train):
    torch.manual_seed(0)
    naive_bn = nn.BatchNorm2d(5).double()
    randomize_bn(naive_bn)
    bn = copy.deepcopy(naive_bn)
    naive_bn.train(train), bn.train(train)
    x = torch.randn(3, 5, 3, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.relu(naive_bn(x)).mean(dim=(2, 3))
    out = norm_relu_pool(x, bn, pool="global")
    assert_close(out, ref, TOLERANCE[torch.float64], "head output")
    grad = torch.randn_like(ref)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(ref, (x, naive_bn.weight, naive_bn.bias), grad)
    gx, gw, gb = torch.autograd.grad(out, (x, bn.weight, bn.bias), grad)
    for a, b, what in ((gx, gx_ref, "dx"), (gw, gw_ref, "dweight"), (gb, gb_ref, "dbias")):
        assert_close(a, b, TOLERANCE[torch.float64], what)
    assert_close(bn.running_var, naive_bn.running_var, TOLERANCE[torch.float64], "running_var")
    assert torch.equal(bn.num_batches_tracked, naive_bn.num_batches_tracked)


# ---------------------------------------------------------------------------- convert


def naive_model(dtype=torch.float64, **config):
    torch.manual_seed(0)
    model = DenseNet(**{**TINY, "small_inputs": True, **config}).to(dtype)
    randomize_bn(model)
    return model


@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize(
    "config",
    [{}, {"bn_size": None, "compression": 1.0}, {"drop_rate": 0.25}, {"small_inputs": False}],
)
def test_convert_python_models_densenet(memory, config):
    naive = naive_model(**config)
    model = naive_model(**config)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    bufs = {n: b for n, b in model.named_buffers()}
    assert convert(model, memory=memory, backend="reference") is model
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters()), "parameters replaced"
    assert all(b is bufs[n] for n, b in model.named_buffers()), "buffers replaced"
    for i in (1, 2):
        block = model.features.get_submodule(f"denseblock{i}")
        assert isinstance(block, EfficientDenseBlock) and block.memory == memory
        assert all(layer.drop_rate == config.get("drop_rate", 0.0) for layer in block.values())
        assert block.spec.bottleneck_factor == (4 if config.get("bn_size", 4) else 0)
    assert isinstance(model.features.transition1, EfficientTransition)
    check_step(model, naive, x, seed=5)


def test_convert_keeps_optimizer_mode_device_dtype():
    model = naive_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.eval()
    convert(model, backend="reference")
    assert not model.training and not model.features.denseblock1.training
    assert not any(m.training for m in model.modules())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    model.train()
    before = model.features.denseblock2.denselayer3.conv2.weight.detach().clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    after = model.features.denseblock2.denselayer3.conv2.weight
    assert not torch.equal(before, after), "the old optimizer must update the new model"


def test_convert_torchvision_style_modules():
    # An independent torchvision-structured block (tests/naive.py) and a transition written
    # as a plain nn.Sequential: duck typing, not python_models classes.
    torch.manual_seed(1)
    net = nn.Sequential(
        OrderedDict(
            [
                ("block", NaiveDenseBlock(3, 5, 4, bn_size=2, drop_rate=0.0)),
                ("trans", naive_transition(17, 6)),
                ("other", nn.Sequential(nn.BatchNorm2d(6), nn.ReLU())),
            ]
        )
    ).double()
    randomize_bn(net)
    reference = copy.deepcopy(net)
    convert(net, memory="min", backend="reference")
    assert isinstance(net.block, EfficientDenseBlock) and net.block.spec.bottleneck_factor == 2
    assert isinstance(net.trans, EfficientTransition)
    assert isinstance(net.other, nn.Sequential)
    assert [n for n, _ in net.named_children()] == ["block", "trans", "other"]
    x = torch.randn(2, 5, 7, 7, dtype=torch.float64)
    check_step(net, reference, x, seed=5)


def test_convert_root_block_returns_new_module():
    block = NaiveDenseBlock(2, 3, 2, bn_size=None)
    new = convert(block, backend="reference")
    assert isinstance(new, EfficientDenseBlock) and new.spec.bottleneck_factor == 0
    assert new.denselayer2.conv1 is block.denselayer2.conv1


def test_convert_errors():
    model = naive_model()
    convert(model, backend="reference")
    with pytest.raises(ValueError, match="no torchvision-structured"):
        convert(model)  # already converted
    with pytest.raises(ValueError, match="no torchvision-structured"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    bad = naive_model()
    bad.features.denseblock2.denselayer2.relu1 = nn.SiLU()
    with pytest.raises(ValueError, match="denselayer2"):
        convert(bad)


def test_convert_keeps_per_module_flags_and_drop_rates():
    model = naive_model()
    block = model.features.denseblock1
    block.denselayer1.norm1.eval()
    block.denselayer2.eval()
    block.denselayer2.drop_rate = 0.5
    flags = {name: m.training for name, m in model.named_modules()}
    convert(model, backend="reference")
    new = model.features.denseblock1
    assert [layer.drop_rate for layer in new.values()][:2] == [0.0, 0.5]
    for name, m in model.named_modules():
        if name in flags:
            assert m.training == flags[name], name


def test_convert_leaves_unrecognised_transitions():
    net = nn.Sequential(
        OrderedDict([("t", naive_transition(4, 2)), ("b", NaiveDenseBlock(1, 2, 2, bn_size=None))])
    )
    net.t.pool = nn.AvgPool2d(kernel_size=3, stride=2)  # not the 2x2 pool: must stay
    convert(net, backend="reference")
    assert type(net.t) is nn.Sequential and isinstance(net.b, EfficientDenseBlock)


def _record_hooks(model: nn.Module, seen: dict[str, list[Tensor]]) -> list:
    """Hooks of every kind on a block, a layer and a transition of ``model`` (as a user or
    timm's hook-based feature extractor registers them before converting), each appending
    what it observes to ``seen``; the handles."""
    block = model.features.denseblock1
    layer = model.features.denseblock2.denselayer2
    transition = model.features.transition1

    def keep(name):
        return lambda t: seen.setdefault(name, []).append(t.detach().clone())

    def state_dict_hook(module, state, prefix, local_metadata):
        seen.setdefault("state_dict", []).append(torch.tensor(float(len(state))))

    return [
        block.register_forward_hook(lambda m, args, out: keep("block out")(out)),
        block.register_forward_pre_hook(lambda m, args: keep("block in")(args[0])),
        layer.register_forward_hook(lambda m, args, out: keep("layer out")(out)),
        layer.register_forward_hook(
            lambda m, args, kwargs, out: keep("layer out kw")(out), with_kwargs=True
        ),
        transition.register_full_backward_hook(lambda m, gin, gout: keep("transition g")(gout[0])),
        transition.register_full_backward_pre_hook(
            lambda m, gout: keep("transition g pre")(gout[0])
        ),
        block.register_state_dict_post_hook(state_dict_hook),
    ]


def test_convert_keeps_hooks_on_replaced_modules():
    """Hooks registered on a block, a layer and a transition before convert() fire after it
    with the unconverted model's values, and their handles still remove them."""
    reference, model = naive_model(), naive_model()
    seen_reference: dict[str, list[Tensor]] = {}
    seen: dict[str, list[Tensor]] = {}
    _record_hooks(reference, seen_reference)
    handles = _record_hooks(model, seen)
    # The hooked layer keeps its block unfused while the hook stays, and convert says so.
    with pytest.warns(UserWarning, match=r"features.denseblock2 \(denselayer2 has hooks"):
        convert(model, backend="reference")
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    check_step(model, reference, x, seed=5)
    for m in (model, reference):
        m.state_dict()  # the state_dict hook's turn
    assert sorted(seen) == sorted(seen_reference)
    for name, values in seen_reference.items():
        assert len(seen[name]) == len(values), name
        for got, want in zip(seen[name], values):
            assert_close(got, want, TOLERANCE[torch.float64], name)
    for handle in handles:
        handle.remove()
    seen.clear()
    model(x).sum().backward()
    model.state_dict()
    assert not seen, f"hooks still fired after remove(): {sorted(seen)}"


def test_convert_moves_every_kind_of_module_hook():
    """HOOK_ATTRIBUTES names every hook dict nn.Module keeps: one added by a later torch
    would be dropped by convert() without this test failing."""
    from dense_ext.convert import HOOK_ATTRIBUTES

    kept = {name for name in nn.Module().__dict__ if "hook" in name}
    assert kept == set(HOOK_ATTRIBUTES)
