"""The main benchmark: naive vs efficient DenseNets, measured in one run (``make bench``).

    python -m bench.run                    # the default device (CUDA if present, else CPU)
    python -m bench.run --device cpu --out bench/results
    python -m bench.run --suites scale     # DenseNet-BC-1000 at batch 64 (make bench-scale)
    python -m bench.run --dry-run          # print the plan, measure nothing
    python -m bench.run --markdown bench/results/cpu-2026-11-25.json   # print a result's table
    python -m bench.run --merge a.json b.json --name gpu   # one document from several runs

The plan (``bench/jobs.py``) is a list of typed jobs; each runs in a fresh process
(``bench/worker.py``); ``bench/report.py`` turns the rows into ratios, tables and files. What
is measured, how, and the JSON schema: bench/README.md. Nothing here is hard-coded: every
number in the table, the JSON and the plots comes from this run's measurements (or, for rows
marked "estimated", from the FakeTensor estimator of bench/estimate.py; "predicted", from a
fit of measured rows, bench/scale.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.jobs import DEFAULT_SUITES, GIB, Job, Settings, best_backend, plan
from bench.report import (
    SCHEMA,
    add_ratios,
    device_slug,
    merge,
    render_markdown,
    write_outputs,
    write_partial,
)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- one job
def git_commit() -> str:
    """``git rev-parse HEAD``, with ``-dirty`` when tracked files differ; "unknown" without git."""
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


def run_worker(job: Job, timeout: float) -> dict:
    """Runs ``job`` in a fresh ``python -m bench.worker`` process; its row, with what it cost."""
    cmd = [sys.executable, "-m", "bench.worker", job.to_json()]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**job.ident(), "error": f"timed out after {timeout:.0f} s"}
    # What the job cost, start-up included: wall time and the worker's CPU time.
    cost = {"job_wall_s": time.perf_counter() - t0, "job_cpu_s": _children_cpu() - cpu0}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            row = {**json.loads(line[len("RESULT ") :]), **cost}
            if row.get("error"):
                row["stderr_tail"] = _tail(proc.stderr)
            return row
    return {
        **job.ident(),
        **cost,
        "error": f"worker exited with {proc.returncode}",
        "stderr_tail": _tail(proc.stderr),
    }


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _tail(text: str, lines: int = 8) -> str:
    keep = [ln for ln in text.splitlines() if "USDT" not in ln and "gpuGetDeviceCount" not in ln]
    return "\n".join(keep[-lines:])


# ----------------------------------------------------------------------------- the run
def extrapolate(job: Job, rows: list[dict]) -> float | None:
    """Activation bytes predicted for a deeper sweep point from the measured ones.

    Naive memory grows as depth^2 and efficient as depth (docs/design.md, "Memory"), so a
    least-squares fit of a*d^2 + b*d + c (naive) or b*d + c (efficient) to the measured
    points of the same variant predicts the next one. Used only to decide whether to measure
    (fits under the limit) or estimate without allocating (would not).
    """
    pts = [
        (int(r["model"].split("_")[-1]), r["peak_activation_bytes"])
        for r in rows
        if r.get("suite") == job.suite
        and r.get("variant") == job.variant
        and not r.get("estimated")
        and r.get("peak_activation_bytes") is not None
        and r.get("batch") == job.batch
    ]
    if len(pts) < 3:
        return None
    import numpy as np

    d = np.array([p[0] for p in pts], dtype=float)
    m = np.array([p[1] for p in pts], dtype=float)
    degree = 1 if job.variant.startswith("efficient") else 2
    coef = np.polyfit(d, m, degree)
    return float(np.polyval(coef, int(job.model.split("_")[-1])))


class Runner:
    """Runs jobs one after the other, within a time budget and a deadline.

    ``time_budget_s``: optional jobs are skipped once 85 % of it has gone. ``deadline_s``: no
    job starts after it, and a running job is stopped at it (its row says so): a device call
    of limited length keeps every row finished before it (``on_row`` sees each one).
    """

    def __init__(
        self,
        settings: Settings,
        commit: str,
        timeout: float,
        measure_limit_bytes: float | None,
        deadline_s: float | None = None,
        on_row: Callable[[list[dict]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.commit = commit
        self.timeout = timeout
        self.limit = measure_limit_bytes
        self.started = time.perf_counter()
        self.deadline_s = deadline_s
        self.on_row = on_row or (lambda rows: None)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self) -> bool:
        budget = self.settings.time_budget_s
        return bool(budget) and self.elapsed() > 0.85 * budget

    def _time_left(self) -> float | None:
        return None if self.deadline_s is None else self.deadline_s - self.elapsed()

    def run(self, jobs: list[Job], rows: list[dict] | None = None) -> list[dict]:
        rows = [] if rows is None else rows
        for job in _progress(jobs):
            rows.append(self.run_one(job.replace(git_commit=self.commit), rows))
            self.on_row(rows)
            _report(rows[-1])
        return rows

    def run_one(self, job: Job, rows: list[dict]) -> dict:
        left = self._time_left()
        if left is not None and left <= 5:
            return {**job.ident(), "skipped": "deadline (--deadline-s) reached"}
        if job.optional and self.over_budget():
            return {**job.ident(), "skipped": "time budget (--time-budget-s) used up"}
        if job.extrapolate and self.limit is not None:
            predicted = extrapolate(job, rows)
            # Over the limit (or nothing to extrapolate from): estimate, never allocate.
            if predicted is None or predicted > self.limit:
                reason = (
                    f"extrapolated from the measured sweep to {predicted / GIB:.2f} GiB, over "
                    f"the measuring limit of {self.limit / GIB:.2f} GiB"
                    if predicted is not None
                    else "no measured points to extrapolate from"
                )
                job = job.replace(estimate_only=True, reason=reason)
        timeout = self.timeout if left is None else max(5.0, min(self.timeout, left))
        row = run_worker(job, timeout)
        if row.get("oom"):  # GPU out of memory: estimate it without allocating instead
            reason = f"out of memory when measured: {row['oom']}"
            row = run_worker(job.replace(estimate_only=True, reason=reason), timeout)
        row.setdefault("suite", job.suite)
        row["git_commit"] = self.commit
        return row


def _progress(jobs: list[Job]) -> Iterable[Job]:
    """The jobs, with a progress bar when tqdm is installed (it is optional)."""
    try:
        from tqdm import tqdm
    except ImportError:
        for i, job in enumerate(jobs):
            print(f"[{i + 1}/{len(jobs)}] {job.label()}", flush=True)
            yield job
        return
    bar = tqdm(jobs, desc="bench", unit="job", dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.label())
        yield job


def _report(r: dict) -> None:
    line = f"  {r['model']:>16} {r['variant']:<34} b{r['batch']:<4} {r.get('dtype', ''):<5}"
    if r.get("error"):
        line += f" ERROR {r['error']}"
    elif r.get("skipped"):
        line += f" skipped: {r['skipped']}"
    else:
        mem, t = r.get("peak_activation_bytes"), r.get("step_time_s")
        line += f" act {mem / (1 << 20):9.1f} MiB" if mem is not None else ""
        line += " (estimated)" if r.get("estimated") else ""
        line += f"  step {t * 1e3:8.1f} ms" if t is not None else ""
        line += f"  compile {r['compile_s']:.0f} s" if r.get("compile_s") is not None else ""
        if r.get("max_batch"):
            line += f"  max batch {r['max_batch']['max_batch']}"
    print(line, flush=True)


def estimator_check(rows: list[dict], variants: tuple[str, ...], runner: Runner) -> list[dict]:
    """The estimator beside the probe on measured main-suite rows, so its error is on record."""
    out = []
    for r in rows:
        if not (
            r.get("suite") == "main"
            and r.get("dtype") == "fp32"
            and r.get("variant") in variants
            and r.get("peak_activation_bytes")
            and not r.get("error")
        ):
            continue
        job = Job(
            suite="estimator-check",
            model=r["model"],
            variant=r["variant"],
            batch=r["batch"],
            dtype=r["dtype"],
            device=r["device"],
            estimate_only=True,
            reason="estimator check",
        )
        est = runner.run_one(job, rows)
        if est.get("peak_activation_bytes"):
            out.append(
                {
                    "model": r["model"],
                    "variant": r["variant"],
                    "batch": r["batch"],
                    "measured_bytes": r["peak_activation_bytes"],
                    "estimated_bytes": est["peak_activation_bytes"],
                    "relative_error": est["peak_activation_bytes"] / r["peak_activation_bytes"] - 1,
                }
            )
    return out


# ----------------------------------------------------------------------------- the CLI
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder")
    p.add_argument(
        "--suites",
        default=",".join(DEFAULT_SUITES),
        help="comma list of main (DenseNet-BC-100), imagenet (DenseNet-121), depth, scale "
        "(DenseNet-BC-1000 at batch 64; not in the default run), deluge (DelugeNet-146), "
        "deluge-depth (DelugeNet memory vs depth)",
    )
    p.add_argument("--backends", default=None, help="comma list (default: all available)")
    p.add_argument(
        "--variants",
        default=None,
        help="comma list: run only these variants of the plan (e.g. to re-run rows a deadline "
        "skipped, then --merge)",
    )
    p.add_argument("--model", dest="main_model", help="main suite's model (densenet_bc_100)")
    p.add_argument("--batch", type=int, dest="main_batch", help="DenseNet-BC-100 batch")
    p.add_argument("--steps", type=int, dest="main_steps", help="timed DenseNet-BC-100 steps")
    p.add_argument("--imagenet-batch", type=int, help="DenseNet-121 batch (CPU 4, GPU 32)")
    p.add_argument("--deluge-batch", type=int, help="DelugeNet-146 batch (CPU 16, GPU 64)")
    p.add_argument("--deluge-steps", type=int, help="timed DelugeNet-146 steps (CPU 3, GPU 20)")
    p.add_argument(
        "--deluge-ns", type=_ints, dest="deluge_sweep_ns", help="DelugeNet sweep n, e.g. 2,4,8"
    )
    p.add_argument("--sweep-batch", type=int, help="depth sweep batch (CPU 8, GPU 64)")
    p.add_argument("--depths", type=_ints, dest="sweep_depths", help="e.g. 40,64,100")
    p.add_argument(
        "--extra-depths",
        type=_ints,
        dest="sweep_extra_depths",
        help="deeper points, measured only if predicted under --measure-limit-gib",
    )
    p.add_argument("--budget-gib", type=float, help="max-batch budget (CPU 1, GPU 8)")
    p.add_argument(
        "--measure-limit-gib",
        type=float,
        help="estimate instead of measure above this (CPU 2 GiB; GPU: the card's memory)",
    )
    p.add_argument("--no-max-batch", action="store_true", help="skip the max-batch search")
    p.add_argument(
        "--max-batch-dtypes",
        type=lambda v: v.split(","),
        help="dtypes whose rows search the max batch, e.g. fp32,bf16 (default fp32)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: skip the CUDA-graph rows")
    p.add_argument("--bf16", action="store_true", help="CPU: add bf16 autocast rows")
    p.add_argument(
        "--dtypes", type=lambda v: v.split(","), help="only these dtypes' rows, e.g. bf16"
    )
    p.add_argument("--scale-depth", type=int, help="scale suite: the deep network (1000)")
    p.add_argument("--scale-batch", type=int, help="scale suite: its batch (64)")
    p.add_argument("--scale-fit-depths", type=_ints, help="scale suite: fit points (100,250,400)")
    p.add_argument("--scale-budget-gib", type=float, help="scale suite: the budget (4 GiB)")
    p.add_argument(
        "--time-budget-s",
        type=float,
        help="skip the optional jobs past 85 %% of this (CPU default 900; 0: none)",
    )
    p.add_argument(
        "--deadline-s",
        type=float,
        help="start no job after this many seconds and stop a running one at it",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--name", help="file stem in --out (default <device>-<date>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--markdown", metavar="JSON", help="print the markdown table of a result file")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine result files of one machine (e.g. one per suite; .partial.json too) "
        "into one JSON + markdown + plots in --out, named --name",
    )
    return p


def settings_from_args(args: argparse.Namespace, device: str) -> Settings:
    """The device's default settings with the command line's choices."""
    names = (
        "main_model",
        "main_batch",
        "main_steps",
        "imagenet_batch",
        "sweep_batch",
        "sweep_depths",
        "sweep_extra_depths",
        "budget_gib",
        "measure_limit_gib",
        "time_budget_s",
        "scale_depth",
        "scale_batch",
        "scale_fit_depths",
        "scale_budget_gib",
        "deluge_batch",
        "deluge_steps",
        "deluge_sweep_ns",
    )
    settings = Settings.for_device(device, **{n: getattr(args, n) for n in names})
    changes: dict = {}
    if args.time_budget_s == 0:
        changes["time_budget_s"] = None
    if args.no_max_batch:
        changes["max_batch"] = False
    if args.no_compile:
        changes["compile"] = False
    if args.no_graphs:
        changes["graphs"] = False
    if args.bf16 and "bf16" not in settings.dtypes:
        changes["dtypes"] = [*settings.dtypes, "bf16"]
    for option in ("dtypes", "max_batch_dtypes"):
        chosen = getattr(args, option)
        unknown = sorted(set(chosen or []) - {"fp32", "bf16"})
        if unknown:
            raise SystemExit(f"--{option.replace('_', '-')}: unknown dtype(s) {unknown}")
        if chosen:
            changes[option] = chosen
    return dataclasses.replace(settings, **changes)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.markdown:
        print(render_markdown(json.loads(Path(args.markdown).read_text())), end="")
        return 0
    if args.merge:
        doc = merge([json.loads(Path(f).read_text()) for f in args.merge])
        stem = (
            args.name or f"{device_slug(doc['device'], doc['device_name'])}-{doc['created'][:10]}"
        )
        return write_outputs(doc, Path(args.out), stem, plots=not args.no_plots)

    import torch

    import dense_ext

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = args.backends.split(",") if args.backends else dense_ext.available_backends(device)
    settings = settings_from_args(args, device)
    suites = [s for s in args.suites.split(",") if s]
    jobs = plan(settings, backends, suites)
    if args.variants:
        wanted = set(args.variants.split(","))
        jobs = [j for j in jobs if j.variant in wanted]
    if args.dry_run:
        for job in jobs:
            flags = [k for k in ("optional", "extrapolate", "estimate_only") if getattr(job, k)]
            print(
                f"{job.suite:<9} {job.label():<60} warmup {job.warmup} steps {job.steps}"
                + (f" max batch {job.max_batch_bytes / GIB:g} GiB" if job.max_batch_bytes else "")
                + "".join(f" {f}" for f in flags)
            )
        return 0
    commit = git_commit()
    print(
        f"dense_ext bench on {device}: backends {backends}, suites {suites}, {len(jobs)} jobs, "
        f"torch {torch.__version__}, commit {commit}",
        flush=True,
    )
    return measure(args, settings, backends, suites, jobs, commit, argv)


def _measure_limit(settings: Settings) -> float | None:
    if settings.measure_limit_gib is not None:
        return settings.measure_limit_gib * GIB
    if settings.device == "cuda":
        import torch

        return 0.9 * torch.cuda.get_device_properties(0).total_memory
    return None


def result_stem(out: Path, name: str | None, slug: str, day: dt.date) -> str:
    """The result files' stem: ``--name``, else ``<slug>-<day>`` or, when a run of the same day
    wrote that already, ``<slug>-<day>b``, ``c``, ... (a second run never overwrites a result that
    may be cited; ``bench.report.unused_path``)."""
    if name:
        return name
    from bench.report import unused_path

    return unused_path(out, f"{slug}-{day.isoformat()}").stem


def measure(
    args: argparse.Namespace,
    settings: Settings,
    backends: list[str],
    suites: list[str],
    jobs: list[Job],
    commit: str,
    argv: list[str] | None,
) -> int:
    """Runs the plan, writing the document after every job; the exit status."""
    import torch

    from bench.worker import device_name

    now = dt.datetime.now(dt.timezone.utc)
    dev_name = device_name(torch.device(settings.device))
    slug = device_slug(settings.device, dev_name)
    if tuple(suites) != DEFAULT_SUITES:
        slug += "-" + "-".join(suites)
    out = Path(args.out)
    stem = result_stem(out, args.name, slug, now.date())
    command = " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])])
    doc = _new_document(settings, dev_name, now, commit, command, backends, suites)

    def checkpoint(rows: list[dict]) -> None:
        doc["measuring_seconds"] = runner.elapsed()
        write_partial(doc, out, stem)

    runner = Runner(
        settings,
        commit,
        args.timeout,
        _measure_limit(settings),
        deadline_s=args.deadline_s,
        on_row=checkpoint,
    )
    doc["probe_self_test"] = _probe_self_test(settings.device)
    rows = runner.run(jobs, doc["rows"])
    add_ratios(rows)
    best = best_backend(backends, settings.device)
    wants_check = "depth" in suites and settings.sweep_extra_depths and not runner.over_budget()
    doc["estimator_check"] = (
        estimator_check(rows, ("naive", f"efficient-{best}-min"), runner) if wants_check else []
    )
    if "scale" in suites:
        from bench.scale import analyse

        doc["derived"] = analyse(rows, settings.scale_budget_gib)
        add_ratios([*rows, *doc["derived"]])
    doc["measuring_seconds"] = runner.elapsed()
    doc["complete"] = True
    return write_outputs(doc, out, stem, plots=not args.no_plots)


def _new_document(
    settings: Settings,
    dev_name: str,
    now: dt.datetime,
    commit: str,
    command: str,
    backends: list[str],
    suites: list[str],
) -> dict:
    """The result document before any row: where, with what, how (bench/README.md, schema)."""
    import torch

    cpu = settings.device == "cpu"
    return {
        "schema": SCHEMA,
        "created": now.isoformat(timespec="seconds"),
        "device": settings.device,
        "device_name": dev_name,
        "torch_version": torch.__version__,
        "git_commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "command": command,
        "backends": backends,
        "suites": suites,
        "settings": settings.to_dict(),
        "memory_method": (
            "torch.profiler memory events of the c10 CPU allocator (sees allocations inside "
            "C++ ops)"
            if cpu
            else "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        ),
        "time_method": (
            "median of time.perf_counter per step" if cpu else "median of CUDA-event time per step"
        ),
        "complete": False,
        "rows": [],
    }


def _probe_self_test(device: str) -> dict | None:
    if device != "cpu":
        return None
    from python_models.memory import self_test

    check = self_test()
    print(
        f"memory probe self-test passed: known pattern peak "
        f"{check['known_allocations_peak_bytes']} B (expected "
        f"{check['known_allocations_expected_bytes']}), ATen-internal im2col seen "
        f"({check['aten_internal_peak_bytes']} B >= "
        f"{check['aten_internal_lower_bound_bytes']})",
        flush=True,
    )
    return check


if __name__ == "__main__":
    sys.exit(main())
