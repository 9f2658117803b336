"""The ``cpp`` backend (dense_ext._C) on the CPU against the reference backend and the
independent naive block: outputs, input and parameter gradients, running statistics, both
memory modes, plain and bottleneck layers, dropout, eval mode, input layouts, gradcheck.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TOLERANCE, assert_close, cpu_backend_or_skip
from naive import NaiveDenseBlock, randomize_bn

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


def step(block, x, grad, seed=11):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = block(x)
    running = {k: v.clone() for k, v in block.state_dict().items() if "running" in k}
    out.backward(grad)
    grads = {name: p.grad for name, p in block.named_parameters()}
    return out.detach(), x.grad, grads, running


def check_same_step(actual, expected, tol, what):
    out_a, gx_a, grads_a, run_a = actual
    out_e, gx_e, grads_e, run_e = expected
    assert_close(out_a, out_e, tol, f"{what}: output")
    assert_close(gx_a, gx_e, tol, f"{what}: input gradient")
    for name, g in grads_e.items():
        assert grads_a[name] is not None, f"{what}: {name} got no gradient"
        assert_close(grads_a[name], g, tol, f"{what}: grad of {name}")
    for name, v in run_e.items():
        assert_close(run_a[name], v, tol, f"{what}: {name}")


SHAPES = [(3, 5, 7, 6), (1, 4, 3, 5), (2, 3, 1, 1), (1, 6, 9, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_training_step_matches_naive_and_reference(dtype, memory, bn_size, shape, layout):
    n, c0, h, w = shape
    if dtype == torch.float32 and n * h * w < 8:
        # BN over 2 values per channel is ill-conditioned: PyTorch's own float32 gradients are
        # O(1) away from float64 there, so float32 agreement at 1e-4 means nothing. float64 runs.
        pytest.skip("float32 BN over N*H*W = 2 values is ill-conditioned")
    naive, blocks = make_blocks(3, c0, 4, bn_size, 0.0, memory, dtype)
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, c0 + 12, h, w, dtype=dtype)
    tol = TOLERANCE[dtype]
    expected = step(naive, x, grad)
    cpp = step(blocks["cpp"], x, grad)
    check_same_step(cpp, expected, tol, "cpp vs naive")
    check_same_step(cpp, step(blocks["reference"], x, grad), tol, "cpp vs reference")
    assert cpp[0].is_contiguous(memory_format=torch.channels_last)
    assert cpp[1].is_contiguous(memory_format=suggested(x))


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
        grad = torch.randn(2, 18, 5, 4, dtype=torch.float64)
        check_same_step(step(cpp, x, grad), step(naive, x, grad), 1e-10, "eval")
    else:
        with torch.no_grad():
            assert_close(cpp(x), naive(x), 1e-10, "eval output")


def naive_with_masks(naive, x, masks):
    """The naive block with given dropout masks instead of F.dropout's."""
    features = [x]
    for layer, mask in zip(naive.values(), masks):
        features.append(layer(features) * mask)
    return torch.cat(features, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 4])
def test_dropout_matches_naive_with_the_backends_masks(dtype, memory, bn_size):
    from dense_ext.backends.cpp import draw_seed, dropout_mask

    p, (n, c0, h, w), k, layers = 0.3, (2, 4, 5, 3), 3, 3
    naive, blocks = make_blocks(layers, c0, k, bn_size, 0.0, memory, dtype)
    cpp = blocks["cpp"]
    for layer in cpp.values():
        layer.drop_rate = p
    torch.manual_seed(2)
    x = torch.randn(n, c0, h, w, dtype=dtype)
    grad = torch.randn(n, c0 + layers * k, h, w, dtype=dtype)
    torch.manual_seed(11)
    seed = draw_seed()
    masks = [dropout_mask(seed, i, (n, k, h, w), p, dtype) for i in range(layers)]
    kept = torch.cat([m.flatten() for m in masks])
    assert set(kept.unique().tolist()) == {0.0, 1 / (1 - p)} or dtype != torch.float64

    xn = x.clone().requires_grad_()
    out_n = naive_with_masks(naive, xn, masks)
    out_n.backward(grad)
    expected = (
        out_n.detach(),
        xn.grad,
        {k_: v.grad for k_, v in naive.named_parameters()},
        {k_: v for k_, v in naive.state_dict().items() if "running" in k_},
    )
    check_same_step(step(cpp, x, grad, seed=11), expected, TOLERANCE[dtype], "dropout")


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
        grad = torch.randn(3, 17, 6, 5, dtype=torch.float64)
        check_same_step(
            step(blocks["cpp"], x, grad), step(blocks["reference"], x, grad), 1e-10, f"step {s}"
        )
    assert torch.equal(blocks["cpp"].denselayer1.norm1.num_batches_tracked, torch.tensor(2))


def test_bf16_and_half_run_close_to_float32():
    """Low precision buffers accumulate in float32: error at most ~2x PyTorch's own."""
    from helpers import rel_err

    naive, blocks = make_blocks(2, 4, 3, 4, 0.0, "min", torch.float32)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = naive(x)
        for dtype in (torch.bfloat16, torch.float16):
            ours = copy.deepcopy(blocks["cpp"]).to(dtype)(x.to(dtype))
            theirs = copy.deepcopy(naive).to(dtype)(x.to(dtype))
            assert rel_err(ours, expected) <= 2 * rel_err(theirs, expected) + 1e-3, dtype


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
    grad = torch.randn(7, 11, 24, 24, dtype=torch.float64)
    check_same_step(step(blocks["cpp"], x, grad), step(naive, x, grad), 1e-10, "chunked")
