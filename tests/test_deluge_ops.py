"""The DelugeNet ops of dense_ext._C one by one: each against a plain-torch formula, opcheck
(schema, fake kernels, AOT dispatch), CUDA registration when built with CUDA, and clear errors
for bad arguments. Nothing here queries the GPU at import or collection time.
"""

from __future__ import annotations

import pytest
import torch
from deluge_helpers import backend_or_skip
from helpers import assert_close

from dense_ext.backends import cpp as block_cpp
from dense_ext.deluge import EfficientDelugeStage
from dense_ext.deluge.backends import cpp
from dense_ext.deluge.backends.base import LayerNorms, StageCall
from dense_ext.deluge.function import norm_call

ACC = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32}


@pytest.fixture(autouse=True)
def _needs_cpp():
    backend_or_skip("cpp")


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def cldc_args(dtype, k=3, c=5, total_slots=4, n=2, h=3, w=7, seed=0):
    """A slot buffer with more slots than the CLDC reads (a channel slice, row stride > k*C)
    and the [k, C] tables."""
    g = torch.Generator().manual_seed(seed)
    acc = ACC[dtype]
    buf = cl(torch.randn(n, total_slots * c, h, w, generator=g, dtype=torch.float64).to(dtype))
    table = lambda: torch.randn(k, c, generator=g, dtype=torch.float64).to(acc)  # noqa: E731
    return dict(
        x=buf[:, : k * c],
        mean=table(),
        scale=table(),
        shift=torch.randn(c, generator=g, dtype=torch.float64).to(acc),
        out=cl(torch.empty(n, c, h, w, dtype=dtype)),
        grad_y=cl(torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)),
        alpha=table(),
        beta=table(),
        gamma=table(),
        grad_x=cl(torch.randn(n, total_slots * c, h, w, generator=g).to(dtype))[:, : k * c],
        sums=torch.empty(k + 1, c, dtype=acc),
        k=k,
        c=c,
    )


def slots(a):
    return [a["x"][:, i * a["c"] : (i + 1) * a["c"]].to(ACC[a["x"].dtype]) for i in range(a["k"])]


def channel(v):
    return v.view(1, -1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ops_against_torch_formulas(dtype):
    a = cldc_args(dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    xs = slots(a)
    ops = torch.ops.dense_ext

    ops.cldc_forward(a["x"], a["mean"], a["scale"], a["shift"], a["out"])
    expected = channel(a["shift"]) + sum(
        channel(a["scale"][i]) * (xs[i] - channel(a["mean"][i])) for i in range(a["k"])
    )
    assert_close(a["out"], expected, tol, "cldc_forward")

    ops.cldc_grad_sums(a["grad_y"], a["x"], a["mean"], a["sums"])
    g = a["grad_y"].to(ACC[dtype])
    for i in range(a["k"]):
        ref = (g * (xs[i] - channel(a["mean"][i]))).sum(dim=(0, 2, 3))
        assert_close(a["sums"][i], ref, tol, f"cldc_grad_sums[{i}]")
    assert_close(a["sums"][a["k"]], g.sum(dim=(0, 2, 3)), tol, "cldc_grad_sums[k]")

    before = a["grad_x"].to(ACC[dtype]).clone()
    ops.cldc_grad_apply(
        a["grad_y"], a["x"], a["mean"], a["alpha"], a["beta"], a["gamma"], a["grad_x"]
    )
    for i in range(a["k"]):
        part = slice(i * a["c"], (i + 1) * a["c"])
        delta = channel(a["alpha"][i]) * g - channel(a["beta"][i])
        delta = delta - channel(a["gamma"][i]) * (xs[i] - channel(a["mean"][i]))
        assert_close(a["grad_x"][:, part], before[:, part] + delta, tol, f"cldc_grad_apply[{i}]")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("next_slots", [0, 1, 2])
def test_grad_step_and_correct_against_torch_formulas(dtype, next_slots):
    """The stage backward's one pass over a CLDC's slots (sums, alpha * g into every slot,
    optionally the forward of a CLDC over the first slots) and the deferred correction."""
    a = cldc_args(dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    xs, g, acc = slots(a), a["grad_y"].to(ACC[dtype]), ACC[dtype]
    before = a["grad_x"].to(acc).clone()
    nxt = [None] * 4
    if next_slots:
        nxt = [
            a["beta"][:next_slots].contiguous(),
            a["gamma"][:next_slots].contiguous(),
            a["shift"] * 2,
            cl(torch.empty_like(a["out"])),
        ]
    torch.ops.dense_ext.cldc_grad_step(
        a["grad_y"], a["x"], a["mean"], a["alpha"], a["grad_x"], a["sums"], *nxt
    )
    for i in range(a["k"]):
        ref = (g * (xs[i] - channel(a["mean"][i]))).sum(dim=(0, 2, 3))
        assert_close(a["sums"][i], ref, tol, f"sums[{i}]")
        part = slice(i * a["c"], (i + 1) * a["c"])
        step = before[:, part] + channel(a["alpha"][i]) * g
        assert_close(a["grad_x"][:, part], step, tol, f"grad_x[{i}]")
    assert_close(a["sums"][a["k"]], g.sum(dim=(0, 2, 3)), tol, "sums[k]")
    if next_slots:
        mean, scale, shift, out = nxt
        expected = channel(shift) + sum(
            channel(scale[i]) * (xs[i] - channel(mean[i])) for i in range(next_slots)
        )
        assert_close(out, expected, tol, "next_out")
    before = a["grad_x"].to(acc).clone()
    torch.ops.dense_ext.cldc_grad_correct(a["x"], a["mean"], a["beta"], a["gamma"], a["grad_x"])
    for i in range(a["k"]):
        part = slice(i * a["c"], (i + 1) * a["c"])
        delta = -channel(a["beta"][i]) - channel(a["gamma"][i]) * (xs[i] - channel(a["mean"][i]))
        assert_close(a["grad_x"][:, part], before[:, part] + delta, tol, f"correct[{i}]")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_cldc_ops(dtype):
    a = cldc_args(dtype)
    ops = torch.ops.dense_ext
    torch.library.opcheck(ops.cldc_forward, (a["x"], a["mean"], a["scale"], a["shift"], a["out"]))
    torch.library.opcheck(ops.cldc_grad_sums, (a["grad_y"], a["x"], a["mean"], a["sums"]))
    torch.library.opcheck(
        ops.cldc_grad_apply,
        (a["grad_y"], a["x"], a["mean"], a["alpha"], a["beta"], a["gamma"], a["grad_x"]),
    )
    step = (a["grad_y"], a["x"], a["mean"], a["alpha"], a["grad_x"], a["sums"])
    torch.library.opcheck(ops.cldc_grad_step, (*step, None, None, None, None))
    nxt = (a["beta"][:2].contiguous(), a["gamma"][:2].contiguous(), a["shift"], a["out"])
    torch.library.opcheck(ops.cldc_grad_step, (*step, *nxt))
    torch.library.opcheck(
        ops.cldc_grad_correct, (a["x"], a["mean"], a["beta"], a["gamma"], a["grad_x"])
    )


def stage_args(training: bool, keep: bool):
    torch.manual_seed(0)
    stage = EfficientDelugeStage(4, 3, memory="bottleneck" if keep else "min", backend="cpp")
    stage.train(training)
    x0 = torch.randn(2, 4, 3, 5)
    norms = [
        LayerNorms(*[None if m is None else norm_call(m) for m in _pad(layer.norms())])
        for layer in stage.layers()
    ]
    call = StageCall(stage.spec, cpp.get_backend(), norms, save=True)
    running, eps, flags = cpp.norm_arguments(call)
    params = [p.detach() for p in stage._flat_params(x0, x0.dtype)]
    return x0, params, running, eps, flags


def _pad(norms):
    return norms if len(norms) == 4 else [None, *norms]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("keep", [True, False])
def test_opcheck_stage_ops(training, keep):
    x0, params, running, eps, flags = stage_args(training, keep)
    ops = torch.ops.dense_ext
    fwd = (x0, params, running, eps, flags, 3, keep, True)
    torch.library.opcheck(ops.deluge_stage_forward, fwd)
    buf, slot_stats, layer_stats, kept = ops.deluge_stage_forward(*fwd)
    grad = cl(torch.randn_like(buf))
    bwd = (grad, buf, slot_stats, layer_stats, kept, params, running, eps, flags)
    torch.library.opcheck(ops.deluge_stage_backward, bwd)


def test_every_op_has_cuda_kernels_when_built_with_cuda():
    from dense_ext import _C

    if not _C.with_cuda:
        pytest.skip("dense_ext._C was built without CUDA")
    missing = [op for op in cpp.OPS if not block_cpp.has_kernel(op, "CUDA")]
    assert missing == []


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(mean=a["mean"][:, :4].contiguous()), "mean must be \\[k, C\\]"),
        (lambda a: a.update(scale=a["scale"].double()), "scale must be Float"),
        (lambda a: a.update(shift=a["shift"][:3]), "shift must have shape"),
        (lambda a: a.update(out=a["out"].contiguous()), "out must be channels_last"),
        (lambda a: a.update(out=cl(torch.empty(2, 4, 3, 7))), "out must be \\[2, 5, 3, 7\\]"),
        (lambda a: a.update(x=a["x"].contiguous()), "x must be channels_last"),
        (lambda a: a.update(x=a["x"].long()), "x must be float64/float32"),
    ],
)
def test_cldc_forward_bad_arguments(change, match):
    a = cldc_args(torch.float32)
    change(a)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dense_ext.cldc_forward(a["x"], a["mean"], a["scale"], a["shift"], a["out"])


def test_grad_ops_bad_arguments():
    a = cldc_args(torch.float32)
    with pytest.raises(RuntimeError, match="sums must be a contiguous \\[4, 5\\]"):
        torch.ops.dense_ext.cldc_grad_sums(a["grad_y"], a["x"], a["mean"], a["sums"][:3])
    with pytest.raises(RuntimeError, match="grad_x has shape"):
        torch.ops.dense_ext.cldc_grad_apply(
            a["grad_y"], a["x"], a["mean"], a["alpha"], a["beta"], a["gamma"], a["out"]
        )


def test_grad_step_next_arguments_go_together():
    a = cldc_args(torch.float32)
    step = (a["grad_y"], a["x"], a["mean"], a["alpha"], a["grad_x"], a["sums"])
    with pytest.raises(RuntimeError, match="go together"):
        torch.ops.dense_ext.cldc_grad_step(*step, a["beta"], None, None, None)
    too_many = torch.zeros(4, 5)
    with pytest.raises(RuntimeError, match="next_mean must be \\[k', 5\\] with 1 <= k' <= 3"):
        torch.ops.dense_ext.cldc_grad_step(*step, too_many, too_many, a["shift"], a["out"])


def test_stage_driver_bad_arguments():
    x0, params, running, eps, flags = stage_args(True, False)
    ops = torch.ops.dense_ext
    with pytest.raises(RuntimeError, match="params must hold 20 tensors"):
        ops.deluge_stage_forward(x0, params[:-1], running, eps, flags, 3, False, True)
    with pytest.raises(RuntimeError, match="eps and batch_stats must hold 8 values"):
        ops.deluge_stage_forward(x0, params, running, eps[:-1], flags, 3, False, True)
    with pytest.raises(RuntimeError, match="must have shape \\[2, 4, 1, 1\\]"):
        bad = list(params)
        bad[2] = torch.randn(2, 3, 1, 1)
        ops.deluge_stage_forward(x0, bad, running, eps, flags, 3, False, True)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        ops.deluge_stage_forward(x0[:1, :, :1, :1], params, running, eps, flags, 3, False, True)


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False])
def test_cuda_stage_and_model_match_naive(training):
    """The CUDA kernels and the CUDA registration of the stage driver, against the naive model
    on the same GPU (float64)."""
    from deluge_helpers import compare_models, compare_stage, make_model_pair, make_stage_pair
    from helpers import cuda_or_skip

    from dense_ext.deluge.backends import unavailable_reason

    cuda_or_skip()
    if unavailable_reason("cpp", "cuda") is not None:
        pytest.skip(unavailable_reason("cpp", "cuda"))
    naive, efficient = make_stage_pair(40, 5, "cpp")
    naive.cuda().train(training), efficient.cuda().train(training)
    x = torch.randn(3, 40, 9, 7, dtype=torch.float64, device="cuda")
    compare_stage(naive, efficient, x, 1e-10)
    naive, efficient = make_model_pair("cpp")
    naive.cuda().train(training), efficient.cuda().train(training)
    compare_models(
        naive, efficient, torch.randn(2, 3, 8, 8, dtype=torch.float64, device="cuda"), 1e-10
    )


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_functional_cldc_ops(backend, dtype):
    """The CLDC glue's functional ops (dense_ext/deluge/cldc_ops.py): schema, fake kernels
    (shapes, dtypes, strides) and the absence of mutation, on a buffer with more slots than the
    CLDC reads; and each equals its backend's own call."""
    from dense_ext.deluge import cldc_ops
    from dense_ext.deluge.backends import get_backend

    backend_or_skip(backend)
    a = cldc_args(dtype)
    buf = a["x"].as_strided(a["x"].shape[:1] + (4 * a["c"],) + a["x"].shape[2:], a["x"].stride())
    invstd = a["scale"].abs() + 0.5
    weight = torch.randn(a["c"], a["k"], dtype=torch.float64).to(dtype)
    bias = torch.randn(a["c"], a["k"], dtype=torch.float64).to(dtype)
    ops = torch.ops.dense_ext
    torch.library.opcheck(ops.deluge_slot_stats, (buf, a["c"], backend))
    torch.library.opcheck(ops.deluge_cldc_forward, (buf, a["mean"], invstd, weight, bias, backend))
    for batch_stats in (True, False):
        args = (a["grad_y"], buf, a["mean"], invstd, weight, batch_stats, backend)
        torch.library.opcheck(ops.deluge_cldc_backward, args)
    direct = get_backend(backend, "cpu")
    assert torch.equal(cldc_ops.slot_stats(buf, a["c"], backend), direct.slot_stats(buf, a["c"]))
    y = cldc_ops.cldc_forward(buf, a["mean"], invstd, weight, bias, backend)
    assert torch.equal(y, direct.cldc_forward(buf, a["mean"], invstd, weight, bias))
    grad_buf, grad_w, grad_b = cldc_ops.cldc_backward(
        a["grad_y"], buf, a["mean"], invstd, weight, True, backend
    )
    expected_buf = torch.zeros_like(buf, memory_format=torch.channels_last)
    expected_w, expected_b = direct.cldc_backward(
        a["grad_y"], buf, a["mean"], invstd, weight, True, expected_buf
    )
    assert torch.equal(grad_buf, expected_buf) and grad_buf[:, a["k"] * a["c"] :].eq(0).all()
    assert torch.equal(grad_w, expected_w) and torch.equal(grad_b, expected_b)
