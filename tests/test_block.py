"""EfficientDenseBlock against the independent naive block (tests/naive.py).

The contract: loaded with a naive block's state_dict, the efficient block gives the same
output, input gradient, every parameter gradient and running statistics (after forward and
after backward), in train and eval mode, for both memory modes, bottleneck and plain layers.
Each CPU backend runs the same matrix.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    RecordOps,
    assert_within_torch_error,
    check_step,
    cpu_backend_or_skip,
    float64_oracle,
)
from hypothesis_compat import HealthCheck, given, settings, st
from naive import NaiveDenseBlock, randomize_bn

from dense_ext import EfficientDenseBlock

BACKENDS = ["reference", "cpp"]


def make_pair(num_layers, c0, k, bn_size, drop_rate, memory, backend, dtype, seed=0):
    torch.manual_seed(seed)
    naive = NaiveDenseBlock(num_layers, c0, k, bn_size, drop_rate).to(dtype)
    randomize_bn(naive)
    efficient = EfficientDenseBlock(
        num_layers, c0, k, bn_size, drop_rate, memory=memory, backend=backend
    ).to(dtype)
    efficient.load_state_dict(naive.state_dict())
    return naive, efficient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 4])
def test_matches_naive_training(backend, dtype, memory, bn_size):
    cpu_backend_or_skip(backend)
    naive, efficient = make_pair(3, 5, 4, bn_size, 0.0, memory, backend, dtype)
    oracle = float64_oracle(naive)
    x = torch.randn(3, 5, 7, 6, dtype=dtype) * 2 + 1
    check_step(efficient, naive, x, oracle=oracle, seed=123)
    # A second step starts from the updated running statistics.
    check_step(efficient, naive, torch.randn_like(x), oracle=oracle, seed=7)


@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 2])
def test_dropout_replays_the_same_masks(memory, bn_size):
    """With the same seed, the reference backend draws the naive block's dropout masks (the
    cpp backend draws its own: tests/test_backend_cpp.py injects them into the naive block)."""
    naive, efficient = make_pair(3, 4, 3, bn_size, 0.3, memory, "reference", torch.float64)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    out = check_step(efficient, naive, x, seed=123).output
    dropped = (out[:, 4:] == 0).double().mean().item()
    assert 0.15 < dropped < 0.45, f"the masks drop {dropped:.2f} of the values, not about 0.3"


@pytest.mark.one_thread
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
def test_dropout_gradient_is_consistent(backend, memory):
    """Whatever masks a backend draws, backward must use the forward's masks: gradcheck-style
    check that d(sum(out * g))/dx matches a finite difference with the RNG re-seeded."""
    cpu_backend_or_skip(backend)
    block = EfficientDenseBlock(2, 3, 2, 2, 0.4, memory=memory, backend=backend).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(inp):
        torch.manual_seed(5)
        return block(inp)

    # Running statistics change with every call; gradcheck only needs the function value.
    torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, nondet_tol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 4])
def test_matches_naive_eval(backend, memory, bn_size):
    cpu_backend_or_skip(backend)
    naive, efficient = make_pair(3, 6, 4, bn_size, 0.2, memory, backend, torch.float64)
    naive.eval()
    efficient.eval()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    check_step(efficient, naive, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_under_no_grad_saves_nothing(backend):
    cpu_backend_or_skip(backend)
    naive, efficient = make_pair(2, 4, 3, 4, 0.0, "bottleneck", backend, torch.float32)
    efficient.eval()
    naive.eval()
    oracle = float64_oracle(naive)
    x = torch.randn(2, 4, 6, 6)
    saved = []
    with (
        torch.no_grad(),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        out = efficient(x)
        expected = naive(x)
        exact = oracle(x.double())
    assert saved == []
    assert not out.requires_grad
    assert_within_torch_error(out, expected, exact, "eval output")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("track", [True, False])
def test_bn_options(backend, momentum, track):
    """momentum=None (cumulative average) and track_running_stats=False, train then eval."""
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    naive = NaiveDenseBlock(2, 3, 3, 2).double()
    for m in naive.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
            if not track:
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
    randomize_bn(naive)
    efficient = EfficientDenseBlock(2, 3, 3, 2, backend=backend).double()
    for mn, me in zip(naive.modules(), efficient.modules()):
        if isinstance(mn, torch.nn.BatchNorm2d):
            me.momentum = mn.momentum
            me.track_running_stats = mn.track_running_stats
            if not track:
                me.running_mean = me.running_var = me.num_batches_tracked = None
    efficient.load_state_dict(naive.state_dict())
    for step in range(3):
        x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        check_step(efficient, naive, x, seed=step)
    naive.eval()
    efficient.eval()
    check_step(efficient, naive, torch.randn(2, 3, 4, 5, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_contiguous_inputs(backend):
    cpu_backend_or_skip(backend)
    naive, efficient = make_pair(2, 5, 3, 4, 0.0, "min", backend, torch.float64)
    x = torch.randn(2, 5, 6, 5, dtype=torch.float64)
    check_step(efficient, naive, x.contiguous(memory_format=torch.channels_last))
    check_step(efficient, naive, x, seed=3)


@pytest.mark.parametrize("memory", ["bottleneck", "min"])
def test_output_is_the_channels_last_buffer_and_input_grad_keeps_layout(memory):
    block = EfficientDenseBlock(2, 4, 3, memory=memory, backend="reference")
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 4, 5, 6).contiguous(memory_format=fmt).requires_grad_()
        out = block(x)
        assert out.shape == (2, 10, 5, 6)
        assert out.is_contiguous(memory_format=torch.channels_last)
        out.sum().backward()
        assert x.grad.is_contiguous(memory_format=fmt)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c0=st.integers(1, 9),
    k=st.integers(1, 6),
    layers=st.integers(1, 4),
    bn_size=st.sampled_from([None, 1, 4]),
    n=st.integers(1, 3),
    h=st.integers(1, 7),
    w=st.integers(2, 7),
    memory=st.sampled_from(["bottleneck", "min"]),
    drop=st.sampled_from([0.0, 0.25]),
    backend=st.sampled_from(BACKENDS),
)
def test_random_configurations(c0, k, layers, bn_size, n, h, w, memory, drop, backend):
    from dense_ext.backends import unavailable_reason

    if unavailable_reason(backend, "cpu") is not None:
        backend = "reference"
    exact_masks = backend == "reference"
    naive, efficient = make_pair(
        layers, c0, k, bn_size, drop if exact_masks else 0.0, memory, backend, torch.float64
    )
    x = torch.randn(n, c0, h, w, dtype=torch.float64) * 3 - 1
    check_step(efficient, naive, x)


def test_large_mean_statistics_float32():
    """Statistics stay accurate when the data has a large mean (no E[x^2]-E[x]^2 cancellation).

    A float32 mean of values near 1000 is itself only good to ~3e-5, i.e. ~3e-4 of a 0.1
    standard deviation, so no float32 BN can match float64 to float32 rounding here: the
    tolerance rule (tests/helpers.py) gives exactly the room PyTorch's own BN needs.
    """
    naive, efficient = make_pair(2, 4, 3, 4, 0.0, "min", "reference", torch.float32)
    oracle = float64_oracle(naive)
    x = torch.randn(4, 4, 8, 8) * 0.1 + 1000.0
    with torch.no_grad():
        exact = oracle(x.double())[:, 4:]
        assert_within_torch_error(efficient(x)[:, 4:], naive(x)[:, 4:], exact, "new features")


def test_running_statistics_fold_in_one_foreach_call_per_momentum():
    """The running statistics of every BN of a block are updated by one foreach op per distinct
    momentum (a temporary and three ops per update before: host time), with the naive model's
    values; BNs with momentum None keep their cumulative average."""
    torch.manual_seed(0)
    naive, efficient = make_pair(3, 4, 3, 2, 0.0, "min", "reference", torch.float64)
    for model in (naive, efficient):
        model.denselayer2.norm2.momentum = 0.3
        model.denselayer3.norm1.momentum = None
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    naive(x)
    with RecordOps() as ops:
        efficient(x)
    lerps = [name for name, _ in ops.calls if name.startswith("aten._foreach_lerp_")]
    assert len(lerps) == 2, ops.calls  # momentum 0.1 and 0.3
    assert not any(name.startswith("aten._foreach_mul") for name, _ in ops.calls), ops.calls
    expected = dict(naive.named_buffers())
    for name, buffer in efficient.named_buffers():
        torch.testing.assert_close(buffer, expected[name], rtol=1e-12, atol=1e-12, msg=name)


def test_batch_counters_advance_in_one_foreach_call():
    """A training forward adds 1 to every BN's num_batches_tracked, as nn.BatchNorm2d does,
    with one foreach op for the whole block (one op per BN is a kernel launch per BN on a
    GPU); a BN in eval keeps its counter."""
    torch.manual_seed(0)
    block = EfficientDenseBlock(3, 4, 3, 2, backend="reference").train()
    frozen = block.denselayer2.norm1.eval()
    with RecordOps() as ops:
        block(torch.randn(2, 4, 5, 5))
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert int(module.num_batches_tracked) == (0 if module is frozen else 1), name
    assert ops.counter_updates() == (1, 0), ops.calls


def test_unfused_reason_names_the_submodule():
    """The walk over submodules (no qualified names built on the fused path) still names the
    module that makes the block run unfused, and visits a module shared by two layers once."""
    from dense_ext.block import unfused_reason

    block = EfficientDenseBlock(3, 4, 3, 2, backend="reference")
    assert unfused_reason(block) is None
    block.denselayer3.relu2 = block.denselayer1.relu1  # shared: still fusable
    assert unfused_reason(block) is None
    handle = block.denselayer2.conv1.register_forward_hook(lambda *args: None)
    assert unfused_reason(block) == "a hook on denselayer2.conv1"
    handle.remove()
    block.denselayer3.norm2 = torch.nn.GroupNorm(1, 6)
    assert unfused_reason(block) == (
        "denselayer3: norm2 is a GroupNorm, not a batch norm the kernels model"
    )
