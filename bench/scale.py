"""The scale that only linear memory allows (``make bench-scale``).

The ``scale`` suite (``bench/jobs.py``) measures the best backend's ``memory="min"``
DenseNet-BC (k=12, 32x32) at batch 64 at a few depths and one training step of the
1000-layer network, and estimates the naive 1000-layer network (it would need a hundred GiB
and more). From the measured points this module derives the deepest DenseNet-BC whose
activation memory fits the budget (4 GiB):

* the efficient model's activation memory is affine in the depth: the feature buffers grow
  linearly with the layer count, and so does the largest per-layer scratch (it is as wide as
  a block's input). A least-squares line through the measured points is solved for the budget
  and rounded down to a valid depth (6n+4);
* the line is checked on the data: fitted without the deepest measured point, it predicts
  that point, and the relative error is reported beside the result (``holdout_error``);
* the depth found is beyond what this CPU can run in minutes (a step costs about the square
  of the depth), so it is a prediction from measurements, and marked so in the table.
"""

from __future__ import annotations

import re

GIB = 1 << 30


def depth_of(model: str) -> int:
    m = re.fullmatch(r"densenet_bc_(\d+)", model)
    if not m:
        raise ValueError(f"not a DenseNet-BC benchmark model: {model!r}")
    return int(m.group(1))


def valid_bc_depth(depth: int) -> int:
    """The deepest DenseNet-BC depth (6n+4, n >= 1) not above ``depth``."""
    n = (depth - 4) // 6
    if n < 1:
        raise ValueError(f"no DenseNet-BC is as shallow as depth {depth}")
    return 6 * n + 4


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of ``y = slope * x + intercept``."""
    if len({x for x, _ in points}) < 2:
        raise ValueError("a line needs points at two different depths at least")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx
    return slope, my - slope * mx


def deepest_fitting(points: list[tuple[int, float]], budget_bytes: float) -> dict:
    """The deepest DenseNet-BC predicted to fit ``budget_bytes``, from measured
    ``(depth, peak_activation_bytes)`` points of one variant at one batch."""
    points = sorted(points)
    slope, intercept = fit_line(points)
    if slope <= 0:
        raise ValueError(f"activation memory does not grow with depth in {points}")
    depth = valid_bc_depth(int((budget_bytes - intercept) // slope))
    result = {
        "depth": depth,
        "predicted_bytes": slope * depth + intercept,
        "budget_bytes": budget_bytes,
        "bytes_per_layer_of_depth": slope,
        "intercept_bytes": intercept,
        "fit_points": [{"depth": d, "peak_activation_bytes": b} for d, b in points],
        "method": "least-squares line through the measured points, solved for the budget, "
        "rounded down to 6n+4",
    }
    if len(points) >= 3:
        held_depth, held_bytes = points[-1]
        s, c = fit_line(points[:-1])
        result["holdout"] = {
            "depth": held_depth,
            "measured_bytes": held_bytes,
            "predicted_bytes": s * held_depth + c,
            "relative_error": (s * held_depth + c) / held_bytes - 1,
        }
    return result


def analyse(rows: list[dict], budget_gib: float) -> list[dict]:
    """One derived row per (variant, batch) of the scale suite with measured points."""
    groups: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in rows:
        if (
            r.get("suite") == "scale"
            and not r.get("estimated")
            and not r.get("error")
            and r.get("peak_activation_bytes")
        ):
            key = (r["variant"], r["batch"])
            groups.setdefault(key, []).append((depth_of(r["model"]), r["peak_activation_bytes"]))
    derived = []
    for (variant, batch), points in groups.items():
        if len({d for d, _ in points}) < 2:
            continue
        fit = deepest_fitting(points, budget_gib * GIB)
        derived.append(
            {
                "suite": "scale",
                "model": f"densenet_bc_{fit['depth']}",
                "model_label": f"DenseNet-BC-{fit['depth']} (k=12, 32x32)",
                "variant": variant,
                "batch": batch,
                "dtype": "fp32",
                "device": next(r["device"] for r in rows if r.get("suite") == "scale"),
                "predicted": True,
                "peak_activation_bytes": fit["predicted_bytes"],
                "deepest_fitting": fit,
            }
        )
    return derived
