"""DenseNet and DelugeNet models (naive and efficient) and a registry of named configurations.

``get_model(name, **kwargs)`` builds a model by name; ``MODEL_NAMES`` lists the named
configurations. Besides those, any ``densenet_bc_<depth>`` (depth = 6n+4) and
``densenet_<depth>`` (depth = 3n+4) is accepted with growth rate 12 unless given.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from python_models.delugenet import (
    DelugeNet,
    delugenet92,
    delugenet104,
    delugenet122,
    delugenet146,
    delugenet218,
    delugenet_cifar,
    wide_delugenet146,
)
from python_models.densenet import (
    DenseNet,
    densenet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_bc,
)

_IMAGENET: dict[str, Callable[..., DenseNet]] = {
    "densenet121": densenet121,
    "densenet161": densenet161,
    "densenet169": densenet169,
    "densenet201": densenet201,
    "densenet264": densenet264,
}
# The CIFAR configurations of Huang et al. (Table 2): name -> (builder, depth, growth rate).
_CIFAR: dict[str, tuple[Callable[..., DenseNet], int, int]] = {
    "densenet_bc_100": (densenet_bc, 100, 12),
    "densenet_bc_250": (densenet_bc, 250, 24),
    "densenet_bc_190": (densenet_bc, 190, 40),
    "densenet_40": (densenet, 40, 12),
    "densenet_100": (densenet, 100, 12),
}
_DELUGENETS: dict[str, Callable[..., DelugeNet]] = {
    "delugenet146": delugenet146,
    "delugenet218": delugenet218,
    "wide_delugenet146": wide_delugenet146,
    "delugenet92": delugenet92,
    "delugenet104": delugenet104,
    "delugenet122": delugenet122,
}
MODEL_NAMES: tuple[str, ...] = (*_CIFAR, *_IMAGENET, *_DELUGENETS)
_PATTERN = re.compile(r"densenet(_bc)?_(\d+)")


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model ``name`` (see ``MODEL_NAMES``); ``kwargs`` go to its builder.

    DenseNets take ``growth_rate``, ``num_classes``, ``efficient``, ``memory``, ``backend``,
    ``drop_rate`` and the other ``DenseNet`` arguments; DelugeNets ``num_classes``,
    ``efficient``, ``memory`` and ``backend``. Raises ValueError for unknown names.
    """
    if name in _DELUGENETS:
        return _DELUGENETS[name](**kwargs)
    if name in _IMAGENET:
        return _IMAGENET[name](**kwargs)
    if name in _CIFAR:
        builder, depth, growth_rate = _CIFAR[name]
        return builder(depth=depth, **{"growth_rate": growth_rate, **kwargs})
    match = _PATTERN.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"unknown model {name!r}; choose one of {MODEL_NAMES} or "
            "densenet_bc_<depth> / densenet_<depth>"
        )
    builder = densenet_bc if match.group(1) else densenet
    return builder(depth=int(match.group(2)), **kwargs)


__all__ = [
    "MODEL_NAMES",
    "DelugeNet",
    "DenseNet",
    "densenet",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_bc",
    "delugenet92",
    "delugenet104",
    "delugenet122",
    "delugenet146",
    "delugenet218",
    "delugenet_cifar",
    "get_model",
    "wide_delugenet146",
]
