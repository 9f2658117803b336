"""Checkpoints of a training run: what is saved, how it is written and read back."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read, or used for this run."""


def rng_state() -> dict:
    """This process's generator states: torch (CPU and CUDA), NumPy and Python."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(state: dict, path: Path) -> None:
    """Write ``state`` to ``path``; a crash while saving never leaves a truncated file."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def resolve(path: str) -> Path:
    """The checkpoint file ``--resume`` names (a file, or a run folder's last.pt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {str(p)!r}")
    return p


def load(path: Path) -> dict:
    """Read a checkpoint written by ``save`` (clear error if it is not one)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"--resume: cannot read {str(path)!r}: {exc}") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"--resume: {str(path)!r} is not a training checkpoint")
    return state
