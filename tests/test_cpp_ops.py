"""The ops of dense_ext._C one by one: opcheck (schema, fake kernels, autograd registration,
AOT dispatch), CUDA registration when built with CUDA, each op against a plain-torch formula,
and the CUDA backend against the reference (marked ``cuda``; skipped without a GPU). Nothing
here queries the GPU at import or collection time.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_close, cpu_backend_or_skip, cuda_or_skip

OPS = (
    "channel_stats",
    "bn_relu",
    "bn_relu_backward",
    "bn_relu_grad_acc",
    "bn_grad_correct",
    "dropout_store",
    "block_forward",
    "block_backward",
)


# Tests that run (and must pass) whether or not the extension loads: `make test` builds it, so
# a build that does not load fails here instead of skipping everything else silently.
_NEVER_SKIPPED = (
    "test_a_broken_extension_falls_back_to_reference",
    "test_every_op_has_cpu_and_cuda_kernels_when_built_with_cuda",
)


@pytest.fixture(autouse=True)
def _needs_extension(request):
    if request.function.__name__ not in _NEVER_SKIPPED:
        cpu_backend_or_skip("cpp")


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def sample_args(device="cpu", dtype=torch.float32, c=5):
    """Arguments of every op on a small problem; buffers are channel slices of wider buffers."""
    torch.manual_seed(0)
    acc = acc_of(dtype)
    n, h, w = 2, 3, 5
    wide = cl(torch.randn(n, c + 4, h, w, device=device, dtype=dtype) * 3 + 2)
    x = wide[:, 1 : 1 + c]
    stats = torch.zeros(2, c + 3, device=device, dtype=acc)
    mean = torch.randn(c, device=device, dtype=acc)
    var = torch.rand(c, device=device, dtype=acc) + 0.5
    gamma = torch.rand(c, device=device, dtype=acc) + 0.5
    beta = torch.randn(c, device=device, dtype=acc)
    out = cl(torch.zeros(n, c, h, w, device=device, dtype=dtype))
    grad_z = cl(torch.randn(n, c, h, w, device=device, dtype=dtype))
    grad_x = cl(torch.randn(n, c + 2, h, w, device=device, dtype=dtype))[:, :c]
    return dict(
        x=x,
        stats=stats,
        mean=mean,
        var=var,
        gamma=gamma,
        beta=beta,
        out=out,
        grad_z=grad_z,
        grad_x=grad_x,
        dgamma=torch.zeros(c, device=device, dtype=acc),
        sums=torch.randn(2, c, device=device, dtype=acc),
        dbeta=torch.zeros(c, device=device, dtype=acc),
    )


def block_args(device="cpu", dtype=torch.float64, bn_size=2, batch_stats=True, drop=0.0, keep=True):
    """The arguments of block_forward (and the pieces block_backward reuses) for a tiny block.

    ``batch_stats``: True/False for every BN, or "mixed" (alternating per BN)."""
    from dense_ext.spec import BlockSpec

    torch.manual_seed(0)
    spec = BlockSpec(2, 3, 2, bn_size)
    params = [
        (torch.rand(s, dtype=dtype, device=device) + 0.5)
        if len(s) == 1
        else torch.randn(s, dtype=dtype, device=device) * 0.3
        for s in spec.param_shapes()
    ]
    nbn = spec.num_layers * spec.bns_per_layer
    flags = [batch_stats if batch_stats != "mixed" else bool(i % 2) for i in range(nbn)]
    sizes = []
    for layer in range(spec.num_layers):
        sizes += [spec.in_channels(layer)] + ([spec.mid_channels] if spec.bottleneck else [])
    running = []  # (mean, var) per BN; empty placeholders for BNs with batch statistics
    for c, flag in zip(sizes, flags):
        if flag:
            running += [torch.empty(0, dtype=dtype, device=device)] * 2
        else:
            running += [
                torch.randn(c, dtype=dtype, device=device),
                torch.rand(c, dtype=dtype, device=device) + 0.5,
            ]
    x = torch.randn(2, 3, 4, 5, dtype=dtype, device=device)
    eps = [1e-5] * nbn
    drops = [drop] * spec.num_layers
    seed = torch.tensor([99], dtype=torch.int64, device=device)
    fwd = (x, params, running, eps, flags, drops, seed, spec.growth_rate, spec.bn_size, keep, True)
    return spec, fwd


def backward_args(fwd, grad, outputs):
    x, params, running, eps, flags, drops, seed, k, bn_size, _, _ = fwd
    feat, s1, s2, bott = outputs
    return (grad, feat, s1, s2, bott, params, running, eps, flags, drops, seed, k, bn_size)


def test_op_schemas_mark_written_buffers():
    mutated = {
        "channel_stats": ["stats"],
        "bn_relu": ["out"],
        "bn_relu_backward": ["grad_x", "grad_gamma", "grad_beta"],
        "dropout_store": ["dst"],
        "bn_relu_grad_acc": ["grad_x", "sums"],
        "bn_grad_correct": ["grad_x"],
        "block_backward": ["grad_feat"],
        "block_forward": [],
    }
    for op in OPS:
        schema = getattr(torch.ops.dense_ext, op).default._schema
        written = [
            a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
        ]
        assert written == mutated[op], (op, written)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_kernels(dtype):
    a = sample_args(dtype=dtype)
    ops = torch.ops.dense_ext
    torch.library.opcheck(ops.channel_stats, (a["x"], a["stats"], 2))
    torch.library.opcheck(
        ops.bn_relu, (a["x"], a["mean"], a["var"], a["gamma"], a["beta"], 1e-5, a["out"])
    )
    for batch_stats in (True, False):
        for accumulate in (True, False):
            torch.library.opcheck(
                ops.bn_relu_backward,
                (
                    a["grad_z"],
                    a["x"],
                    a["mean"],
                    a["var"],
                    a["gamma"],
                    a["beta"],
                    1e-5,
                    batch_stats,
                    accumulate,
                    a["grad_x"],
                    a["dgamma"],
                    a["dbeta"],
                ),
            )
    torch.library.opcheck(
        ops.bn_relu_grad_acc,
        (
            a["grad_z"],
            a["x"],
            a["mean"],
            a["var"],
            a["gamma"],
            a["beta"],
            1e-5,
            a["grad_x"],
            a["sums"],
        ),
    )
    torch.library.opcheck(
        ops.bn_grad_correct,
        (a["x"], a["mean"], a["var"], a["gamma"], a["beta"], 1e-5, a["sums"], 30, a["grad_x"]),
    )
    torch.library.opcheck(ops.dropout_store, (a["x"], 0.3, 17, 1, a["out"]))
    torch.library.opcheck(ops.dropout_store, (a["x"], 0.0, 17, 1, a["out"]))


@pytest.mark.parametrize("bn_size", [0, 2])
@pytest.mark.parametrize("batch_stats", [True, False, "mixed"])
@pytest.mark.parametrize("keep", [True, False])
def test_opcheck_block_ops(bn_size, batch_stats, keep):
    for drop in (0.0, 0.25):
        _, fwd = block_args(bn_size=bn_size, batch_stats=batch_stats, drop=drop, keep=keep)
        torch.library.opcheck(torch.ops.dense_ext.block_forward, fwd)
        outputs = torch.ops.dense_ext.block_forward(*fwd)
        grad = torch.randn_like(outputs[0]).contiguous(memory_format=torch.channels_last)
        bwd = backward_args(fwd, grad, outputs)
        torch.library.opcheck(torch.ops.dense_ext.block_backward, bwd)


# --- each op against a plain torch formula -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_channel_stats_accurate_with_large_means(dtype, offset):
    """Mean and variance of the (rounded) data to the accumulation precision, also when the mean
    is 1e5 standard deviations (no E[x^2]-E[x]^2 cancellation, no Welford drift)."""
    torch.manual_seed(3)
    std = 20.0 if dtype == torch.bfloat16 else 0.01  # bfloat16's ulp at 1000 is 4
    x = cl((torch.randn(3, 7, 33, 17, dtype=torch.float64) * std + offset).to(dtype))
    stats = torch.zeros(2, 11, dtype=acc_of(dtype))
    torch.ops.dense_ext.channel_stats(x, stats, 2)
    # Two-pass float64 truth (torch.var_mean's one-pass Welford drifts by 1e-11 here).
    mean = x.double().mean(dim=(0, 2, 3))
    var = (x.double() - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
    unit = 1e-13 if dtype == torch.float64 else 1e-6  # ~8 ulps of the accumulation dtype
    mean_err = ((stats[0, 2:9].double() - mean).abs() / (mean.abs() + var.sqrt())).max().item()
    var_err = ((stats[1, 2:9].double() - var).abs() / var).max().item()
    assert mean_err <= unit, mean_err
    assert var_err <= unit, var_err
    assert (stats[:, :2] == 0).all() and (stats[:, 9:] == 0).all(), "wrote outside its columns"


def test_bn_relu_and_backward_match_autograd():
    a = sample_args(dtype=torch.float64)
    x = a["x"].detach().clone().requires_grad_()
    mean, var, gamma, beta = a["mean"], a["var"], a["gamma"], a["beta"]
    ch = lambda v: v.view(1, -1, 1, 1)
    for batch_stats in (True, False):
        gamma_ = gamma.clone().requires_grad_()
        beta_ = beta.clone().requires_grad_()
        if batch_stats:
            v, m = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        else:
            v, m = var, mean
        z = torch.relu((x - ch(m)) * torch.rsqrt(ch(v) + 1e-5) * ch(gamma_) + ch(beta_))
        out = torch.empty_like(a["out"])
        torch.ops.dense_ext.bn_relu(a["x"], m.detach(), v.detach(), gamma, beta, 1e-5, out)
        assert_close(out, z.detach(), 1e-12, "bn_relu")
        gx, gg, gb = torch.autograd.grad(z, (x, gamma_, beta_), a["grad_z"])
        grad_x = a["grad_x"].clone()
        before = grad_x.clone()
        dgamma, dbeta = torch.empty_like(gamma), torch.empty_like(beta)
        torch.ops.dense_ext.bn_relu_backward(
            a["grad_z"],
            a["x"],
            m.detach(),
            v.detach(),
            gamma,
            beta,
            1e-5,
            batch_stats,
            True,
            grad_x,
            dgamma,
            dbeta,
        )
        assert_close(grad_x, before + gx, 1e-12, "grad_x accumulated")
        assert_close(dgamma, gg, 1e-12, "grad_gamma")
        assert_close(dbeta, gb, 1e-12, "grad_beta")


@pytest.mark.parametrize("batch_stats", [True, False])
def test_chunked_bn_backward_equals_whole_batch(batch_stats):
    """bn_relu_grad_acc over row chunks + bn_grad_correct == bn_relu_backward over all rows."""
    a = sample_args(dtype=torch.float64, c=6)
    ops = torch.ops.dense_ext
    args = (a["mean"], a["var"], a["gamma"], a["beta"], 1e-5)
    expected = a["grad_x"].clone()
    dgamma, dbeta = torch.empty_like(a["gamma"]), torch.empty_like(a["beta"])
    ops.bn_relu_backward(a["grad_z"], a["x"], *args, batch_stats, True, expected, dgamma, dbeta)
    ours = a["grad_x"].clone()
    sums = torch.zeros(2, 6, dtype=torch.float64)
    for n in range(a["x"].shape[0]):  # one image per chunk
        ops.bn_relu_grad_acc(
            a["grad_z"][n : n + 1], a["x"][n : n + 1], *args, ours[n : n + 1], sums
        )
    if batch_stats:
        rows = a["x"].numel() // a["x"].shape[1]
        ops.bn_grad_correct(a["x"], *args, sums, rows, ours)
    assert_close(ours, expected, 1e-12, "grad_x")
    assert_close(sums[0], dbeta, 1e-12, "sum g")
    assert_close(sums[1], dgamma, 1e-12, "sum g*xhat")


def test_dropout_store_writes_only_its_slice():
    src = cl(torch.randn(2, 3, 4, 4))
    feat = cl(torch.zeros(2, 7, 4, 4))
    torch.ops.dense_ext.dropout_store(src, 0.5, 3, 0, feat[:, 2:5])
    assert (feat[:, :2] == 0).all() and (feat[:, 5:] == 0).all()
    written = feat[:, 2:5]
    kept = written != 0
    assert torch.equal(written[kept], src[kept] * 2)


# --- registration and CUDA ---------------------------------------------------------------


def _cuda_build_expected() -> bool:
    flag = os.environ.get("DENSE_EXT_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return torch.version.cuda is not None and os.path.exists(nvcc)


def test_a_broken_extension_falls_back_to_reference(monkeypatch):
    """`auto` falls back to reference with one warning; asking for `cpp` by name raises."""
    import dense_ext.backends as backends
    import dense_ext.backends.cpp as cpp

    monkeypatch.setattr(cpp, "_LOAD_ERROR", "ImportError: simulated")
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.delenv("DENSE_EXT_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="simulated"):
        assert backends.resolve_backend_name("auto", "cpu") == "reference"
    with pytest.raises(backends.BackendUnavailableError, match="simulated"):
        backends.resolve_backend_name("cpp", "cpu")


def test_every_op_has_cpu_and_cuda_kernels_when_built_with_cuda():
    from dense_ext.backends.cpp import _LOAD_ERROR

    assert _LOAD_ERROR is None, f"dense_ext._C does not load: {_LOAD_ERROR}"
    from dense_ext import _C
    from dense_ext.backends.cpp import OPS as BACKEND_OPS
    from dense_ext.backends.cpp import has_kernel

    assert set(BACKEND_OPS) == set(OPS)
    assert bool(_C.with_cuda) == _cuda_build_expected(), "CUDA part built iff expected"
    for op in OPS:
        assert has_kernel(op, "CPU"), op
        assert has_kernel(op, "CUDA") == bool(_C.with_cuda), op


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_kernels_cuda(dtype):
    cuda_or_skip()
    a = sample_args(device="cuda", dtype=dtype)
    ops = torch.ops.dense_ext
    torch.library.opcheck(ops.channel_stats, (a["x"], a["stats"], 2))
    torch.library.opcheck(
        ops.bn_relu, (a["x"], a["mean"], a["var"], a["gamma"], a["beta"], 1e-5, a["out"])
    )
    torch.library.opcheck(
        ops.bn_relu_backward,
        (
            a["grad_z"],
            a["x"],
            a["mean"],
            a["var"],
            a["gamma"],
            a["beta"],
            1e-5,
            True,
            True,
            a["grad_x"],
            a["dgamma"],
            a["dbeta"],
        ),
    )
    torch.library.opcheck(
        ops.bn_relu_grad_acc,
        (
            a["grad_z"],
            a["x"],
            a["mean"],
            a["var"],
            a["gamma"],
            a["beta"],
            1e-5,
            a["grad_x"],
            a["sums"],
        ),
    )
    torch.library.opcheck(
        ops.bn_grad_correct,
        (a["x"], a["mean"], a["var"], a["gamma"], a["beta"], 1e-5, a["sums"], 30, a["grad_x"]),
    )
    torch.library.opcheck(ops.dropout_store, (a["x"], 0.3, 17, 1, a["out"]))
    _, fwd = block_args(device="cuda", dtype=torch.float32, drop=0.2)
    torch.library.opcheck(ops.block_forward, fwd)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_kernels_match_cpu_kernels(dtype):
    """The same op on both devices: same arithmetic (math.cuh), same dropout masks."""
    cuda_or_skip()
    a = sample_args(dtype=dtype, c=37)
    g = {k: v.cuda() for k, v in a.items()}
    ops = torch.ops.dense_ext
    ops.channel_stats(a["x"], a["stats"], 2)
    ops.channel_stats(g["x"], g["stats"], 2)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(g["stats"].cpu(), a["stats"], tol, "channel_stats")
    ops.dropout_store(a["x"], 0.3, 17, 1, a["out"])
    ops.dropout_store(g["x"], 0.3, 17, 1, g["out"])
    assert torch.equal(g["out"].cpu() == 0, a["out"] == 0), "dropout masks differ"
    for args in (a, g):
        ops.bn_relu_backward(
            args["grad_z"],
            args["x"],
            args["mean"],
            args["var"],
            args["gamma"],
            args["beta"],
            1e-5,
            True,
            True,
            args["grad_x"],
            args["dgamma"],
            args["dbeta"],
        )
    assert_close(g["grad_x"].cpu(), a["grad_x"], tol, "grad_x")
    assert_close(g["dgamma"].cpu(), a["dgamma"], tol, "dgamma")
    for args in (a, g):
        ops.bn_relu_grad_acc(
            args["grad_z"],
            args["x"],
            args["mean"],
            args["var"],
            args["gamma"],
            args["beta"],
            1e-5,
            args["grad_x"],
            args["sums"],
        )
        ops.bn_grad_correct(
            args["x"],
            args["mean"],
            args["var"],
            args["gamma"],
            args["beta"],
            1e-5,
            args["sums"],
            30,
            args["grad_x"],
        )
    assert_close(g["grad_x"].cpu(), a["grad_x"], tol, "grad_x (chunked form)")
    assert_close(g["sums"].cpu(), a["sums"], tol, "sums")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 4])
def test_cuda_backend_matches_reference(dtype, memory, bn_size):
    """cpp on CUDA vs the reference backend on CUDA. float32: 1e-4 (TF32 off); bfloat16: error
    against the float32 reference at most ~2x the reference's own bfloat16 error."""
    cuda_or_skip()
    from conftest import rel_err

    from dense_ext import EfficientDenseBlock

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    blocks = {}
    ref32 = EfficientDenseBlock(4, 16, 8, bn_size, memory=memory, backend="reference").cuda()
    for backend in ("cpp", "reference"):
        blocks[backend] = (
            EfficientDenseBlock(4, 16, 8, bn_size, memory=memory, backend=backend).cuda().to(dtype)
        )
        blocks[backend].load_state_dict(ref32.state_dict())
    x = torch.randn(4, 16, 9, 11, device="cuda") * 2 + 1
    grad = torch.randn(4, 48, 9, 11, device="cuda")

    def run(block, dt):
        xx = x.to(dt).requires_grad_()
        out = block(xx)
        out.backward(grad.to(dt))
        return [out.float(), xx.grad.float(), *[p.grad.float() for p in block.parameters()]]

    expected = run(ref32, torch.float32)
    ours = run(blocks["cpp"], dtype)
    theirs = run(blocks["reference"], dtype)
    for i, (o, t, e) in enumerate(zip(ours, theirs, expected)):
        if dtype == torch.float32:
            assert_close(o, t, 1e-4, f"tensor {i}")
        else:
            assert rel_err(o, e) <= 2 * rel_err(t, e) + 1e-2, (i, rel_err(o, e), rel_err(t, e))
