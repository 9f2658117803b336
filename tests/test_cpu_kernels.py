"""The float32 CPU loops of dense_ext._C, once per instruction set the machine runs (portable,
AVX2, AVX-512: csrc/cpu/rows.h is compiled for each), against float64 torch formulas, on sizes
that leave vector tails (channel counts 1 to 100) and partial row tiles (555 rows), on channel
slices of wider buffers. The float64 tests of test_cpp_ops.py run the portable loops only.
The 3x3 weight-gradient loops (csrc/cpu/conv3x3.h, the op conv3x3_weight_grad) are at the end.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, cpu_backend_or_skip, rel_err, switched, torch_threads

ISAS = ("portable", "avx2", "avx512")
CHANNELS = (1, 7, 8, 17, 33, 100)
TOL = 2e-6  # float32 rounding of a few operations, relative to the largest value


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test with the CPU kernels of one instruction set (skipped if not supported)."""
    cpu_backend_or_skip("cpp")
    from dense_ext import _C

    why = f"{request.param} not supported here (widest: {_C.supported_cpu_isa()})"
    yield from switched(_C.cpu_isa, _C.set_cpu_isa, request.param, why)


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def ch(v):
    return v.view(1, -1, 1, 1)


# dropout_store's seed: a one-element int64 tensor (read on the device, as CUDA graphs need).
SEED = torch.tensor([11], dtype=torch.int64)


def problem(c, seed=0, shape=(3, 5, 37)):
    """x and grad_x as channel slices (at 3 and 1) of wider float32 buffers, per-channel BN
    constants and the float64 copies the reference formulas use."""
    g = torch.Generator().manual_seed(seed)
    n, h, w = shape
    x = cl(torch.randn(n, c + 5, h, w, generator=g) * 2 + 1)[:, 3 : 3 + c]
    grad_z = cl(torch.randn(n, c, h, w, generator=g))
    grad_x = cl(torch.randn(n, c + 2, h, w, generator=g))[:, 1 : 1 + c]
    mean = torch.randn(c, generator=g)
    var = torch.rand(c, generator=g) + 0.5
    gamma = torch.rand(c, generator=g) + 0.5
    beta = torch.randn(c, generator=g)
    return x, grad_z, grad_x, mean, var, gamma, beta


def pre_activation(x, mean, var, gamma, beta, eps=1e-5):
    d = lambda t: t.double()  # noqa: E731
    return (d(x) - ch(d(mean))) * torch.rsqrt(ch(d(var)) + eps) * ch(d(gamma)) + ch(d(beta))


def test_set_cpu_isa_rejects_unknown_names():
    cpu_backend_or_skip("cpp")
    from dense_ext import _C

    before = _C.cpu_isa()
    assert _C.supported_cpu_isa() in ISAS
    assert not _C.set_cpu_isa("sse9")
    assert _C.cpu_isa() == before


@pytest.mark.parametrize("c", CHANNELS)
def test_bn_relu(isa, c):
    x, _, _, mean, var, gamma, beta = problem(c)
    out = cl(torch.full(x.shape, float("nan")))
    torch.ops.dense_ext.bn_relu(x, mean, var, gamma, beta, 1e-5, out)
    assert_close(out, torch.relu(pre_activation(x, mean, var, gamma, beta)), TOL, "bn_relu")


@pytest.mark.parametrize("c", CHANNELS)
def test_channel_stats(isa, c):
    x = problem(c)[0]
    stats = torch.zeros(2, c + 4)
    torch.ops.dense_ext.channel_stats(x, stats, 2)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert_close(stats[0, 2 : 2 + c], mean, TOL, "mean")
    assert_close(stats[1, 2 : 2 + c], var, TOL, "variance")
    assert (stats[:, :2] == 0).all() and (stats[:, 2 + c :] == 0).all()


def reference_backward(grad_z, x, mean, var, gamma, beta, batch_stats):
    """(dx, dgamma, dbeta) of relu(bn(x)) in float64 by autograd, the statistics held fixed as
    the block passes them (batch_stats: the batch statistics of x)."""
    xx = x.double().requires_grad_()
    gg, bb = gamma.double().requires_grad_(), beta.double().requires_grad_()
    if batch_stats:
        v, m = torch.var_mean(xx, dim=(0, 2, 3), correction=0)
    else:
        v, m = var.double(), mean.double()
    z = torch.relu((xx - ch(m)) * torch.rsqrt(ch(v) + 1e-5) * ch(gg) + ch(bb))
    return torch.autograd.grad(z, (xx, gg, bb), grad_z.double())


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("accumulate", [True, False])
def test_bn_relu_backward(isa, c, batch_stats, accumulate):
    x, grad_z, grad_x, mean, var, gamma, beta = problem(c)
    if batch_stats:
        var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        var, mean = var.float(), mean.float()
    dx, dgamma, dbeta = reference_backward(grad_z, x, mean, var, gamma, beta, batch_stats)
    expected = dx + grad_x.double() if accumulate else dx
    ours_g, ours_b = torch.empty(c), torch.empty(c)
    torch.ops.dense_ext.bn_relu_backward(
        grad_z, x, mean, var, gamma, beta, 1e-5, batch_stats, accumulate, grad_x, ours_g, ours_b
    )
    assert_close(grad_x, expected, 1e-5, "grad_x")
    assert_close(ours_g, dgamma, 1e-5, "grad_gamma")
    assert_close(ours_b, dbeta, 1e-5, "grad_beta")


@pytest.mark.parametrize("c", CHANNELS)
def test_bn_relu_backward_in_place(isa, c):
    """grad_z may be grad_x itself (the transition's backward): the same result as out of
    place; accumulating in place is refused."""
    x, grad_z, _, mean, var, gamma, beta = problem(c)
    args = (x, mean, var, gamma, beta, 1e-5, True)
    expected = torch.empty_like(grad_z)
    eg, eb = torch.empty(c), torch.empty(c)
    torch.ops.dense_ext.bn_relu_backward(grad_z, *args, False, expected, eg, eb)
    g = grad_z.clone()
    og, ob = torch.empty(c), torch.empty(c)
    torch.ops.dense_ext.bn_relu_backward(g, *args, False, g, og, ob)
    assert torch.equal(g, expected) and torch.equal(og, eg) and torch.equal(ob, eb)
    with pytest.raises(RuntimeError, match="cannot accumulate"):
        torch.ops.dense_ext.bn_relu_backward(g, *args, True, g, og, ob)


@pytest.mark.parametrize("c", CHANNELS)
def test_chunked_backward_equals_whole_batch(isa, c):
    """bn_relu_backward_reduce over chunks of images, then bn_relu_backward_apply."""
    x, grad_z, grad_x, mean, var, gamma, beta = problem(c)
    args = (mean, var, gamma, beta, 1e-5)
    expected = grad_x.clone()
    dgamma, dbeta = torch.empty(c), torch.empty(c)
    torch.ops.dense_ext.bn_relu_backward(grad_z, x, *args, True, True, expected, dgamma, dbeta)
    ours, sums = grad_x.clone(), torch.zeros(2, c)
    for n0, n1 in ((0, 1), (1, 3)):
        torch.ops.dense_ext.bn_relu_backward_reduce(
            grad_z[n0:n1], x[n0:n1], *args, ours[n0:n1], sums
        )
    torch.ops.dense_ext.bn_relu_backward_apply(x, *args, sums, x.numel() // c, ours)
    assert_close(ours, expected, 1e-5, "grad_x")
    assert_close(sums[0], dbeta, 1e-5, "sum g")
    assert_close(sums[1], dgamma, 1e-5, "sum g*xhat")


def at_threads(threads, op, *args):
    """op(*args) with torch on ``threads`` threads; the argument tensors it wrote, cloned."""
    with torch_threads(threads):
        op(*args)
    return [a.clone() for a in args if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("c", (1, 17, 100))
def test_results_do_not_depend_on_the_thread_count(isa, c):
    """The ops split rows into fixed tiles and chunks, not into one share per thread, so one
    thread and three (uneven shares) give the same bits. 33,924 rows: many statistics tiles,
    and several elementwise chunks even at one channel."""
    x, grad_z, grad_x, mean, var, gamma, beta = problem(c, shape=(4, 33, 257))
    ops = torch.ops.dense_ext
    runs = {
        "channel_stats": (ops.channel_stats, x, torch.zeros(2, c), 0),
        "bn_relu": (ops.bn_relu, x, mean, var, gamma, beta, 1e-5, cl(torch.empty(x.shape))),
        "bn_relu_backward": (
            ops.bn_relu_backward,
            *(grad_z, x, mean, var, gamma, beta, 1e-5, True, True),
            *(grad_x.clone(), torch.empty(c), torch.empty(c)),
        ),
    }
    for name, (op, *args) in runs.items():
        one = at_threads(1, op, *[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        three = at_threads(3, op, *args)
        for i, (a, b) in enumerate(zip(one, three)):
            assert torch.equal(a, b), f"{name}: tensor argument {i} differs between 1 and 3 threads"


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_store_is_the_same_on_every_isa(isa, c, p):
    """The mask is an integer hash of the element index, so every instruction set stores
    exactly the values of the portable loops."""
    from dense_ext import _C

    src = problem(c)[0]
    ours = cl(torch.zeros(src.shape))
    torch.ops.dense_ext.dropout_store(src, p, SEED, 4, ours)
    current = _C.cpu_isa()
    _C.set_cpu_isa("portable")
    try:
        expected = cl(torch.zeros(src.shape))
        torch.ops.dense_ext.dropout_store(src, p, SEED, 4, expected)
    finally:
        _C.set_cpu_isa(current)
    assert torch.equal(ours, expected)
    if p == 0:
        assert torch.equal(ours, src)


def test_nan_propagates_on_every_isa(isa):
    """relu(NaN) = NaN and threshold_backward's mask, in full vectors and in the tails."""
    c = 19
    x, grad_z, _, mean, var, gamma, beta = problem(c)
    x = x.clone()
    x[0, ::3, 0, 0] = float("nan")
    grad_z = grad_z.clone()
    grad_z[1, ::2, 1, 1] = float("nan")
    out = torch.empty_like(grad_z)
    torch.ops.dense_ext.bn_relu(x, mean, var, gamma, beta, 1e-5, out)
    pre = pre_activation(x, mean, var, gamma, beta)
    assert torch.equal(torch.isnan(out), torch.isnan(torch.relu(pre)))
    grad_x = torch.zeros_like(grad_z)
    dgamma, dbeta = torch.empty(c), torch.empty(c)
    torch.ops.dense_ext.bn_relu_backward(
        grad_z, x, mean, var, gamma, beta, 1e-5, False, False, grad_x, dgamma, dbeta
    )
    pre_ = pre.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.relu(pre_), pre_, grad_z.double())
    assert torch.equal(torch.isnan(grad_x), torch.isnan(expected))


@pytest.mark.parametrize("c", CHANNELS)
def test_folded_terms_equal_the_apply_of_each_bn(isa, c):
    """Two BNs that normalise the same channels with the same batch mean (different gamma, eps
    and sums): their terms folded by bn_grad_fold and added by one bn_grad_fold_apply equal
    bn_relu_backward_apply of each, and the fold adds exactly common/math.cuh's coefficients."""
    x, _, grad_x, mean, var, gamma, beta = problem(c)
    g = torch.Generator().manual_seed(1)
    bns = [
        (gamma, beta, 1e-5, torch.randn(2, c, generator=g)),
        (torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g), 1e-3, torch.randn(2, c)),
    ]
    count = x.numel() // c
    expected = grad_x.clone()
    for gam, bet, eps, sums in bns:
        torch.ops.dense_ext.bn_relu_backward_apply(
            x, mean, var, gam, bet, eps, sums, count, expected
        )
    wide = torch.zeros(2, c + 3)
    coef = wide[:, 2 : 2 + c]
    reference = torch.zeros(2, c, dtype=torch.float64)
    for gam, _, eps, sums in bns:
        torch.ops.dense_ext.bn_grad_fold(var, gam, eps, sums, count, coef)
        invstd = torch.rsqrt(var.double() + eps)
        reference[0] -= gam.double() * invstd * sums[0].double() / count
        reference[1] -= gam.double() * invstd * invstd * sums[1].double() / count
    assert_close(coef, reference, 1e-6, "coefficients")
    assert (wide[:, :2] == 0).all() and (wide[:, 2 + c :] == 0).all()
    ours = grad_x.clone()
    torch.ops.dense_ext.bn_grad_fold_apply(x, mean, coef, ours)
    assert_close(ours, expected, 1e-5, "grad_x")


@pytest.mark.parametrize("c", CHANNELS)
def test_reduce_then_fold_equals_bn_relu_backward(isa, c):
    """The block's schedule: bn_relu_backward_reduce over chunks, bn_grad_fold, then one
    bn_grad_fold_apply, equals bn_relu_backward with batch statistics, accumulated."""
    x, grad_z, grad_x, _, _, gamma, beta = problem(c)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    var, mean = var.float(), mean.float()
    args = (mean, var, gamma, beta, 1e-5)
    expected = grad_x.clone()
    dgamma, dbeta = torch.empty(c), torch.empty(c)
    torch.ops.dense_ext.bn_relu_backward(grad_z, x, *args, True, True, expected, dgamma, dbeta)
    ours, sums, coef = grad_x.clone(), torch.zeros(2, c), torch.zeros(2, c)
    for n0, n1 in ((0, 2), (2, 3)):
        torch.ops.dense_ext.bn_relu_backward_reduce(
            grad_z[n0:n1], x[n0:n1], *args, ours[n0:n1], sums
        )
    torch.ops.dense_ext.bn_grad_fold(var, gamma, 1e-5, sums, x.numel() // c, coef)
    torch.ops.dense_ext.bn_grad_fold_apply(x, mean, coef, ours)
    assert_close(ours, expected, 1e-5, "grad_x")
    assert_close(sums, torch.stack([dbeta, dgamma]), 1e-5, "sums")


def test_fold_ops_check_their_arguments():
    cpu_backend_or_skip("cpp")
    x, _, grad_x, mean, var, gamma, _ = problem(5)
    sums = torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="coef must be a \\[2, 5\\] tensor"):
        torch.ops.dense_ext.bn_grad_fold(var, gamma, 1e-5, sums, 10, torch.zeros(5, 2).t())
    with pytest.raises(RuntimeError, match="count must be positive"):
        torch.ops.dense_ext.bn_grad_fold(var, gamma, 1e-5, sums, 0, torch.zeros(2, 5))
    with pytest.raises(RuntimeError, match="coef must be Float, got Double"):
        torch.ops.dense_ext.bn_grad_fold_apply(x, mean, torch.zeros(2, 5).double(), grad_x)
    with pytest.raises(RuntimeError, match="mean must have shape \\[5\\]"):
        torch.ops.dense_ext.bn_grad_fold_apply(x, mean[:4], torch.zeros(2, 5), grad_x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (2, 3)])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "bn_kwargs", [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}]
)
def test_transition_backward_through_the_extension_matches_naive(
    monkeypatch, dtype, hw, train, bn_kwargs
):
    """EfficientTransition on channels_last CPU input (a block's output) runs its BN-ReLU
    backward through dense_ext::bn_relu_backward in place; it must match torchvision's order as
    the Python in-place path does (test_convert.py)."""
    cpu_backend_or_skip("cpp")
    from helpers import float64_oracle
    from test_convert import compare_modules, transition_pair

    import dense_ext.transition as transition

    calls = []
    fused = transition._bn_relu_backward_fused
    monkeypatch.setattr(
        transition, "_bn_relu_backward_fused", lambda *a: calls.append(1) or fused(*a)
    )
    naive, efficient = transition_pair(7, 3, dtype, **bn_kwargs)
    naive.train(train), efficient.train(train)
    oracle = float64_oracle(naive)
    x = cl(torch.randn(3, 7, *hw, dtype=dtype) * 1.5 + 0.7)
    compare_modules(naive, efficient, x, oracle)
    compare_modules(naive, efficient, x - 0.3, oracle)
    assert len(calls) == 2, "the extension's backward did not run"


# ---------------------------------------------------------------------------------------------
# conv3x3_weight_grad: the block's CPU weight gradient of its 3x3 convolutions (csrc/cpu/conv3x3.h)


def aten_weight_grad(grad_out, x):
    """ATen's weight gradient of a 3x3, stride-1, padding-1 convolution, in the inputs' dtype."""
    weight = torch.empty(grad_out.shape[1], x.shape[1], 3, 3, dtype=x.dtype)
    args = (None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])
    return torch.ops.aten.convolution_backward(grad_out, x, weight, *args)[1]


def weight_grad_reference(grad_out, x):
    """ATen's float64 weight gradient (im2col: the padding's zeros are multiplied in)."""
    return aten_weight_grad(grad_out.double(), x.double())


def conv_problem(n, co, ci, h, w, dtype=torch.float32, seed=0):
    """grad_out and the convolution input as channel slices (at 2 and 1) of wider channels_last
    buffers, as the block passes them."""
    g = torch.Generator().manual_seed(seed)
    x = cl(torch.randn(n, ci + 3, h, w, generator=g, dtype=dtype))[:, 2 : 2 + ci]
    grad_out = cl(torch.randn(n, co + 1, h, w, generator=g, dtype=dtype))[:, 1 : 1 + co]
    return grad_out, x


# Tile tails in every direction: output channels 1-13 (six-row tiles and each smaller one),
# input channels around the vector widths (4/8/16 float lanes, 2/4/8 double), images of one
# row or column, and the chunking of wide and tall images (256-row chunks, 16 groups).
CONV_CASES = [
    (2, 1, 1, 1, 1),
    (1, 3, 5, 1, 7),
    (2, 7, 17, 6, 1),
    (3, 13, 37, 5, 9),
    (2, 6, 8, 3, 3),
    (1, 12, 48, 32, 32),
    (2, 5, 33, 11, 300),
    (5, 32, 128, 7, 7),
    (9, 4, 16, 40, 3),
]


@pytest.mark.parametrize("n,co,ci,h,w", CONV_CASES)
def test_conv3x3_weight_grad(isa, n, co, ci, h, w):
    grad_out, x = conv_problem(n, co, ci, h, w)
    ours = torch.full((co, ci, 3, 3), float("nan"))
    torch.ops.dense_ext.conv3x3_weight_grad(grad_out, x, ours)
    expected = weight_grad_reference(grad_out, x)
    assert_close(ours, expected, TOL, "grad_weight")
    # ATen's own float32 gradient (oneDNN), for scale: ours must be no further from float64.
    aten = aten_weight_grad(grad_out, x)
    assert rel_err(ours, expected) <= 2 * rel_err(aten, expected) + 1e-7


@pytest.mark.parametrize("n,co,ci,h,w", CONV_CASES[:4])
def test_conv3x3_weight_grad_float64_is_exact(n, co, ci, h, w):
    cpu_backend_or_skip("cpp")
    grad_out, x = conv_problem(n, co, ci, h, w, dtype=torch.float64, seed=1)
    ours = torch.empty(co, ci, 3, 3, dtype=torch.float64)
    torch.ops.dense_ext.conv3x3_weight_grad(grad_out, x, ours)
    assert_close(ours, weight_grad_reference(grad_out, x), 1e-12, "grad_weight")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv3x3_weight_grad_16_bit_types_use_aten(dtype):
    """No loops of ours for the 16-bit types: the op returns ATen's gradient, bit for bit."""
    cpu_backend_or_skip("cpp")
    grad_out, x = conv_problem(2, 5, 9, 6, 7, dtype=dtype)
    ours = torch.empty(5, 9, 3, 3, dtype=dtype)
    torch.ops.dense_ext.conv3x3_weight_grad(grad_out, x, ours)
    assert torch.equal(ours, aten_weight_grad(grad_out, x))


def test_conv3x3_weight_grad_does_not_depend_on_the_thread_count(isa):
    """Chunks are summed in 16 fixed groups, added in group order: one thread and three give the
    same bits (a 2x64x64 image: 32 chunks)."""
    grad_out, x = conv_problem(2, 13, 37, 64, 64)
    one = at_threads(
        1, torch.ops.dense_ext.conv3x3_weight_grad, grad_out, x, torch.empty(13, 37, 3, 3)
    )
    three = at_threads(
        3, torch.ops.dense_ext.conv3x3_weight_grad, grad_out, x, torch.empty(13, 37, 3, 3)
    )
    assert torch.equal(one[2], three[2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv3x3_weight_grad_propagates_non_finite_values_as_aten(isa, dtype):
    """ATen's gradient sums g * 0 over the zero padding: a NaN or infinite g on an image border
    makes the taps that reach past that border NaN. Ours skips the padding and must give the
    same NaNs (a drop-in model fed a NaN does), and NaN/Inf inside the image as the sum does."""
    grad_out, x = conv_problem(3, 7, 10, 5, 6, dtype=dtype)
    grad_out[1, 2, 0, 3] = float("nan")  # first row: the taps with kh = 0
    grad_out[0, 4, 2, 5] = float("inf")  # last column: kw = 2
    grad_out[2, 6, 4, 0] = float("-inf")  # last row and first column
    x[1, 3, 2, 2] = float("inf")  # inside: with grad_out's zeros nowhere, plain sums
    ours = torch.empty(7, 10, 3, 3, dtype=dtype)
    torch.ops.dense_ext.conv3x3_weight_grad(grad_out, x, ours)
    expected = weight_grad_reference(grad_out, x)
    assert torch.equal(ours.isnan(), expected.isnan())
    assert_close(ours, expected, 1e-12 if dtype == torch.float64 else TOL, "grad_weight")


def test_conv3x3_weight_grad_of_an_empty_batch_is_zero():
    cpu_backend_or_skip("cpp")
    grad_out, x = conv_problem(0, 3, 4, 5, 5)
    ours = torch.full((3, 4, 3, 3), 7.0)
    torch.ops.dense_ext.conv3x3_weight_grad(grad_out, x, ours)
    assert torch.equal(ours, torch.zeros(3, 4, 3, 3))


def test_conv3x3_weight_grad_rejects_bad_input():
    cpu_backend_or_skip("cpp")
    op = torch.ops.dense_ext.conv3x3_weight_grad
    grad_out, x = conv_problem(2, 3, 4, 5, 6)
    out = torch.empty(3, 4, 3, 3)
    with pytest.raises(RuntimeError, match="grad_weight must have shape"):
        op(grad_out, x, torch.empty(3, 4, 1, 1))
    with pytest.raises(RuntimeError, match="same batch and image size"):
        op(conv_problem(2, 3, 4, 4, 6)[0], x, out)
    with pytest.raises(RuntimeError, match="grad_out has dtype"):
        op(grad_out.double(), x, out)
    with pytest.raises(RuntimeError, match="grad_weight has dtype"):
        op(grad_out, x, out.double())
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(grad_out, x, torch.empty(4, 3, 3, 3).transpose(0, 1))
    with pytest.raises(RuntimeError, match="input must be channels_last"):
        op(grad_out, x.contiguous(), out)
    with pytest.raises(RuntimeError, match="must be float64/float32"):
        op(grad_out.int(), x.int(), out.int())


@pytest.mark.parametrize("bn_size", [None, 4])
def test_cpp_block_backward_takes_its_3x3_weight_gradients_from_conv3x3_weight_grad(bn_size):
    """One conv3x3_weight_grad call per layer in a CPU block backward (the op's results reach
    the parameters: the block tests compare them with the naive block's)."""
    cpu_backend_or_skip("cpp")
    from torch.profiler import ProfilerActivity, profile

    from dense_ext import EfficientDenseBlock

    block = EfficientDenseBlock(3, 5, 4, bn_size, backend="cpp")
    x = cl(torch.randn(2, 5, 6, 7))
    out = block(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.sum().backward()
    names = [e.name for e in prof.events()]
    assert names.count("dense_ext::conv3x3_weight_grad") == 3
