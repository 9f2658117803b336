"""Checkpoints of a training run: what is saved, how it is written, how it is read back.

A checkpoint is a dict of tensors and plain Python values (dicts, lists, tuples, str, int,
float, bool, None) and nothing else, so it loads with ``torch.load(weights_only=True)``: a
file that names any other Python object is refused before anything in it runs. Generator
states are stored as tensors and ints for the same reason.

Writes are atomic: the checkpoint goes to a temporary file in the same folder, is flushed
and fsynced, then renamed over the old one (and the folder fsynced), so a crash or a full
disk mid-save leaves the previous checkpoint in place, never a truncated one.

Keys (``FORMAT``, version 2): ``format``, ``version``, ``model``, ``optimizer``, ``scaler``,
``epoch`` (completed), ``step`` (optimiser steps taken), ``sampler`` (``seed``, ``epoch``,
``offset``: batches of that epoch already trained, ``batch_size``, ``world_size``),
``ranks`` (one entry per process: ``rng`` and the unfinished epoch's ``progress``),
``best_acc``, ``history``, ``batch_size``, ``args``. Only ``model`` and ``epoch`` are
required; a reader falls back (and says so) when the others are missing.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "dense-ext-train"
VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read safely, or used for this run."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one (if any) is untouched."""


# ----------------------------------------------------------------------------- generators


def capture_rng(device: torch.device | None = None) -> dict:
    """This process's generator states (torch CPU, ``device``'s CUDA generator, NumPy,
    Python) as tensors and ints."""
    numpy_state = np.random.get_state(legacy=False)
    version, words, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": None,
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": {"version": version, "words": torch.tensor(words), "gauss": gauss},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device | None = None) -> None:
    """Set the generators to what ``capture_rng`` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"].tolist()), p["gauss"]))
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- writing


def save(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename, fsync folder).

    Raises ``CheckpointWriteError`` (the temporary file removed, ``path`` untouched) when
    the write fails, e.g. on a full disk. A success also removes the temporary files of
    ``path`` that a process killed mid-save left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            raise CheckpointWriteError(
                exc.errno,
                f"cannot write checkpoint {str(path)!r}: {reason} (the previous "
                "checkpoint, if any, is untouched)",
            ) from exc
        raise
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-save
        with contextlib.suppress(OSError):
            stale.unlink()


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk (POSIX; not on Windows).
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- reading


def load(path: str | os.PathLike) -> dict:
    """Read a training checkpoint safely (``weights_only=True``, memory-mapped).

    Raises ``CheckpointError`` with one line saying why when the file cannot be read, holds
    anything but tensors and plain data (nothing in it runs), or is not a training checkpoint.
    """
    path = Path(path)
    where = repr(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except OSError as exc:
        raise CheckpointError(f"cannot read {where}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise CheckpointError(
            f"{where} is not a readable training checkpoint: {_why(exc)}"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(
            f"{where} is not a training checkpoint (expected a dict with 'model' and 'epoch'"
            f"{', found a bare state_dict' if _is_state_dict(state) else ''})"
        )
    if not isinstance(state.get("epoch"), int):
        raise CheckpointError(f"{where} is not a training checkpoint: it has no 'epoch' count")
    return state


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _why(exc: Exception) -> str:
    text = str(exc)
    if "Weights only load failed" in text:
        # torch's message is a paragraph; keep the line naming what was refused.
        found = re.search(r"(Trying to load unsupported[^\n]*|Unsupported[^\n]*)", text)
        what = found.group(1).strip() if found else "objects other than tensors and plain data"
        return f"it holds Python objects a safe load refuses, not run ({what})"
    if isinstance(exc, (KeyError, RuntimeError, EOFError)) or "zip" in text:
        return "not a complete torch.save archive (truncated, or another kind of file)"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def latest(folder: str | os.PathLike) -> tuple[Path, dict]:
    """The newest valid checkpoint among the ``*.pt`` files of a run folder, loaded.

    Newest: the most optimiser steps (``last.pt`` on a tie). Files that fail ``load``
    (truncated, foreign, unsafe) are skipped; if none is valid, the error lists why.
    """
    folder = Path(folder)
    best: tuple[tuple[int, int, bool], Path, dict] | None = None
    refused = []
    for path in sorted(folder.glob("*.pt")):
        try:
            state = load(path)
        except CheckpointError as exc:
            refused.append(str(exc))
            continue
        key = (int(state.get("step", 0)), int(state["epoch"]), path.name == "last.pt")
        if best is None or key > best[0]:
            best = (key, path, state)
    if best is None:
        reasons = f": {'; '.join(refused)}" if refused else " (no *.pt files)"
        raise CheckpointError(f"no valid checkpoint in {str(folder)!r}{reasons}")
    return best[1], best[2]


def find(path: str | os.PathLike) -> tuple[Path, dict]:
    """The checkpoint ``--resume`` names, loaded: a file, or a run folder's newest valid one."""
    p = Path(path).expanduser()
    if p.is_dir():
        return latest(p)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {str(p)!r}")
    return p, load(p)


# ----------------------------------------------------------------------------- models


def model_mismatch(model: nn.Module, state_dict: dict) -> str | None:
    """What keeps ``state_dict`` from loading into ``model`` (None if it fits): every
    missing key, unexpected key and shape difference, counted, with the first few named."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {list(state_dict[k].shape)} vs {list(own[k].shape)}"
        for k in own
        if k in state_dict
        and torch.is_tensor(state_dict[k])
        and state_dict[k].shape != own[k].shape
    ]
    parts = [
        f"{len(items)} {label}: {_first(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape (checkpoint vs model)", shapes),
        )
        if items
    ]
    return "; ".join(parts) or None


def _first(items: list[str], n: int = 3) -> str:
    more = f", ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
