"""Backend selection, shared by dense blocks (``dense_ext.backends``) and DelugeNet stages
(``dense_ext.deluge.backends``).

``auto`` picks, for CUDA tensors, ``triton`` when Triton works, else ``cpp`` when the extension
was built with CUDA, else ``reference``; for CPU tensors ``cpp`` when the extension is built,
else ``reference``. The environment variable ``DENSE_EXT_BACKEND`` replaces ``auto``. A backend
requested by name that cannot run raises ``BackendUnavailableError``; ``auto`` falls back with
one warning per reason.

Each backend module exposes ``unavailable_reason(device) -> str | None`` and ``get_backend()``.
The choice for a (name, device) pair is made by ``_resolve``, which ``torch.compile`` treats as
a constant: it runs eagerly while a graph is traced (module imports and availability probes
cannot be traced) and the compiled graph keeps the backend it chose.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import torch

BACKEND_NAMES = ("reference", "cpp", "triton")
ENV_VARIABLE = "DENSE_EXT_BACKEND"

BackendT = TypeVar("BackendT")


class BackendUnavailableError(RuntimeError):
    """A backend requested by name cannot run on this machine or device."""


class BackendRegistry(Generic[BackendT]):
    """The backends of one kind of module (``kind``: "block" or "stage"), each in its own
    module (``modules``: backend name -> module path), selected by the rules of the module
    docstring. ``label`` names them in messages ("backend", "DelugeNet backend")."""

    def __init__(self, kind: str, label: str, modules: Mapping[str, str]) -> None:
        if set(modules) != set(BACKEND_NAMES):
            raise ValueError(f"a registry needs modules for {BACKEND_NAMES}, got {set(modules)}")
        self.kind = kind
        self.label = label
        self.modules = dict(modules)
        # Backend objects by name, filled by _resolve before get() reads them.
        self._instances: dict[str, BackendT] = {}
        # (name, DENSE_EXT_BACKEND, device type, device index) -> backend name: availability is
        # probed once per device, not per forward.
        self._resolved: dict[tuple[str, str, str, int], str] = {}
        self._warned: set[str] = set()
        _REGISTRIES[kind] = self

    def check_name(self, name: str, where: str = "") -> None:
        """ValueError unless ``name`` is ``"auto"`` or a backend name (``where`` says where the
        name came from, e.g. " in the environment variable DENSE_EXT_BACKEND")."""
        if name != "auto" and name not in BACKEND_NAMES:
            raise ValueError(
                f"unknown backend {name!r}{where}; choose one of {('auto', *BACKEND_NAMES)}"
            )

    def unavailable_reason(self, name: str, device: torch.device | str) -> str | None:
        """Why backend ``name`` cannot run on ``device``, or None if it can."""
        self.check_name(name)
        if name == "auto":
            raise ValueError("unavailable_reason needs a backend name, not 'auto'")
        try:
            module = importlib.import_module(self.modules[name])
        except Exception as exc:  # a missing or broken optional dependency
            return f"importing {self.modules[name]} failed: {type(exc).__name__}: {exc}"
        return module.unavailable_reason(torch.device(device))

    def available(self, device: torch.device | str = "cpu") -> list[str]:
        """Names of the backends that can run on ``device``."""
        return [name for name in BACKEND_NAMES if self.unavailable_reason(name, device) is None]

    def resolve_name(self, name: str, device: torch.device | str) -> str:
        """The backend that ``name`` (possibly ``auto``) selects for ``device``."""
        device = torch.device(device)
        self.check_name(name)
        if name == "auto":
            name = os.environ.get(ENV_VARIABLE, "auto") or "auto"
            self.check_name(name, where=f" in the environment variable {ENV_VARIABLE}")
        if name != "auto":
            reason = self.unavailable_reason(name, device)
            if reason is not None:
                raise BackendUnavailableError(
                    f"dense_ext {self.label} {name!r} is unavailable on {device}: {reason}"
                )
            return name
        for candidate in _preference(device):
            reason = self.unavailable_reason(candidate, device)
            if reason is None:
                return candidate
            self._warn_once(
                f"dense_ext: {self.label} {candidate!r} unavailable on {device.type} "
                f"({reason}); falling back"
            )
        raise BackendUnavailableError(  # pragma: no cover  (reference always runs)
            f"no dense_ext {self.label} can run on {device}"
        )

    def get(self, name: str, device: torch.device | str) -> BackendT:
        """The backend object that ``name`` selects for ``device`` (traceable by
        torch.compile)."""
        device = torch.device(device)
        index = -1 if device.index is None else device.index
        return self._instances[_resolve(self.kind, name, device.type, index)]

    def reset(self) -> None:
        """Forget every cached choice, backend object and warning (tests)."""
        self._instances.clear()
        self._resolved.clear()
        self._warned.clear()

    def _resolve_cached(self, name: str, device_type: str, device_index: int) -> str:
        key = (name, os.environ.get(ENV_VARIABLE, ""), device_type, device_index)
        resolved = self._resolved.get(key)
        if resolved is None:
            device = (
                torch.device(device_type)
                if device_index < 0
                else torch.device(device_type, device_index)
            )
            resolved = self._resolved[key] = self.resolve_name(name, device)
        if resolved not in self._instances:
            module = importlib.import_module(self.modules[resolved])
            self._instances[resolved] = module.get_backend()
        return resolved

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=5)


_REGISTRIES: dict[str, BackendRegistry[Any]] = {}


def _preference(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "cpp", "reference")
    return ("cpp", "reference")


def _resolve(kind: str, name: str, device_type: str, device_index: int) -> str:
    """The backend name registry ``kind`` selects for (name, device type, index; -1 for none),
    with that backend's object created. Only constants in and out, so that torch.compile can
    call it while tracing and keep the result."""
    return _REGISTRIES[kind]._resolve_cached(name, device_type, device_index)


# What torch.compiler.assume_constant_result(_resolve) does, without importing torch._dynamo (and
# with it triton) whenever dense_ext is imported; tests/test_compile.py compiles a block cold.
_resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]
