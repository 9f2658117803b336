"""What a training run writes and prints: config.json, metrics.csv/.json (per epoch),
steps.csv (per step), summary.json, the progress bar and the console lines."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any


class RunLog:
    """Files of a run folder; writes nothing when ``enabled`` is false (ranks other than 0)."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.dir, self.enabled = out_dir, enabled
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` to ``name`` in the run folder."""
        if self.enabled:
            (self.dir / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")

    def append_csv(self, name: str, rows: list[dict]) -> None:
        """Append rows to a CSV file (header written when the file is new)."""
        if not self.enabled or not rows:
            return
        path = self.dir / name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def truncate(self, epochs: int) -> None:
        """Drop the rows of epochs after ``epochs`` (a resumed run trains them again)."""
        for name in ("metrics.csv", "steps.csv"):
            path = self.dir / name
            if not self.enabled or not path.exists():
                continue
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                fields, rows = reader.fieldnames or [], list(reader)
            kept = [r for r in rows if int(r["epoch"]) <= epochs]
            if len(kept) < len(rows):
                with open(path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=fields)
                    writer.writeheader()
                    writer.writerows(kept)

    def record_epoch(self, row: dict, step_losses: list[float], first_step: int) -> None:
        """Append an epoch's row to metrics.csv and its step losses to steps.csv."""
        self.append_csv(
            "steps.csv",
            [
                {"epoch": row["epoch"], "step": first_step + i + 1, "loss": repr(v)}
                for i, v in enumerate(step_losses)
            ],
        )
        self.append_csv("metrics.csv", [row])


def default_out_dir() -> Path:
    """runs/<timestamp> under the current folder."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def progress_bars(enabled: bool):
    """A factory of tqdm bars, ``make(total, desc)``; disabled bars print nothing."""
    from tqdm.auto import tqdm

    def make(total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)

    return make


def epoch_line(row: dict) -> str:
    """The console line of a finished epoch."""
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc "
        f"{row['train_acc']:.4f} | test loss {row['test_loss']:.4f} acc "
        f"{row['test_acc']:.4f} | {row['images_per_s']:.0f} img/s, "
        f"{row['epoch_time_s']:.1f} s, lr {row['lr']:.4g}, mem {row['memory']}"
    )


def summary_line(s: dict) -> str:
    """The console line at the end of a run."""
    acc = (
        "n/a"
        if s["final_test_acc"] is None
        else (f"{s['final_test_acc']:.4f} (best {s['best_test_acc']:.4f})")
    )
    return (
        f"done: {s['epochs']} epochs, {s['steps']} steps in {s['train_time_s']:.1f} s; "
        f"test accuracy {acc}; peak memory {s['peak_memory']}; results in {s['out_dir']}"
    )
