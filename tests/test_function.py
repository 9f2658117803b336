"""DenseBlockFunction: gradcheck, what autograd saves, input errors, backend selection."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_within_torch_error, cpu_backend_or_skip, float64_oracle
from naive import NaiveDenseBlock, randomize_bn

from dense_ext import BackendUnavailableError, EfficientDenseBlock
from dense_ext.backends import resolve_backend_name

BACKENDS = ["reference", "cpp"]


@pytest.mark.one_thread
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["bottleneck", "min"])
@pytest.mark.parametrize("bn_size", [None, 2])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(backend, memory, bn_size, training):
    """Every input and parameter gradient against finite differences, train and eval mode."""
    cpu_backend_or_skip(backend)
    torch.manual_seed(0)
    block = EfficientDenseBlock(2, 3, 2, bn_size, memory=memory, backend=backend).double()
    randomize_bn(block)
    block.train(training)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in block.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in block.parameters()]

    def f(inp, *params):
        return torch.func.functional_call(block, dict(zip(names, params)), (inp,))

    # fast_mode checks random projections of the Jacobian: as strict, far fewer evaluations.
    assert torch.autograd.gradcheck(f, (x, *leaves), eps=1e-6, atol=1e-7, fast_mode=True)
    # The full input Jacobian, column by column, on the block itself.
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-7)


def saved_bytes(block, x):
    """Bytes autograd saves for one block call, excluding parameters and the input."""
    excluded = {p.data_ptr() for p in block.parameters()} | {x.data_ptr()}
    packed = []

    def pack(t):
        if t.data_ptr() not in excluded:
            packed.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    return sum(packed), out


@pytest.mark.parametrize("bn_size", [None, 4])
def test_saved_memory_is_the_buffer_in_min_mode(bn_size):
    """memory="min": autograd holds the feature buffer and O(channels) statistics, nothing
    that grows with depth beyond the buffer itself."""
    n, c0, k, h, w = 2, 8, 4, 8, 8
    for layers in (2, 4, 8):
        block = EfficientDenseBlock(layers, c0, k, bn_size, memory="min", backend="reference")
        x = torch.randn(n, c0, h, w, requires_grad=True)
        total, out = saved_bytes(block, x)
        buffer_bytes = out.numel() * out.element_size()
        stats_bytes = 4 * 2 * (out.shape[1] + layers * (bn_size or 0) * k)
        assert total == buffer_bytes + stats_bytes, (layers, total, buffer_bytes, stats_bytes)


def test_saved_memory_bottleneck_mode_adds_one_bottleneck_per_layer():
    n, c0, k, h, w, bn = 2, 8, 4, 8, 8, 4
    for layers in (2, 5):
        block = EfficientDenseBlock(layers, c0, k, bn, memory="bottleneck", backend="reference")
        x = torch.randn(n, c0, h, w, requires_grad=True)
        total, out = saved_bytes(block, x)
        buffer_bytes = out.numel() * 4
        bottleneck_bytes = layers * n * bn * k * h * w * 4
        stats_bytes = 4 * 2 * (out.shape[1] + layers * bn * k)
        assert total == buffer_bytes + bottleneck_bytes + stats_bytes


def test_naive_saved_memory_grows_quadratically():
    """Sanity check of the probe itself, at two depths: four times the layers make the naive
    block save more than four times as much (anything linear in depth, a + b*L with a >= 0,
    grows at most fourfold), the efficient block at most four times as much."""
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    naive = {depth: saved_bytes(NaiveDenseBlock(depth, 8, 4), x)[0] for depth in (4, 16)}
    assert naive[16] > 6 * naive[4], naive  # quadratic: about 7x here
    efficient = {
        depth: saved_bytes(EfficientDenseBlock(depth, 8, 4, backend="reference"), x)[0]
        for depth in (4, 16)
    }
    assert efficient[16] <= 4 * efficient[4], efficient


@pytest.mark.parametrize(
    "shape, error, match",
    [
        ((2, 5, 4), ValueError, "4-D"),
        ((2, 6, 4, 4), ValueError, "5 input channels, got 6"),
        ((1, 5, 1, 1), ValueError, "more than 1 value per channel"),
    ],
)
def test_bad_input_raises(shape, error, match):
    block = EfficientDenseBlock(2, 5, 3, backend="reference")
    with pytest.raises(error, match=match):
        block(torch.randn(shape))


def test_single_value_per_channel_is_fine_in_eval():
    block = EfficientDenseBlock(2, 5, 3, backend="reference").eval()
    assert block(torch.randn(1, 5, 1, 1)).shape == (1, 11, 1, 1)


def test_integer_and_mismatched_dtypes_raise():
    block = EfficientDenseBlock(2, 5, 3, backend="reference")
    with pytest.raises(TypeError, match="floating-point"):
        block(torch.ones(2, 5, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="does not match parameter dtype"):
        block(torch.randn(2, 5, 4, 4, dtype=torch.float64))


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="memory"):
        EfficientDenseBlock(2, 5, 3, memory="tiny")
    with pytest.raises(ValueError, match="drop_rate"):
        EfficientDenseBlock(2, 5, 3, drop_rate=1.5)
    with pytest.raises(ValueError, match="num_layers"):
        EfficientDenseBlock(0, 5, 3)


def test_in_place_change_of_output_before_backward_raises():
    block = EfficientDenseBlock(2, 4, 3, backend="reference")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = block(x)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_running_stats_updated_once_per_forward_not_by_backward():
    block = EfficientDenseBlock(2, 4, 3, memory="min", backend="reference")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = block(x)
    after_forward = {k: v.clone() for k, v in block.state_dict().items()}
    out.sum().backward()
    for k, v in block.state_dict().items():
        assert torch.equal(v, after_forward[k]), k
    assert block.denselayer2.norm2.num_batches_tracked.item() == 1


def test_state_dict_keys_match_naive_both_ways():
    naive = NaiveDenseBlock(3, 5, 4, 4)
    efficient = EfficientDenseBlock(3, 5, 4, 4)
    assert list(naive.state_dict()) == list(efficient.state_dict())
    efficient.load_state_dict(naive.state_dict())
    naive.load_state_dict(efficient.state_dict())
    plain_naive, plain = NaiveDenseBlock(2, 5, 4, None), EfficientDenseBlock(2, 5, 4, None)
    assert list(plain_naive.state_dict()) == list(plain.state_dict())
    assert plain.denselayer1.conv1.weight.shape == (4, 5, 3, 3)


def test_bf16_autocast_within_twice_torch_error():
    """Under CPU autocast the buffer is bfloat16; its error against a float64 reference is at
    most about twice that of the naive block under the same autocast."""
    torch.manual_seed(0)
    naive = NaiveDenseBlock(3, 8, 8, 4)
    randomize_bn(naive)
    efficient = EfficientDenseBlock(3, 8, 8, 4, backend="reference")
    efficient.load_state_dict(naive.state_dict())
    oracle = float64_oracle(naive)
    x = torch.randn(4, 8, 8, 8)
    expected = oracle(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = efficient(x)
        theirs = naive(x)
    assert ours.dtype == torch.bfloat16
    assert_within_torch_error(ours, theirs, expected, "output", precision=torch.bfloat16)


def test_explicit_unavailable_backend_raises_and_auto_falls_back(monkeypatch):
    import dense_ext.backends as backends

    monkeypatch.setattr(
        backends._REGISTRY,
        "unavailable_reason",
        lambda name, device: None if name == "reference" else "not built in this test",
    )
    monkeypatch.setattr(backends._REGISTRY, "_warned", set())
    with pytest.raises(BackendUnavailableError, match="'cpp' is unavailable"):
        resolve_backend_name("cpp", "cpu")
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert resolve_backend_name("auto", "cpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend_name("auto", "cpu") == "reference"  # warned once only


def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv("DENSE_EXT_BACKEND", "reference")
    assert resolve_backend_name("auto", "cpu") == "reference"
    monkeypatch.setenv("DENSE_EXT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend_name("auto", "cpu")


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="unknown backend"):
        EfficientDenseBlock(2, 4, 3, backend="cuda-magic")(torch.randn(2, 4, 3, 3))


def test_input_errors_are_value_and_runtime_errors():
    """Code written against nn.Conv2d (RuntimeError) or nn.BatchNorm2d (ValueError) catches them."""
    block = EfficientDenseBlock(2, 5, 3, backend="reference")
    for bad in (torch.randn(2, 6, 4, 4), torch.randn(1, 5, 1, 1)):
        with pytest.raises(RuntimeError):
            block(bad)
        with pytest.raises(ValueError):
            block(bad)
    with pytest.raises(RuntimeError):
        block(torch.ones(2, 5, 4, 4, dtype=torch.int32))


def test_double_backward_raises_clearly():
    block = EfficientDenseBlock(2, 4, 3, backend="reference").double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="dense_ext blocks are not twice differentiable"):
        grad.sum().backward()


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    block = EfficientDenseBlock(2, 4, 3, 2, drop_rate=0.3, memory="min", backend="reference")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = block(x)
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    out.sum().backward()
    assert torch.equal(x.grad, first)


@pytest.mark.slow
def _block_then_transition():
    from dense_ext import EfficientTransition

    torch.manual_seed(0)
    block = EfficientDenseBlock(2, 4, 3, 2, memory="min", backend="reference")
    transition = EfficientTransition(10, 5)
    return block, transition


def test_transition_gradient_is_donated_to_the_block(monkeypatch):
    """The block accumulates into the transition's fresh gradient instead of copying it."""
    import dense_ext.function as function

    taken = []
    original = function.take_donated

    def spy(grad, refs, like):
        result = original(grad, refs, like)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(function, "take_donated", spy)
    block, transition = _block_then_transition()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    transition(block(x)).sum().backward()
    assert taken == [True]


def test_donation_refused_when_a_hook_keeps_the_gradient():
    block, transition = _block_then_transition()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    kept = []
    out = block(x)
    out.register_hook(lambda g: kept.append((g, g.clone())))
    out.retain_grad()
    transition(out).sum().backward()
    grad, copy_at_hook_time = kept[0]
    assert torch.equal(grad, copy_at_hook_time), "the block wrote into a gradient a hook kept"
    assert torch.equal(out.grad, copy_at_hook_time)
    # Same input gradient as without the hook (donation changes memory, never values).
    expected = x.grad.clone()
    x.grad = None
    transition(block(x)).sum().backward()
    assert torch.equal(x.grad, expected)
