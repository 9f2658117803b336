"""The ops of dense_ext._C one by one: opcheck (schema, fake kernels, autograd registration,
AOT dispatch), CUDA registration when built with CUDA, each op against a plain-torch formula,
and the CUDA backend against the reference (marked ``cuda``; skipped without a GPU). Nothing
here queries the GPU at import or collection time.
"""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch
from helpers import assert_close, cpu_backend_or_skip, cuda_or_skip, ieee_fp32

OPS = (
    "channel_stats",
    "bn_relu",
    "bn_relu_backward",
    "bn_relu_backward_reduce",
    "bn_relu_backward_apply",
    "bn_grad_fold",
    "bn_grad_fold_apply",
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


def sample_args(device="cpu", dtype=torch.float32, c=5, lo=1):
    """Arguments of every op on a small problem; x and grad_x are channel slices of wider
    buffers (x starts at channel ``lo``)."""
    torch.manual_seed(0)
    acc = acc_of(dtype)
    n, h, w = 2, 3, 5
    wide = cl(torch.randn(n, c + 4, h, w, device=device, dtype=dtype) * 3 + 2)
    x = wide[:, lo : lo + c]
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


def seed_of(like, value):
    """dropout_store's seed: a one-element int64 tensor on the device of ``like``."""
    return torch.tensor([value], dtype=torch.int64, device=like.device)


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
        sizes += [spec.in_channels(layer)] + ([spec.mid_channels] if spec.has_bottleneck else [])
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
    factor = spec.bottleneck_factor
    fwd = (x, params, running, eps, flags, drops, seed, spec.growth_rate, factor, keep, True)
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
        "bn_relu_backward_reduce": ["grad_x", "sums"],
        "bn_relu_backward_apply": ["grad_x"],
        "bn_grad_fold": ["coef"],
        "bn_grad_fold_apply": ["grad_x"],
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
        ops.bn_relu_backward_reduce,
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
        ops.bn_relu_backward_apply,
        (a["x"], a["mean"], a["var"], a["gamma"], a["beta"], 1e-5, a["sums"], 30, a["grad_x"]),
    )
    torch.library.opcheck(ops.dropout_store, (a["x"], 0.3, seed_of(a["x"], 17), 1, a["out"]))
    torch.library.opcheck(ops.dropout_store, (a["x"], 0.0, seed_of(a["x"], 17), 1, a["out"]))
    coef = torch.randn(2, 8, dtype=acc_of(dtype))[:, 1:6]  # a channel range, rows contiguous
    torch.library.opcheck(ops.bn_grad_fold, (a["var"], a["gamma"], 1e-5, a["sums"], 30, coef))
    torch.library.opcheck(ops.bn_grad_fold_apply, (a["x"], a["mean"], coef, a["grad_x"]))


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
    """bn_relu_backward_reduce over row chunks, then bn_relu_backward_apply, equals
    bn_relu_backward over all rows."""
    a = sample_args(dtype=torch.float64, c=6)
    ops = torch.ops.dense_ext
    args = (a["mean"], a["var"], a["gamma"], a["beta"], 1e-5)
    expected = a["grad_x"].clone()
    dgamma, dbeta = torch.empty_like(a["gamma"]), torch.empty_like(a["beta"])
    ops.bn_relu_backward(a["grad_z"], a["x"], *args, batch_stats, True, expected, dgamma, dbeta)
    ours = a["grad_x"].clone()
    sums = torch.zeros(2, 6, dtype=torch.float64)
    for n in range(a["x"].shape[0]):  # one image per chunk
        ops.bn_relu_backward_reduce(
            a["grad_z"][n : n + 1], a["x"][n : n + 1], *args, ours[n : n + 1], sums
        )
    if batch_stats:
        rows = a["x"].numel() // a["x"].shape[1]
        ops.bn_relu_backward_apply(a["x"], *args, sums, rows, ours)
    assert_close(ours, expected, 1e-12, "grad_x")
    assert_close(sums[0], dbeta, 1e-12, "sum g")
    assert_close(sums[1], dgamma, 1e-12, "sum g*xhat")


def test_dropout_store_writes_only_its_slice():
    src = cl(torch.randn(2, 3, 4, 4))
    feat = cl(torch.zeros(2, 7, 4, 4))
    torch.ops.dense_ext.dropout_store(src, 0.5, seed_of(src, 3), 0, feat[:, 2:5])
    assert (feat[:, :2] == 0).all() and (feat[:, 5:] == 0).all()
    written = feat[:, 2:5]
    kept = written != 0
    assert torch.equal(written[kept], src[kept] * 2)


def test_dropout_store_reads_its_seed_from_the_tensor():
    """The seed is read from the tensor when the op runs (on CUDA by the kernel, from device
    memory): changing the tensor in place changes the mask, as a CUDA-graph replay that redraws
    the seed with torch.randint does."""
    src = cl(torch.randn(2, 5, 6, 6))
    seed = seed_of(src, 11)
    masks = []
    for value in (11, 12, 11):
        seed.fill_(value)
        dst = torch.empty_like(src)
        torch.ops.dense_ext.dropout_store(src, 0.5, seed, 0, dst)
        masks.append(dst == 0)
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
        torch.ops.dense_ext.dropout_store(src, 0.5, torch.tensor([1.0]), 0, dst)
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 tensor"):
        torch.ops.dense_ext.dropout_store(src, 0.5, torch.tensor([1, 2]), 0, dst)


@pytest.mark.cuda
def test_cuda_graph_replays_draw_new_dropout_masks():
    """A CUDA graph that draws the seed with torch.randint and runs dropout_store: every replay
    gives a new mask (a seed passed by value would be frozen into the graph)."""
    cuda_or_skip()
    src = cl(torch.randn(2, 8, 16, 16, device="cuda"))
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    dst = torch.empty_like(src)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.dense_ext.dropout_store(src, 0.5, seed, 0, dst)  # warm-up outside capture
        with torch.cuda.graph(graph):
            seed.copy_(torch.randint(0, 2**62, (1,), device="cuda"))
            torch.ops.dense_ext.dropout_store(src, 0.5, seed, 0, dst)
    torch.cuda.current_stream().wait_stream(stream)
    masks = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        masks.append((dst == 0).cpu())
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


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
    monkeypatch.setattr(backends._REGISTRY, "_warned", set())
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
        ops.bn_relu_backward_reduce,
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
        ops.bn_relu_backward_apply,
        (a["x"], a["mean"], a["var"], a["gamma"], a["beta"], 1e-5, a["sums"], 30, a["grad_x"]),
    )
    torch.library.opcheck(ops.dropout_store, (a["x"], 0.3, seed_of(a["x"], 17), 1, a["out"]))
    _, fwd = block_args(device="cuda", dtype=torch.float32, drop=0.2)
    torch.library.opcheck(ops.block_forward, fwd)


def same_view_on(t, device):
    """``t`` rebuilt on ``device``: its whole storage copied, then the same sizes, strides and
    offset (``.to(device)`` would compact a channel slice into a dense tensor)."""
    numel = t.untyped_storage().nbytes() // t.element_size()
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (numel,), (1,))
    view = flat.to(device).as_strided(t.shape, t.stride(), t.storage_offset())
    assert view.stride() == t.stride() and view.storage_offset() == t.storage_offset()
    return view


def test_same_view_on_keeps_strides():
    a = sample_args(c=7)
    v = same_view_on(a["x"], "cpu")
    assert v.stride() == a["x"].stride() and v.stride(3) == 11 != v.shape[1]
    assert torch.equal(v, a["x"]) and v.untyped_storage().data_ptr() != a["x"].data_ptr()


# dtype -> tolerance of the CUDA-vs-CPU comparison: the same formulas, rsqrtf and another
# summation order; 16-bit results may differ by an ulp after rounding.
CROSS_DEVICE_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(CROSS_DEVICE_TOL), ids=str)
@pytest.mark.parametrize("c, lo", [(37, 1), (36, 2), (36, 1)], ids=["odd", "even", "misaligned"])
def test_cuda_kernels_match_cpu_kernels(dtype, c, lo):
    """The same op on both devices, on the same strided channel slices (row stride != C):
    same arithmetic (common/math.cuh), same dropout masks. Even slices at even offsets take the
    CUDA kernels' two-channel vector path for 16-bit types, the others the scalar path."""
    cuda_or_skip()
    a = sample_args(dtype=dtype, c=c, lo=lo)
    g = {k: same_view_on(v, "cuda") for k, v in a.items()}
    assert g["x"].stride(3) != c and g["grad_x"].stride(3) != c, "not a strided slice"
    ops = torch.ops.dense_ext
    ops.channel_stats(a["x"], a["stats"], 2)
    ops.channel_stats(g["x"], g["stats"], 2)
    tol = CROSS_DEVICE_TOL[dtype]
    stats_tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32 statistics of the same data
    assert_close(g["stats"].cpu(), a["stats"], stats_tol, "channel_stats")
    out = a["out"].clone()
    ops.bn_relu(a["x"], a["mean"], a["var"], a["gamma"], a["beta"], 1e-5, out)
    ops.bn_relu(g["x"], g["mean"], g["var"], g["gamma"], g["beta"], 1e-5, g["out"])
    assert_close(g["out"].cpu(), out, tol, "bn_relu")
    ops.dropout_store(a["x"], 0.3, seed_of(a["x"], 17), 1, a["out"])
    ops.dropout_store(g["x"], 0.3, seed_of(g["x"], 17), 1, g["out"])
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
        ops.bn_relu_backward_reduce(
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
        ops.bn_relu_backward_apply(
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
    """cpp on CUDA vs the reference backend on CUDA. float32: 1e-4 (TF32 off, restored after);
    bfloat16: error against the float32 reference at most ~2x the reference's own error."""
    cuda_or_skip()
    from helpers import rel_err

    from dense_ext import EfficientDenseBlock

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
        xx = x.detach().to(dt).requires_grad_()  # its own leaf (x.to(float32) is x)
        out = block(xx)
        out.backward(grad.to(dt))
        return [out.float(), xx.grad.float(), *[p.grad.float() for p in block.parameters()]]

    with ieee_fp32():
        expected = run(ref32, torch.float32)
        ours = run(blocks["cpp"], dtype)
        theirs = run(blocks["reference"], dtype)
    for i, (o, t, e) in enumerate(zip(ours, theirs, expected)):
        if dtype == torch.float32:
            assert_close(o, t, 1e-4, f"tensor {i}")
        else:
            assert rel_err(o, e) <= 2 * rel_err(t, e) + 1e-2, (i, rel_err(o, e), rel_err(t, e))


def test_ieee_fp32_restores_the_settings():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    with ieee_fp32():
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    assert (matmul.fp32_precision, conv.fp32_precision) == before


@pytest.mark.cuda
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
def test_cuda_batches_larger_than_one_chunk(memory):
    """On CUDA the bottleneck layers run BN1-ReLU-Conv1x1 in chunks of 65536 rows
    (csrc/block.cpp chunk_images): 3 images of 160x160 (25600 rows each) make chunks of 2 and 1
    images, so the chunked BN backward (reduce per chunk, then apply) crosses a boundary."""
    cuda_or_skip()
    from naive import NaiveDenseBlock, randomize_bn

    from dense_ext import EfficientDenseBlock

    n, c0, hw = 3, 5, 160
    assert (n - 1) * hw * hw < 65536 < n * hw * hw
    torch.manual_seed(4)
    naive = NaiveDenseBlock(2, c0, 3, 4, 0.0).double().cuda()
    randomize_bn(naive)
    cpp = EfficientDenseBlock(2, c0, 3, 4, 0.0, memory=memory, backend="cpp").double().cuda()
    cpp.load_state_dict(naive.state_dict())
    x = torch.randn(n, c0, hw, hw, dtype=torch.float64, device="cuda") + 0.5
    grad = torch.randn(n, c0 + 6, hw, hw, dtype=torch.float64, device="cuda")
    results = []
    for block in (cpp, naive):
        xx = x.clone().requires_grad_()
        out = block(xx)
        out.backward(grad)
        results.append([out.detach(), xx.grad, *[p.grad for p in block.parameters()]])
    for i, (ours, theirs) in enumerate(zip(*results)):
        assert_close(ours, theirs, 1e-10, f"tensor {i}")


# --- NaN and Inf propagate exactly as BatchNorm2d + torch.relu do ---------------------------


def nonfinite_pattern(t):
    """Where t is NaN, +Inf and -Inf: three boolean masks."""
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def assert_same_nonfinite(actual, expected, what):
    for kind, a, e in zip(
        ("NaN", "+Inf", "-Inf"), nonfinite_pattern(actual), nonfinite_pattern(expected)
    ):
        assert torch.equal(a, e), (
            f"{what}: {kind} at {int(a.sum())} positions, naive at {int(e.sum())}"
        )
    finite = torch.isfinite(expected)
    if finite.any():
        assert_close(actual[finite], expected[finite], 1e-10, f"{what} (finite values)")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("bn_size", [None, 4])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("train", [True, False])
def test_nonfinite_input_propagates_like_the_naive_block(value, bn_size, memory, train):
    """One NaN/Inf input pixel: the cpp block puts NaN/Inf exactly where the naive block does, in
    the output, the input gradient and every parameter gradient (relu(NaN) = NaN, the ReLU
    gradient mask of threshold_backward, BN sums that carry NaN)."""
    from naive import NaiveDenseBlock, randomize_bn

    from dense_ext import EfficientDenseBlock

    torch.manual_seed(0)
    naive = NaiveDenseBlock(3, 4, 3, bn_size, 0.0).double()
    randomize_bn(naive)
    cpp = EfficientDenseBlock(3, 4, 3, bn_size, 0.0, memory=memory, backend="cpp").double()
    cpp.load_state_dict(naive.state_dict())
    naive.train(train)
    cpp.train(train)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    x[1, 2, 3, 1] = value
    grad = torch.randn(2, 13, 5, 6, dtype=torch.float64)
    results = []
    for block in (cpp, naive):
        xx = x.clone().requires_grad_()
        out = block(xx)
        out.backward(grad)
        results.append((out.detach(), xx.grad, {n: p.grad for n, p in block.named_parameters()}))
    (out, gx, grads), (out_n, gx_n, grads_n) = results
    assert_same_nonfinite(out, out_n, "output")
    assert_same_nonfinite(gx, gx_n, "input gradient")
    for name, g in grads_n.items():
        assert_same_nonfinite(grads[name], g, f"grad of {name}")
    if not train and value != -float("inf"):  # eval: local, so a zeroed NaN would show
        new = out[:, 4:]
        assert 0 < int((~torch.isfinite(new)).sum()) < new.numel()


def test_ops_propagate_nan_like_torch():
    """bn_relu and bn_relu_backward on a NaN pre-activation and a NaN gradient, against
    torch.relu/threshold_backward; dropout keeps NaN where it drops (NaN * 0, as F.dropout)."""
    c = 3
    x = cl(torch.zeros(1, c, 2, 2, dtype=torch.float64))
    x[0, 0, 0, 0] = float("nan")  # NaN pre-activation
    x[0, 1, 0, 1] = -1.0  # ReLU off
    x[0, 2, 1, 1] = 1.0  # ReLU on
    mean, var = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    gamma, beta = torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    out = torch.empty_like(x)
    torch.ops.dense_ext.bn_relu(x, mean, var, gamma, beta, 0.0, out)
    assert torch.equal(torch.isnan(out), torch.isnan(torch.relu(x)))
    grad_z = cl(torch.full_like(x, float("nan")))
    grad_z[0, 0, 0, 0] = 2.0
    xr = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(torch.relu(xr), xr, grad_z)
    grad_x = cl(torch.zeros_like(x))
    dgamma, dbeta = torch.empty_like(gamma), torch.empty_like(beta)
    torch.ops.dense_ext.bn_relu_backward(
        grad_z, x, mean, var, gamma, beta, 0.0, False, False, grad_x, dgamma, dbeta
    )
    assert torch.equal(torch.isnan(grad_x), torch.isnan(expected)), (grad_x, expected)
    src = cl(torch.full((2, 3, 4, 4), float("nan")))
    dst = torch.zeros_like(src)
    torch.ops.dense_ext.dropout_store(src, 0.5, seed_of(src, 3), 0, dst)
    assert torch.isnan(dst).all()


# --- nothing to compute: zero channels or zero rows ------------------------------------------


def empty_calls(shape, dtype=torch.float32):
    """(op, args) of every kernel op on a problem with nothing to compute; grad_gamma/grad_beta
    start as NaN so that a missing zero shows."""
    n, c, h, w = shape
    acc = acc_of(dtype)
    x, out, grad_z = (cl(torch.randn(shape, dtype=dtype)) for _ in range(3))
    grad_x = cl(torch.randn(shape, dtype=dtype))
    vec = [torch.ones(c, dtype=acc) for _ in range(4)]
    dgamma, dbeta = (
        torch.full((c,), float("nan"), dtype=acc),
        torch.full((c,), float("nan"), dtype=acc),
    )
    sums = torch.zeros(2, c, dtype=acc)
    calls = [
        ("bn_relu", (x, *vec, 1e-5, out)),
        ("bn_relu_backward", (grad_z, x, *vec, 1e-5, True, True, grad_x, dgamma, dbeta)),
        ("bn_relu_backward_reduce", (grad_z, x, *vec, 1e-5, grad_x, sums)),
        ("bn_relu_backward_apply", (x, *vec, 1e-5, sums, 7, grad_x)),
        ("bn_grad_fold_apply", (x, vec[0], torch.zeros(2, c, dtype=acc), grad_x)),
        ("dropout_store", (x, 0.5, seed_of(x, 3), 0, out)),
    ]
    if n * h * w > 0:  # statistics of no rows are an error (below)
        calls.append(("channel_stats", (x, torch.zeros(2, c + 1, dtype=acc), 1)))
    return calls, (dgamma, dbeta)


EMPTY_SHAPES = [(2, 0, 3, 3), (0, 4, 3, 3), (3, 4, 0, 5)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ops_with_nothing_to_compute(shape):
    calls, (dgamma, dbeta) = empty_calls(shape)
    for op, args in calls:
        getattr(torch.ops.dense_ext, op)(*args)
    assert (dgamma == 0).all() and (dbeta == 0).all(), "sums over no rows must be zero"
    with pytest.raises(RuntimeError, match="no rows"):
        torch.ops.dense_ext.channel_stats(cl(torch.randn(0, 3, 2, 2)), torch.zeros(2, 3), 0)


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_ops_return_before_touching_the_device(shape):
    """The CUDA implementations, called through the dispatcher's CUDA key on CPU tensors (no GPU
    needed): with nothing to compute they return after the checks, before the device guard and
    before the launch configuration (which divided by the channel count)."""
    from dense_ext import _C

    if not _C.with_cuda:
        pytest.skip("dense_ext._C was built without CUDA kernels")
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    calls, (dgamma, dbeta) = empty_calls(shape)
    for op, args in calls:
        getattr(torch.ops.dense_ext, op).default.redispatch(cuda, *args)
    assert (dgamma == 0).all() and (dbeta == 0).all()


# --- does the GPU at hand run the built CUDA code? -------------------------------------------


@pytest.mark.parametrize(
    "capability, runs",
    [
        ((8, 0), True),
        ((8, 6), True),
        ((9, 0), True),
        ((10, 0), True),
        ((12, 0), True),
        ((7, 5), False),
        ((7, 0), False),
    ],
)
def test_arch_reason(capability, runs):
    from dense_ext.backends.cpp import arch_reason

    reason = arch_reason(capability, [80, 90], [90])
    assert (reason is None) == runs, reason
    assert arch_reason((10, 0), [80, 90], []) is not None, "SASS alone does not run on sm_100"
    assert arch_reason((8, 6), [90], [90]) is not None


def test_auto_falls_back_when_the_gpu_cannot_run_the_build(monkeypatch):
    """A GPU the fatbin has no code for: `cpp` by name raises, `auto` falls back with a warning
    that names the compute capability. A GPU it has code for runs the probe launch once."""
    import dense_ext.backends as backends
    import dense_ext.backends.cpp as cpp
    from dense_ext import _C

    monkeypatch.setattr(cpp, "has_kernel", lambda op, key: True)
    monkeypatch.setattr(_C, "cuda_sass", "80_90", raising=False)
    monkeypatch.setattr(_C, "cuda_ptx", "90", raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cpp, "_PROBED", {})
    probes = []
    monkeypatch.setattr(cpp, "probe_launch", lambda device: probes.append(device))
    monkeypatch.setattr(backends._REGISTRY, "_warned", set())
    monkeypatch.delenv("DENSE_EXT_BACKEND", raising=False)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    with pytest.raises(backends.BackendUnavailableError, match="compute capability 7.5"):
        backends.resolve_backend_name("cpp", "cuda")
    with warnings.catch_warnings(record=True) as caught:  # triton's reason warns here too
        warnings.simplefilter("always")
        assert backends.resolve_backend_name("auto", "cuda") == "reference"
    assert [w for w in caught if "compute capability 7.5" in str(w.message)], caught
    assert probes == []

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 0))
    assert backends.resolve_backend_name("cpp", "cuda:0") == "cpp"
    assert backends.resolve_backend_name("cpp", "cuda:0") == "cpp"
    assert probes == [torch.device("cuda", 0)], "the probe runs once per device"

    monkeypatch.setattr(cpp, "_PROBED", {0: "a test launch failed: no kernel image"})
    with pytest.raises(backends.BackendUnavailableError, match="no kernel image"):
        backends.resolve_backend_name("cpp", "cuda")


def test_probe_launch_runs_a_kernel():
    from dense_ext.backends.cpp import probe_launch

    assert probe_launch(torch.device("cpu")) is None


def count_casts(fn) -> int:
    """How many dtype conversions (aten::to) a dense_ext driver ``fn`` dispatches itself (not
    those inside ATen ops it calls, e.g. oneDNN's weight conversions in a bfloat16 convolution)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        e.name == "aten::to"
        and e.cpu_parent is not None
        and e.cpu_parent.name.startswith("dense_ext")
        for e in prof.events()
    )


def test_half_bn_vectors_are_converted_once_per_call():
    """With bfloat16 BN parameters and running statistics, the drivers convert them to the
    accumulation dtype once per call (one cast of all of them), not per layer and pass: on a GPU
    each cast is a kernel launch (issue 11.6). Float32 ones are used as they are."""
    for bn_size in (0, 2):
        spec, fwd = block_args(dtype=torch.bfloat16, bn_size=bn_size, batch_stats="mixed")
        outputs = torch.ops.dense_ext.block_forward(*fwd)
        grad = cl(torch.randn_like(outputs[0]))
        bwd = backward_args(fwd, grad, outputs)
        ops = torch.ops.dense_ext
        assert count_casts(functools.partial(ops.block_forward, *fwd)) <= 1, bn_size
        assert count_casts(functools.partial(ops.block_backward, *bwd)) <= 1, bn_size
    spec, fwd = block_args(dtype=torch.float32, bn_size=2, batch_stats="mixed")
    assert count_casts(functools.partial(torch.ops.dense_ext.block_forward, *fwd)) == 0
