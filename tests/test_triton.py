"""The ``triton`` backend: fused kernels against the naive block and the reference backend.

On machines without a GPU the very same kernels and launchers run under Triton's interpreter
(``TRITON_INTERPRET=1``, set below before any kernel is defined) on small CPU tensors, with
sizes chosen so that every masked edge is exercised: ``M = N*H*W`` not a multiple of the row
tile, input channels crossing the 16-wide channel tile (11 -> 17), bottleneck width 24.

Tests marked ``cuda`` run the compiled kernels on a GPU; they skip without one and never
query the GPU at import or collection time. Run them on a GPU machine with
``TRITON_INTERPRET=0 pytest tests/test_triton.py -m cuda`` (Triton fixes interpreted vs
compiled when the kernels are first defined, i.e. per process).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything defines the kernels

import copy  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import TOLERANCE, assert_close, cuda_or_skip, rel_err  # noqa: E402
from naive import NaiveDenseBlock, randomize_bn  # noqa: E402

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
    cuda_or_skip()
    reason = unavailable_reason("triton", "cuda")
    if reason is not None:
        pytest.skip(f"triton backend unavailable on cuda: {reason}")


def make_pair(bn_size, drop_rate, memory, dtype, device="cpu", seed=0, backend="triton"):
    torch.manual_seed(seed)
    naive = NaiveDenseBlock(L, C0, K, bn_size, drop_rate).to(device=device, dtype=dtype)
    randomize_bn(naive)
    block = EfficientDenseBlock(L, C0, K, bn_size, drop_rate, memory=memory, backend=backend)
    block = block.to(device=device, dtype=dtype)
    block.load_state_dict(naive.state_dict())
    return naive, block


def buffers(module):
    return {
        k: v.clone() for k, v in module.state_dict().items() if "running" in k or "batches" in k
    }


def step(module, x, grad, seed):
    """One forward + backward; output, input grad, parameter grads, buffers after forward
    and after backward."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = module(x)
    after_forward = buffers(module)
    out.backward(grad.to(out.dtype))
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out.detach(), x.grad, grads, after_forward, buffers(module)


def check_against(expected, actual, tol):
    out_n, gx_n, grads_n, fwd_n, bwd_n = expected
    out_e, gx_e, grads_e, fwd_e, bwd_e = actual
    assert_close(out_e, out_n, tol, "output")
    assert_close(gx_e, gx_n, tol, "input gradient")
    assert grads_e.keys() == grads_n.keys()
    for name, g in grads_n.items():
        assert grads_e[name] is not None, f"{name}: no gradient"
        assert_close(grads_e[name], g, tol, f"grad {name}")
    for name, v in fwd_n.items():
        assert_close(fwd_e[name].double(), v.double(), tol, f"{name} after forward")
        assert_close(bwd_e[name].double(), bwd_n[name].double(), tol, f"{name} after backward")


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
    check_against(step(naive, x, grad, 5), step(block, x, grad, 5), TOLERANCE[torch.float32])


@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_block_matches_naive_with_dropout(bn_size):
    triton_cpu_or_skip()
    naive, block = make_pair(bn_size, 0.3, "min", torch.float32)
    x, grad = inputs(torch.float32)
    expected, actual = step(naive, x, grad, 7), step(block, x, grad, 7)
    # the masks really dropped something, and the same things
    assert (expected[0][:, C0:] == 0).float().mean() > 0.15
    assert torch.equal(actual[0][:, C0:] == 0, expected[0][:, C0:] == 0)
    check_against(expected, actual, TOLERANCE[torch.float32])


@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_block_matches_naive_float64(bn_size, memory):
    triton_cpu_or_skip()
    if bn_size == 0 and memory == "min":
        pytest.skip("plain layers keep no bottleneck: both memory modes are the same code")
    naive, block = make_pair(bn_size, 0.0, memory, torch.float64)
    x, grad = inputs(torch.float64)
    check_against(step(naive, x, grad, 3), step(block, x, grad, 3), TOLERANCE[torch.float64])


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
    check_against(step(naive, x, grad, 0), step(block, x, grad, 0), TOLERANCE[torch.float64])


# ----------------------------------------------------------------------------------------------
# Backend level: statistics, saved state, against the reference backend
# ----------------------------------------------------------------------------------------------


def backend_call(name, spec, x, params, save=True):
    """One backend forward with batch statistics for every BN, no dropout."""
    from dense_ext import BlockCall, NormCall
    from dense_ext.backends import get_backend

    backend = get_backend(name, x.device)
    norms = [NormCall(eps=1e-5, batch_stats=True)] * (spec.num_layers * spec.bns_per_layer)
    call = BlockCall(spec, backend, norms, [0.0] * spec.num_layers, save=save)
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

    spec = BlockSpec(L, C0, K, bn_size=4, memory=memory)
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

    spec = BlockSpec(L, C0, K, bn_size=4, memory="bottleneck")
    x, _ = inputs(torch.float32)
    params = random_params(spec, torch.float32)
    _, state = backend_call("triton", spec, x, params, save=False)
    assert state.bottlenecks == []


def test_channel_statistics_are_stable_for_large_means():
    """Values 1000 + 0.1*N(0,1) in float32: variance to float32 rounding of the data, where
    E[x^2] - E[x]^2 in float32 would lose every digit."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton.stats import channel_stats

    g = torch.Generator().manual_seed(0)
    m, c_total = 150, 21
    data = torch.randn(2, c_total, 5, 15, generator=g) * 0.1 + 1000.0
    data[:, 3] = torch.randn(2, 5, 15, generator=g) * 3.0 - 50.0  # one ordinary channel
    feat = data.contiguous(memory_format=torch.channels_last)
    assert feat.shape[0] * feat.shape[2] * feat.shape[3] == m
    stats = torch.full((2, c_total), float("nan"))
    channel_stats(feat, 2, 17, stats, 2, c_total + 2)  # channels [2, 19) into columns [2, 19)
    var, mean = torch.var_mean(
        data.double().permute(0, 2, 3, 1).reshape(m, c_total), dim=0, correction=0
    )
    assert torch.isnan(stats[:, :2]).all() and torch.isnan(stats[:, 19:]).all(), "wrote outside"
    assert_close(stats[0, 2:19], mean[2:19], 1e-6, "mean")
    rel_var = ((stats[1, 2:19].double() - var[2:19]).abs() / var[2:19]).max().item()
    assert rel_var < 1e-4, f"variance relative error {rel_var:.2e}"


def test_epilogue_statistics_are_stable_for_large_means():
    """The statistics fused into the convolution epilogues (stats2 of Y1, stats1 of the new
    channels) on a block whose outputs have means ~1000x their spread: BN shifts of 1000, and
    3x3 weights whose only non-zero tap is the centre (so zero padding adds no spread)."""
    triton_cpu_or_skip()
    from dense_ext.spec import BlockSpec

    spec = BlockSpec(L, C0, K, bn_size=4)
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
    """fwd, wgrad and dgrad+BN-ReLU backward of one step against torch autograd (float64),
    with C_in=17, C_out=20, M=70, a dropout mask and channel offsets in wider buffers."""
    triton_cpu_or_skip()
    from dense_ext.backends.triton.conv_dgrad import (
        conv_dgrad_bn_relu_apply,
        conv_dgrad_bn_relu_reduce,
    )
    from dense_ext.backends.triton.conv_fwd import bn_relu_conv_fwd, conv_weight_taps
    from dense_ext.backends.triton.conv_wgrad import bn_relu_conv_wgrad

    torch.manual_seed(0)
    dt = torch.float64
    n, h, w, c_in, c_out, c_total = 2, 5, 7, 17, 20, 40
    buf = torch.randn(n, c_total, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)
    x = buf[:, 1 : 1 + c_in].detach().clone().requires_grad_()
    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    gamma, beta = torch.rand(c_in, dtype=dt) + 0.5, torch.randn(c_in, dtype=dt) * 0.5
    weight = torch.randn(c_out, c_in, ks, ks, dtype=dt)
    mask = (torch.rand(n, c_out, h, w, dtype=dt) > 0.3).to(dt) / 0.7
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
    bn_relu_conv_fwd(
        buf, 1, c_in, mean, invstd, gamma, beta, w_taps, y, 2, mask, stats, 0, c_out, h, w
    )
    assert_close(y[:, 2 : 2 + c_out], out.detach(), 1e-12, "forward")
    assert (y[:, :2] == 7).all() and (y[:, 2 + c_out :] == 7).all(), (
        "forward wrote outside its slice"
    )
    var_o, mean_o = torch.var_mean(out.detach(), dim=(0, 2, 3), correction=0)
    assert_close(stats[0], mean_o, 1e-12, "output mean")
    assert_close(stats[1], var_o, 1e-12, "output variance")

    gbuf = torch.zeros(n, c_out + 5, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)
    gbuf[:, 5:] = dout
    grad_w = bn_relu_conv_wgrad(
        gbuf, 5, c_out, mask, buf, 1, c_in, mean, invstd, gamma, beta, ks, h, w
    )
    assert_close(grad_w, w_.grad, 1e-12, "weight gradient")
    sums = conv_dgrad_bn_relu_reduce(
        gbuf, 5, mask, w_taps, buf, 1, c_in, mean, invstd, gamma, beta, h, w
    )
    assert_close(sums[0], b_.grad, 1e-12, "grad beta")
    assert_close(sums[1], g_.grad, 1e-12, "grad gamma")
    dx = torch.ones(n, c_in + 1, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)
    conv_dgrad_bn_relu_apply(
        gbuf,
        5,
        mask,
        w_taps,
        buf,
        1,
        c_in,
        mean,
        invstd,
        gamma,
        beta,
        sums,
        dx,
        1,
        True,
        True,
        h,
        w,
    )
    assert_close(dx[:, 1:] - 1, x.grad, 1e-12, "input gradient (accumulated)")
    assert (dx[:, 0] == 1).all(), "dgrad wrote outside its slice"


# ----------------------------------------------------------------------------------------------
# Low precision (interpreted): at most 2x PyTorch's own error against a float64 reference
# ----------------------------------------------------------------------------------------------


def norm_err(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def low_precision_check(results, reference, naive_low, dtype):
    """Per tensor (norm-wise relative error against float64): err(triton) <= 2 * err(naive
    at dtype) + machine epsilon of dtype."""
    unit = torch.finfo(dtype).eps
    out_r, gx_r, grads_r, *_ = reference
    out_l, gx_l, grads_l, *_ = naive_low
    out_t, gx_t, grads_t, *_ = results
    pairs = [("output", out_t, out_l, out_r), ("input gradient", gx_t, gx_l, gx_r)]
    pairs += [(f"grad {n}", grads_t[n], grads_l[n], grads_r[n]) for n in grads_r]
    for what, t, low, ref in pairs:
        err_t, err_l = norm_err(t, ref), norm_err(low, ref)
        assert err_t <= 2 * err_l + unit, (
            f"{what}: error {err_t:.2e} > 2 x PyTorch's {err_l:.2e} + {unit:.0e}"
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_low_precision_within_twice_pytorch_error(bn_size, dtype):
    triton_cpu_or_skip()
    naive64, _ = make_pair(bn_size, 0.0, "min", torch.float64)
    x, grad = inputs(torch.float64)
    reference = step(naive64, x, grad, 0)
    naive_low = copy.deepcopy(naive64).to(dtype)
    block = EfficientDenseBlock(L, C0, K, bn_size, memory="min", backend="triton").to(dtype)
    block.load_state_dict(naive64.state_dict())
    low_precision_check(
        step(block, x.to(dtype), grad, 0), reference, step(naive_low, x.to(dtype), grad, 0), dtype
    )


def test_autocast_picks_the_buffer_dtype():
    """Under CPU autocast (bfloat16) the block runs its kernels on a bfloat16 buffer with
    float32 parameters, and is as accurate as the naive block under the same autocast."""
    triton_cpu_or_skip()
    naive, block = make_pair(4, 0.0, "bottleneck", torch.float32)
    x, grad = inputs(torch.float32)
    reference = step(copy.deepcopy(naive).double(), x.double(), grad.double(), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        naive_low = step(naive, x, grad, 0)
        results = step(block, x, grad, 0)
    assert out.dtype == torch.bfloat16 and results[0].dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert all(p.grad.dtype == torch.float32 for p in block.parameters())
    low_precision_check(results, reference, naive_low, torch.bfloat16)


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
    """Every kernel variant a block launches compiles to a cubin for sm_90 (float32 with tf32,
    float64) and fits the shared memory: the compiled path the interpreter does not exercise.
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
        "90",
        "--dtypes",
        "float32",
        "float64",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(" ok ") == 2 * 8 + 2, done.stdout


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
    ):
        schema = str(getattr(ns, op).default._schema)
        assert schema.startswith(f"dense_ext_triton::{op}"), schema
    assert re.search(r"Tensor\(a\d*!\) y,", str(ns.bn_relu_conv_fwd.default._schema))
    assert re.search(r"Tensor\(a\d*!\)\? stats,", str(ns.bn_relu_conv_fwd.default._schema))
    assert re.search(r"Tensor\(a\d*!\) dx,", str(ns.conv_dgrad_bn_relu_apply.default._schema))
    assert "!" not in str(ns.bn_relu_conv_wgrad.default._schema)


# ----------------------------------------------------------------------------------------------
# GPU: compiled kernels (skipped without a CUDA GPU)
# ----------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_cuda_within_twice_pytorch_error(bn_size, memory, dtype):
    """Compiled kernels (tf32 for float32 when cuDNN may use it) against a float64 naive
    block: at most 2x the error of the naive block (cuDNN) at the same precision."""
    triton_cuda_or_skip()
    naive64, _ = make_pair(bn_size, 0.2, memory, torch.float64, device="cuda")
    shape = (4, C0, 16, 16)
    x, grad = inputs(torch.float64, "cuda", shape=shape)
    reference = step(naive64, x, grad, 0)
    naive_low = copy.deepcopy(naive64).to(dtype)
    block = EfficientDenseBlock(L, C0, K, bn_size, 0.2, memory=memory, backend="triton")
    block = block.to(device="cuda", dtype=dtype)
    block.load_state_dict(naive64.state_dict())
    low_precision_check(
        step(block, x.to(dtype), grad, 0), reference, step(naive_low, x.to(dtype), grad, 0), dtype
    )


@pytest.mark.cuda
@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck_layer", "plain_layer"])
def test_cuda_float64_exact(bn_size):
    triton_cuda_or_skip()
    naive, block = make_pair(bn_size, 0.0, "min", torch.float64, device="cuda")
    x, grad = inputs(torch.float64, "cuda")
    check_against(step(naive, x, grad, 0), step(block, x, grad, 0), TOLERANCE[torch.float64])


@pytest.mark.cuda
def test_cuda_torch_compile_without_graph_breaks():
    triton_cuda_or_skip()
    import torch._dynamo

    torch.manual_seed(0)
    block = EfficientDenseBlock(2, 8, 4, 2, memory="min", backend="triton").cuda()
    x = torch.randn(2, 8, 9, 9, device="cuda", requires_grad=True)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    expected = block(x)
    expected.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    out = torch.compile(block, fullgraph=True)(x)
    out.sum().backward()
    assert rel_err(out, expected) < 1e-6
    assert rel_err(x.grad, grad) < 1e-6
