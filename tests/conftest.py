"""Shared test helpers. Nothing here touches a GPU at import time."""

from __future__ import annotations

import pytest
import torch

# Relative tolerances against the naive oracle: exact up to rounding.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute when expected is all zero)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() or 1.0
    return (actual - expected).abs().max().item() / scale


def assert_close(actual, expected, tol: float, what: str) -> None:
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
