"""The fused ImageNet stem (``dense_ext.stem``, csrc/cpu/stem_pool.cpp) against torchvision's
modules: the op against ``max_pool2d(relu(z), 3, 2, 1)`` bit for bit (ties, zeros, NaN, Inf,
odd sizes), the stem function against BatchNorm2d-ReLU-MaxPool2d bit for bit (output, every
gradient, running statistics, train and eval), the model's choice of path, and what it saves.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TOLERANCE,
    Autocast,
    RecordOps,
    assert_close,
    assert_same_step,
    check_step,
    cuda_or_skip,
    float64_oracle,
    ieee_fp32,
    train_step,
)
from torch import Tensor, nn

from dense_ext.stem import norm_relu_max_pool, unfused_stem_reason
from python_models.delugenet import DelugeNet
from python_models.densenet import DenseNet

pytest.importorskip("dense_ext._C")
DTYPES = [torch.float32, torch.float64]
SHAPES = [(2, 3, 7, 7), (1, 5, 8, 9), (3, 2, 1, 1), (2, 4, 2, 3), (1, 17, 12, 10), (2, 1, 5, 1)]


def _hard_values(shape, dtype, seed: int) -> Tensor:
    """Random values with the pool's hard cases: many ties (values on a coarse grid), exact
    zeros, negatives (the ReLU's zeros), NaN and +-Inf."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-3, 4, shape, generator=g).to(dtype) / 2
    special = torch.rand(shape, generator=g)
    z[special < 0.03] = float("nan")
    z[(special >= 0.03) & (special < 0.05)] = float("inf")
    z[(special >= 0.05) & (special < 0.07)] = float("-inf")
    return z


def _same(actual: Tensor, expected: Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual.nan_to_num(), expected.nan_to_num()), f"{what}: values differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_op_equals_relu_then_max_pool_bit_for_bit(shape, dtype, seed):
    z = _hard_values(shape, dtype, seed)
    out, offsets = torch.ops.dense_ext.relu_max_pool(z)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert offsets.dtype == torch.uint8
    zr = z.clone().requires_grad_()
    expected = F.max_pool2d(F.relu(zr), 3, 2, 1)
    _same(out, expected.detach(), "output")
    grad = _hard_values(expected.shape, dtype, seed + 10)
    expected.backward(grad)
    for layout in (torch.contiguous_format, torch.channels_last):
        grad_z = torch.ops.dense_ext.relu_max_pool_backward(
            grad.contiguous(memory_format=layout), offsets, shape[2], shape[3]
        )
        assert grad_z.is_contiguous()
        _same(grad_z, zr.grad, f"input gradient ({layout})")


def test_op_rejects_what_it_does_not_take():
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.dense_ext.relu_max_pool(torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="NCHW-contiguous"):
        x = torch.zeros(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
        torch.ops.dense_ext.relu_max_pool(x)
    with pytest.raises(RuntimeError, match=r"\[N, C, H, W\]"):
        torch.ops.dense_ext.relu_max_pool(torch.zeros(3, 4, 4))
    _, offsets = torch.ops.dense_ext.relu_max_pool(torch.zeros(1, 2, 4, 4))
    with pytest.raises(RuntimeError, match="pools to 3x3, not 2x2"):
        torch.ops.dense_ext.relu_max_pool_backward(torch.zeros(1, 2, 2, 2), offsets, 6, 6)


def _stem_modules(channels: int, dtype, momentum=0.1, affine=True, track=True):
    g = torch.Generator().manual_seed(5)
    norm = nn.BatchNorm2d(channels, momentum=momentum, affine=affine, track_running_stats=track)
    norm = norm.to(dtype)
    with torch.no_grad():
        if affine:
            norm.weight.copy_(torch.randn(channels, generator=g))  # negative gammas too
            norm.bias.copy_(torch.randn(channels, generator=g))
        if track:
            norm.running_mean.copy_(torch.randn(channels, generator=g))
            norm.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return norm, nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)


def _run(fn, norm, x: Tensor, grad: Tensor):
    for p in norm.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    out = fn(x)
    out.backward(grad)
    grads = [x.grad] + [p.grad for p in norm.parameters()]
    return out.detach(), grads, [b.clone() for b in norm.buffers()]


def _stem_runs(x: Tensor, grad: Tensor, mode: str, **options):
    """(modules' run, fused run) of ``_run`` on fresh stem modules in ``x``'s dtype and device."""
    runs = []
    for fused in (False, True):
        norm, relu, pool = (m.to(x.device) for m in _stem_modules(x.shape[1], x.dtype, **options))
        norm.train(mode == "train")
        if fused:
            assert unfused_stem_reason(x, norm, relu, pool) is None
            runs.append(
                _run(lambda t, m=(norm, relu, pool): norm_relu_max_pool(t, *m), norm, x, grad)
            )
        else:
            runs.append(_run(nn.Sequential(norm, relu, pool), norm, x, grad))
    return runs


CASES = {
    "train": dict(),
    "eval": dict(mode="eval"),
    "momentum_none": dict(momentum=None),
    "no_affine": dict(affine=False),
    "untracked": dict(track=False),
    "untracked_eval": dict(track=False, mode="eval"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_stem_function_equals_the_modules_bit_for_bit(case, dtype):
    options = dict(CASES[case])
    mode = options.pop("mode", "train")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 11, 14, generator=g).to(dtype)
    x[0, 1, 2, 3] = float("nan")  # one NaN: its channel's statistics and gradients go NaN
    grad = torch.randn(3, 6, 6, 7, generator=torch.Generator().manual_seed(3)).to(dtype)
    runs = _stem_runs(x, grad, mode, **options)
    (out_n, grads_n, bufs_n), (out_f, grads_f, bufs_f) = runs
    assert out_f.is_contiguous(memory_format=torch.channels_last)
    _same(out_f, out_n, "output")
    for i, (a, b) in enumerate(zip(grads_f, grads_n)):
        _same(a, b, f"gradient {i}")
    for i, (a, b) in enumerate(zip(bufs_f, bufs_n)):
        _same(a, b, f"buffer {i}")


def _tiny_densenet(**kwargs) -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(4, (2, 2), 8, bn_size=2, num_classes=5, **kwargs)


def _ops_of_a_step(model: nn.Module, x: Tensor) -> list[str]:
    with RecordOps() as rec:
        model(x).sum().backward()
    return [name for name, _ in rec.calls]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_efficient_densenet_takes_the_fused_stem_with_the_modules_numbers(mode):
    """The model's fused stem against the same model running the modules: every observable of
    two steps bit for bit (against the naive model: tests/test_models.py's ImageNet-stem
    tests, which take the fused stem since it is the default)."""
    x = torch.randn(2, 3, 32, 30, generator=torch.Generator().manual_seed(1)).double()
    fused = _tiny_densenet(efficient=True, backend="reference").double().train(mode == "train")
    modules = _tiny_densenet(efficient=True, backend="reference").double()
    modules.load_state_dict(fused.state_dict())
    modules.efficient_stem = False
    modules.train(mode == "train")
    ops = _ops_of_a_step(fused, x)
    assert "dense_ext.relu_max_pool.default" in ops
    assert "aten.max_pool2d_with_indices.default" not in ops
    assert "dense_ext.relu_max_pool.default" not in _ops_of_a_step(modules, x)
    for seed in (0, 1):
        assert_same_step(train_step(fused, x, seed=seed), train_step(modules, x, seed=seed), 0.0)


@pytest.mark.parametrize(
    "why",
    ["hook_on_pool", "hook_on_features", "stem_off", "bfloat16", "channels_last", "sync_bn_norm"],
)
def test_the_modules_run_where_the_fused_stem_does_not_apply(why):
    model = _tiny_densenet(efficient=True, backend="reference")
    x = torch.randn(2, 3, 32, 32)
    if why == "hook_on_pool":
        model.features.pool0.register_forward_hook(lambda *a: None)
    elif why == "hook_on_features":
        model.features.register_forward_hook(lambda *a: None)
    elif why == "stem_off":
        model.efficient_stem = False
    elif why == "bfloat16":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    elif why == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        model.features.norm0 = nn.SyncBatchNorm(8)  # not a plain BatchNorm2d
        model.eval()
    ops = _ops_of_a_step(model, x)
    assert "dense_ext.relu_max_pool.default" not in ops
    assert "aten.max_pool2d_with_indices.default" in ops


def test_fused_stem_saves_at_most_half_of_what_the_modules_save():
    norm, relu, pool = _stem_modules(16, torch.float32)
    x = torch.randn(4, 16, 56, 56).requires_grad_()
    saved = {}
    for name, fn in (
        ("modules", lambda t: pool(relu(norm(t)))),
        ("fused", lambda t: norm_relu_max_pool(t, norm, relu, pool)),
    ):
        tensors: dict[int, Tensor] = {}

        def pack(t: Tensor, tensors=tensors) -> Tensor:
            tensors[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        saved[name] = sum(t.untyped_storage().nbytes() for t in tensors.values())
    # modules: x, the ReLU output, int64 indices of the pooled map; fused: x and one byte each
    assert saved["fused"] <= saved["modules"] / 2 + 4096, saved


def test_imagenet_delugenet_takes_the_fused_stem_with_the_modules_numbers():
    def tiny(stem: bool) -> DelugeNet:
        torch.manual_seed(0)
        model = DelugeNet((2, 3), (8, 16), 8, 5, small_inputs=False, efficient=True)
        model.efficient_stem = stem
        return model.double()

    fused, modules = tiny(True), tiny(False)
    x = torch.randn(2, 3, 29, 32, generator=torch.Generator().manual_seed(4)).double()
    assert "dense_ext.relu_max_pool.default" in _ops_of_a_step(fused, x)
    assert "dense_ext.relu_max_pool.default" not in _ops_of_a_step(modules, x)
    assert_same_step(train_step(fused, x), train_step(modules, x), 0.0)


# --- the CUDA kernels' arithmetic (common/stem_pool.cuh), on the host and on a GPU ----------

LOW = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES + LOW)
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_thread_bodies_on_the_host_equal_aten_bit_for_bit(shape, dtype):
    """relu_max_pool_reference runs the CUDA kernels' per-element functions once per element:
    forward equal to ATen's pool of the ReLU and to the CPU op; backward (gathering in float32
    for 16-bit types, then one rounding) equal to the float32 gather of the same gradients,
    rounded once, and in float32/float64 to ATen's backward and the CPU op's."""
    z = _hard_values(shape, dtype, 3)
    out, offsets = torch.ops.dense_ext.relu_max_pool_reference(z)
    expected = F.max_pool2d(F.relu(z.float()), 3, 2, 1).to(dtype)
    _same(out, expected, "output")
    grad = _hard_values(out.shape, dtype, 4)
    grad_z = torch.ops.dense_ext.relu_max_pool_backward_reference(grad, offsets, *shape[2:])
    if dtype in LOW:
        wide = torch.ops.dense_ext.relu_max_pool_backward_reference(
            grad.float(), offsets, *shape[2:]
        )
        _same(grad_z, wide.to(dtype), "input gradient")
        return
    fast_out, fast_offsets = torch.ops.dense_ext.relu_max_pool(z)
    _same(out, fast_out, "output against the CPU op")
    assert torch.equal(offsets, fast_offsets)
    zr = z.clone().requires_grad_()
    F.max_pool2d(F.relu(zr), 3, 2, 1).backward(grad)
    _same(grad_z, zr.grad, "input gradient")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES + LOW)
def test_cuda_stem_op_equals_its_host_emulation(dtype):
    cuda_or_skip()
    shape = (3, 5, 17, 12)
    z = _hard_values(shape, dtype, 6)
    out, offsets = torch.ops.dense_ext.relu_max_pool(z.cuda())
    ref_out, ref_offsets = torch.ops.dense_ext.relu_max_pool_reference(z)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _same(out.cpu(), ref_out, "output")
    assert torch.equal(offsets.cpu(), ref_offsets)
    grad = _hard_values(out.shape, dtype, 7)
    for layout in (torch.contiguous_format, torch.channels_last):
        g = grad.contiguous(memory_format=layout)
        grad_z = torch.ops.dense_ext.relu_max_pool_backward(g.cuda(), offsets, *shape[2:])
        expected = torch.ops.dense_ext.relu_max_pool_backward_reference(g, ref_offsets, *shape[2:])
        _same(grad_z.cpu(), expected, f"input gradient ({layout})")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_stem_function_matches_the_modules(mode):
    cuda_or_skip()
    x = torch.randn(3, 6, 11, 14, generator=torch.Generator().manual_seed(2)).double().cuda()
    grad = torch.randn(3, 6, 6, 7, generator=torch.Generator().manual_seed(3)).double().cuda()
    runs = _stem_runs(x, grad, mode)
    (out_n, grads_n, bufs_n), (out_f, grads_f, bufs_f) = runs
    assert_close(out_f, out_n, TOLERANCE[torch.float64], "output")
    for i, (a, b) in enumerate(zip(grads_f + bufs_f, grads_n + bufs_n)):
        if a.is_floating_point():
            assert_close(a, b, TOLERANCE[torch.float64], f"gradient or buffer {i}")
        else:
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_cuda_densenet_with_fused_stem_matches_naive(autocast):
    """The whole tiny ImageNet DenseNet on a GPU, its stem fused (a bfloat16 map with float32
    BN parameters under autocast), by the tolerance rule against the naive model (IEEE
    float32: TF32 off)."""
    cuda_or_skip()
    naive = _tiny_densenet().cuda()
    ours = _tiny_densenet(efficient=True, backend="cpp").cuda()
    ours.load_state_dict(naive.state_dict())
    if autocast:
        naive, ours = Autocast(naive), Autocast(ours)
    x = torch.randn(3, 3, 33, 30, generator=torch.Generator().manual_seed(8)).cuda()
    # ieee_fp32, not torch.backends.cudnn.flags(allow_tf32=False): flags() also sets every
    # flag it is not given to its default, enabled=False among them, and so ran this test
    # with cuDNN off (on the H200 run10-11 that failed the bf16 case's rule at 1.1x its bound;
    # with cuDNN on, as users run, the same step passes: bench/results/cuda-h200-2026-11-27).
    with ieee_fp32():
        oracle = float64_oracle(naive)
        ops = _ops_of_a_step(copy.deepcopy(ours), x)
        assert "dense_ext.relu_max_pool.default" in ops
        check_step(ours, naive, x, oracle=oracle, precision=torch.bfloat16 if autocast else None)
