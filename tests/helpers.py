"""The one test harness: tolerances, comparisons and a training step that records everything a
drop-in module must reproduce (output, input gradient, every parameter gradient, every buffer
after forward and after backward). Nothing here touches a GPU at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

# Relative tolerances for "exact up to rounding" against an independent implementation.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute when expected is all zero); NaN and
    Inf must sit at the same places with the same values (else the error is inf)."""
    actual, expected = actual.double(), expected.double()
    special = ~torch.isfinite(expected) | ~torch.isfinite(actual)
    if special.any():
        same = torch.equal(actual[special].nan_to_num(), expected[special].nan_to_num())
        same = same and torch.equal(actual[special].isnan(), expected[special].isnan())
        if not same:
            return float("inf")
        actual, expected = actual[~special], expected[~special]
        if expected.numel() == 0:
            return 0.0
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().item() or 1.0
    return (actual - expected).abs().max().item() / scale


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def cpu_backend_or_skip(name: str) -> str:
    from dense_ext.backends import unavailable_reason

    reason = unavailable_reason(name, "cpu")
    if reason is not None:
        pytest.skip(f"backend {name} unavailable: {reason}")
    return name


def cuda_or_skip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _name(name: str) -> str:
    """A parameter/buffer name without torch.compile's wrapper prefix."""
    return name.removeprefix("_orig_mod.")


def buffers(module: nn.Module) -> dict[str, Tensor]:
    """Copies of every buffer (running statistics, counters), by state_dict name."""
    return {_name(name): b.detach().clone() for name, b in module.named_buffers()}


@dataclass
class Step:
    """Everything one training step of a module produced."""

    output: Tensor
    input_grad: Tensor | None
    grads: dict[str, Tensor | None]
    buffers_after_forward: dict[str, Tensor]
    buffers_after_backward: dict[str, Tensor]


def train_step(module: nn.Module, x: Tensor, grad: Tensor | None = None, seed: int = 0) -> Step:
    """Forward ``x`` (seeded with ``seed``, so dropout draws repeat), backward ``grad`` (a
    seeded random tensor shaped like the output when None)."""
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = module(x)
    after_forward = buffers(module)
    if grad is None:
        generator = torch.Generator().manual_seed(seed + 1)
        grad = torch.randn(out.shape, dtype=out.dtype, generator=generator).to(out.device)
    out.backward(grad)
    grads = {
        _name(name): None if p.grad is None else p.grad.clone()
        for name, p in module.named_parameters()
    }
    return Step(out.detach(), x.grad, grads, after_forward, buffers(module))


def assert_same_step(actual: Step, expected: Step, tol: float, what: str = "") -> None:
    """``actual`` reproduces ``expected``: output, input gradient, every parameter's gradient
    (the same parameters got one) and every buffer after forward and after backward."""
    prefix = f"{what}: " if what else ""
    assert_close(actual.output, expected.output, tol, f"{prefix}output")
    if expected.input_grad is not None:
        assert actual.input_grad is not None, f"{prefix}no input gradient"
        assert_close(actual.input_grad, expected.input_grad, tol, f"{prefix}input gradient")
    assert actual.grads.keys() == expected.grads.keys(), f"{prefix}parameter names differ"
    for name, g in expected.grads.items():
        a = actual.grads[name]
        assert (a is None) == (g is None), f"{prefix}{name}: gradient presence differs"
        if g is not None:
            assert_close(a, g, tol, f"{prefix}grad of {name}")
    for stage in ("buffers_after_forward", "buffers_after_backward"):
        exp, act = getattr(expected, stage), getattr(actual, stage)
        assert act.keys() == exp.keys(), f"{prefix}buffer names differ"
        for name, value in exp.items():
            if value.is_floating_point():
                assert_close(act[name], value, tol, f"{prefix}{name} ({stage})")
            else:
                assert torch.equal(act[name], value), (
                    f"{prefix}{name} ({stage}): {act[name]} != {value}"
                )
