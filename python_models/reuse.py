"""Feature-reuse heat maps of a trained DenseNet or DelugeNet.

``python -m python_models.reuse CHECKPOINT -o reuse.png`` draws, for every dense block (or
DelugeNet stage), how strongly each layer reads each earlier layer's output, as in Figure 5 of
Huang et al. (CVPR 2017) and the DelugeNets slides. ``CHECKPOINT`` is a training checkpoint
(``last.pt``), a run folder (its newest valid checkpoint) or a bare ``state_dict`` file; the
architecture is read from the parameter names, so no model needs to be built.

DenseNet: pixel (s, l) of block b is the average absolute weight (the L1 norm divided by the
number of weights, i.e. normalised by the number of input feature maps) of the first
convolution of layer ``l`` over the input channels that source ``s`` produced: ``s = 0`` is
the block's input (the stem or the previous transition), ``s >= 1`` layer ``s``. The last
target row is the transition after the block, or the classifier after the last block.

DelugeNet: pixel (i, k) of a stage is ``mean_c |w[c, i]|`` of composite layer ``k``'s cross-
layer depthwise convolution: how much slot ``i`` contributes to layer ``k``'s input. Slot 0 is
the stage's entry; the last row is the transition's (or the head's) CLDC. Layer 1 reads slot 0
through a plain BN, not a CLDC: its row is left blank.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class ReuseMap:
    """One block's (or stage's) heat map: ``values[target, source]``, NaN where no weight
    connects them."""

    title: str
    values: np.ndarray
    sources: list[str]
    targets: list[str]

    def to_json(self) -> dict:
        rows = [[None if np.isnan(v) else float(v) for v in row] for row in self.values]
        return {
            "title": self.title,
            "sources": self.sources,
            "targets": self.targets,
            "values": rows,
        }


def _strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix from every key."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _mean_abs(weight: Tensor, lo: int, hi: int) -> float:
    """Average |w| of the weights reading input channels [lo, hi) (conv or linear weight)."""
    return weight[:, lo:hi].detach().double().abs().mean().item()


def densenet_maps(state_dict: Mapping[str, Tensor]) -> list[ReuseMap]:
    """One map per dense block of a torchvision-structured DenseNet ``state_dict``."""
    sd = _strip_prefix(state_dict)
    pattern = re.compile(r"features\.denseblock(\d+)\.denselayer(\d+)\.conv1\.weight")
    blocks: dict[int, dict[int, Tensor]] = {}
    for key, value in sd.items():
        m = pattern.fullmatch(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
    maps = []
    for b in sorted(blocks):
        layers = [blocks[b][i] for i in sorted(blocks[b])]
        exit_key = f"features.transition{b}.conv.weight"
        exit_name = "transition" if exit_key in sd else "classifier"
        exit_weight = sd[exit_key] if exit_key in sd else sd["classifier.weight"]
        c0 = layers[0].shape[1]
        total = exit_weight.shape[1]
        growth = (total - c0) // len(layers)
        targets = [*layers, exit_weight]
        values = np.full((len(targets), len(layers) + 1), np.nan)
        for t, weight in enumerate(targets):
            for s in range(t + 1):  # target t (layer t+1, or the exit) reads sources 0..t
                lo = 0 if s == 0 else c0 + (s - 1) * growth
                hi = c0 if s == 0 else lo + growth
                values[t, s] = _mean_abs(weight, lo, hi)
        maps.append(
            ReuseMap(
                title=f"dense block {b}",
                values=values,
                sources=["in", *[str(i) for i in range(1, len(layers) + 1)]],
                targets=[*[str(i) for i in range(1, len(layers) + 1)], exit_name],
            )
        )
    return maps


def delugenet_maps(state_dict: Mapping[str, Tensor]) -> list[ReuseMap]:
    """One map per stage of a ``python_models.delugenet`` ``state_dict`` (naive or efficient)."""
    sd = _strip_prefix(state_dict)
    stages = sorted(
        {int(m.group(1)) for k in sd if (m := re.match(r"stage(\d+)\.", k))}
        | {int(m.group(1)) for k in sd if (m := re.match(r"transition(\d+)\.", k))}
    )
    maps = []
    for s in stages:
        exit_key = f"transition{s}.cldc.weight"
        exit_name = "transition"
        if exit_key not in sd:
            exit_key, exit_name = "head.cldc.weight", "head"
        exit_weight = sd[exit_key]
        slots = exit_weight.shape[1]
        values = np.full((slots, slots), np.nan)
        for k in range(2, slots):
            weight = sd[f"stage{s}.layer{k}.cldc.weight"]
            values[k - 1, :k] = weight.detach().double().abs().mean(dim=0).numpy()
        values[slots - 1, :] = exit_weight.detach().double().abs().mean(dim=0).numpy()
        maps.append(
            ReuseMap(
                title=f"stage {s}",
                values=values,
                sources=[str(i) for i in range(slots)],
                targets=[*[str(k) for k in range(1, slots)], exit_name],
            )
        )
    return maps


def reuse_maps(state_dict: Mapping[str, Tensor]) -> list[ReuseMap]:
    """The maps of a DenseNet or DelugeNet ``state_dict``; ValueError for anything else."""
    keys = _strip_prefix(state_dict).keys()
    if any(k.startswith("features.denseblock") for k in keys):
        return densenet_maps(state_dict)
    if "head.cldc.weight" in keys:
        return delugenet_maps(state_dict)
    raise ValueError(
        "not a DenseNet or DelugeNet state_dict (no features.denseblock* or head.cldc.weight)"
    )


def draw(maps: Sequence[ReuseMap], path: str | Path, title: str | None = None) -> Path:
    """Draw the maps side by side into ``path`` (PNG, or any format matplotlib knows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(maps), figsize=(4.2 * len(maps), 4.0), squeeze=False, constrained_layout=True
    )
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # white: no weight
    for ax, m in zip(axes[0], maps):
        image = ax.imshow(np.ma.masked_invalid(m.values), cmap=cmap, origin="upper")
        ax.set_title(m.title)
        ax.set_xlabel("source layer s")
        ax.set_ylabel("target layer l")
        ax.set_xticks(range(len(m.sources)), _thin(m.sources), fontsize=7)
        ax.set_yticks(range(len(m.targets)), _thin(m.targets), fontsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8, label="average |weight|")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _thin(labels: list[str], most: int = 13) -> list[str]:
    """Every label when few, else every n-th (and the last) so that they stay readable."""
    if len(labels) <= most:
        return labels
    step = -(-len(labels) // most)
    return [lab if i % step == 0 or i == len(labels) - 1 else "" for i, lab in enumerate(labels)]


def load_state_dict(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """The model ``state_dict`` of a training checkpoint, run folder or bare state_dict file,
    read safely (``weights_only``); and a description of where it came from."""
    from python_models import checkpoint as ckpt

    p = Path(path).expanduser()
    try:
        found, state = ckpt.find(p)
        return state["model"], f"{found} (epoch {state['epoch']})"
    except ckpt.CheckpointError as exc:
        if not p.is_file():
            raise
        try:
            bare = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            raise exc from None
        if isinstance(bare, dict) and bare and all(torch.is_tensor(v) for v in bare.values()):
            return bare, str(p)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m python_models.reuse",
        description="Feature-reuse heat maps of a trained DenseNet or DelugeNet.",
    )
    parser.add_argument("checkpoint", help="training checkpoint, run folder or state_dict file")
    parser.add_argument("-o", "--output", default="reuse.png", help="image to write")
    parser.add_argument("--json", help="also write the maps' values to this JSON file")
    args = parser.parse_args(argv)
    try:
        state_dict, source = load_state_dict(args.checkpoint)
        maps = reuse_maps(state_dict)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = draw(maps, args.output, title=f"feature reuse: {source}")
    if args.json:
        Path(args.json).write_text(json.dumps([m.to_json() for m in maps], indent=1))
    print(f"{len(maps)} maps from {source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
