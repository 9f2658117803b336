"""Backend selection for DelugeNet stages, with the dense block's rules
(``dense_ext.backends.registry``): ``get_backend(name, device)`` returns the ``StageBackend``
that ``name`` ("auto", "reference", "cpp" or "triton") selects for ``device``.
"""

from __future__ import annotations

import torch

from dense_ext.backends.registry import (
    BACKEND_NAMES,
    BackendRegistry,
    BackendUnavailableError,
)
from dense_ext.deluge.backends.base import StageBackend

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "resolve_backend_name",
    "unavailable_reason",
]

_REGISTRY: BackendRegistry[StageBackend] = BackendRegistry(
    "stage",
    "DelugeNet backend",
    {
        "reference": "dense_ext.deluge.backends.reference",
        "cpp": "dense_ext.deluge.backends.cpp",
        "triton": "dense_ext.deluge.backends.triton",
    },
)


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why stage backend ``name`` cannot run on ``device``, or None if it can."""
    return _REGISTRY.unavailable_reason(name, device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the stage backends that can run on ``device``."""
    return _REGISTRY.available(device)


def resolve_backend_name(name: str, device: torch.device | str) -> str:
    """The stage backend that ``name`` (possibly ``auto``) selects for ``device``."""
    return _REGISTRY.resolve_name(name, device)


def get_backend(name: str, device: torch.device | str) -> StageBackend:
    """The stage backend object that ``name`` selects for ``device`` (traceable by
    torch.compile)."""
    return _REGISTRY.get(name, device)
