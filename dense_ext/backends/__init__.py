"""Backend selection.

``auto`` picks, for CUDA tensors, ``triton`` when Triton works, else ``cpp`` when the extension
was built with CUDA, else ``reference``; for CPU tensors ``cpp`` when the extension is built,
else ``reference``. The environment variable ``DENSE_EXT_BACKEND`` replaces ``auto``. A backend
requested by name that cannot run raises; ``auto`` falls back with one warning per reason.

Each backend module exposes ``unavailable_reason(device) -> str | None`` and ``get_backend()``.
The choice for a (name, device) pair is made by ``_resolve``, which ``torch.compile`` treats as
a constant: it runs eagerly while a graph is traced (module imports and availability probes
cannot be traced) and the compiled graph keeps the backend it chose.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from dense_ext.backends.base import Backend

BACKEND_NAMES = ("reference", "cpp", "triton")
_MODULES = {
    "reference": "dense_ext.backends.reference",
    "cpp": "dense_ext.backends.cpp",
    "triton": "dense_ext.backends.triton",
}
_ENV = "DENSE_EXT_BACKEND"
_warned: set[str] = set()
# Backend objects by name, filled by _resolve before get_backend reads them.
_INSTANCES: dict[str, Backend] = {}
# (name, DENSE_EXT_BACKEND, device type, device index) -> backend name: availability is probed
# once per device, not per forward.
_RESOLVED: dict[tuple[str, str, str, int], str] = {}


class BackendUnavailableError(RuntimeError):
    """A backend requested by name cannot run on this machine or device."""


def check_backend_name(name: str, where: str = "") -> None:
    """ValueError unless ``name`` is ``"auto"`` or a backend name (``where`` says where the
    name came from, e.g. " in the environment variable DENSE_EXT_BACKEND")."""
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {name!r}{where}; choose one of {('auto', *BACKEND_NAMES)}"
        )


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None if it can."""
    check_backend_name(name)
    if name == "auto":
        raise ValueError("unavailable_reason needs a backend name, not 'auto'")
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # a missing or broken optional dependency
        return f"importing {_MODULES[name]} failed: {type(exc).__name__}: {exc}"
    return module.unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``."""
    return [name for name in BACKEND_NAMES if unavailable_reason(name, device) is None]


def _preference(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "cpp", "reference")
    return ("cpp", "reference")


def resolve_backend_name(name: str, device: torch.device | str) -> str:
    """The backend that ``name`` (possibly ``auto``) selects for ``device``."""
    device = torch.device(device)
    check_backend_name(name)
    if name == "auto":
        name = os.environ.get(_ENV, "auto") or "auto"
        check_backend_name(name, where=f" in the environment variable {_ENV}")
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"dense_ext backend {name!r} is unavailable on {device}: {reason}"
            )
        return name
    for candidate in _preference(device):
        reason = unavailable_reason(candidate, device)
        if reason is None:
            return candidate
        _warn_once(
            f"dense_ext: backend {candidate!r} unavailable on {device.type} ({reason}); "
            "falling back"
        )
    raise BackendUnavailableError(f"no dense_ext backend can run on {device}")  # pragma: no cover


def _resolve(name: str, device_type: str, device_index: int) -> str:
    """``resolve_backend_name`` for a device given as (type, index; -1 for none), with the
    chosen backend's object instantiated in ``_INSTANCES``."""
    key = (name, os.environ.get(_ENV, ""), device_type, device_index)
    resolved = _RESOLVED.get(key)
    if resolved is None:
        device = (
            torch.device(device_type)
            if device_index < 0
            else torch.device(device_type, device_index)
        )
        resolved = _RESOLVED[key] = resolve_backend_name(name, device)
    if resolved not in _INSTANCES:
        _INSTANCES[resolved] = importlib.import_module(_MODULES[resolved]).get_backend()
    return resolved


# What torch.compiler.assume_constant_result(_resolve) does, without importing torch._dynamo (and
# with it triton) whenever dense_ext is imported; tests/test_compile.py compiles a block cold.
_resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]


def get_backend(name: str, device: torch.device | str) -> Backend:
    """The backend object that ``name`` selects for ``device`` (traceable by torch.compile)."""
    device = torch.device(device)
    index = -1 if device.index is None else device.index
    return _INSTANCES[_resolve(name, device.type, index)]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
