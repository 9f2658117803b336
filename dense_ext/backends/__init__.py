"""Backend selection for dense blocks: the rules of ``dense_ext.backends.registry``.

``get_backend(name, device)`` returns the ``Backend`` that ``name`` ("auto", "reference", "cpp"
or "triton") selects for ``device``; ``available_backends``, ``unavailable_reason`` and
``resolve_backend_name`` say what can run and why not.
"""

from __future__ import annotations

import torch

from dense_ext.backends.base import Backend
from dense_ext.backends.registry import (
    BACKEND_NAMES,
    BackendRegistry,
    BackendUnavailableError,
)

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "available_backends",
    "check_backend_name",
    "get_backend",
    "resolve_backend_name",
    "unavailable_reason",
]

_REGISTRY: BackendRegistry[Backend] = BackendRegistry(
    "block",
    "backend",
    {
        "reference": "dense_ext.backends.reference",
        "cpp": "dense_ext.backends.cpp",
        "triton": "dense_ext.backends.triton",
    },
)


def check_backend_name(name: str, where: str = "") -> None:
    """ValueError unless ``name`` is ``"auto"`` or a backend name (``where`` says where the
    name came from, e.g. " in the environment variable DENSE_EXT_BACKEND")."""
    _REGISTRY.check_name(name, where)


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None if it can."""
    return _REGISTRY.unavailable_reason(name, device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``."""
    return _REGISTRY.available(device)


def resolve_backend_name(name: str, device: torch.device | str) -> str:
    """The backend that ``name`` (possibly ``auto``) selects for ``device``."""
    return _REGISTRY.resolve_name(name, device)


def get_backend(name: str, device: torch.device | str) -> Backend:
    """The backend object that ``name`` selects for ``device`` (traceable by torch.compile)."""
    return _REGISTRY.get(name, device)
