"""Helpers of the DelugeNet tests: naive/efficient pairs, on the one harness of helpers.py.

The naive modules of python_models.delugenet are the oracle. ``observe`` is ``train_step``
(every observable of one forward and backward) plus, for a naive module, the size of the terms
its CLDC bias gradients sum; ``check`` is ``assert_same_step`` with those sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TOLERANCE, Step, assert_same_step, check_step, train_step
from torch import nn

from dense_ext.deluge import EfficientCLDC, EfficientDelugeStage
from dense_ext.deluge.backends import unavailable_reason
from python_models.delugenet import CrossLayerDepthwiseConv, DelugeNet, DelugeStage

NORMS = (nn.BatchNorm2d, CrossLayerDepthwiseConv, EfficientCLDC)


def backend_or_skip(name: str) -> str:
    reason = unavailable_reason(name, "cpu")
    if reason is not None:
        pytest.skip(f"stage backend {name} unavailable: {reason}")
    return name


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine parameters and running statistics in every BN and CLDC."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, NORMS):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)


def make_stage_pair(channels, slots, backend, dtype=torch.float64, memory="min", seed=0):
    torch.manual_seed(seed)
    naive = DelugeStage(channels, slots).to(dtype)
    randomize(naive, seed)
    efficient = EfficientDelugeStage(channels, slots, memory=memory, backend=backend).to(dtype)
    efficient.load_state_dict(naive.state_dict())
    return naive, efficient


def record_cldc_term_scales(
    module: nn.Module, weights: bool = False, norms: bool = False
) -> tuple[dict[str, float], list]:
    """Hooks that record, for every naive CLDC, ``max_c sum_r |dL/dy[r, c]|``: the size of the
    terms its bias gradient sums. Where a batch-statistics BN follows the CLDC that gradient is
    zero up to rounding, so only an error against the size of its terms means anything. With
    ``weights``, also ``max_{c,i} sum_r |dL/dy[r, c] * xhat_i[r, c]|`` for its weight gradient
    (``xhat_i``: slot ``i`` as its BN normalises it), which cancels the same way when the CLDC
    reads one slot. With ``norms``, also ``max_c sum_r |dL/dy[r, c] * xhat[r, c]|`` for every
    BN's weight gradient and ``max |sum_r |dL/dy| * |x||`` over a conv's weight entries for its
    weight gradient: sums over the N*H*W values of a channel, which cancel on small maps
    behind a batch-statistics BN (a stage of 2 channels over one 4x6 map: layer 2's
    norm.weight and conv1.weight gradients 1.1e-10 of their largest value apart between naive
    and fused float64 steps, where naive alone moves by 3e-11 with the input's memory format;
    hypothesis found it), so they too are measured against the size of their terms."""
    scales: dict[str, float] = {}

    def forward_hook(name):
        def hook(mod, inputs, output):
            if not output.requires_grad:
                return
            xhat = [_normalised(mod, i, h.detach()) for i, h in enumerate(inputs[0])]

            def record(g):
                scales[f"grad of {name}.bias"] = term_scale(g)
                if weights:
                    scales[f"grad of {name}.weight"] = max(term_scale(g * x) for x in xhat)

            output.register_hook(record)

        return hook

    def term_scale(g):
        return g.abs().sum(dim=(0, 2, 3)).max().item() if g.numel() else 0.0

    def norm_hook(name):
        def hook(bn, inputs, output):
            if not output.requires_grad or bn.weight is None:
                return
            xhat = _bn_normalised(bn, inputs[0].detach())
            output.register_hook(
                lambda g: scales.__setitem__(f"grad of {name}.weight", term_scale(g * xhat))
            )

        return hook

    def conv_hook(name):
        def hook(conv, inputs, output):
            if not output.requires_grad:
                return
            x = inputs[0].detach().abs()

            def record(g):
                terms = torch.nn.grad.conv2d_weight(
                    x,
                    conv.weight.shape,
                    g.abs(),
                    conv.stride,
                    conv.padding,
                    conv.dilation,
                    conv.groups,
                )
                scales[f"grad of {name}.weight"] = terms.abs().max().item()

            output.register_hook(record)

        return hook

    handles = [
        m.register_forward_hook(forward_hook(name))
        for name, m in module.named_modules()
        if isinstance(m, CrossLayerDepthwiseConv)
    ]
    if norms:
        handles += [
            m.register_forward_hook(norm_hook(name))
            for name, m in module.named_modules()
            if type(m) is nn.BatchNorm2d
        ]
        handles += [
            m.register_forward_hook(conv_hook(name))
            for name, m in module.named_modules()
            if type(m) is nn.Conv2d
        ]
    return scales, handles


def _bn_normalised(bn: nn.BatchNorm2d, h: torch.Tensor) -> torch.Tensor:
    """``h`` as ``bn`` normalises it (batch or running statistics), before its affine map."""
    running = None if bn.running_mean is None else (bn.running_mean, bn.running_var)
    return _normalise(h, bn.training, running, bn.eps)


def _normalised(cldc, i: int, h: torch.Tensor) -> torch.Tensor:
    """Slot ``i`` of a naive CLDC's input as its BN normalises it (batch or running stats)."""
    running = None if cldc.running_mean is None else (cldc.running_mean, cldc.running_var)
    running = None if running is None else tuple(t[:, i] for t in running)
    return _normalise(h, cldc.training, running, cldc.eps)


def _normalise(h: torch.Tensor, training: bool, running, eps: float) -> torch.Tensor:
    """``h`` normalised per channel as a BN does: by batch statistics in training or without
    running ones, else by ``running`` (mean, var)."""
    if training or running is None:
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean, var = (t.view(1, -1, 1, 1) for t in running)
    return (h - mean) / torch.sqrt(var + eps)


def cldc_term_scales(module: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """``record_cldc_term_scales(weights=True)`` of one training step of a copy of the naive
    ``module`` on ``x``: the term sizes for comparing CLDC gradients across usage patterns."""
    copy_ = copy.deepcopy(module).train()
    scales, handles = record_cldc_term_scales(copy_, weights=True)
    try:
        train_step(copy_, x)
    finally:
        for h in handles:
            h.remove()
    return scales


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal, NaN where the other is NaN."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])


def check(actual: Step, expected: Step, tol: float, scales: dict[str, float]) -> None:
    """``actual`` reproduces ``expected`` to ``tol``; CLDC bias and BN weight gradients against
    the size of their terms (``scales``, from ``observe``)."""
    assert_same_step(actual, expected, tol, scales=scales)


def observe(module, x, grad, as_output=lambda out: out, as_input=lambda x: x):
    """``train_step`` of ``module``, and for a naive module the term scales of its CLDC bias
    and BN weight gradients (empty for an efficient one: its BNs are not called)."""
    # Hooks on the BNs and convs of an efficient module would make it run unfused.
    naive = not any(type(m).__module__.startswith("dense_ext") for m in module.modules())
    scales, handles = record_cldc_term_scales(module, norms=naive)
    try:
        step = train_step(module, x, grad, as_input=as_input, as_output=as_output)
    finally:
        for h in handles:
            h.remove()
    return step, scales


def cat_slots(slots):
    return torch.cat(slots, 1)


def compare_stage(
    naive, efficient, x, tol=TOLERANCE[torch.float64], seed=1, oracle=None, miss=None
):
    """One training step of a naive and an efficient stage: float64 to ``tol`` (CLDC bias
    gradients against their terms); lower precision by the tolerance rule against ``oracle``
    (tests/helpers.py)."""
    if x.dtype != torch.float64:
        check_step(efficient, naive, x, oracle=oracle, seed=seed, as_output=cat_slots, miss=miss)
        return
    torch.manual_seed(seed)
    s, c = efficient.spec.num_slots, efficient.spec.channels
    grad = torch.randn(x.shape[0], s * c, *x.shape[2:], dtype=x.dtype, device=x.device)
    expected, scales = observe(naive, x, grad, cat_slots)
    actual, _ = observe(efficient, x, grad)
    add_rounding_floor(scales, expected, tol)
    check(actual, expected, tol, scales)


# Rounding units (float64 eps) of the step's largest parameter gradient that any parameter
# gradient may be off by (add_rounding_floor).
FLOOR_ULPS = 100


def add_rounding_floor(scales, expected: Step, tol: float) -> None:
    """Let every parameter gradient be off by ``FLOOR_ULPS`` float64 rounding units of the
    step's largest parameter gradient when that is more than ``tol`` of its own size.

    A gradient that is what is left after cancellations upstream of its own sum is rounding
    noise at that level, and the term scales of ``observe`` do not see those cancellations.
    Hypothesis found one: a stage of 2 channels over five values in training, where layer 2's
    CLDC weight gradient was 8e-7 while the largest was about 2. That gradient moved by
    3.3e-16 between two naive steps that differ only in summation order (contiguous and
    channels_last input), and the efficient one was 3.1e-16 from naive: 3.6e-10 of its size,
    1.5e-16 of the largest. 1 to 3 of the 2,140 training configurations per backend (5 slots
    or fewer, up to 8 channels, up to 3x6x6 values) failed that way. The floor is an absolute
    error about 2e-4 of ``tol``'s relative one on the largest gradient, so a wrong gradient of any
    size that matters still fails."""
    if tol <= 0:  # an exact comparison stays exact
        return
    largest = max(
        (g.abs().max().item() for g in expected.grads.values() if g is not None and g.numel()),
        default=0.0,
    )
    floor = FLOOR_ULPS * torch.finfo(torch.float64).eps * largest / tol
    for name, value in expected.grads.items():
        if value is not None:
            key = f"grad of {name}"
            scales[key] = max(scales.get(key, 0.0), floor)


def make_model_pair(backend, dtype=torch.float64, memory="min", small_inputs=True):
    torch.manual_seed(0)
    config = dict(stage_slots=(3, 4), stage_channels=(4, 8), stem_channels=3, num_classes=5)
    naive = DelugeNet(**config, small_inputs=small_inputs).to(dtype)
    randomize(naive)
    efficient = DelugeNet(
        **config, small_inputs=small_inputs, efficient=True, memory=memory, backend=backend
    ).to(dtype)
    efficient.load_state_dict(naive.state_dict())
    return naive, efficient


def compare_models(naive, efficient, x, tol=TOLERANCE[torch.float64]):
    grad = torch.randn(x.shape[0], naive.classifier.out_features, dtype=x.dtype, device=x.device)
    expected, scales = observe(naive, x, grad)
    actual, _ = observe(efficient, x, grad)
    check(actual, expected, tol, scales)
