"""Hypothesis when it is installed; otherwise its property tests skip, the rest still runs.

The GPU image may lack hypothesis (bench/gpu_suite.sh runs there without network), and a test
module must not fail at import because of an optional tool. Import ``given``, ``settings``,
``st``, ``HealthCheck`` and ``assume`` from here: without hypothesis, ``@given(...)`` marks the
test skipped and ``settings`` / ``st`` / ``HealthCheck`` / ``assume`` accept anything and do
nothing.
"""

from __future__ import annotations

import pytest

try:
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:
    HAVE_HYPOTHESIS = False

    class _Inert:
        """Stands in for ``strategies`` and ``HealthCheck``: every attribute and call is inert."""

        def __getattr__(self, name: str) -> _Inert:
            return self

        def __call__(self, *args, **kwargs) -> _Inert:
            return self

    st = HealthCheck = _Inert()  # type: ignore[assignment]

    def given(*args, **kwargs):  # type: ignore[no-redef]
        return pytest.mark.skip(reason="hypothesis is not installed")

    def settings(*args, **kwargs):  # type: ignore[no-redef]
        return lambda test: test

    def assume(condition) -> bool:  # type: ignore[misc]
        return True


__all__ = ["HAVE_HYPOTHESIS", "HealthCheck", "assume", "given", "settings", "st"]
