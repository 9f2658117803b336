"""Training recipes: the published hyperparameters of a model, as training-CLI defaults.

A recipe is a set of values for the CLI's options (``epochs``, ``batch_size``, ``lr``, ...).
``--model NAME`` brings the recipe ``recipe_for(NAME)`` names, unless ``--recipe`` says
otherwise; any option given on the command line still wins. So the trainer knows no model:
a model family registers its recipe here, next to the others.

The named configurations of the papers carry their paper's recipe; models built from a
pattern (``densenet_bc_<depth>``, the CLI's default ``densenet_bc_40``) carry none and use
the CLI's own defaults (a short run).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """A named set of training-CLI defaults and where it comes from."""

    name: str
    source: str
    values: Mapping[str, Any]

    def describe(self) -> str:
        """One line: the recipe's name and values."""
        v = self.values
        parts = [f"{v['epochs']} epochs", f"batch {v['batch_size']}/process", f"lr {v['lr']:g}"]
        if v.get("schedule") == "step":
            at = ", ".join(f"{m:.0%}" for m in v["lr_milestones"])
            parts[-1] += f" x{v['lr_gamma']:g} at {at}"
        parts += [f"Nesterov momentum {v['momentum']:g}", f"weight decay {v['weight_decay']:g}"]
        return f"{self.name} ({self.source}): {', '.join(parts)}"


def _recipe(name: str, source: str, **values: Any) -> Recipe:
    return Recipe(name, source, MappingProxyType(values))


_SGD = dict(momentum=0.9, weight_decay=1e-4, schedule="step", lr_gamma=0.1, drop_rate=0.0)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # Huang et al., CVPR 2017, section 4.2. With augmentation (the CLI always augments
        # CIFAR) there is no dropout; the paper's 0.2 is for the unaugmented datasets.
        _recipe(
            "densenet-cifar",
            "Huang et al. 2017, CIFAR",
            epochs=300,
            batch_size=64,
            lr=0.1,
            lr_milestones=(0.5, 0.75),
            **_SGD,
        ),
        _recipe(
            "densenet-imagenet",
            "Huang et al. 2017, ImageNet",
            epochs=90,
            batch_size=256,
            lr=0.1,
            lr_milestones=(1 / 3, 2 / 3),  # epochs 30 and 60
            **_SGD,
        ),
        # Kuen, Kong, Wang, CVPR 2017 (CIFAR): weight decay on all parameters, /10 at
        # epochs 150 and 225 of 300.
        _recipe(
            "delugenet-cifar",
            "Kuen et al. 2017, CIFAR",
            epochs=300,
            batch_size=64,
            lr=0.1,
            lr_milestones=(0.5, 0.75),
            **_SGD,
        ),
    )
}

MODEL_RECIPES: dict[str, str] = {
    **dict.fromkeys(
        ("densenet_bc_100", "densenet_bc_250", "densenet_bc_190", "densenet_40", "densenet_100"),
        "densenet-cifar",
    ),
    **dict.fromkeys(
        ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264"),
        "densenet-imagenet",
    ),
    # The ImageNet DelugeNets (delugenet92/104/122) have no recipe here yet: the sources at
    # hand give only the CIFAR one.
    **dict.fromkeys(("delugenet146", "delugenet218", "wide_delugenet146"), "delugenet-cifar"),
}


def recipe_for(model: str) -> Recipe | None:
    """The recipe ``model`` carries by default (None: the CLI's own defaults)."""
    name = MODEL_RECIPES.get(model)
    return None if name is None else RECIPES[name]
