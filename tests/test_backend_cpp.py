"""The ``cpp`` backend (dense_ext._C) on the CPU against the reference backend and the
independent naive block: outputs, input and parameter gradients, running statistics, both
memory modes, plain and bottleneck layers, dropout, eval mode, input layouts, gradcheck.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    BN_OVER_TWO_VALUES,
    RELU_FLIP,
    TOLERANCE,
    assert_close,
    assert_same_step,
    assert_within_torch_error,
    check_step,
    cpu_backend_or_skip,
    data_digest,
    expect_rule_failure,
    float64_oracle,
    switched,
    train_step,
)
from naive import NaiveDenseBlock, randomize_bn, with_masks

from dense_ext import EfficientDenseBlock


@pytest.fixture(autouse=True)
def _needs_cpp():
    cpu_backend_or_skip("cpp")


def make_blocks(layers, c0, k, bn_size, drop, memory, dtype, seed=0):
    """A naive block and cpp/reference efficient blocks with the same (randomised) state."""
    torch.manual_seed(seed)
    naive = NaiveDenseBlock(layers, c0, k, bn_size, drop).to(dtype)
    randomize_bn(naive)
    blocks = {}
    for backend in ("cpp", "reference"):
        blocks[backend] = EfficientDenseBlock(
            layers, c0, k, bn_size, drop, memory=memory, backend=backend
        ).to(dtype)
        blocks[backend].load_state_dict(naive.state_dict())
    return naive, blocks


SHAPES = [(3, 5, 7, 6), (1, 4, 3, 5), (2, 3, 1, 1), (1, 6, 9, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_training_step_matches_naive_and_reference(dtype, memory, bn_size, shape, layout, request):
    n, c0, h, w = shape
    two_values = dtype == torch.float32 and n * h * w == 2
    miss = expect_rule_failure(request, two_values, BN_OVER_TWO_VALUES)
    naive, blocks = make_blocks(3, c0, 4, bn_size, 0.0, memory, dtype)
    oracle = float64_oracle(naive)
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    cpp = check_step(
        blocks["cpp"], naive, x, oracle=oracle, seed=11, what="cpp vs naive", miss=miss
    )
    assert cpp.output.is_contiguous(memory_format=torch.channels_last)
    assert cpp.input_grad.is_contiguous(memory_format=suggested(x))
    if dtype == torch.float64:  # below float64 both follow the rule against naive instead
        reference = train_step(blocks["reference"], x, cpp.grad_output, seed=11)
        assert_same_step(cpp, reference, TOLERANCE[dtype], "cpp vs reference")


def suggested(x):
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last


@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 2])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_eval_mode_matches_naive(memory, bn_size, requires_grad):
    naive, blocks = make_blocks(3, 6, 4, bn_size, 0.2, memory, torch.float64)
    naive.eval()
    cpp = blocks["cpp"].eval()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    if requires_grad:
        check_step(cpp, naive, x, what="eval")
    else:
        with torch.no_grad():
            assert_close(cpp(x), naive(x), 1e-10, "eval output")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 4])
def test_dropout_matches_naive_with_the_backends_masks(dtype, memory, bn_size):
    """The cpp backend draws its own masks (not F.dropout's): the naive block given those
    masks must match it in every observable."""
    from dense_ext.backends.cpp import draw_seed, dropout_mask

    p, (n, c0, h, w), k, layers = 0.3, (2, 4, 5, 3), 3, 3
    naive, blocks = make_blocks(layers, c0, k, bn_size, p, memory, dtype)
    torch.manual_seed(11)
    seed = draw_seed()
    masks = [dropout_mask(seed, i, (n, k, h, w), p, dtype) for i in range(layers)]
    kept = torch.cat([m.flatten() for m in masks])
    # Exactly 0 and 1/(1-p), the latter rounded to the mask's dtype.
    assert set(kept.unique().tolist()) == {0.0, torch.tensor(1 / (1 - p), dtype=dtype).item()}
    assert 0.15 < (kept == 0).double().mean() < 0.45, "the masks really drop about p"
    naive = with_masks(naive, masks)
    oracle = with_masks(float64_oracle(naive), [m.double() for m in masks])
    torch.manual_seed(2)
    x = torch.randn(n, c0, h, w, dtype=dtype)
    check_step(blocks["cpp"], naive, x, oracle=oracle, seed=11, what="dropout")


def test_dropout_mask_statistics():
    from dense_ext.backends.cpp import dropout_mask

    p, shape = 0.25, (8, 16, 40, 40)
    mask = dropout_mask(123, 0, shape, p, torch.float64)
    values = set(mask.unique().tolist())
    assert values == {0.0, 1 / (1 - p)}
    count = mask.numel()
    dropped = (mask == 0).sum().item()
    sigma = (count * p * (1 - p)) ** 0.5
    assert abs(dropped - p * count) < 5 * sigma, (dropped, p * count)
    # Masks differ between layers and seeds, and are the same for the same (seed, layer).
    assert not torch.equal(mask, dropout_mask(123, 1, shape, p, torch.float64))
    assert not torch.equal(mask, dropout_mask(124, 0, shape, p, torch.float64))
    assert torch.equal(mask, dropout_mask(123, 0, shape, p, torch.float64))
    # No correlation between neighbouring elements of a row (a weak hash would show it).
    flat = (mask.permute(0, 2, 3, 1).reshape(-1) > 0).double()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()
    assert abs(corr) < 0.01, corr


@pytest.mark.one_thread
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 2])
@pytest.mark.parametrize("drop", [0.0, 0.4])
def test_gradcheck(memory, bn_size, drop):
    torch.manual_seed(0)
    block = EfficientDenseBlock(2, 3, 2, bn_size, drop, memory=memory, backend="cpp").double()
    randomize_bn(block)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [p for p in block.parameters()]
    names = [name for name, _ in block.named_parameters()]

    def f(inp, *ps):
        torch.manual_seed(5)  # the same dropout masks for every evaluation
        state = {name: p for name, p in zip(names, ps)}
        return torch.func.functional_call(block, state, (inp,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def test_two_steps_match_reference_including_running_stats():
    naive, blocks = make_blocks(4, 5, 3, 4, 0.0, "min", torch.float64)
    for s in range(2):
        torch.manual_seed(100 + s)
        x = torch.randn(3, 5, 6, 5, dtype=torch.float64)
        assert_same_step(
            train_step(blocks["cpp"], x, seed=s),
            train_step(blocks["reference"], x, seed=s),
            TOLERANCE[torch.float64],
            f"step {s}",
        )
    assert torch.equal(blocks["cpp"].denselayer1.norm1.num_batches_tracked, torch.tensor(2))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_and_half_within_twice_torch_error(dtype, train):
    """Low precision buffers accumulate in float32: the forward (train and eval mode) within
    the tolerance rule (tests/helpers.py) of the naive block at the same precision."""
    naive, blocks = make_blocks(2, 4, 3, 4, 0.0, "min", dtype)
    oracle = float64_oracle(naive)
    for module in (blocks["cpp"], naive, oracle):
        module.train(train)
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    with torch.no_grad():
        exact = oracle(x.double())
        assert_within_torch_error(blocks["cpp"](x), naive(x), exact, "output")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_and_half_training_step_within_twice_torch_error(dtype, request):
    """A whole low-precision training step (every observable) under the tolerance rule."""
    naive, blocks = make_blocks(2, 4, 3, 4, 0.0, "min", dtype)
    oracle = float64_oracle(naive)
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    digest = data_digest(x, naive.state_dict())
    print(f"data {digest}")
    miss = expect_rule_failure(request, True, RELU_FLIP, digest)
    check_step(blocks["cpp"], naive, x, oracle=oracle, miss=miss)


def test_auto_selects_cpp_on_cpu(monkeypatch):
    from dense_ext.backends import resolve_backend_name

    monkeypatch.delenv("DENSE_EXT_BACKEND", raising=False)
    assert resolve_backend_name("auto", "cpu") == "cpp"


def test_op_errors_name_the_tensor():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)  # contiguous, not channels_last
    stats = torch.empty(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="x must be channels_last"):
        torch.ops.dense_ext.channel_stats(x, stats, 0)
    xc = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="stats must be torch.float64|stats must be Double"):
        torch.ops.dense_ext.channel_stats(xc, stats.float(), 0)
    with pytest.raises(RuntimeError, match="gamma must have shape"):
        one = torch.ones(3, dtype=torch.float64)
        torch.ops.dense_ext.bn_relu(xc, one, one, one[:2], one, 1e-5, torch.empty_like(xc))


@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("train", [True, False])
def test_batches_larger_than_one_chunk(memory, train):
    """Bottleneck layers run BN1-ReLU-Conv1x1 in chunks of ~2048 rows on the CPU
    (csrc/block.cpp chunk_images): 7 images of 24x24 make chunks of 3, 3 and 1 images."""
    naive, blocks = make_blocks(2, 5, 3, 4, 0.0, memory, torch.float64)
    naive.train(train)
    blocks["cpp"].train(train)
    torch.manual_seed(4)
    x = torch.randn(7, 5, 24, 24, dtype=torch.float64) + 0.5
    check_step(blocks["cpp"], naive, x, what="chunked")


@pytest.mark.parametrize("memory, per_layer", [("bottleneck", 1 + 3), ("min", 3 + 1 + 2)])
def test_backward_computes_bn1_relu_once_per_chunk_it_lacks(memory, per_layer):
    """The BN-ReLU passes of a chunked backward (3 chunks of 7 images of 24x24), counted: BN2's,
    and BN1's per chunk; in `min` also BN1's per chunk of the conv1 recompute, whose last chunk
    the gradient loop then takes as it is (csrc/block.cpp) instead of computing it again."""
    from torch.profiler import ProfilerActivity, profile

    _, blocks = make_blocks(2, 5, 3, 4, 0.0, memory, torch.float64)
    x = torch.randn(7, 5, 24, 24, dtype=torch.float64, requires_grad=True)
    out = blocks["cpp"](x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.sum().backward()
    calls = sum(e.count for e in prof.key_averages() if e.key == "dense_ext::bn_relu")
    assert calls == 2 * per_layer, calls


@pytest.fixture(params=["onednn", "mkl"])
def cpu_gemm(request):
    """Runs the test with the float32 1x1-convolution products on one library (csrc/cpu/gemm.h;
    skipped where libtorch has no working oneDNN matmul)."""
    from dense_ext import _C

    why = f"{request.param} matmul not available in this libtorch or on this CPU"
    yield from switched(_C.cpu_gemm, _C.set_cpu_gemm, request.param, why)


def test_set_cpu_gemm_rejects_unknown_names():
    from dense_ext import _C

    assert _C.cpu_gemm() in ("onednn", "mkl")
    assert not _C.set_cpu_gemm("openblas")
    assert _C.cpu_gemm() in ("onednn", "mkl")


@pytest.mark.parametrize("memory", ["bottleneck", "min"])
def test_float32_chunked_step_within_torch_error_with_each_gemm(cpu_gemm, memory):
    """A float32 training step over two chunks (6 images of 24x24, 64 channels in, 48 in the
    bottleneck: every 1x1 product above oneDNN's 2^22 multiply-adds) follows the tolerance rule
    against the float64 oracle with either library computing the products (oneDNN writes dW1
    directly, MKL transposed: csrc/block.cpp)."""
    naive, blocks = make_blocks(3, 64, 12, 4, 0.0, memory, torch.float32)
    oracle = float64_oracle(naive)
    torch.manual_seed(5)
    x = torch.randn(6, 64, 24, 24) * 2 + 1
    check_step(blocks["cpp"], naive, x, oracle=oracle, what=f"{cpu_gemm} products")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_run_on_the_chosen_library(cpu_gemm, dtype):
    """Which library ran the products, seen from the profiler: a float32 block on "onednn" runs
    every one (all above 2^22 multiply-adds here) as dense_ext::onednn_matmul (csrc/cpu/gemm.cpp's
    record) and none through aten::mm / aten::addmm_; on "mkl", and in float64 under either
    choice, the other way round."""
    from torch.profiler import ProfilerActivity, profile

    _, blocks = make_blocks(2, 64, 12, 4, 0.0, "min", dtype)
    x = torch.randn(6, 64, 24, 24, dtype=dtype, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        blocks["cpp"](x).sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    aten = counts.get("aten::mm", 0) + counts.get("aten::addmm_", 0)
    onednn = counts.get("dense_ext::onednn_matmul", 0)
    expected = 2 * 2 * 4  # per layer: 2 chunks x (forward, recompute, dW1, dZ1)
    if cpu_gemm == "onednn" and dtype == torch.float32:
        assert (aten, onednn) == (0, expected)
    else:
        assert (aten, onednn) == (expected, 0)


def test_small_products_stay_on_mkl(cpu_gemm):
    """Below 2^22 multiply-adds oneDNN's per-call cost outweighs its speed (csrc/cpu/gemm.cpp):
    a float32 block of 5 channels at 6x6 runs every product through aten::mm / aten::addmm_."""
    from torch.profiler import ProfilerActivity, profile

    _, blocks = make_blocks(2, 5, 3, 4, 0.0, "bottleneck", torch.float32)
    x = torch.randn(2, 5, 6, 6, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        blocks["cpp"](x).sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("dense_ext::onednn_matmul", 0) == 0
    assert counts.get("aten::mm", 0) + counts.get("aten::addmm_", 0) == 2 * 3


@pytest.mark.slow
def test_onednn_products_under_flags_nan_and_fullgraph_compile(cpu_gemm):
    """The fused float32 block at a size whose products run on oneDNN (2^22 multiply-adds and
    more): mixed per-module train/eval flags match naive within the tolerance rule; in eval a
    NaN pixel of image 0 leaves every other image's output finite and equal to naive's; and
    torch.compile(fullgraph=True) forward and backward equals eager."""
    naive, blocks = make_blocks(2, 64, 12, 4, 0.0, "min", torch.float32)
    block = blocks["cpp"]
    for module in (naive, block):
        module.train()
        module.denselayer2.norm1.eval()  # frozen BN inside a training block
    oracle = float64_oracle(naive)
    torch.manual_seed(6)
    x = torch.randn(6, 64, 24, 24) * 2 + 1
    check_step(block, naive, x, oracle=oracle, what=f"{cpu_gemm}, mixed flags")

    naive.eval()
    block.eval()
    bad = x.clone()
    bad[0, 3, 5, 7] = float("nan")
    with torch.no_grad():
        ours, theirs = block(bad), naive(bad)
    assert torch.isnan(ours[0]).any() and torch.isfinite(ours[1:]).all()
    torch.testing.assert_close(ours[1:], theirs[1:], rtol=1e-5, atol=1e-5)

    block.train()
    block.zero_grad(set_to_none=True)  # check_step's gradients stay on the parameters
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True)
    outs, grads = [], []
    for module in (eager, compiled):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([xi.grad, *(p.grad for p in module.parameters())])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g_compiled, g_eager in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-5)
