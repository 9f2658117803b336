"""Plots of a result document (matplotlib, Agg backend): PNGs beside the JSON.

* ``<stem>-memory-vs-depth.png``: activation memory of one training step against depth of
  DenseNet-BC (k=12), one line per variant, in the style of Pleiss et al. 2017 (Figure 4):
  naive grows quadratically, the shared-buffer implementation linearly. Estimated points are
  hollow markers; the floor (the features themselves) is the dashed line.
  ``<stem>-deluge-memory-vs-depth.png``: the same for CIFAR DelugeNets (floor: all slots).
* ``<stem>-time-per-step.png``: median step time per variant, for each model and dtype,
  with the ratio to naive on each bar.
* ``<stem>-memory.png``: activation memory per variant beside the floor, same grouping.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1 << 20
COLORS = {"naive": "#d62728", "naive-checkpoint": "#ff7f0e", "naive-compile": "#8c564b"}
EFF_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#bcbd22", "#7f7f7f"]


def _color(variant: str, order: list[str]) -> str:
    if variant in COLORS:
        return COLORS[variant]
    effs = [v for v in order if v not in COLORS]
    return EFF_COLORS[effs.index(variant) % len(EFF_COLORS)] if variant in effs else "k"


def _depth(row: dict) -> int:
    """Layers of the model: DenseNet-BC's depth, or a CIFAR DelugeNet's 18n + 2."""
    number = int(row["model"].rsplit("_", 1)[-1])
    return 18 * number + 2 if row["model"].startswith("delugenet_cifar_") else number


def _subtitle(doc: dict) -> str:
    return f"{doc['device_name']}, torch {doc['torch_version']}, {doc['git_commit'][:12]}"


def plot_memory_vs_depth(
    doc: dict,
    path: Path,
    suite: str = "depth",
    xlabel: str = "depth (layers), DenseNet-BC k=12, 32x32",
    floor_label: str = "floor (features only)",
) -> Path | None:
    rows = [r for r in doc["rows"] if r.get("suite") == suite and r.get("peak_activation_bytes")]
    if not rows:
        return None
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for v in variants:
        pts = sorted(
            (_depth(r), r["peak_activation_bytes"] / MIB, r.get("estimated", False))
            for r in rows
            if r["variant"] == v
        )
        c = _color(v, variants)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=c, label=v)
        for d, m, est in pts:
            ax.plot(d, m, "o", color=c, mfc="white" if est else c, ms=6)
    floor = sorted({(_depth(r), r["floor_bytes"] / MIB) for r in rows if r.get("floor_bytes")})
    if floor:
        ax.plot([f[0] for f in floor], [f[1] for f in floor], "k--", lw=1, label=floor_label)
    if any(r.get("estimated") for r in rows):
        ax.plot([], [], "o", color="gray", mfc="white", label="estimated (not allocated)")
    batch = rows[0]["batch"]
    ax.set_xlabel(xlabel)
    ax.set_ylabel("activation memory per training step (MiB)")
    ax.set_title(f"Memory vs depth, batch {batch}\n{_subtitle(doc)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _grouped_bars(
    doc: dict,
    path: Path,
    key: str,
    ylabel: str,
    title: str,
    scale: float,
    ratio_key: str,
    floor: bool = False,
) -> Path | None:
    groups = []
    for suite in ("main", "imagenet", "deluge"):
        for dtype in ("fp32", "bf16"):
            rs = [
                r
                for r in doc["rows"]
                if r.get("suite") == suite and r.get("dtype") == dtype and r.get(key)
            ]
            if rs:
                groups.append((f"{rs[0]['model_label']}\nbatch {rs[0]['batch']}, {dtype}", rs))
    if not groups:
        return None
    fig, axes = plt.subplots(
        1, len(groups), figsize=(max(6.0, 4.2 * len(groups)), 4.8), squeeze=False
    )
    for ax, (label, rs) in zip(axes[0], groups):
        order = [r["variant"] for r in rs]
        vals = [r[key] / scale for r in rs]
        bars = ax.bar(range(len(rs)), vals, color=[_color(v, order) for v in order])
        for b, r in zip(bars, rs):
            if r.get(ratio_key) is not None:
                ax.annotate(
                    f"{r[ratio_key]:.2f}x",
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        if floor and rs[0].get("floor_bytes"):
            ax.axhline(rs[0]["floor_bytes"] / scale, color="k", ls="--", lw=1, label="floor")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels(order, rotation=40, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title}\n{_subtitle(doc)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(doc: dict, out: Path, stem: str) -> list[Path]:
    made = [
        plot_memory_vs_depth(doc, out / f"{stem}-memory-vs-depth.png"),
        plot_memory_vs_depth(
            doc,
            out / f"{stem}-deluge-memory-vs-depth.png",
            suite="deluge-depth",
            xlabel="depth 18n+2 (layers), CIFAR DelugeNet, width 1, 32x32",
            floor_label="floor (all slots)",
        ),
        _grouped_bars(
            doc,
            out / f"{stem}-time-per-step.png",
            "step_time_s",
            "median time per training step (ms)",
            "Time per step, ratio to naive",
            1e-3,
            "step_time_ratio",
        ),
        _grouped_bars(
            doc,
            out / f"{stem}-memory.png",
            "peak_activation_bytes",
            "activation memory per step (MiB)",
            "Activation memory, ratio to naive",
            MIB,
            "peak_activation_ratio",
            floor=True,
        ),
    ]
    return [p for p in made if p is not None]
