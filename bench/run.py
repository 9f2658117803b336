"""The main benchmark: naive vs efficient DenseNets, measured in one run (``make bench``).

    python bench/run.py                    # the default device (CUDA if present, else CPU)
    python bench/run.py --device cpu --out bench/results
    python bench/run.py --markdown bench/results/cpu-2026-11-25.json   # print the README table

Every job (model, variant, batch, dtype) runs in a fresh process (bench/worker.py). What is
measured, how, and the JSON schema: bench/README.md. Nothing here is hard-coded: every number
in the table, the JSON and the plots comes from this run's measurements (or, for rows marked
"estimated", from the FakeTensor estimator of bench/estimate.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1 << 30
MIB = 1 << 20
SCHEMA = 1


# ----------------------------------------------------------------------------- planning
def _settings(args, device: str) -> dict:
    """Batch sizes and repetition counts; CPU values keep the run within 10 minutes on 2 cores."""
    gpu = device == "cuda"
    return {
        "main_model": "densenet_bc_100",
        "main_batch": args.batch or (64 if gpu else 16),
        "main_warmup": 3 if gpu else 2,
        "main_steps": args.steps or (20 if gpu else 5),
        "budget_gib": args.budget_gib or (8.0 if gpu else 1.0),
        "imagenet_model": "densenet121",
        "imagenet_batch": args.imagenet_batch or (32 if gpu else 4),
        "imagenet_warmup": 3 if gpu else 1,
        "imagenet_steps": 10 if gpu else 3,
        "sweep_depths": args.depths or [40, 64, 100, 136, 172, 208, 250],
        "sweep_batch": args.sweep_batch or (64 if gpu else 8),
        "sweep_extra_depths": (
            args.extra_depths if args.extra_depths is not None else ([1000] if gpu else [400])
        ),
        "measure_limit_gib": args.measure_limit_gib or (None if gpu else 2.0),
        # The extra depth points and the estimator check are dropped (and said so) when the
        # run has used 85 % of this. 500 s: a 2-core run measured 608 s with 600 (the depth-400
        # estimate started at 450 s and took 150 s), so `make bench` stays within 10 minutes.
        "time_budget_s": args.time_budget_s
        if args.time_budget_s is not None
        else (None if gpu else 500.0),
        "dtypes": ["fp32", "bf16"] if gpu or args.bf16 else ["fp32"],
        "max_batch": not args.no_max_batch,
        "compile": gpu or args.compile,
    }


def _sweep_backend(backends: list[str], device: str) -> str:
    for name in ("triton", "cpp", "reference") if device == "cuda" else ("cpp", "reference"):
        if name in backends:
            return name
    return backends[0]


def plan(settings: dict, backends: list[str], device: str, suites: list[str]) -> list[dict]:
    from bench.variants import variant_names

    jobs: list[dict] = []
    names = variant_names(backends, settings["compile"])
    budget = int(settings["budget_gib"] * GIB)
    if "main" in suites:
        for dtype in settings["dtypes"]:
            for v in names:
                jobs.append(
                    {
                        "suite": "main",
                        "model": settings["main_model"],
                        "variant": v,
                        "batch": settings["main_batch"],
                        "dtype": dtype,
                        "warmup": settings["main_warmup"],
                        "steps": settings["main_steps"],
                        "max_batch": None
                        if v == "naive-compile" or dtype != "fp32" or not settings["max_batch"]
                        else {"budget_bytes": budget},
                    }
                )
    if "imagenet" in suites:
        for dtype in settings["dtypes"]:
            for v in names:
                jobs.append(
                    {
                        "suite": "imagenet",
                        "model": settings["imagenet_model"],
                        "variant": v,
                        "batch": settings["imagenet_batch"],
                        "dtype": dtype,
                        "warmup": settings["imagenet_warmup"],
                        "steps": settings["imagenet_steps"],
                    }
                )
    if "depth" in suites:
        best = _sweep_backend(backends, device)
        sweep = [
            "naive",
            "naive-checkpoint",
            f"efficient-{best}-bottleneck",
            f"efficient-{best}-min",
        ]
        for depth in settings["sweep_depths"]:
            for v in sweep:
                jobs.append(
                    {
                        "suite": "depth",
                        "model": f"densenet_bc_{depth}",
                        "variant": v,
                        "batch": settings["sweep_batch"],
                        "dtype": "fp32",
                        "warmup": 1,
                        "steps": 0,
                    }
                )
        for depth in settings["sweep_extra_depths"]:
            for v in ("naive", f"efficient-{best}-min"):
                jobs.append(
                    {
                        "suite": "depth",
                        "model": f"densenet_bc_{depth}",
                        "variant": v,
                        "batch": settings["sweep_batch"],
                        "dtype": "fp32",
                        "warmup": 1,
                        "steps": 0,
                        "extrapolate": True,
                    }
                )
    for job in jobs:
        job["device"] = device
    return jobs


def _extrapolate(job: dict, rows: list[dict]) -> float | None:
    """Activation bytes predicted for a deeper sweep point from the measured ones.

    Naive memory grows as depth^2 and efficient as depth (DESIGN.md section 1), so a
    least-squares fit of a*d^2 + b*d + c (naive) or b*d + c (efficient) to the measured
    points of the same variant predicts the next one. Used only to decide whether to measure
    (fits under the limit) or estimate without allocating (would not).
    """
    pts = [
        (int(r["model"].split("_")[-1]), r["peak_activation_bytes"])
        for r in rows
        if r.get("suite") == "depth"
        and r.get("variant") == job["variant"]
        and not r.get("estimated")
        and r.get("peak_activation_bytes") is not None
        and r.get("batch") == job["batch"]
    ]
    if len(pts) < 3:
        return None
    import numpy as np

    d = np.array([p[0] for p in pts], dtype=float)
    m = np.array([p[1] for p in pts], dtype=float)
    degree = 1 if job["variant"].startswith("efficient") else 2
    coef = np.polyfit(d, m, degree)
    return float(np.polyval(coef, int(job["model"].split("_")[-1])))


# ----------------------------------------------------------------------------- running
def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_worker(job: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "bench.worker", json.dumps(job)]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {**_ident(job), "error": f"timed out after {timeout:.0f} s"}
    # What the job cost, start-up included: wall time and the worker's CPU time.
    cost = {"job_wall_s": time.perf_counter() - t0, "job_cpu_s": _children_cpu() - cpu0}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            row = {**json.loads(line[len("RESULT ") :]), **cost}
            if row.get("error"):
                row["stderr_tail"] = _tail(proc.stderr)
            return row
    return {
        **_ident(job),
        **cost,
        "error": f"worker exited with {proc.returncode}",
        "stderr_tail": _tail(proc.stderr),
    }


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _ident(job: dict) -> dict:
    return {k: job[k] for k in ("suite", "model", "variant", "batch", "dtype", "device")}


def _tail(text: str, lines: int = 8) -> str:
    keep = [ln for ln in text.splitlines() if "USDT" not in ln and "gpuGetDeviceCount" not in ln]
    return "\n".join(keep[-lines:])


def over_budget(settings: dict, started: float) -> bool:
    budget = settings.get("time_budget_s")
    return bool(budget) and time.perf_counter() - started > 0.85 * budget


def run_jobs(
    jobs: list[dict], settings: dict, commit: str, timeout: float, started: float
) -> list[dict]:
    from tqdm import tqdm

    rows: list[dict] = []
    limit = settings["measure_limit_gib"]
    bar = tqdm(jobs, desc="bench", unit="job", dynamic_ncols=True)
    for job in bar:
        job = {**job, "git_commit": commit}
        bar.set_postfix_str(f"{job['model']} {job['variant']} b{job['batch']} {job['dtype']}")
        extra = job.pop("extrapolate", False)
        if extra and over_budget(settings, started):
            rows.append({**_ident(job), "skipped": "time budget (--time-budget-s) used up"})
            bar.write(f"  {job['model']:>16} {job['variant']:<30} skipped: time budget")
            continue
        if extra and limit is not None:
            predicted = _extrapolate(job, rows)
            # Over the limit (or nothing to extrapolate from): estimate, never allocate.
            if predicted is None or predicted > limit * GIB:
                job["estimate"] = "only"
                job["reason"] = (
                    f"extrapolated from the measured sweep to {predicted / GIB:.2f} GiB, over "
                    f"the measuring limit of {limit} GiB"
                    if predicted is not None and limit
                    else "no measured points to extrapolate from"
                )
        row = run_worker(job, timeout)
        if row.get("oom"):  # GPU out of memory: estimate it without allocating instead
            row = run_worker(
                {**job, "estimate": "only", "reason": f"out of memory when measured: {row['oom']}"},
                timeout,
            )
        row.setdefault("suite", job["suite"])
        row["git_commit"] = commit
        rows.append(row)
        bar.write(_progress_line(row))
    return rows


def _progress_line(r: dict) -> str:
    if r.get("error"):
        return f"  {r['model']:>16} {r['variant']:<30} b{r['batch']:<4} ERROR {r['error']}"
    mem = r.get("peak_activation_bytes")
    t = r.get("step_time_s")
    s = f"  {r['model']:>16} {r['variant']:<30} b{r['batch']:<4} {r.get('dtype', ''):<5}"
    s += f" act {mem / MIB:9.1f} MiB" if mem is not None else ""
    s += " (estimated)" if r.get("estimated") else ""
    s += f"  step {t * 1e3:8.1f} ms" if t is not None else ""
    if r.get("max_batch"):
        s += f"  max batch {r['max_batch']['max_batch']}"
    return s


# ----------------------------------------------------------------------------- analysis
def add_ratios(rows: list[dict]) -> None:
    """Each row's memory, time and max batch as ratios to the naive row of the same setting."""
    key = lambda r: (
        r.get("suite"),
        r.get("model"),
        r.get("batch"),
        r.get("dtype"),
        r.get("device"),
    )
    naive = {key(r): r for r in rows if r.get("variant") == "naive" and not r.get("error")}
    for r in rows:
        base = naive.get(key(r))
        if base is None or r.get("error"):
            continue
        if r.get("peak_activation_bytes") and base.get("peak_activation_bytes"):
            r["peak_activation_ratio"] = r["peak_activation_bytes"] / base["peak_activation_bytes"]
            r["ratio_basis"] = (
                "estimated" if (r.get("estimated") or base.get("estimated")) else "measured"
            )
        if r.get("step_time_s") and base.get("step_time_s"):
            r["step_time_ratio"] = r["step_time_s"] / base["step_time_s"]
        if r.get("max_batch") and base.get("max_batch"):
            naive_max = max(1, base["max_batch"]["max_batch"])
            r["max_batch_ratio"] = r["max_batch"]["max_batch"] / naive_max
        if r.get("peak_activation_bytes") and r.get("floor_bytes"):
            r["peak_over_floor"] = r["peak_activation_bytes"] / r["floor_bytes"]


def estimator_check(rows: list[dict], variants: tuple[str, ...], timeout: float) -> list[dict]:
    """The estimator beside the probe on measured rows, so its error is on record."""
    out = []
    for r in rows:
        if (
            r.get("suite") == "main"
            and r.get("dtype") == "fp32"
            and not r.get("error")
            and r.get("variant") in variants
            and r.get("peak_activation_bytes")
        ):
            est = run_worker(
                {
                    **_ident(r),
                    "suite": "estimator-check",
                    "estimate": "only",
                    "reason": "estimator check",
                },
                timeout,
            )
            if est.get("peak_activation_bytes"):
                out.append(
                    {
                        "model": r["model"],
                        "variant": r["variant"],
                        "batch": r["batch"],
                        "measured_bytes": r["peak_activation_bytes"],
                        "estimated_bytes": est["peak_activation_bytes"],
                        "relative_error": est["peak_activation_bytes"] / r["peak_activation_bytes"]
                        - 1,
                    }
                )
    return out


# ----------------------------------------------------------------------------- output
def _fmt_mib(b) -> str:
    return "" if b is None else f"{b / MIB:,.1f}"


def _fmt_ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


COLUMNS = [
    "model",
    "variant",
    "batch",
    "dtype",
    "act. MiB",
    "vs naive",
    "floor MiB",
    "step ms",
    "vs naive",
    "max batch",
    "vs naive",
    "note",
]


def table_rows(doc: dict, suites=("main", "imagenet", "depth")) -> list[list[str]]:
    out = []
    budget = doc["settings"]["budget_gib"]
    for suite in suites:
        for r in doc["rows"]:
            if r.get("suite") != suite:
                continue
            if r.get("error") or r.get("skipped"):
                note = "error: " + r["error"][:60] if r.get("error") else "skipped: " + r["skipped"]
                out.append(
                    [
                        r["model"],
                        r["variant"],
                        str(r["batch"]),
                        r.get("dtype", ""),
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                        note,
                    ]
                )
                continue
            mb = r.get("max_batch")
            t = r.get("step_time_s")
            out.append(
                [
                    r.get("model_label", r["model"]),
                    r["variant"],
                    str(r["batch"]),
                    r["dtype"],
                    _fmt_mib(r.get("peak_activation_bytes")),
                    _fmt_ratio(r.get("peak_activation_ratio")),
                    _fmt_mib(r.get("floor_bytes")),
                    "" if t is None else f"{t * 1e3:,.0f}",
                    _fmt_ratio(r.get("step_time_ratio")),
                    "" if not mb else f"{mb['max_batch']} @ {budget:g} GiB",
                    _fmt_ratio(r.get("max_batch_ratio")),
                    "estimated"
                    if r.get("estimated")
                    else "ratio to estimated naive"
                    if r.get("ratio_basis") == "estimated"
                    else "",
                ]
            )
    return out


def render_text(doc: dict) -> str:
    rows = table_rows(doc)
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)
    ]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(COLUMNS), line(["-" * w for w in widths])]
    last = None
    for r in rows:
        if last is not None and r[0] != last:
            out.append("")
        out.append(line(r))
        last = r[0]
    return "\n".join(out)


def render_markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [
        f"### Benchmark: {doc['device_name']}",
        "",
        f"torch {doc['torch_version']}, commit `{doc['git_commit']}`, {doc['created']}; "
        f"measuring took {doc['measuring_seconds']:.0f} s. "
        f"Activation memory = peak live bytes during one full training step (forward, loss, "
        f"backward, SGD step) above the bytes held before it; {doc['memory_method']}. "
        f"Step time = {doc['time_method']} after warm-up. Floor = sum over dense blocks of "
        f"N*H*W*C_total*bytes. Max batch: largest batch whose measured activation memory fits "
        f"{s['budget_gib']:g} GiB. Ratios are to the naive model measured in the same run.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for r in table_rows(doc):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    if doc.get("estimator_check"):
        errs = ", ".join(
            f"{e['variant']} {e['relative_error'] * 100:+.1f} %" for e in doc["estimator_check"]
        )
        lines += ["", f"Estimator (FakeTensor; rows marked estimated) vs the probe: {errs}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder")
    p.add_argument(
        "--suites",
        default="main,imagenet,depth",
        help="comma list of main (DenseNet-BC-100), imagenet (DenseNet-121), depth",
    )
    p.add_argument("--backends", default=None, help="comma list (default: all available)")
    p.add_argument("--batch", type=int, help="DenseNet-BC-100 batch (CPU 16, GPU 64)")
    p.add_argument("--steps", type=int, help="timed steps for DenseNet-BC-100")
    p.add_argument("--imagenet-batch", type=int, help="DenseNet-121 batch (CPU 4, GPU 32)")
    p.add_argument("--sweep-batch", type=int, help="depth sweep batch (CPU 8, GPU 64)")
    p.add_argument(
        "--depths",
        type=lambda s: [int(x) for x in s.split(",")],
        help="measured depth sweep, e.g. 40,64,100",
    )
    p.add_argument(
        "--extra-depths",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="deeper points, measured only if predicted under --measure-limit-gib",
    )
    p.add_argument("--budget-gib", type=float, help="max-batch budget (CPU 1, GPU 8)")
    p.add_argument(
        "--measure-limit-gib",
        type=float,
        help="CPU: estimate instead of measure above this (default 2 GiB)",
    )
    p.add_argument("--no-max-batch", action="store_true", help="skip the max-batch search")
    p.add_argument(
        "--time-budget-s",
        type=float,
        help="drop the optional jobs past 85 %% of this (CPU default 500; 0: none)",
    )
    p.add_argument("--compile", action="store_true", help="CPU: add naive-compile")
    p.add_argument("--bf16", action="store_true", help="CPU: add bf16 autocast rows")
    p.add_argument("--timeout", type=float, default=600, help="seconds per job")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--name", help="file stem in --out (default <device>-<date>)")
    p.add_argument("--markdown", metavar="JSON", help="print the markdown table of a result file")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine result files of one machine (e.g. one per suite) into one "
        "JSON + markdown + plots in --out, named --name",
    )
    args = p.parse_args(argv)

    if args.markdown:
        print(render_markdown(json.loads(Path(args.markdown).read_text())), end="")
        return 0
    if args.merge:
        doc = merge([json.loads(Path(f).read_text()) for f in args.merge])
        stem = args.name or (
            f"{_device_slug(doc['device'], doc['device_name'])}-{doc['created'][:10]}"
        )
        return write_outputs(doc, Path(args.out), stem, args.no_plots)

    import torch

    import dense_ext
    from python_models.memory import self_test

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = args.backends.split(",") if args.backends else dense_ext.available_backends(device)
    settings = _settings(args, device)
    suites = [s for s in args.suites.split(",") if s]
    commit = _git_commit()
    jobs = plan(settings, backends, device, suites)
    print(
        f"dense_ext bench on {device}: backends {backends}, {len(jobs)} jobs, "
        f"torch {torch.__version__}, commit {commit}",
        flush=True,
    )

    t0 = time.perf_counter()
    probe_check = self_test() if device == "cpu" else None
    if probe_check:
        print(
            f"memory probe self-test passed: known pattern peak "
            f"{probe_check['known_allocations_peak_bytes']} B (expected "
            f"{probe_check['known_allocations_expected_bytes']}), ATen-internal im2col seen "
            f"({probe_check['aten_internal_peak_bytes']} B >= "
            f"{probe_check['aten_internal_lower_bound_bytes']})",
            flush=True,
        )
    rows = run_jobs(jobs, settings, commit, args.timeout, t0)
    add_ratios(rows)
    checks = (
        estimator_check(
            rows, ("naive", f"efficient-{_sweep_backend(backends, device)}-min"), args.timeout
        )
        if ("depth" in suites and settings["sweep_extra_depths"] and not over_budget(settings, t0))
        else []
    )
    measuring = time.perf_counter() - t0

    from bench.worker import _device_name

    dev_name = next(
        (r["device_name"] for r in rows if r.get("device_name")), _device_name(torch.device(device))
    )
    now = dt.datetime.now(dt.timezone.utc)
    doc = {
        "schema": SCHEMA,
        "created": now.isoformat(timespec="seconds"),
        "device": device,
        "device_name": dev_name,
        "torch_version": torch.__version__,
        "git_commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "backends": backends,
        "settings": settings,
        "measuring_seconds": measuring,
        "memory_method": (
            "torch.profiler memory events of the c10 CPU allocator (sees "
            "allocations inside C++ ops)"
            if device == "cpu"
            else "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        ),
        "time_method": (
            "median of time.perf_counter per step"
            if device == "cpu"
            else "median of CUDA-event time per step"
        ),
        "probe_self_test": probe_check,
        "estimator_check": checks,
        "rows": rows,
    }
    stem = args.name or f"{_device_slug(device, dev_name)}-{now.date().isoformat()}"
    return write_outputs(doc, Path(args.out), stem, args.no_plots)


def merge(docs: list[dict]) -> dict:
    """One document from several runs on the same machine (e.g. one suite per device call)."""
    names = {d["device_name"] for d in docs}
    if len(names) != 1:
        raise SystemExit(f"refusing to merge results of different machines: {sorted(names)}")
    doc = dict(docs[0])
    doc["rows"] = [r for d in docs for r in d["rows"]]
    doc["estimator_check"] = [e for d in docs for e in d.get("estimator_check") or []]
    doc["measuring_seconds"] = sum(d["measuring_seconds"] for d in docs)
    doc["settings"] = {k: v for d in reversed(docs) for k, v in d["settings"].items()}
    doc["git_commit"] = ", ".join(dict.fromkeys(d["git_commit"] for d in docs))
    doc["command"] = " + ".join(d["command"] for d in docs)
    doc["merged_from"] = [d["created"] for d in docs]
    return doc


def write_outputs(doc: dict, out: Path, stem: str, no_plots: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(doc))
    plots = [] if no_plots else _plots(doc, out, stem)
    print()
    print(render_text(doc))
    print()
    print(
        f"measuring took {doc['measuring_seconds']:.0f} s ({len(doc['rows'])} jobs); wrote "
        f"{json_path}, {out / (stem + '.md')}" + "".join(f", {p}" for p in plots)
    )
    errors = [r for r in doc["rows"] if r.get("error")]
    for r in errors:
        print(
            f"ERROR {r['model']} {r['variant']}: {r['error']}\n{r.get('stderr_tail', '')}",
            file=sys.stderr,
        )
    return 1 if errors else 0


def _device_slug(device: str, name: str) -> str:
    if device == "cpu":
        return "cpu"
    return device + "-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _plots(doc: dict, out: Path, stem: str) -> list[Path]:
    from bench.plots import plot_all

    return plot_all(doc, out, stem)


if __name__ == "__main__":
    sys.exit(main())
