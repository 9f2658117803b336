"""Stage backend selection, with the dense block's rules.

``auto`` picks, for CUDA tensors, ``triton`` when Triton works, else ``cpp`` when the extension
was built with CUDA, else ``reference``; for CPU tensors ``cpp`` when the extension is built,
else ``reference``. ``DENSE_EXT_BACKEND`` replaces ``auto``. A backend requested by name that
cannot run raises ``BackendUnavailableError``; ``auto`` falls back with one warning per reason.

Each backend module exposes ``unavailable_reason(device) -> str | None`` and ``get_backend()``.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from dense_ext.backends import BackendUnavailableError
from dense_ext.deluge.backends.base import StageBackend

BACKEND_NAMES = ("reference", "cpp", "triton")
_MODULES = {
    "reference": "dense_ext.deluge.backends.reference",
    "cpp": "dense_ext.deluge.backends.cpp",
    "triton": "dense_ext.deluge.backends.triton",
}
_warned: set[str] = set()


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why stage backend ``name`` cannot run on ``device``, or None if it can."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto', *BACKEND_NAMES)}")
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # a missing or broken optional dependency
        return f"importing {_MODULES[name]} failed: {type(exc).__name__}: {exc}"
    return module.unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the stage backends that can run on ``device``."""
    return [name for name in BACKEND_NAMES if unavailable_reason(name, device) is None]


def _preference(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "cpp", "reference")
    return ("cpp", "reference")


def resolve_backend_name(name: str, device: torch.device | str) -> str:
    """The stage backend that ``name`` (possibly ``auto``) selects for ``device``."""
    device = torch.device(device)
    if name == "auto":
        name = os.environ.get("DENSE_EXT_BACKEND", "auto") or "auto"
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"dense_ext DelugeNet backend {name!r} is unavailable on {device}: {reason}"
            )
        return name
    for candidate in _preference(device):
        reason = unavailable_reason(candidate, device)
        if reason is None:
            return candidate
        _warn_once(
            f"dense_ext: DelugeNet backend {candidate!r} unavailable on {device.type} "
            f"({reason}); falling back"
        )
    raise BackendUnavailableError(f"no dense_ext DelugeNet backend can run on {device}")


def get_backend(name: str, device: torch.device | str) -> StageBackend:
    """The stage backend object that ``name`` selects for ``device``."""
    resolved = resolve_backend_name(name, device)
    return importlib.import_module(_MODULES[resolved]).get_backend()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
