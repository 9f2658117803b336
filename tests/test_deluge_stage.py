"""dense_ext.deluge against the naive DelugeNet of python_models (the oracle).

The contract: loaded with a naive module's state_dict, the efficient stage, transition, head
and model give the same output, input gradient, every parameter gradient and running
statistics (after forward and after backward), in train and eval mode, with every
normalisation module following its own train/eval flag, momentum and ``track_running_stats``;
float64 to 1e-10. Every CPU stage backend runs the same matrix.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from deluge_helpers import (
    NORMS,
    backend_or_skip,
    cat_slots,
    check,
    compare_models,
    compare_stage,
    make_model_pair,
    make_stage_pair,
    observe,
    randomize,
)
from helpers import (
    TOLERANCE,
    RecordOps,
    assert_close,
    assert_within_torch_error,
    float64_oracle,
    observables,
    train_step,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dense_ext import BackendUnavailableError
from dense_ext.deluge import (
    EfficientCLDC,
    EfficientDelugeHead,
    EfficientDelugeStage,
    EfficientDelugeTransition,
)
from dense_ext.deluge.backends import resolve_backend_name, unavailable_reason
from python_models.delugenet import (
    CrossLayerDepthwiseConv,
    DelugeHead,
    DelugeStage,
    DelugeTransition,
)

BACKENDS = ["reference", "cpp"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory", ["min", "bottleneck"])
def test_stage_matches_naive_training(backend, dtype, memory):
    backend_or_skip(backend)
    naive, efficient = make_stage_pair(6, 4, backend, dtype, memory)
    oracle = float64_oracle(naive)
    x = torch.randn(3, 6, 5, 7, dtype=dtype) * 2 + 1
    compare_stage(naive, efficient, x, oracle=oracle)
    # A second step starts from the updated running statistics.
    compare_stage(naive, efficient, torch.randn_like(x), seed=2, oracle=oracle)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory", ["min", "bottleneck"])
def test_stage_matches_naive_eval(backend, memory):
    backend_or_skip(backend)
    naive, efficient = make_stage_pair(4, 5, backend, memory=memory)
    naive.eval(), efficient.eval()
    compare_stage(naive, efficient, torch.randn(2, 4, 6, 5, dtype=torch.float64), 1e-10)


def set_flags(module: nn.Module, flags: list[bool]) -> None:
    norms = [m for m in module.modules() if isinstance(m, NORMS)]
    for m, flag in zip(norms, flags):
        m.train(flag)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["frozen", "recalibrate", "mixed"])
def test_every_module_follows_its_own_train_flag(backend, case):
    """Frozen-BN fine-tuning (stage in train, every norm in eval), BN re-calibration (stage in
    eval, norms in train) and a random mix, slot statistics shared across modes."""
    backend_or_skip(backend)
    naive, efficient = make_stage_pair(4, 5, backend)
    count = sum(isinstance(m, NORMS) for m in naive.modules())
    if case == "frozen":
        stage_flag, flags = True, [False] * count
    elif case == "recalibrate":
        stage_flag, flags = False, [True] * count
    else:
        rng = random.Random(3)
        stage_flag, flags = True, [rng.random() < 0.5 for _ in range(count)]
    for module in (naive, efficient):
        module.train(stage_flag)
        set_flags(module, flags)
    compare_stage(naive, efficient, torch.randn(2, 4, 5, 5, dtype=torch.float64), 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("track", [True, False])
def test_momentum_and_track_running_stats(backend, momentum, track):
    """momentum=None (cumulative average) and track_running_stats=False, set after
    construction as a user would, train then eval."""
    backend_or_skip(backend)
    naive, efficient = make_stage_pair(4, 4, backend)
    for module in (naive, efficient):
        for m in module.modules():
            if isinstance(m, NORMS):
                m.momentum = momentum
                if not track:
                    m.track_running_stats = False
                    m.running_mean = m.running_var = m.num_batches_tracked = None
    for step in range(3):
        compare_stage(naive, efficient, torch.randn(2, 4, 3, 4, dtype=torch.float64), 1e-10, step)
    naive.eval(), efficient.eval()
    compare_stage(naive, efficient, torch.randn(2, 4, 3, 4, dtype=torch.float64), 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_changed_after_construction(backend):
    backend_or_skip(backend)
    naive, efficient = make_stage_pair(4, 4, backend)
    for module in (naive, efficient):
        for i, m in enumerate(m for m in module.modules() if isinstance(m, NORMS)):
            m.eps = 10.0 ** -(i % 4 + 1)
    compare_stage(naive, efficient, torch.randn(2, 4, 3, 4, dtype=torch.float64), 1e-10)


@pytest.mark.one_thread
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("memory", ["min", "bottleneck"])
def test_gradcheck_float64(backend, training, memory):
    """Every input and parameter gradient against finite differences."""
    backend_or_skip(backend)
    torch.manual_seed(0)
    stage = EfficientDelugeStage(2, 3, memory=memory, backend=backend).double()
    randomize(stage)
    stage.train(training)
    x = torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in stage.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in stage.parameters()]

    def f(inp, *params):
        return torch.func.functional_call(stage, dict(zip(names, params)), (inp,))

    assert torch.autograd.gradcheck(f, (x, *leaves), eps=1e-6, atol=1e-7, fast_mode=True)
    assert torch.autograd.gradcheck(stage, (x,), eps=1e-6, atol=1e-7)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    half=st.integers(1, 4),
    slots=st.integers(1, 5),
    n=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    memory=st.sampled_from(["min", "bottleneck"]),
    training=st.booleans(),
    backend=st.sampled_from(BACKENDS),
)
def test_random_configurations(half, slots, n, h, w, memory, training, backend):
    if unavailable_reason(backend, "cpu") is not None:
        backend = "reference"
    if training and n * h * w == 1:
        training = False  # one value per channel: only eval mode is defined (N=1 in eval)
    naive, efficient = make_stage_pair(2 * half, slots, backend, memory=memory)
    naive.train(training), efficient.train(training)
    x = torch.randn(n, 2 * half, h, w, dtype=torch.float64) * 3 - 1
    compare_stage(naive, efficient, x, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_contiguous_inputs(backend):
    backend_or_skip(backend)
    naive, efficient = make_stage_pair(4, 3, backend)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    compare_stage(naive, efficient, x.contiguous(memory_format=torch.channels_last), 1e-10)
    compare_stage(naive, efficient, x, 1e-10, seed=3)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.clone().contiguous(memory_format=fmt).requires_grad_()
        out = efficient(xi)
        assert out.is_contiguous(memory_format=torch.channels_last)
        out.sum().backward()
        assert xi.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_nan_propagates_like_batch_norm_and_relu(backend, training):
    """One NaN pixel: the naive stage puts NaN wherever batch statistics (training) or the
    convolutions' receptive fields (eval) carry it, ReLU included; so must we, in the output
    and in every gradient."""
    backend_or_skip(backend)
    naive, efficient = make_stage_pair(4, 4, backend)
    naive.train(training), efficient.train(training)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    x[1, 2, 1, 1] = float("nan")
    grad = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    expected, _ = observe(naive, x, grad, cat_slots)
    actual, _ = observe(efficient, x, grad)
    seen = observables(actual)
    for key, value in observables(expected).items():
        if not value.is_floating_point():
            assert torch.equal(seen[key], value), key
            continue
        nan = torch.isnan(value)
        assert torch.equal(torch.isnan(seen[key]), nan), f"{key}: NaN pattern differs"
        if not nan.all():
            assert_close(seen[key][~nan], value[~nan], TOLERANCE[torch.float64], key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_like_the_naive_stage(backend, training):
    backend_or_skip(backend)
    naive, efficient = make_stage_pair(4, 4, backend)
    naive.train(training), efficient.train(training)
    compare_stage(naive, efficient, torch.randn(0, 4, 3, 3, dtype=torch.float64), 0.0)


def saved_bytes(module, x):
    """Bytes autograd saves for one call, excluding parameters and the input."""
    excluded = {p.untyped_storage().data_ptr() for p in module.parameters()}
    excluded.add(x.untyped_storage().data_ptr())
    packed = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            packed[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    return sum(packed.values()), out


def test_saved_memory_is_the_slot_buffer_in_min_mode():
    """memory="min": autograd holds the slot buffer and O(channels) statistics, whatever the
    number of slots; "bottleneck" adds each layer's 3x3 output (C/2 channels)."""
    n, c, h, w = 2, 8, 6, 6
    for slots in (2, 4, 7):
        x = torch.randn(n, c, h, w, requires_grad=True)
        stage = EfficientDelugeStage(c, slots, memory="min", backend="reference")
        total, out = saved_bytes(stage, x)
        stats = 4 * (2 * slots * c + (slots - 1) * 2 * 2 * c)
        assert total == out.numel() * 4 + stats, (slots, total)
        stage.memory = "bottleneck"
        total, out = saved_bytes(stage, x)
        kept = (slots - 1) * n * (c // 2) * h * w * 4
        assert total == out.numel() * 4 + stats + kept, (slots, total)


def test_naive_stage_saves_several_slots_per_layer():
    """The probe itself: the naive stage keeps about five slot-sized tensors per layer."""
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    total, _ = saved_bytes(DelugeStage(8, 7), x)
    slot = x.numel() * 4
    assert total > 4 * 6 * slot


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_eval_saves_nothing(backend):
    backend_or_skip(backend)
    naive, efficient = make_stage_pair(4, 3, backend, torch.float32)
    naive.eval(), efficient.eval()
    x = torch.randn(2, 4, 5, 5)
    saved = []
    with (
        torch.no_grad(),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        out = efficient(x)
        expected = cat_slots(naive(x))
    assert saved == [] and not out.requires_grad
    assert_close(out, expected, 1e-5, "eval output")


def test_inplace_change_of_the_buffer_before_backward_raises():
    stage = EfficientDelugeStage(4, 3, backend="reference")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = stage(x)
    loss = out.sum()
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_double_backward_raises_clearly():
    stage = EfficientDelugeStage(4, 3, backend="reference").double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(stage(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="dense_ext blocks are not twice differentiable"):
        g.sum().backward()


@pytest.mark.parametrize(
    "shape, dtype, error, match",
    [
        ((2, 4, 3), torch.float32, ValueError, "4-D"),
        ((2, 6, 3, 3), torch.float32, ValueError, "4 input channels, got 6"),
        ((1, 4, 1, 1), torch.float32, ValueError, "more than 1 value per channel"),
        ((2, 4, 3, 3), torch.int64, TypeError, "floating-point"),
        ((2, 4, 3, 3), torch.float64, TypeError, "does not match parameter dtype"),
    ],
)
def test_bad_input_raises(shape, dtype, error, match):
    stage = EfficientDelugeStage(4, 3, backend="reference")
    with pytest.raises(error, match=match):
        stage(torch.ones(shape, dtype=dtype))
    cldc = EfficientCLDC(4, 3, backend="reference")
    buffer_shape = (*shape[:1], 3 * shape[1], *shape[2:]) if len(shape) == 4 else shape
    with pytest.raises(error, match=match.replace("4 input channels, got 6", "12 input")):
        cldc(torch.ones(buffer_shape, dtype=dtype))


def test_synchronised_batch_norm_is_refused():
    """enable_sync_bn marks modules with a stats_sync attribute; a DelugeNet stage or CLDC
    that cannot synchronise must refuse to train rather than normalise locally."""
    for module, x in (
        (EfficientDelugeStage(4, 3, backend="reference"), torch.randn(2, 4, 3, 3)),
        (EfficientCLDC(4, 3, backend="reference"), torch.randn(2, 12, 3, 3)),
    ):
        module.stats_sync = object()
        with pytest.raises(RuntimeError, match="synchronised batch norm is not implemented"):
            module(x)
        module.eval()
        module(x)  # running statistics: nothing to synchronise


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_value_per_channel_is_fine_in_eval(backend):
    backend_or_skip(backend)
    naive, efficient = make_stage_pair(4, 3, backend)
    naive.eval(), efficient.eval()
    compare_stage(naive, efficient, torch.randn(1, 4, 1, 1, dtype=torch.float64), 1e-10)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="memory"):
        EfficientDelugeStage(4, 3, memory="none")
    with pytest.raises(ValueError, match="even"):
        EfficientDelugeStage(5, 3)
    with pytest.raises(ValueError, match="num_slots"):
        EfficientDelugeStage(4, 0)


def test_backend_selection():
    assert resolve_backend_name("reference", "cpu") == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend_name("fast", "cpu")
    with pytest.raises(BackendUnavailableError, match="triton"):
        if unavailable_reason("triton", "cpu") is None:
            pytest.skip("triton runs on CPU here (interpreter)")
        resolve_backend_name("triton", "cpu")


def test_auto_falls_back_with_one_warning(monkeypatch):
    import dense_ext.deluge.backends as backends

    monkeypatch.setattr(backends._REGISTRY, "_warned", set())
    monkeypatch.setitem(backends._REGISTRY.modules, "cpp", "dense_ext.deluge.no_such_module")
    monkeypatch.delenv("DENSE_EXT_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="falling back") as record:
        assert resolve_backend_name("auto", "cpu") == "reference"
        assert resolve_backend_name("auto", "cpu") == "reference"
    assert len(record) == 1


# Transition, head and CLDC module: the CLDC over a finished stage's buffer.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_transition_and_head_match_naive(backend, training):
    """The naive modules take the list of slots, the efficient ones the stage's buffer."""
    backend_or_skip(backend)
    torch.manual_seed(0)
    pairs = [
        (DelugeTransition(4, 3, 8), EfficientDelugeTransition(4, 3, 8, backend=backend), (8, 3, 3)),
        (DelugeHead(4, 3), EfficientDelugeHead(4, 3, backend=backend), (4,)),
    ]
    for naive, efficient, out_shape in pairs:
        naive.double(), efficient.double()
        randomize(naive)
        efficient.load_state_dict(naive.state_dict())
        naive.train(training), efficient.train(training)
        x = torch.cat([torch.randn(2, 4, 5, 5, dtype=torch.float64) * (i + 1) for i in range(3)], 1)
        grad = torch.randn(2, *out_shape, dtype=torch.float64)
        expected, scales = observe(naive, x, grad, as_input=lambda buf: list(buf.split(4, 1)))
        actual, _ = observe(efficient, x, grad)
        check(actual, expected, 1e-10, scales)


# The whole model.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("small_inputs", [True, False])
@pytest.mark.parametrize("memory", ["min", "bottleneck"])
def test_model_matches_naive(backend, small_inputs, memory):
    backend_or_skip(backend)
    naive, efficient = make_model_pair(backend, memory=memory, small_inputs=small_inputs)
    size = 8 if small_inputs else 20
    for training in (True, True, False):
        naive.train(training), efficient.train(training)
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        compare_models(naive, efficient, x, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_init_then_to_empty_like_naive(backend):
    """Deferred initialisation (FSDP's, ``torch.device("meta")``): the efficient model built
    on meta runs forward and backward there (shapes only, whatever its backend; it failed in
    autocast dispatch before), then ``to_empty`` + ``load_state_dict`` give the naive step."""
    backend_or_skip(backend)
    naive, _ = make_model_pair(backend)
    with torch.device("meta"):
        _, meta = make_model_pair(backend)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = meta(x.to("meta"))
    out.sum().backward()
    assert out.shape == naive(x).shape and out.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.load_state_dict(naive.state_dict())
    compare_models(naive, meta, x, 1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_empty_batch_like_naive(backend):
    backend_or_skip(backend)
    naive, efficient = make_model_pair(backend)
    compare_models(naive, efficient, torch.randn(0, 3, 8, 8, dtype=torch.float64), 0.0)


def test_state_dicts_are_interchangeable():
    naive, efficient = make_model_pair("reference")
    assert list(naive.state_dict()) == list(efficient.state_dict())
    twin = copy.deepcopy(naive)
    twin.load_state_dict(efficient.state_dict())
    for key, value in naive.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


@pytest.mark.one_thread
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_cldc_gradcheck_float64(backend, training):
    backend_or_skip(backend)
    torch.manual_seed(0)
    cldc = EfficientCLDC(3, 3, backend=backend).double()
    randomize(cldc)
    cldc.train(training)
    buf = torch.randn(2, 9, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = cldc.weight.detach().clone().requires_grad_()
    bias = cldc.bias.detach().clone().requires_grad_()

    def f(inp, w, b):
        return torch.func.functional_call(cldc, {"weight": w, "bias": b}, (inp,))

    assert torch.autograd.gradcheck(f, (buf, weight, bias), eps=1e-6, atol=1e-7)


@pytest.mark.one_thread
@pytest.mark.parametrize("flags", ["train", "eval", "mixed"])
def test_entry_matches_naive(flags):
    """The CIFAR entry (a pre-activation bottleneck that keeps only its input)."""
    from dense_ext.deluge import EfficientPreActBottleneck
    from python_models.delugenet import PreActBottleneck

    torch.manual_seed(0)
    naive = PreActBottleneck(3, 2, 4).double()
    randomize(naive)
    efficient = EfficientPreActBottleneck(3, 2, 4).double()
    efficient.load_state_dict(naive.state_dict())
    for module in (naive, efficient):
        module.train(flags != "eval")
        if flags == "mixed":
            module.norm2.eval()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64) * 2 + 1
    grad = torch.randn(2, 4, 5, 4, dtype=torch.float64)
    expected, _ = observe(naive, x, grad)
    actual, _ = observe(efficient, x, grad)
    check(actual, expected, 1e-10, {})
    assert torch.autograd.gradcheck(efficient, (x.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.one_thread
@pytest.mark.parametrize("backend", BACKENDS)
def test_transition_mixed_flags_and_gradcheck(backend):
    backend_or_skip(backend)
    torch.manual_seed(0)
    naive = DelugeTransition(2, 3, 4).double()
    randomize(naive)
    efficient = EfficientDelugeTransition(2, 3, 4, backend=backend).double()
    efficient.load_state_dict(naive.state_dict())
    for module in (naive, efficient):
        module.cldc.eval()  # frozen CLDC, training BN
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    grad = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected, scales = observe(naive, x, grad, as_input=lambda buf: list(buf.split(2, 1)))
    actual, _ = observe(efficient, x, grad)
    check(actual, expected, 1e-10, scales)
    assert torch.autograd.gradcheck(efficient, (x.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_efficient_model_saves_only_slot_buffers():
    """Linear memory, all of it: besides the image, autograd keeps the stem output (the entry's
    input), each stage's slot buffer and the head's CLDC output, plus O(channels) statistics."""
    _, efficient = make_model_pair("reference", torch.float32)
    x = torch.randn(2, 3, 8, 8)
    params = {p.untyped_storage().data_ptr() for p in efficient.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.numel() > 100:
            saved[ptr] = tuple(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        efficient(x)
    # stem: 3 channels; stage 1: 3 slots of 4 at 8x8; stage 2: 4 slots of 8 at 4x4;
    # head: the CLDC output, 8 channels at 4x4.
    expected = [(2, 3, 8, 8), (2, 3, 8, 8), (2, 12, 8, 8), (2, 32, 4, 4), (2, 8, 4, 4)]
    assert sorted(saved.values()) == sorted(expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_within_twice_torch_error(backend):
    """Under CPU bf16 autocast the efficient model (bf16 slots, float32 statistics) follows the
    tolerance rule (tests/helpers.py) against the float64 oracle, with the naive model under
    the same autocast as PyTorch's own result: output and input gradient. (The parameter
    gradients meet ReLU flips: PyTorch's own entry.norm3.weight gradient is 14% off.)"""
    backend_or_skip(backend)
    naive, efficient = make_model_pair(backend, torch.float32)
    oracle = float64_oracle(naive)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = train_step(naive, x)
        ours = train_step(efficient, x, theirs.grad_output)
    exact = train_step(oracle, x.double(), theirs.grad_output.double())
    for what in ("output", "input_grad"):
        ours_, theirs_, exact_ = (getattr(step, what) for step in (ours, theirs, exact))
        assert_within_torch_error(ours_, theirs_, exact_, what, precision=torch.bfloat16)


def test_stage_counters_advance_in_one_foreach_call():
    """A training forward of a fused stage adds 1 to every BN's and CLDC's
    num_batches_tracked, as the naive stage's modules do, with one foreach op (not one op, a
    GPU launch, per module); a module in eval keeps its counter."""
    _, stage = make_stage_pair(6, 4, "reference")
    stage.train()
    frozen = stage.layer2.norm1.eval()
    with RecordOps() as ops:
        stage(torch.randn(2, 6, 5, 5, dtype=torch.float64))
    for name, module in stage.named_modules():
        if hasattr(module, "num_batches_tracked") and module.num_batches_tracked is not None:
            assert int(module.num_batches_tracked) == (0 if module is frozen else 1), name
    assert ops.counter_updates() == (1, 0), ops.calls


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_cldc_nan_input_in_evaluation_gives_batch_norms_input_gradient(backend):
    """With running statistics a CLDC's input gradient is weight * invstd * grad, which a NaN
    input cannot reach (F.batch_norm's evaluation backward does not read its input). The cpp
    and triton CLDCs computed it as the batch-statistics formula with zero coefficients, whose
    (x - mean) * 0 put a NaN at the NaN pixel (a DelugeNet's head in evaluation)."""
    backend_or_skip(backend)
    torch.manual_seed(0)
    naive = CrossLayerDepthwiseConv(4, 3).double()
    randomize(naive, seed=1)
    efficient = EfficientCLDC(4, 3, backend=backend).double()
    efficient.load_state_dict(naive.state_dict())
    naive.eval(), efficient.eval()
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64)
    x[1, 5, 2, 2] = float("nan")
    grad = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected, _ = observe(naive, x, grad, as_input=lambda t: list(t.split(4, 1)))
    actual, _ = observe(efficient, x, grad)
    assert not expected.input_grad.isnan().any()  # the case: a number where the NaN sits
    check(actual, expected, TOLERANCE[torch.float64], {})
