"""The ``triton`` backend: fused kernels against the naive block and the reference backend.

On machines without a GPU the very same kernels and launchers run under Triton's interpreter
(``TRITON_INTERPRET=1``, set below before any kernel is defined) on small CPU tensors, with
sizes chosen so that every masked edge is exercised: ``M = N*H*W`` not a multiple of the row
tile, input channels crossing the 16-wide channel tile (11 -> 17), bottleneck width 24.

Tests marked ``cuda`` run the compiled kernels on a GPU; they skip without one. Triton fixes
interpreted vs compiled when the kernels are first defined, i.e. per process: unless
``TRITON_INTERPRET`` is set, this module picks compiled kernels when a CUDA device is present
and the interpreter otherwise. On a GPU machine, ``TRITON_INTERPRET=0 pytest tests/test_triton.py
-m cuda`` runs the compiled kernels; a CUDA test that finds the kernels interpreted (or the
backend otherwise unavailable on a capable GPU) *fails*, so a GPU run cannot pass by testing
nothing.
"""

from __future__ import annotations

import os

import torch

# Before anything defines the kernels. torch.cuda.is_available() creates no CUDA context.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

import copy  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import fields  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import (  # noqa: E402
    RELU_FLIP,
    TOLERANCE,
    Step,
    assert_close,
    assert_same_step,
    assert_step_within_torch_error,
    check_step,
    cuda_or_skip,
    data_digest,
    expect_rule_failure,
    float64_oracle,
    rel_err,
    swap_on_conversion,
    train_step,
)
from naive import NaiveDenseBlock, randomize_bn, with_masks  # noqa: E402

from dense_ext import EfficientDenseBlock  # noqa: E402
from dense_ext.backends import unavailable_reason  # noqa: E402

pytestmark = pytest.mark.triton

# L, C0, k: layer inputs 11 and 17 channels (one and two channel tiles, both ragged),
# bottleneck 4k = 24 channels, C_total = 23. N, H, W = 2, 7, 9: M = 126 (two ragged row tiles).
L, C0, K = 2, 11, 6
SHAPE = (2, C0, 7, 9)


def triton_cpu_or_skip() -> None:
    reason = unavailable_reason("triton", "cpu")
    if reason is not None:
        pytest.skip(f"triton backend unavailable on cpu: {reason}")


def triton_cuda_or_skip() -> None:
    """Skip without a CUDA device; *fail* when one is present but the compiled kernels cannot
    run on it (interpreted kernels, Triton missing), except on GPUs older than sm_80."""
    cuda_or_skip()
    reason = unavailable_reason("triton", "cuda")
    if reason is not None and "below sm_80" in reason:
        pytest.skip(f"triton backend unavailable on cuda: {reason}")
    if reason is not None:
        pytest.fail(f"CUDA device present but the triton backend cannot run on it: {reason}")


def make_pair(bn_size, drop_rate, memory, dtype, device="cpu", seed=0, backend="triton"):
    torch.manual_seed(seed)
    naive = NaiveDenseBlock(L, C0, K, bn_size, drop_rate).to(device=device, dtype=dtype)
    randomize_bn(naive)
    block = EfficientDenseBlock(L, C0, K, bn_size, drop_rate, memory=memory, backend=backend)
    block = block.to(device=device, dtype=dtype)
    block.load_state_dict(naive.state_dict())
    return naive, block


def inputs(dtype, device="cpu", seed=1, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    grad = torch.randn((shape[0], C0 + L * K, shape[2], shape[3]), generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# The whole block against the naive block (interpreted kernels, CPU)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_block_matches_naive_float32(bn_size, memory, train):
    triton_cpu_or_skip()
    if bn_size == 0 and memory == "min":
        pytest.skip("plain layers keep no bottleneck: both memory modes are the same code")
    naive, block = make_pair(bn_size, 0.0, memory, torch.float32)
    naive.train(train)
    block.train(train)
    x, grad = inputs(torch.float32)
    check_step(block, naive, x, oracle=float64_oracle(naive), grad=grad, seed=5)


def _random_bn(c: int, g: torch.Generator, dtype: torch.dtype) -> tuple:
    """Random BN operands ``(mean, invstd, gamma, beta)`` of ``c`` channels."""
    return (
        torch.randn(c, generator=g, dtype=dtype),
        torch.rand(c, generator=g, dtype=dtype) + 0.5,
        torch.randn(c, generator=g, dtype=dtype),
        torch.randn(c, generator=g, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dgrad_passes_with_dz_kept_between_them_equal_the_recomputing_passes(dtype):
    """``DZ_IN_DX`` (the roofline's probe): the reduce pass also stores dZ into DX and the
    apply pass reads it there instead of computing the product again, then overwrites it
    with dX. The partial sums and dX equal those of the passes that each compute dZ, bit for
    bit (interpreted); dZ is rounded to the buffer dtype in both."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import conv_dgrad
    from dense_ext.backends.triton._common import dot_config
    from dense_ext.backends.triton.conv_fwd import conv_weight_taps

    g = torch.Generator().manual_seed(4)
    n, c, k, h, w = 2, 19, 6, 5, 7
    m = n * h * w
    dy = torch.randn(m, k + 3, generator=g, dtype=dtype)  # the layer's slice at column 3
    x = torch.randn(m, c, generator=g, dtype=dtype)
    bn = _random_bn(c, g, dtype)
    taps = conv_weight_taps(torch.randn(k, c, 3, 3, generator=g, dtype=dtype), dtype)
    dot = dot_config(dtype, x.device)
    passes = (conv_dgrad._REDUCE, conv_dgrad._Pass(apply=True, batch_stats=True))
    sites = [
        conv_dgrad.dgrad_site(
            m, (k + 3, c, c), (3, 0, 0), c, k, 3, (h, w), dtype, x.device, dot, what
        )
        for what in passes
    ]
    part_shape = sites[0][1]

    def run(dz_in_dx: bool):
        reduce, apply = (s.variant(DZ_IN_DX=dz_in_dx) for s, _ in sites)
        part = torch.full(part_shape, math.nan, dtype=dtype)
        dx = torch.full((m, c), math.nan, dtype=dtype)
        reduce(dy, taps, x, *bn, bn[0], part, dx if dz_in_dx else x)
        apply(dy, taps, x, *bn, part.sum(dim=0), bn[0], dx)
        return part, dx

    (part, dx), (part_kept, dx_kept) = run(False), run(True)
    assert not torch.isnan(dx).any()
    assert torch.equal(part_kept, part) and torch.equal(dx_kept, dx)


@pytest.fixture
def small_merge_groups(monkeypatch):
    """Two-launch statistics merges past 2 tiles, in groups of 2 tiles (instead of 128 and
    64), so a small interpreted block exercises them; every cache of launch sites and plans
    is cleared before and after."""
    from dense_ext.backends.triton import backend, conv_fwd, stats

    def clear():
        for cached in (stats.merge_site, stats.stats_sites, conv_fwd.fwd_sites):
            cached.cache_clear()
        backend.get_backend()._plans.clear()

    clear()
    monkeypatch.setattr(stats, "ONE_LAUNCH_TILES", 2)
    monkeypatch.setattr(stats, "GROUP_TILES", 2)
    yield stats
    monkeypatch.undo()
    clear()


def test_block_with_two_launch_merges_matches_naive(small_merge_groups, monkeypatch):
    """The eager layer loop with every statistics merge in two launches (7 row tiles: groups
    of 2, 2, 2 and 1 tiles) against the naive block in float64: outputs, gradients, running
    statistics."""
    triton_cpu_or_skip()
    stats = small_merge_groups
    merges = []
    two_level_call = stats.TwoLevelMerge.__call__
    monkeypatch.setattr(
        stats.TwoLevelMerge,
        "__call__",
        lambda self, *t: merges.append(1) or two_level_call(self, *t),
    )
    naive, block = make_pair(4, 0.0, "min", torch.float64)
    x, grad = inputs(torch.float64, shape=(2, C0, 13, 17))  # 442 rows: 7 tiles of 64
    check_step(block, naive, x, grad=grad, seed=0)
    assert len(merges) == 1 + 2 * L, len(merges)  # the input's, then two per layer


def block_masks(seed, shape, p, dtype, device="cpu"):
    """The masks the block's forward draws after ``torch.manual_seed(seed)`` (the backend's own
    stream, see dense_ext.backends.triton.dropout), one ``[N, k, H, W]`` tensor per layer."""
    from dense_ext.backends.triton.dropout import draw_seeds, dropout_mask

    torch.manual_seed(seed)
    seeds = draw_seeds(L, device)
    return [dropout_mask(seeds, i, p, shape, dtype) for i in range(L)]


@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_block_matches_naive_with_dropout(bn_size):
    """Dropout contract: masks are the backend's own stream (not F.dropout's); with the same
    masks injected into the naive block, every output, gradient and statistic matches."""
    triton_cpu_or_skip()
    p = 0.3
    naive, block = make_pair(bn_size, p, "min", torch.float64)
    x, grad = inputs(torch.float64)
    masks = block_masks(7, (SHAPE[0], K, SHAPE[2], SHAPE[3]), p, torch.float64)
    kept = torch.cat([m.flatten() for m in masks])
    assert set(kept.unique().tolist()) == {0.0, 1 / (1 - p)}
    assert 0.15 < (kept == 0).double().mean() < 0.45, "the masks really drop about p"
    expected = train_step(with_masks(naive, masks), x, grad, 7)
    actual = train_step(block, x, grad, 7)
    assert torch.equal(actual.output[:, C0:] == 0, expected.output[:, C0:] == 0)
    assert_same_step(actual, expected, TOLERANCE[torch.float64])


def test_dropout_mask_statistics():
    """The mask stream: rate p, only 0 and 1/(1-p), different per layer and seed, repeatable,
    no correlation between neighbouring elements."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton.dropout import dropout_mask

    p, shape = 0.25, (4, 8, 20, 20)
    seeds = torch.tensor([123, 124], dtype=torch.int64)
    mask = dropout_mask(seeds, 0, p, shape, torch.float64)
    assert set(mask.unique().tolist()) == {0.0, 1 / (1 - p)}
    dropped = (mask == 0).sum().item()
    sigma = (mask.numel() * p * (1 - p)) ** 0.5
    assert abs(dropped - p * mask.numel()) < 5 * sigma, (dropped, p * mask.numel())
    assert not torch.equal(mask, dropout_mask(seeds, 1, p, shape, torch.float64))
    assert torch.equal(mask, dropout_mask(seeds.clone(), 0, p, shape, torch.float64))
    flat = (mask.permute(0, 2, 3, 1).reshape(-1) > 0).double()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()
    assert abs(corr) < 0.03, corr


@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_block_matches_naive_float64(bn_size, memory):
    triton_cpu_or_skip()
    if bn_size == 0 and memory == "min":
        pytest.skip("plain layers keep no bottleneck: both memory modes are the same code")
    naive, block = make_pair(bn_size, 0.0, memory, torch.float64)
    x, grad = inputs(torch.float64)
    check_step(block, naive, x, grad=grad, seed=3)


@pytest.mark.parametrize("frozen", ["norm1", "norm2"])
def test_per_bn_train_eval_flags(frozen):
    """Each BN behaves as its own ``nn.BatchNorm2d``: in a training block, one layer's BN in
    eval mode normalises with its running statistics and updates nothing (float64)."""
    triton_cpu_or_skip()
    naive, block = make_pair(4, 0.0, "min", torch.float64)
    for model in (naive, block):
        getattr(model.denselayer2, frozen).eval()
    x, grad = inputs(torch.float64)
    check_step(block, naive, x, grad=grad, seed=0)


@pytest.mark.slow
def test_weights_changed_through_data_are_used():
    """The backend reuses its weight transposes only from a forward to its backward: a weight
    changed through ``.data`` between steps (no version bump) is seen by the next forward."""
    triton_cpu_or_skip()
    naive, block = make_pair(4, 0.0, "min", torch.float64)
    x, grad = inputs(torch.float64)
    check_step(block, naive, x, grad=grad, seed=0)
    for model in (naive, block):
        for name, p in model.named_parameters():
            if "conv" in name:
                p.data.mul_(-0.5)
    check_step(block, naive, x, grad=grad, seed=0)


def test_parameters_swap_after_a_step():
    """Under PyTorch's future flag ``module.to`` and ``load_state_dict`` swap each parameter's
    contents (``torch.utils.swap_tensors``), which refuses a tensor that anything references
    weakly: the weights the backend computes for a backward must not hold the parameters so."""
    triton_cpu_or_skip()
    naive, block = make_pair(4, 0.0, "min", torch.float64)
    x, grad = inputs(torch.float64)
    check_step(block, naive, x, grad=grad, seed=0)
    with swap_on_conversion():
        for model in (naive, block):
            state = copy.deepcopy(model.state_dict())
            model.float().double()
            model.load_state_dict(state)
    check_step(block, naive, x, grad=grad, seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weight_taps_launch_equals_permute_copy(dtype):
    """The eager loop's launch for a 3x3 weight's taps: what ``conv_weight_taps`` computes,
    bit for bit, over several programs and a ragged last one."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import conv_fwd

    c_out, c_in = 12, 101  # 10,908 elements: 11 programs of 1,024
    weight = torch.randn(c_out, c_in, 3, 3, generator=torch.Generator().manual_seed(0))
    weight = weight.to(dtype)
    taps = torch.full((3, 3, c_in, c_out), float("nan"), dtype=dtype)
    conv_fwd.weight_taps_site(c_out, c_in, 3)(weight, taps)
    assert torch.equal(taps, conv_fwd.conv_weight_taps(weight, dtype, flat=False))


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_sum_launch_adds_the_splits_left_to_right(splits, dtype):
    """The eager loop's launch summing a weight gradient's partials over its row splits: in
    split order, bit for bit."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import conv_wgrad

    g = torch.Generator().manual_seed(splits)
    part = torch.randn(splits, 12, 101, 3, 3, generator=g, dtype=dtype) * 1e3
    out = torch.full(part.shape[1:], float("nan"), dtype=dtype)
    site = conv_wgrad.sum_splits_site(tuple(part.shape))
    assert site is not None and conv_wgrad.sum_splits_site((1, 12, 101, 3, 3)) is None
    site(part, out)
    expected = part[0].clone()
    for s in range(1, splits):
        expected += part[s]
    assert torch.equal(out, expected)


def test_three_layers_odd_image_and_batch_of_one():
    """N=1, 5x3 image (3x3 taps clipped on every side), three layers."""
    triton_cpu_or_skip()
    torch.manual_seed(0)
    naive = NaiveDenseBlock(3, 3, 5, 2, 0.0).double()
    randomize_bn(naive)
    block = EfficientDenseBlock(3, 3, 5, 2, memory="min", backend="triton").double()
    block.load_state_dict(naive.state_dict())
    x = torch.randn(1, 3, 5, 3, dtype=torch.float64)
    grad = torch.randn(1, 18, 5, 3, dtype=torch.float64)
    check_step(block, naive, x, grad=grad, seed=0)


# ----------------------------------------------------------------------------------------------
# Backend level: statistics, saved state, against the reference backend
# ----------------------------------------------------------------------------------------------


def backend_call(name, spec, x, params, save=True):
    """One backend forward with batch statistics for every BN, no dropout."""
    from dense_ext import BlockCall, NormCall
    from dense_ext.backends import get_backend
    from dense_ext.backends.base import LOCAL

    backend = get_backend(name, x.device)
    norms = [NormCall(eps=1e-5, batch_stats=True)] * (spec.num_layers * spec.bns_per_layer)
    call = BlockCall(spec, backend, norms, [0.0] * spec.num_layers, LOCAL, save=save)
    return backend.forward(x, params, call)


def random_params(spec, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in spec.param_shapes():
        if len(shape) == 1:
            params.append((torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype))
        else:
            params.append((torch.randn(shape, generator=g, dtype=torch.float64) * 0.3).to(dtype))
    return params


@pytest.mark.parametrize("memory", ["bottleneck", "min"])
def test_forward_state_matches_reference(memory):
    """stats1 (every buffer channel), stats2 (every bottleneck) and the saved Y1 of the
    triton backend equal the reference backend's (float64)."""
    triton_cpu_or_skip()
    from dense_ext.spec import BlockSpec

    spec = BlockSpec(L, C0, K, bottleneck_factor=4, memory=memory)
    x, _ = inputs(torch.float64)
    params = random_params(spec, torch.float64)
    feat_r, state_r = backend_call("reference", spec, x, params)
    feat_t, state_t = backend_call("triton", spec, x, params)
    tol = TOLERANCE[torch.float64]
    assert feat_t.is_contiguous(memory_format=torch.channels_last)
    assert_close(feat_t, feat_r, tol, "feat")
    assert_close(state_t.stats1, state_r.stats1, tol, "stats1")
    assert_close(state_t.stats2, state_r.stats2, tol, "stats2")
    assert (
        len(state_t.bottlenecks) == len(state_r.bottlenecks) == (L if memory == "bottleneck" else 0)
    )
    for y_t, y_r in zip(state_t.bottlenecks, state_r.bottlenecks):
        assert_close(
            y_t.reshape(-1, y_t.shape[-1]), y_r.permute(0, 2, 3, 1).reshape(y_t.shape), tol, "Y1"
        )


def test_eval_forward_without_save_keeps_nothing():
    triton_cpu_or_skip()
    from dense_ext.spec import BlockSpec

    spec = BlockSpec(L, C0, K, bottleneck_factor=4, memory="bottleneck")
    x, _ = inputs(torch.float32)
    params = random_params(spec, torch.float32)
    _, state = backend_call("triton", spec, x, params, save=False)
    assert state.bottlenecks == []


@pytest.mark.parametrize("height, width", [(5, 15), (61, 79)])
def test_channel_statistics_are_stable_for_large_means(height, width):
    """Values 1000 + 0.1*N(0,1) in float32: variance to float32 rounding of the data, where
    E[x^2] - E[x]^2 in float32 would lose every digit. 61x79: 151 tiles of 64 rows, merged in
    two launches (groups of 64, 64 and 23 tiles, the last tile partial)."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import stats as stats_module
    from dense_ext.backends.triton.stats import channel_stats

    g = torch.Generator().manual_seed(0)
    m, c_total = 2 * height * width, 21
    two_level = m > stats_module.ONE_LAUNCH_TILES * 64
    _, merge, _ = stats_module.stats_sites(m, c_total, 2, 17, 2, c_total + 2, torch.device("cpu"))
    assert isinstance(merge, stats_module.TwoLevelMerge) == two_level
    data = torch.randn(2, c_total, height, width, generator=g) * 0.1 + 1000.0
    data[:, 3] = torch.randn(2, height, width, generator=g) * 3.0 - 50.0  # one ordinary channel
    feat = data.contiguous(memory_format=torch.channels_last)
    assert feat.shape[0] * feat.shape[2] * feat.shape[3] == m
    stats = torch.full((2, c_total), float("nan"))
    # channels [2, 19) into columns [2, 19)
    channel_stats(feat, stats, x_col=2, channels=17, mean_off=2, var_off=c_total + 2)
    var, mean = torch.var_mean(
        data.double().permute(0, 2, 3, 1).reshape(m, c_total), dim=0, correction=0
    )
    assert torch.isnan(stats[:, :2]).all() and torch.isnan(stats[:, 19:]).all(), "wrote outside"
    assert_close(stats[0, 2:19], mean[2:19], 1e-6, "mean")
    rel_var = ((stats[1, 2:19].double() - var[2:19]).abs() / var[2:19]).max().item()
    assert rel_var < 1e-4, f"variance relative error {rel_var:.2e}"


def test_merge_writes_the_normalisers_torch_computes():
    """``merge_site(..., inv=(off, eps))`` also writes ``rsqrt(var + eps)`` of the variance it
    stores, as ``torch.add(var, eps).rsqrt_()`` gives it, at ``off`` and nowhere else."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import stats

    g = torch.Generator().manual_seed(0)
    m, c, c_total = 150, 17, 23
    x = torch.randn(m, c_total, generator=g) * torch.rand(c_total, generator=g) * 3
    tile, _, part_shape = stats.stats_sites(m, c_total, 2, c, 2, c_total + 2, x.device)
    tiles, block_m = part_shape[0], tile.constexprs["BLOCK_M"]
    part = torch.empty(part_shape)
    tile(x, part)
    out = torch.full((2, c_total), float("nan"))
    inv = torch.full((c_total + 5,), float("nan"))
    eps = 1e-3
    stats.merge_site(tiles, c, m, block_m, 2, c_total + 2, (5, eps))(part, out, inv)
    assert torch.isnan(inv[:5]).all() and torch.isnan(inv[5 + c :]).all(), "wrote outside"
    assert torch.equal(inv[5 : 5 + c], torch.add(out[1, 2 : 2 + c], eps).rsqrt_())
    # and without inv the third tensor is not written
    untouched = torch.full((c_total,), float("nan"))
    stats.merge_site(tiles, c, m, block_m, 2, c_total + 2)(part, out, untouched)
    assert torch.isnan(untouched).all()


@pytest.mark.parametrize("ks", [1, 3])
@pytest.mark.parametrize("kernel", ["fwd", "wgrad"])
def test_kernels_over_a_normalised_input_equal_the_fused_prologue(kernel, ks):
    """``NORMALIZE=False`` (the roofline's probes of a BN-ReLU pass before a plain convolution
    and its weight gradient) takes its input as it is: fed ``relu(bn(x))`` computed as the
    prologue computes it, the forward gives the fused output and statistics, the weight
    gradient the fused partials, bit for bit (interpreted float32); no BN tensor is read (NaN
    ones here)."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import conv_fwd, conv_wgrad
    from dense_ext.backends.triton._common import dot_config

    g = torch.Generator().manual_seed(2)
    n, c_in, c_out, h, w = 2, 19, 6, 5, 7
    m = n * h * w
    x = torch.randn(m, c_in, generator=g)
    mean, invstd = torch.randn(c_in, generator=g), torch.rand(c_in, generator=g) + 0.5
    gamma, beta = torch.randn(c_in, generator=g), torch.randn(c_in, generator=g)
    normalised = torch.relu((x - mean) * (gamma * invstd) + beta)
    dot = dot_config(x.dtype, x.device)
    if kernel == "fwd":
        taps = conv_fwd.conv_weight_taps(torch.randn(c_out, c_in, ks, ks, generator=g), x.dtype)
        sites = conv_fwd.fwd_sites(
            m, c_in, 0, c_out, 0, c_in, c_out, ks, h, w, x.dtype, x.device, dot, (0, c_out), None
        )
        site = sites.conv

        def run(site, operand, bn):
            y, stats = torch.full((m, c_out), math.nan), torch.full((2, c_out), math.nan)
            part = torch.empty(sites.part_shape)
            site(operand, *bn, taps, y, part, bn[0])
            sites.merge(part, stats, stats)
            return torch.cat([y.flatten(), stats.flatten()])
    else:
        dy = torch.randn(m, c_out, generator=g)
        site, part_shape = conv_wgrad.wgrad_site(
            m, c_out, 0, c_in, 0, c_in, c_out, ks, (h, w), x.dtype, x.device, dot
        )

        def run(site, operand, bn):
            part = torch.full(part_shape, math.nan)
            site(dy, operand, *bn, part)
            return part

    plain = site.variant(NORMALIZE=False)
    fused = run(site, x, (mean, invstd, gamma, beta))
    assert not torch.isnan(fused).any()
    assert torch.equal(run(plain, normalised, [torch.full((c_in,), math.nan)] * 4), fused)


@pytest.mark.parametrize("c_in", [19, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_1x1_kernels_read_the_conv_weight_in_place(dtype, c_in):
    """The bottleneck's 1x1 forward and data-gradient passes read the conv weight as it is,
    ``[C_out, C_in, 1, 1]`` (``W_AS_CONV``; no transposed copy per step): the same outputs,
    statistics, partial sums and dX, bit for bit, as from the transposed taps. 19 channels
    give rows of unaligned weights, 24 rows aligned to 8 elements (``X_ALIGN``)."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import conv_dgrad, conv_fwd
    from dense_ext.backends.triton._common import dot_config, weight_layout

    g = torch.Generator().manual_seed(4)
    n, c_out, h, w = 2, 20, 5, 7
    m = n * h * w
    x = torch.randn(m, c_in, generator=g, dtype=dtype)
    bn = _random_bn(c_in, g, dtype)
    weight = torch.randn(c_out, c_in, 1, 1, generator=g, dtype=dtype)
    taps = conv_fwd.conv_weight_taps(weight, dtype)
    assert weight_layout(weight) == (1, c_out, True) and weight_layout(taps) == (1, c_out, False)
    with pytest.raises(ValueError, match="contiguous 1x1 weight, got"):
        weight_layout(torch.empty(c_out, c_in, 3, 3))  # a 3x3 weight is read as taps only
    dot = dot_config(dtype, x.device)
    sites = conv_fwd.fwd_sites(m, c_in, 0, c_out, 0, c_in, c_out, 1, h, w, dtype, x.device, dot,
                               (0, c_out), None)  # fmt: skip
    in_place = conv_fwd.fwd_sites(m, c_in, 0, c_out, 0, c_in, c_out, 1, h, w, dtype, x.device,
                                  dot, (0, c_out), None, w_as_conv=True)  # fmt: skip
    assert in_place.conv.constexprs["W_AS_CONV"] and not sites.conv.constexprs["W_AS_CONV"]

    def forward(sites, w_operand):
        y = torch.full((m, c_out), math.nan, dtype=dtype)
        stats = torch.full((2, c_out), math.nan, dtype=dtype)
        part = torch.empty(sites.part_shape, dtype=dtype)
        sites.conv(x, *bn, w_operand, y, part, bn[0])
        sites.merge(part, stats, stats)
        return torch.cat([y.flatten(), stats.flatten()])

    out = forward(in_place, weight)
    assert not torch.isnan(out).any()
    assert torch.equal(out, forward(sites, taps))

    dy = torch.randn(m, c_out, generator=g, dtype=dtype)
    sums = torch.randn(2, c_in, generator=g, dtype=dtype)

    def data_gradient(w_as_conv, w_operand):
        reduce, part_shape = conv_dgrad.dgrad_site(m, (c_out, c_in, 0), (0, 0, 0), c_in, c_out, 1,
                                                   (h, w), dtype, x.device, dot,
                                                   conv_dgrad._REDUCE, w_as_conv)  # fmt: skip
        what = conv_dgrad._Pass(apply=True, batch_stats=True, accumulate=True)
        apply, _ = conv_dgrad.dgrad_site(m, (c_out, c_in, c_in), (0, 0, 0), c_in, c_out, 1, (h, w),
                                         dtype, x.device, dot, what, w_as_conv)  # fmt: skip
        part = torch.full(part_shape, math.nan, dtype=dtype)
        reduce(dy, w_operand, x, *bn, bn[0], part, x)
        dx = torch.ones(m, c_in, dtype=dtype)
        apply(dy, w_operand, x, *bn, sums, bn[0], dx)
        return torch.cat([part.flatten(), dx.flatten()])

    grads = data_gradient(True, weight)
    assert not torch.isnan(grads).any()
    assert torch.equal(grads, data_gradient(False, taps))


def test_two_level_merge_equals_one_launch_over_the_same_partials():
    """Past ``ONE_LAUNCH_TILES`` tiles the merge runs in two launches (groups of tiles first);
    over the same partials it gives the one-launch merge's statistics to float32 rounding,
    both near the float64 statistics of the data, and writes the normalisers of what it
    stores. Group rows land after the tiles, which neither launch reads as tiles. Half the
    channels sit at 1000 +- 0.05 by group with a spread of 1e-3 within: their variance is the
    groups' means apart, which float32 group means (no ``mean_lo``) would get 1e-3 wrong."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import stats

    g = torch.Generator().manual_seed(1)
    c = 40
    m = 64 * 200 - 29  # 200 tiles of 64 rows: groups of 64, 64, 64, 8 tiles
    x = torch.randn(m, c, generator=g) * torch.rand(c, generator=g) * 4 + torch.randn(c) * 30
    sign = (torch.arange(m) // (64 * 64) % 2 * 2 - 1).float()[:, None]  # +-1 by group
    x[:, 20:] = 1000 + 0.05 * sign + 1e-3 * torch.randn(m, 20, generator=g)
    tile, merge, part_shape = stats.stats_sites(m, c, 0, c, 0, c, x.device, (0, 1e-5))
    tiles, block_m = -(-m // 64), tile.constexprs["BLOCK_M"]
    assert block_m == 64 and isinstance(merge, stats.TwoLevelMerge)
    assert part_shape == (tiles + 4, 3, c)
    part = torch.full(part_shape, float("nan"))
    tile(x, part)
    two, inv = torch.full((2, c), float("nan")), torch.full((c,), float("nan"))
    merge(part, two, inv)
    assert not torch.isnan(part).any(), "a group row was not written"
    one = torch.full((2, c), float("nan"))
    stats._final_merge(0, tiles, c, m, block_m, 0, c, None)(part, one, one)
    var, mean = torch.var_mean(x.double(), dim=0, correction=0)
    for name, got in (("two launches", two), ("one launch", one)):
        assert_close(got[0], mean, 1e-6, f"mean, {name}")
        rel_var = ((got[1].double() - var).abs() / var).max().item()
        assert rel_var < 1e-6, f"variance relative error {rel_var:.2e}, {name}"
    assert torch.allclose(two, one, rtol=3e-7, atol=0)
    assert torch.equal(inv, torch.add(two[1], 1e-5).rsqrt_())


@pytest.mark.parametrize("bn_size", [4, 0])
def test_eager_forward_takes_the_normalisers_from_the_merges(bn_size, monkeypatch):
    """In training with one eps for all BNs, no layer of the eager forward computes a BN
    normaliser (an add and an rsqrt per BN: host time per layer); when the BN1s' eps differ,
    each BN1's own is computed (the BN2s' still come from the merges). The outputs match the
    reference either way. (Counted by wrapping ``eager.invstd``: a dispatch mode would send
    the block down the traced path.)"""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import eager

    computed = []
    invstd = eager.invstd
    monkeypatch.setattr(eager, "invstd", lambda var, eps: computed.append(eps) or invstd(var, eps))
    for mixed in (False, True):
        torch.manual_seed(0)
        block = EfficientDenseBlock(L, C0, K, bn_size, backend="triton")
        if mixed:
            block.denselayer2.norm1.eps = 1e-3
        reference = copy.deepcopy(block)
        reference.backend = "reference"
        x = torch.randn(3, C0, 5, 6)
        computed.clear()
        out = block(x)
        assert len(computed) == (L if mixed else 0), (mixed, computed)
        assert_close(out, reference(x), 1e-5, f"output, mixed eps {mixed}")


def test_epilogue_statistics_are_stable_for_large_means():
    """The statistics fused into the convolution epilogues (stats2 of Y1, stats1 of the new
    channels) on a block whose outputs have means ~1000x their spread: BN shifts of 1000, and
    3x3 weights whose only non-zero tap is the centre (so zero padding adds no spread)."""
    triton_cpu_or_skip()
    from dense_ext.spec import BlockSpec

    spec = BlockSpec(L, C0, K, bottleneck_factor=4)
    x, _ = inputs(torch.float32)
    params = random_params(spec, torch.float32)
    for layer in range(L):
        params[layer * 6 + 1] = params[layer * 6 + 1] + 1000.0  # beta1
        params[layer * 6 + 4] = params[layer * 6 + 4] + 1000.0  # beta2
        centre = torch.zeros(3, 3)
        centre[1, 1] = 1.0
        params[layer * 6 + 5] = params[layer * 6 + 5] * centre
    feat, state = backend_call("triton", spec, x, params)
    rows = feat.double().permute(0, 2, 3, 1).reshape(-1, spec.num_features)
    var, mean = torch.var_mean(rows, dim=0, correction=0)
    ratio = (mean.abs() / var.sqrt())[C0:]
    assert ratio.median() > 100, f"the test data does not have large means: {ratio}"
    assert_close(state.stats1[0], mean, 1e-6, "mean")
    rel_var = ((state.stats1[1].double() - var).abs() / var).max().item()
    assert rel_var < 1e-4, f"variance relative error {rel_var:.2e}"
    for layer, y1 in enumerate(state.bottlenecks):
        var2, mean2 = torch.var_mean(y1.double(), dim=0, correction=0)
        assert (mean2.abs() / var2.sqrt()).median() > 100
        assert_close(state.stats2[layer, 0], mean2, 1e-6, "bottleneck mean")
        rel_var = ((state.stats2[layer, 1].double() - var2).abs() / var2).max().item()
        assert rel_var < 1e-4, f"bottleneck variance relative error {rel_var:.2e}"


# ----------------------------------------------------------------------------------------------
# The ops one by one against torch (awkward shapes, dropout mask)
# ----------------------------------------------------------------------------------------------


def _bn_relu(x, mean, invstd, gamma, beta):
    c = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    return torch.relu((x - c(mean)) * c(gamma * invstd) + c(beta))


@pytest.mark.parametrize("ks", [1, 3])
def test_ops_against_autograd(ks):
    """fwd, dropout backward, wgrad and dgrad+BN-ReLU backward of one step against torch
    autograd (float64), with C_in=17, C_out=20, M=70, a dropout mask (the backend's, of layer 2)
    and channel offsets in wider buffers."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton.conv_dgrad import (
        conv_dgrad_bn_relu_apply,
        conv_dgrad_bn_relu_reduce,
    )
    from dense_ext.backends.triton.conv_fwd import bn_relu_conv_fwd, conv_weight_taps
    from dense_ext.backends.triton.conv_wgrad import bn_relu_conv_wgrad
    from dense_ext.backends.triton.dropout import draw_seeds as dropout_seeds
    from dense_ext.backends.triton.dropout import dropout_backward, dropout_mask

    torch.manual_seed(0)
    dt = torch.float64
    p = 0.3
    n, h, w, c_in, c_out, c_total = 2, 5, 7, 17, 20, 40
    buf = torch.randn(n, c_total, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)
    x = buf[:, 1 : 1 + c_in].detach().clone().requires_grad_()
    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    gamma, beta = torch.rand(c_in, dtype=dt) + 0.5, torch.randn(c_in, dtype=dt) * 0.5
    weight = torch.randn(c_out, c_in, ks, ks, dtype=dt)
    seeds = dropout_seeds(3, "cpu")
    mask = dropout_mask(seeds, 2, p, (n, c_out, h, w), dt)
    assert set(mask.unique().tolist()) == {0.0, 1 / (1 - p)}
    # batch-statistics BN as autograd sees it: mean and invstd are functions of x
    bmean = x.mean(dim=(0, 2, 3))
    binv = torch.rsqrt(x.var(dim=(0, 2, 3), correction=0) + 1e-5)
    g_ = gamma.clone().requires_grad_()
    b_ = beta.clone().requires_grad_()
    w_ = weight.clone().requires_grad_()
    out = torch.nn.functional.conv2d(_bn_relu(x, bmean, binv, g_, b_), w_, padding=ks // 2) * mask
    dout = torch.randn_like(out)
    out.backward(dout)

    w_taps = conv_weight_taps(weight, dt)
    y = torch.full((n, c_total + 3, h, w), 7.0, dtype=dt).contiguous(
        memory_format=torch.channels_last
    )
    stats = torch.zeros(2, c_out, dtype=dt)
    bn = (mean, invstd, gamma, beta)
    hw = {"height": h, "width": w}
    bn_relu_conv_fwd(
        buf, *bn, w_taps, y, stats, seeds, x_col=1, c_in=c_in, y_col=2, mean_off=0,
        var_off=c_out, layer=2, drop_p=p, **hw,
    )  # fmt: skip
    assert_close(y[:, 2 : 2 + c_out], out.detach(), 1e-12, "forward")
    assert (y[:, :2] == 7).all() and (y[:, 2 + c_out :] == 7).all(), (
        "forward wrote outside its slice"
    )
    var_o, mean_o = torch.var_mean(out.detach(), dim=(0, 2, 3), correction=0)
    assert_close(stats[0], mean_o, 1e-12, "output mean")
    assert_close(stats[1], var_o, 1e-12, "output variance")

    gbuf = torch.zeros(n, c_out + 5, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)
    gbuf[:, 5:] = dout
    dropout_backward(gbuf, seeds, col=5, channels=c_out, layer=2, p=p)
    assert_close(gbuf[:, 5:], dout * mask, 1e-15, "dropout backward")
    grad_w = bn_relu_conv_wgrad(
        gbuf, buf, *bn, dy_col=5, c_out=c_out, x_col=1, c_in=c_in, kernel_size=ks, **hw
    )
    assert_close(grad_w, w_.grad, 1e-12, "weight gradient")
    cols = {"dy_col": 5, "x_col": 1, "c_in": c_in}
    sums = conv_dgrad_bn_relu_reduce(gbuf, w_taps, buf, *bn, **cols, **hw)
    assert_close(sums[0], b_.grad, 1e-12, "grad beta")
    assert_close(sums[1], g_.grad, 1e-12, "grad gamma")
    dx = torch.ones(n, c_in + 1, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)
    conv_dgrad_bn_relu_apply(
        gbuf, w_taps, buf, *bn, sums, dx, dx_col=1, batch_stats=True, accumulate=True,
        **cols, **hw,
    )  # fmt: skip
    assert_close(dx[:, 1:] - 1, x.grad, 1e-12, "input gradient (accumulated)")
    assert (dx[:, 0] == 1).all(), "dgrad wrote outside its slice"


# ----------------------------------------------------------------------------------------------
# Low precision (interpreted): at most 2x PyTorch's own error against a float64 reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_low_precision_within_twice_pytorch_error(bn_size, dtype, request):
    """A whole float16/bfloat16 training step, every observable, under the tolerance rule. On
    the plain-layer float16 data, layer 2's ReLU sees an input of 3e-5 (a thirtieth of a
    rounding): every backend, the reference one included, lands on the other side of it."""
    triton_cpu_or_skip()
    naive, block = make_pair(bn_size, 0.0, "min", dtype)
    x, grad = inputs(dtype)
    digest = data_digest(x, grad, naive.state_dict())
    print(f"data {digest}")
    miss = expect_rule_failure(request, bn_size == 0 and dtype == torch.float16, RELU_FLIP, digest)
    check_step(block, naive, x, oracle=float64_oracle(naive), grad=grad, miss=miss)


def test_autocast_picks_the_buffer_dtype():
    """Under CPU autocast (bfloat16) the block runs its kernels on a bfloat16 buffer with
    float32 parameters, and is as accurate as the naive block under the same autocast."""
    triton_cpu_or_skip()
    naive, block = make_pair(4, 0.0, "bottleneck", torch.float32)
    oracle = float64_oracle(naive)
    x, grad = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive_low = train_step(naive, x, grad)
        results = train_step(block, x, grad)
    exact = train_step(oracle, x.double(), naive_low.grad_output.double())
    assert results.output.dtype == torch.bfloat16
    assert results.output.is_contiguous(memory_format=torch.channels_last)
    assert all(p.grad.dtype == torch.float32 for p in block.parameters())
    assert_step_within_torch_error(results, naive_low, exact, "autocast", precision=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# NaN, TF32 rounding, the fp32 precision setting (interpreted; the PTX side is compile_check)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_nan_propagates_like_torch(train):
    """One NaN input pixel: the same NaN pattern as the naive block in the output, the input
    gradient and every parameter gradient (relu(NaN) = NaN; its gradient passes NaN through),
    and equal values elsewhere."""
    triton_cpu_or_skip()
    naive, block = make_pair(4, 0.0, "min", torch.float64)
    naive.train(train)
    block.train(train)
    x, grad = inputs(torch.float64)
    x[1, 3, 2, 4] = float("nan")
    expected, actual = train_step(naive, x, grad), train_step(block, x, grad)
    pairs = [("output", actual.output, expected.output)]
    pairs += [("input gradient", actual.input_grad, expected.input_grad)]
    pairs += [(f"grad {n}", actual.grads[n], g) for n, g in expected.grads.items()]
    nan = torch.isnan(expected.output)
    assert nan.any() and not nan.all() or train
    for what, a, e in pairs:
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN pattern differs"
        finite = ~torch.isnan(e)
        if finite.any():
            assert_close(a[finite], e[finite], TOLERANCE[torch.float64], what)


def tf32_reference(a: np.ndarray) -> np.ndarray:
    """float32 -> TF32 as PTX defines ``cvt.rna.tf32.f32``: 10 explicit mantissa bits, round to
    nearest with ties away from zero; written with frexp/ldexp, independent of the bit trick."""
    with np.errstate(invalid="ignore"):  # signalling-NaN bit patterns
        x = a.astype(np.float64)
    out = x.copy()
    finite = np.isfinite(x) & (x != 0)
    tiny = finite & (np.abs(x) < 2.0**-126)  # float32 subnormals: fixed absolute ulp 2^-136
    normal = finite & ~tiny
    m, e = np.frexp(x[normal])  # |m| in [0.5, 1): 11 significant bits = 2^11 * m
    out[normal] = np.ldexp(np.sign(m) * np.floor(np.abs(m) * 2.0**11 + 0.5), e - 11)
    out[tiny] = np.sign(x[tiny]) * np.floor(np.abs(x[tiny]) * 2.0**136 + 0.5) * 2.0**-136
    with np.errstate(over="ignore"):
        return out.astype(np.float32)


def tf32_sweep() -> np.ndarray:
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    ties = (bits & ~np.uint32(0x1FFF)) | np.uint32(0x1000)  # exactly half an ulp: ties
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 1.0],
        dtype=np.float32,
    )
    values = np.concatenate([bits.view(np.float32), ties.view(np.float32), special])
    return np.concatenate([values, rng.standard_normal(5000).astype(np.float32) * 1e3])


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all() and (a.view(np.uint32) == b.view(np.uint32))[~nan].all())


def test_tf32_rounding_is_cvt_rna_bit_for_bit():
    """The kernels' ``round_tf32`` (interpreted form) and the host's ``round_tf32_`` (weights)
    give exactly the bits of an independent numpy model of ``cvt.rna.tf32.f32`` over random
    bit patterns, exact ties, subnormals, infinities, NaN and the float32 maximum."""
    triton_cpu_or_skip()
    import triton

    from dense_ext.backends.triton._common import round_tf32_, round_tf32_kernel

    values = tf32_sweep()
    expected = tf32_reference(values)
    x = torch.from_numpy(values)
    y = torch.empty_like(x)
    round_tf32_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    assert _same_floats(y.numpy(), expected), "in-kernel rounding differs from cvt.rna"
    assert _same_floats(round_tf32_(x.clone()).numpy(), expected), "host rounding differs"
    ties = values[20000:40000]
    assert (np.abs(tf32_reference(ties)) > np.abs(ties))[np.isfinite(ties)].all(), "ties away"


def tf32_numpy(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(tf32_reference(t.detach().float().numpy())).to(t.dtype)


class _TF32Conv(torch.autograd.Function):
    """A cuDNN TF32 convolution modelled on CPU: every GEMM operand rounded to TF32, products
    accumulated in float32 (forward, data gradient, weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight, padding):
        xr, wr = tf32_numpy(x), tf32_numpy(weight)
        ctx.save_for_backward(xr, wr)
        ctx.padding = padding
        return torch.nn.functional.conv2d(xr, wr, padding=padding)

    @staticmethod
    def backward(ctx, grad):
        xr, wr = ctx.saved_tensors
        p = ctx.padding
        gx, gw, _ = torch.ops.aten.convolution_backward(
            tf32_numpy(grad), xr, wr, None, [1, 1], [p, p], [1, 1], False, [0, 0], 1,
            [True, True, False],
        )  # fmt: skip
        return gx, gw, None


def with_tf32_convolutions(naive):
    for module in naive.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.forward = lambda inp, m=module: _TF32Conv.apply(inp, m.weight, m.padding[0])
    return naive


@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_tf32_within_twice_cudnn_tf32_error(bn_size, monkeypatch):
    """The GPU acceptance rule for float32 (at most 2x the naive model's error against float64,
    with cuDNN using TF32), run under the interpreter: the kernels emulate their TF32 arithmetic
    (operands rounded as the PTX does) and the naive model's convolutions are TF32-rounded."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import _common

    monkeypatch.setattr(_common, "EMULATE_TF32_ON_CPU", True)
    monkeypatch.setattr(_common, "conv_fp32_precision", lambda: "tf32")
    naive, block = make_pair(bn_size, 0.0, "min", torch.float32)
    oracle = float64_oracle(naive)
    naive_tf32 = with_tf32_convolutions(naive)
    x, grad = inputs(torch.float32)
    expected = train_step(naive_tf32, x, grad)
    results = train_step(block, x, grad)
    exact = train_step(oracle, x.double(), grad.double())
    assert_step_within_torch_error(results, expected, exact, "tf32")
    assert rel_err(results.output, exact.output) > 1e-5, "TF32 arithmetic was not emulated"


@pytest.fixture
def restore_fp32_precision():
    b = torch.backends
    levels = [b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.cudnn.rnn]
    saved = [lv.fp32_precision for lv in levels]
    yield
    for level, value in zip(levels, saved):  # top-down: a parent's setter resets its children
        level.fp32_precision = value


def test_fp32_precision_follows_the_new_api(restore_fp32_precision):
    """``torch.backends.*.fp32_precision`` decides TF32 for float32 on CUDA ("ieee" = no TF32),
    reading it raises nothing (``allow_tf32`` raises once the new API is mixed in)."""
    from dense_ext.backends.triton._common import conv_fp32_precision, dot_config

    cuda = torch.device("cuda")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert conv_fp32_precision() == "ieee"
    assert dot_config(torch.float32, cuda) == (False, "ieee", False)
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert dot_config(torch.float32, cuda) == (False, "tf32", True)
    torch.backends.cudnn.conv.fp32_precision = "none"  # inherits from cudnn, then global
    torch.backends.cudnn.fp32_precision = "none"
    torch.backends.fp32_precision = "ieee"
    assert dot_config(torch.float32, cuda) == (False, "ieee", False)
    torch.backends.cudnn.conv.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = "tf32"
    assert conv_fp32_precision() == "tf32"
    assert dot_config(torch.float32, torch.device("cpu"))[1] == "ieee", "CPU never uses TF32"
    assert dot_config(torch.bfloat16, cuda)[2] is False


def test_fp32_precision_falls_back_to_allow_tf32(monkeypatch, restore_fp32_precision):
    """On torch without the new API, ``torch.backends.cudnn.allow_tf32`` decides."""
    from types import SimpleNamespace

    from dense_ext.backends.triton._common import conv_fp32_precision

    monkeypatch.setattr(torch.backends.cudnn, "conv", SimpleNamespace())  # no fp32_precision
    torch.backends.cudnn.allow_tf32 = False
    assert conv_fp32_precision() == "ieee"
    torch.backends.cudnn.allow_tf32 = True
    assert conv_fp32_precision() == "tf32"


# ----------------------------------------------------------------------------------------------
# Launch hygiene: device guard, no recompilation per batch size
# ----------------------------------------------------------------------------------------------


def _launchers():
    from dense_ext.backends.triton import conv_dgrad, conv_fwd, conv_wgrad, dropout, stats

    return [
        stats.channel_stats_,
        conv_fwd.bn_relu_conv_fwd_,
        conv_wgrad.bn_relu_conv_wgrad_,
        conv_dgrad.conv_dgrad_bn_relu_reduce_,
        conv_dgrad.conv_dgrad_bn_relu_apply_,
        dropout.dropout_backward_,
    ]


def test_every_launcher_makes_its_tensors_device_current(monkeypatch):
    """Triton launches on the *current* device: a model on cuda:1 with cuda:0 current must not
    launch on cuda:0. Every launcher is guarded; the guard enters the first tensor's device
    (checked with a fake cuda:1 tensor and a recording ``torch.cuda.device``)."""
    triton_cpu_or_skip()
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dense_ext.backends.triton._common import on_tensor_device

    unguarded = [f.__name__ for f in _launchers() if not getattr(f, "device_guarded", False)]
    assert not unguarded, f"launchers without a device guard: {unguarded}"
    current = [0]

    class RecordingDevice:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    seen = []
    launcher = on_tensor_device(lambda scale, t, **kw: seen.append(current[0]))
    with FakeTensorMode():
        launcher(2.0, torch.empty(3, device="cuda:1"), flag=True)
    assert seen == [1] and current[0] == 0


def test_small_grids_get_smaller_row_tiles():
    """At 7x7 (batch 64: 3136 rows) 128-row tiles would give 25 CTAs for 132 SMs: the row tile
    shrinks until the grid covers the SMs (or reaches 32 rows); 32x32 layers keep 128."""
    pytest.importorskip("triton")
    from dense_ext.backends.triton import configs

    sm90, sms = (9, 0), 132
    for dtype in (torch.bfloat16, torch.float32):
        big = configs.conv_fwd_gpu(64 * 32 * 32, 256, 128, dtype, sm90, sms)
        assert big.block_m == 128
        for c_in, c_out in ((992, 128), (128, 32)):
            cfg = configs.conv_fwd_gpu(64 * 7 * 7, c_in, c_out, dtype, sm90, sms)
            ctas = -(-64 * 49 // cfg.block_m) * -(-c_out // cfg.block_n)
            assert ctas >= sms or cfg.block_m == 32, (dtype, c_in, cfg)
            cfg = configs.conv_dgrad_gpu(64 * 7 * 7, c_in, c_out, dtype, sm90, sms)
            ctas = -(-64 * 49 // cfg.block_m) * -(-c_in // cfg.block_k)
            assert ctas >= sms or cfg.block_m == 32, (dtype, c_in, cfg)


def test_row_counts_are_not_specialised():
    """Triton specialises integer arguments on ``== 1`` and ``% 16``; the batch-dependent ones
    (row counts) are exempt, so an odd batch size reuses the compiled kernels."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton import conv_dgrad, conv_fwd, conv_wgrad, dropout, stats

    kernels = [
        stats._tile_stats_kernel,
        stats._merge_stats_kernel,
        stats._merge_groups_kernel,
        conv_fwd._bn_relu_conv_fwd_kernel,
        conv_wgrad._bn_relu_conv_wgrad_kernel,
        conv_dgrad._conv_dgrad_bn_relu_bwd_kernel,
        dropout._dropout_backward_kernel,
    ]
    for k in kernels:
        batch_dependent = ("M", "rows_per_split", "num_tiles", "part_row", "layer")
        names = [n for n in k.arg_names if n in batch_dependent]
        exempt = k.kwargs["do_not_specialize"]
        assert "M" in names and set(names) <= set(exempt), (k.fn.__name__, names, exempt)


# ----------------------------------------------------------------------------------------------
# Availability, lazy kernel definition, op registration
# ----------------------------------------------------------------------------------------------


def test_package_imports_without_triton_interpret_and_defines_no_kernel():
    code = (
        "import sys, torch, dense_ext\n"
        "import dense_ext.backends.triton as t\n"
        "from dense_ext.backends import available_backends\n"
        "assert 'triton' not in available_backends('cpu')\n"
        "r = t.unavailable_reason(torch.device('cpu'))\n"
        "assert r is not None and 'TRITON_INTERPRET' in r, r\n"
        "assert 'dense_ext.backends.triton.backend' not in sys.modules\n"
        "assert not any(m.startswith('triton') for m in sys.modules), 'imported triton'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = (
        str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    )
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_kernels_compile_for_the_gpu_without_a_gpu():
    """Every kernel variant a block launches compiles to a cubin for sm_80 and sm_90 (float32
    with TF32 and IEEE, float64), fits the shared memory, spills nothing, and the TF32
    variants round their operands (``cvt.rna.tf32.f32`` in the PTX): the compiled path the
    interpreter does not exercise.
    ``python -m dense_ext.backends.triton.compile_check`` runs the whole matrix (sm_80/86/90,
    four dtypes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = (
        str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    )
    cmd = [
        sys.executable,
        "-m",
        "dense_ext.backends.triton.compile_check",
        "--arch",
        "80",
        "90",
        "--dtypes",
        "float32",
        "float64",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # float32 TF32 + IEEE and float64, at a 32x32 and a 7x7 layer: at least 3 x 8 convolution
    # variants, 2 statistics kernels, the dropout kernel per dtype; each compiled, fitting
    # shared memory, without spills, and the TF32 ones with rounded operands in the PTX.
    summary = re.search(r"(\d+) variants, (\d+) failed", done.stdout)
    assert summary is not None and summary.group(2) == "0", done.stdout
    assert int(summary.group(1)) >= 3 * 8 + 2 + 2, done.stdout
    assert done.stdout.count(" ok ") == int(summary.group(1)), done.stdout


@pytest.mark.slow
def test_kernels_compile_as_torch_compile_re_emits_them(tmp_path):
    """``torch.compile`` does not launch a user-defined Triton kernel as defined: inductor
    re-emits its source with its helpers' sources, under the names the kernel calls them by,
    and compiles that copy. Every variant of that copy compiles for sm_90 (the first GPU run
    found ``round_tf32`` undefined there: it was an alias of ``_round_tf32_compiled``). The
    folder of re-emitted sources is removed at the end (it was left in /tmp by every run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TMPDIR"] = str(tmp_path)
    env["PYTHONPATH"] = (
        str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    )
    module = "dense_ext.backends.triton.compile_check"
    cmd = [sys.executable, "-m", module, "--arch", "90", "--as-inductor", "--dtypes"]
    cmd += ["float32", "bfloat16", "float64"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = re.search(r"(\d+) variants, (\d+) failed", done.stdout)
    assert summary is not None and summary.group(2) == "0", done.stdout
    assert done.stdout.count(" ok ") == int(summary.group(1)) >= 3 * 8 + 2 + 3, done.stdout
    assert not list(tmp_path.glob("dense_ext_*")), "the check left its folder behind"


def test_cuda_device_with_interpreted_kernels_is_refused():
    triton_cpu_or_skip()
    from dense_ext.backends import get_backend

    get_backend("triton", "cpu")  # kernels now defined, interpreted
    reason = unavailable_reason("triton", "cuda")
    assert reason is not None
    assert unavailable_reason("triton", "meta") is not None


def test_ops_are_registered_with_torch_library():
    triton_cpu_or_skip()
    from dense_ext.backends import get_backend

    get_backend("triton", "cpu")
    ns = torch.ops.dense_ext_triton
    for op in (
        "channel_stats",
        "bn_relu_conv_fwd",
        "conv_dgrad_bn_relu_reduce",
        "conv_dgrad_bn_relu_apply",
        "bn_relu_conv_wgrad",
        "dropout_backward",
    ):
        schema = str(getattr(ns, op).default._schema)
        assert schema.startswith(f"dense_ext_triton::{op}"), schema
    assert re.search(r"Tensor\(a\d*!\) y,", str(ns.bn_relu_conv_fwd.default._schema))
    assert re.search(r"Tensor\(a\d*!\)\? stats,", str(ns.bn_relu_conv_fwd.default._schema))
    assert re.search(r"Tensor\(a\d*!\) dx,", str(ns.conv_dgrad_bn_relu_apply.default._schema))
    assert "!" not in str(ns.bn_relu_conv_wgrad.default._schema)
    assert re.search(r"Tensor\(a\d*!\) grad,", str(ns.dropout_backward.default._schema))
    # integers are keyword-only, after the tensors
    assert re.search(r", \*, SymInt x_col", str(ns.bn_relu_conv_fwd.default._schema))


_COMPILE_SCRIPT = """
import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.fx_passes.reinplace import reinplace_inplaceable_ops_core

from dense_ext import BlockCall, NormCall
from dense_ext.backends.base import ForwardState
from dense_ext.backends.triton import backend as tb
from dense_ext.backends.base import LOCAL
from dense_ext.backends.triton.mock_gpu import mocked_gpu
from dense_ext.spec import BlockSpec

tb.TritonBackend._check = staticmethod(lambda x: None)  # CPU tensors stand in for CUDA ones
backend = tb.get_backend()
spec = BlockSpec(2, 8, 4, bottleneck_factor=4, memory="min")
g = torch.Generator().manual_seed(0)
params = [torch.rand(s, generator=g) + 0.5 if len(s) == 1 else torch.randn(s, generator=g)
          for s in spec.param_shapes()]
norms = [NormCall(eps=1e-5, batch_stats=True)] * (spec.num_layers * spec.bns_per_layer)
call = BlockCall(spec, backend, norms, [0.2] * spec.num_layers, LOCAL)
graphs = []

def capture(gm, example_inputs):
    graphs.append(gm)
    return gm.forward

def forward(x, *p):
    feat, state = backend.forward(x, p, call)
    return feat, state.stats1, state.stats2, state.dropout

def backward(grad_out, feat, stats1, stats2, seeds, *p):
    # as DenseBlockFunction.backward: a fresh buffer the backend may overwrite
    grad_feat = torch.empty_like(feat, memory_format=torch.channels_last)
    grad_feat.copy_(grad_out)
    state = ForwardState(stats1, stats2, [], seeds)
    grads = backend.backward(grad_feat, feat, state, p, call)
    return grad_feat[:, :8].clone(), grads

def buffer_clones(gm, numel):
    wrapper = torch.ops.higher_order.triton_kernel_wrapper_functional
    return [n for node in gm.graph.nodes if node.target is wrapper
            for n in node.kwargs["tensors_to_clone"]
            if node.kwargs["kwargs"][n].meta["val"].numel() >= numel]

compiler = aot_autograd(fw_compiler=capture)
x = torch.randn(2, 8, 5, 5)
with mocked_gpu() as mock:
    feat, stats1, stats2, seeds = torch.compile(forward, fullgraph=True, backend=compiler)(
        x, *params)
    grad = torch.randn_like(feat).contiguous(memory_format=torch.channels_last)
    torch.compile(backward, fullgraph=True, backend=compiler)(
        grad, feat, stats1, stats2, seeds, *params)
launched = sum(mock.launches.values())
assert launched >= 8 + 12, dict(mock.launches)
fwd, bwd = graphs
assert "torch.ops.aten.randint" in fwd.code, "dropout seeds are not drawn in the graph"
kernels = [str(n.target) for g_ in graphs for n in g_.graph.nodes]
assert sum("triton_kernel_wrapper" in k for k in kernels) >= 20, kernels
before = [len(buffer_clones(gm, feat.numel())) for gm in graphs]
assert before[0] >= 2, before  # functionalization clones the buffer per op
with enable_python_dispatcher():
    for gm in graphs:
        reinplace_inplaceable_ops_core(gm.graph)
after = [buffer_clones(gm, feat.numel()) for gm in graphs]
assert after == [[], []], after

# The whole block, as a user compiles it: fullgraph forward and backward.
import dense_ext.backends.triton as triton_package
from dense_ext import EfficientDenseBlock

triton_package.unavailable_reason = lambda device: None  # CPU tensors stand in for CUDA ones
torch.manual_seed(0)
block = EfficientDenseBlock(2, 8, 4, 4, 0.2, memory="min", backend="triton")
xb = torch.randn(2, 8, 5, 5, requires_grad=True)
first = mock  # compiled kernels keep the launcher of the driver that loaded them
with mocked_gpu():
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(xb)
    out.sum().backward()
block_launches = sum(first.launches.values()) - launched
assert xb.grad is not None and block_launches >= 20, dict(first.launches)
print("ok", before, launched)
"""


_FAST_LAUNCH_SCRIPT = """
import torch
import triton

from dense_ext.backends.triton import _common
from dense_ext.backends.triton.conv_fwd import bn_relu_conv_fwd_, conv_weight_taps
from dense_ext.backends.triton.mock_gpu import mocked_gpu

buf = torch.randn(3 * 40 * 16 + 1).clone()
bn = [torch.rand(24) for _ in range(4)]
w = conv_weight_taps(torch.randn(16, 24, 1, 1), torch.float32)

outputs = {32: torch.empty(32, 16), 48: torch.empty(48, 16)}

def launch(x, rows):
    y = outputs[rows]
    bn_relu_conv_fwd_(x, *bn, w, y, None, None, x_col=0, c_in=24, y_col=0, height=4, width=4)
    return mock.last["_bn_relu_conv_fwd_kernel"]

def same(a, b):
    return len(a) == len(b) and all(
        u is v if isinstance(u, torch.Tensor) else (type(u) is type(v) and u == v)
        for u, v in zip(a, b))

calls = []
original = triton.runtime.jit.JITFunction.run
def counting_run(self, *args, **kwargs):
    calls.append(self.fn.__name__)
    return original(self, *args, **kwargs)
triton.runtime.jit.JITFunction.run = counting_run

with mocked_gpu() as mock:
    aligned = buf[: 2 * 40 * 16].view(2, 4, 4, 40).permute(0, 3, 1, 2)
    first = launch(aligned, 32)       # through Triton (compiles)
    second = launch(aligned, 32)      # fast path: the same launch arguments
    assert calls == ["_bn_relu_conv_fwd_kernel"], calls
    assert first[0] == second[0] and same(first[2], second[2]), (first, second)
    # a batch of 3 (M = 48): row counts are not specialised, still the fast path
    odd = buf[: 3 * 40 * 16].view(3, 4, 4, 40).permute(0, 3, 1, 2)
    third = launch(odd, 48)
    assert len(calls) == 1 and third[2][13] == 48, (calls, third[2][13])
    # a 4-byte misaligned input: a different specialisation, so Triton's path again
    shifted = buf[1 : 1 + 2 * 40 * 16].view(2, 4, 4, 40).permute(0, 3, 1, 2)
    launch(shifted, 32)
    assert len(calls) == 2, calls
    fast = _common._fast(__import__("dense_ext.backends.triton.conv_fwd",
                                    fromlist=["_"])._bn_relu_conv_fwd_kernel)
    kernels = {id(v[2]) for v in fast.compiled.values()}
    assert len(fast.compiled) == 2 and len(kernels) == 2, fast.compiled.keys()
print("ok")
"""


@pytest.mark.slow
def test_fast_launch_matches_triton_launch():
    """``FastLaunch`` skips Triton's per-launch binding only for a specialisation Triton has
    launched: the direct launch passes the launcher the very arguments Triton's path passed; a
    new batch size reuses it (row counts unspecialised); a misaligned pointer takes Triton's
    path again and gets its own compiled kernel. Compiled kernels, launches mocked."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = (
        str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    )
    done = subprocess.run(
        [sys.executable, "-c", _FAST_LAUNCH_SCRIPT], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0 and "ok" in done.stdout, (done.stdout + done.stderr)[-4000:]


@pytest.mark.slow
def test_triton_ops_trace_with_fullgraph_and_reinplace():
    """``torch.compile(fullgraph=True)`` traces the backend's forward and backward through the
    ``triton_op``s (no graph break, so no host sync either: a ``.item()`` would break the
    graph), with the dropout seeds drawn inside the graph (fresh under CUDA-graph replay). The
    functional graph clones the feature buffer per kernel; Inductor's reinplacing pass removes
    every such clone. Then the whole block compiles with ``fullgraph=True``, forward and
    backward. Compiled kernels, launches mocked (``mock_gpu``), CPU tensors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = (
        str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    )
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0 and "ok" in done.stdout, (done.stdout + done.stderr)[-4000:]


@pytest.mark.slow
def test_compiled_models_hand_triton_kernels_dense_tensors():
    """torch.compile(fullgraph=True) of a triton DenseNet-BC and DelugeNet, forward and
    backward, kernels compiled for sm_90 and launches mocked: every tensor the traced graphs
    pass to a Triton kernel is dense, never a channel slice of a buffer, whose traced strides
    a launch would bake in (tests/triton_traced_layouts.py; it failed on the CLDC launchers
    before they took whole buffers)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    env["CUDA_VISIBLE_DEVICES"] = ""
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    script = Path(__file__).with_name("triton_traced_layouts.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0 and "ok" in result.stdout, (result.stdout + result.stderr)[-4000:]


# ----------------------------------------------------------------------------------------------
# GPU: compiled kernels (skipped without a CUDA GPU)
# ----------------------------------------------------------------------------------------------


def _to_device(value, device):
    """``value`` (tensors in nested tuples, lists, dicts and ``Step``s) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Step):
        moved = {f.name: _to_device(getattr(value, f.name), device) for f in fields(Step)}
        return Step(**moved)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


PRECISIONS = {
    "ieee": torch.float32,
    "tf32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@pytest.mark.cuda
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_cuda_within_twice_pytorch_error(bn_size, memory, precision, restore_fp32_precision):
    """Compiled kernels against a float64 naive block: at most 2x the error of the naive block
    at the same precision. Dropout on: the block's own masks are injected into both naive
    blocks (the backend's contract). float32 runs twice: "ieee" (TF32 off, against cuDNN in
    IEEE float32) and "tf32" (TF32 allowed, so the kernels use it), against the naive block with
    TF32-rounded convolutions (modelled on the CPU: cuDNN may choose non-TF32 algorithms even
    when allowed, which would measure a precision the kernels were not asked for)."""
    triton_cuda_or_skip()
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        torch.backends.cudnn.conv.fp32_precision = precision
    p = 0.2
    naive, block = make_pair(bn_size, p, memory, dtype, device="cuda")
    shape = (4, C0, 16, 16)
    x, grad = inputs(dtype, "cuda", shape=shape)
    masks = block_masks(0, (4, K, 16, 16), p, torch.float64, "cuda")
    oracle = with_masks(float64_oracle(naive), masks)
    if precision == "tf32":
        naive_tf32 = with_tf32_convolutions(copy.deepcopy(naive).cpu())
        naive_tf32 = with_masks(naive_tf32, [m.cpu().float() for m in masks])
        theirs = _to_device(train_step(naive_tf32, x.cpu(), grad.cpu()), "cuda")
        results = train_step(block, x, grad)
        exact = train_step(oracle, x.double(), grad.double())
        assert_step_within_torch_error(results, theirs, exact, "tf32")
    else:
        naive = with_masks(naive, [m.to(dtype) for m in masks])
        results = check_step(block, naive, x, oracle=oracle, grad=grad)
    assert torch.equal(results.output[:, C0:] == 0, oracle(x.double())[:, C0:] == 0), "masks"


@pytest.mark.cuda
@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_cuda_float64_exact(bn_size):
    triton_cuda_or_skip()
    naive, block = make_pair(bn_size, 0.0, "min", torch.float64, device="cuda")
    x, grad = inputs(torch.float64, "cuda")
    check_step(block, naive, x, grad=grad, seed=0)


@pytest.mark.cuda
def test_cuda_torch_compile_without_graph_breaks():
    """``torch.compile(fullgraph=True)`` of the block, forward and backward, equals eager."""
    triton_cuda_or_skip()
    import torch._dynamo

    torch.manual_seed(0)
    block = EfficientDenseBlock(2, 8, 4, 2, memory="min", backend="triton").cuda()
    x = torch.randn(2, 8, 9, 9, device="cuda", requires_grad=True)
    torch._dynamo.reset()
    expected = block(x)
    expected.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    out = torch.compile(block, fullgraph=True)(x)
    out.sum().backward()
    assert rel_err(out, expected) < 1e-6
    assert rel_err(x.grad, grad) < 1e-6


@pytest.mark.cuda
def test_cuda_graph_replays_a_training_step_with_fresh_dropout():
    """A whole training step (forward, backward) captured in a CUDA graph replays, and every
    replay draws new dropout masks (the seeds are drawn by a graph-safe op into a device
    tensor, not baked in as Python ints)."""
    triton_cuda_or_skip()
    torch.manual_seed(0)
    block = EfficientDenseBlock(2, 8, 4, 4, 0.3, memory="min", backend="triton").cuda()
    x = torch.randn(2, 8, 9, 9, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels outside the capture
        for _ in range(2):
            block(x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    for p in block.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block(x)
        out.sum().backward()
    outputs = []
    for _ in range(2):
        graph.replay()
        outputs.append((out.detach().clone(), x.grad.detach().clone()))
    torch.cuda.synchronize()
    (first, grad1), (second, grad2) = outputs
    assert torch.isfinite(first).all() and torch.isfinite(grad1).all()
    assert not torch.equal(first[:, 8:] == 0, second[:, 8:] == 0), "the masks did not change"
    assert not torch.equal(grad1, grad2)
