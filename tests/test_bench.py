"""The benchmark's own machinery (bench/): plan, worker, estimator, report, scale fit, runner.

These check that the instruments measure what they claim on cases with known answers; they
time nothing (performance is shown by ``make bench``, never asserted in a test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import jobs as bench_jobs
from bench import report, run, scale
from bench.estimate import LiveBytes, estimate_activation_bytes
from bench.jobs import Job, Settings, plan
from bench.variants import TrainStep, build_model, model_config, parse_variant

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


# ----------------------------------------------------------------------------- plan
def test_plan_has_every_peer_next_to_the_efficient_rows():
    jobs = plan(Settings.for_device("cpu"), ["reference", "cpp"], ["main", "imagenet"])
    for suite in ("main", "imagenet"):
        variants = [j.variant for j in jobs if j.suite == suite]
        for peer in ("naive", "naive-channels_last", "naive-compile", "naive-checkpoint"):
            assert peer in variants
        assert "efficient-cpp-min-compile" in variants
        assert "efficient-cpp-bottleneck-compile" in variants
        assert "efficient-reference-min" in variants
    # The max-batch search resizes the batch, which would recompile a compiled model.
    main = {j.variant: j for j in jobs if j.suite == "main"}
    assert main["naive"].max_batch_bytes == 1 << 30
    assert main["naive-compile"].max_batch_bytes is None
    assert main["efficient-cpp-min-compile"].max_batch_bytes is None


def test_gpu_plan_compiles_in_fp32_only():
    jobs = plan(Settings.for_device("cuda"), ["reference", "cpp", "triton"], ["main"])
    compiled = [j for j in jobs if j.variant.endswith("-compile")]
    assert {j.dtype for j in compiled} == {"fp32"}
    assert {j.variant for j in compiled} == {
        "naive-compile",
        "efficient-triton-min-compile",
        "efficient-triton-bottleneck-compile",
    }
    assert {j.dtype for j in jobs} == {"fp32", "bf16"}


def test_gpu_plan_times_cuda_graphs_without_a_memory_pass():
    """A replayed graph allocates nothing: its rows are timed only, never batch-searched."""
    jobs = plan(Settings.for_device("cuda"), ["cpp", "triton"], ["main"])
    graphs = {(j.variant, j.dtype): j for j in jobs if j.variant.endswith("-graph")}
    assert ("naive-graph", "bf16") in graphs and ("efficient-triton-min-graph", "fp32") in graphs
    assert ("efficient-cpp-bottleneck-graph", "fp32") in graphs
    assert all(not j.memory and j.max_batch_bytes is None and j.steps for j in graphs.values())
    assert not any(
        j.variant.endswith("-graph") for j in plan(Settings.for_device("cpu"), ["cpp"], ["main"])
    )
    no_graphs = Settings.for_device("cuda", graphs=False)
    assert not any(j.variant.endswith("-graph") for j in plan(no_graphs, ["cpp"], ["main"]))


def test_graph_variant_needs_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        TrainStep(model_config("densenet_bc_10"), "naive-graph", 2, "fp32", torch.device("cpu"))


def test_plan_without_compile_and_unknown_suite():
    settings = Settings.for_device("cpu", compile=False)
    variants = {j.variant for j in plan(settings, ["cpp"], ["main"])}
    assert not any(v.endswith("-compile") for v in variants)
    with pytest.raises(ValueError, match="unknown suites"):
        plan(settings, ["cpp"], ["mian"])


def test_scale_plan_measures_the_1000_layer_step_and_estimates_naive():
    jobs = plan(Settings.for_device("cpu"), ["reference", "cpp"], ["scale"])
    deep = [j for j in jobs if j.model == "densenet_bc_1000"]
    assert {(j.variant, j.estimate_only, j.steps) for j in deep} == {
        ("efficient-cpp-min", False, 1),
        ("naive", True, 0),
    }
    assert all(j.batch == 64 and j.warmup_batch == 2 for j in jobs)
    gpu = plan(Settings.for_device("cuda"), ["cpp", "triton"], ["scale"])
    assert all(j.warmup_batch is None for j in gpu)
    fit = [scale.depth_of(j.model) for j in jobs if j.model != "densenet_bc_1000"]
    assert fit == [100, 250, 400]


def test_job_round_trips_through_json():
    job = Job("depth", "densenet_bc_40", "naive", 8, "fp32", "cpu", optional=True, seed=3)
    assert Job.from_json(job.to_json()) == job
    assert json.loads(job.to_json())["optional"] is True


def test_settings_for_cuda_and_overrides():
    s = Settings.for_device("cuda", main_batch=32, sweep_depths=None)
    assert s.main_batch == 32 and s.dtypes == ["fp32", "bf16"] and s.sweep_extra_depths == [1000]
    assert s.sweep_depths == Settings.for_device("cpu").sweep_depths  # None keeps the default


# ----------------------------------------------------------------------------- variants
@pytest.mark.parametrize(
    "name,fields",
    [
        ("naive", dict(efficient=False, channels_last=False, compile=False, checkpoint=False)),
        ("naive-channels_last", dict(efficient=False, channels_last=True, compile=False)),
        ("naive-compile", dict(efficient=False, channels_last=False, compile=True)),
        ("naive-checkpoint", dict(efficient=False, checkpoint=True, compile=False)),
        ("efficient-cpp-min", dict(efficient=True, backend="cpp", memory="min", compile=False)),
        (
            "efficient-triton-bottleneck-compile",
            dict(efficient=True, backend="triton", memory="bottleneck", compile=True),
        ),
        ("naive-channels_last-graph", dict(channels_last=True, compile=False, graph=True)),
        ("efficient-cpp-min-graph", dict(backend="cpp", memory="min", graph=True)),
        ("efficient-cpp-min", dict(graph=False)),
    ],
)
def test_variant_grammar(name, fields):
    v = parse_variant(name)
    assert {k: getattr(v, k) for k in fields} == fields


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variant("naive-fast")


def test_channels_last_variant_converts_the_model():
    model = build_model(model_config("densenet_bc_10"), "naive-channels_last")
    conv = model.features.conv0.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


# ----------------------------------------------------------------------------- estimator
def test_live_bytes_counts_known_allocations():
    """1 MiB, then 3 MiB, the 1 MiB freed, then 2 MiB: the peak is 5 MiB, nothing remains."""
    tracker = LiveBytes()
    with tracker:
        a = torch.empty(MIB, dtype=torch.uint8)
        b = torch.empty(3 * MIB, dtype=torch.uint8)
        view = b[: MIB // 2]  # a view: no new storage
        del a
        c = torch.empty(2 * MIB, dtype=torch.uint8)
        del b, c, view
    assert tracker.peak == 5 * MIB
    assert tracker.live == 0


def test_estimator_agrees_with_torch_memtracker():
    """The same bookkeeping as torch's MemTracker (which is quadratic in the op count)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from bench.variants import TrainStep

    config = model_config("densenet_bc_16")
    ours = estimate_activation_bytes(config, "naive", 4, "fp32", torch.device("cpu"))
    with FakeTensorMode():
        step = TrainStep(config, "naive", 4, "fp32", torch.device("cpu"))
        step()
        tracker = MemTracker()
        tracker.track_external(step.model, step.opt, step.x, step.y)
        with tracker:
            before = tracker.get_tracker_snapshot("current")
            step()
            peak = tracker.get_tracker_snapshot("peak")
    total = lambda snap: next(s["Total"] for d, s in snap.items() if torch.device(d).type == "cpu")
    theirs = total(peak) - total(before)
    assert ours["peak_activation_bytes"] == pytest.approx(theirs, rel=1e-3)
    assert ours["floor_bytes"] > 0


def test_estimator_refuses_compiled_variants():
    with pytest.raises(ValueError, match="compiled"):
        estimate_activation_bytes(
            model_config("densenet_bc_10"), "naive-compile", 2, "fp32", torch.device("cpu")
        )


# ----------------------------------------------------------------------------- worker
def test_worker_measures_a_tiny_job_in_its_own_process():
    job = Job(
        "main", "densenet_bc_10", "efficient-reference-min", 2, "fp32", "cpu", warmup=1, steps=2
    )
    row = run.run_worker(job, timeout=300)
    assert not row.get("error"), row.get("stderr_tail")
    assert row["peak_activation_bytes"] > row["floor_bytes"] > 0
    assert len(row["step_times_s"]) == 2 and row["step_time_s"] > 0
    assert row["first_step_s"] > 0 and "compile_s" not in row
    assert row["job_wall_s"] > 0


def test_worker_searches_the_max_batch_with_the_shared_search():
    """The benchmark's max batch is python_models.max_batch's search over measured steps: the
    batch found fits the budget and the next one, also measured, does not."""
    budget = 24 * MIB
    job = Job("main", "densenet_bc_10", "naive", 2, "fp32", "cpu", warmup=1, max_batch_bytes=budget)
    row = run.run_worker(job, timeout=600)
    assert not row.get("error"), row.get("stderr_tail")
    found = row["max_batch"]
    probes = {p["batch"]: p for p in found["probes"]}
    best = found["max_batch"]
    assert best > 2 and probes[best]["fits"] and probes[best]["bytes"] <= budget
    assert not probes[best + 1]["fits"]


@pytest.mark.slow
def test_worker_warms_up_at_a_small_batch_and_measures_the_job_batch():
    """The scale suite's warm-up batch: the probe and the floor are of the job's batch."""
    job = Job(
        "scale", "densenet_bc_10", "naive", 4, "fp32", "cpu", warmup=1, steps=1, warmup_batch=1
    )
    row = run.run_worker(job, timeout=300)
    assert not row.get("error"), row.get("stderr_tail")
    full = run.run_worker(job.replace(warmup_batch=None), timeout=300)
    assert row["warmup_batch"] == 1 and "warmup_batch" not in full
    assert row["floor_bytes"] == full["floor_bytes"] > 0
    assert row["peak_activation_bytes"] == pytest.approx(full["peak_activation_bytes"], rel=0.05)


def test_worker_reports_a_failure_as_a_row():
    job = Job("main", "densenet_bc_10", "efficient-nosuch-min", 2, "fp32", "cpu", warmup=1, steps=1)
    row = run.run_worker(job, timeout=300)
    assert "BackendUnavailableError" in row["error"] or "unknown backend" in row["error"]


# ----------------------------------------------------------------------------- runner
def _fake_worker(calls):
    def worker(job, timeout):
        calls.append(job)
        return {**job.ident(), "peak_activation_bytes": 1, "estimated": job.estimate_only}

    return worker


def test_runner_estimates_a_deep_point_predicted_over_the_limit(monkeypatch):
    calls: list[Job] = []
    monkeypatch.setattr(run, "run_worker", _fake_worker(calls))
    measured = [
        {
            "suite": "depth",
            "model": f"densenet_bc_{d}",
            "variant": "naive",
            "batch": 8,
            "peak_activation_bytes": d * d * MIB,
        }  # fmt: skip
        for d in (40, 64, 100)
    ]
    runner = run.Runner(Settings.for_device("cpu"), "abc", 60, measure_limit_bytes=2 << 30)
    deep = Job("depth", "densenet_bc_400", "naive", 8, "fp32", "cpu", extrapolate=True)
    runner.run_one(deep, measured)
    assert calls[-1].estimate_only and "over the measuring limit" in calls[-1].reason
    shallow = deep.replace(model="densenet_bc_40")  # 1.6 GiB predicted: measured
    runner.run_one(shallow, measured)
    assert not calls[-1].estimate_only


def test_runner_skips_after_the_deadline_and_optional_jobs_past_the_budget(monkeypatch):
    calls: list[Job] = []
    monkeypatch.setattr(run, "run_worker", _fake_worker(calls))
    job = Job("main", "densenet_bc_10", "naive", 2, "fp32", "cpu")
    runner = run.Runner(Settings.for_device("cpu"), "abc", 60, None, deadline_s=0)
    assert "deadline" in runner.run_one(job, [])["skipped"]
    runner = run.Runner(Settings.for_device("cpu", time_budget_s=1e-9), "abc", 60, None)
    assert "time budget" in runner.run_one(job.replace(optional=True), [])["skipped"]
    assert not runner.run_one(job, []).get("skipped")
    assert len(calls) == 1


# ----------------------------------------------------------------------------- report
def _row(variant, step, mem, suite="main"):
    return {"suite": suite, "model": "densenet_bc_100", "variant": variant, "batch": 16,
            "dtype": "fp32", "device": "cpu", "step_time_s": step,
            "peak_activation_bytes": mem, "floor_bytes": mem / 10}  # fmt: skip


def test_ratios_to_naive_and_to_the_fastest_naive_peer():
    rows = [
        _row("naive", 0.5, 500),
        _row("naive-channels_last", 0.4, 600),
        _row("naive-compile", 0.45, 400),
        _row("naive-checkpoint", 0.3, 200),  # not a speed peer
        _row("efficient-cpp-min", 0.36, 50),
    ]
    report.add_ratios(rows)
    eff = rows[-1]
    assert eff["step_time_ratio"] == pytest.approx(0.36 / 0.5)
    assert eff["step_time_vs_best_naive"] == pytest.approx(0.36 / 0.4)
    assert eff["best_naive_variant"] == "naive-channels_last"
    assert eff["peak_activation_ratio"] == pytest.approx(0.1)
    assert eff["peak_over_floor"] == pytest.approx(10)


def _doc(rows, name="Some CPU"):
    return {"schema": report.SCHEMA, "created": "2026-11-25T00:00:00+00:00", "device": "cpu",
            "device_name": name, "torch_version": "x", "git_commit": "abc",
            "command": "python -m bench.run", "settings": {"budget_gib": 1.0},
            "measuring_seconds": 1.0, "memory_method": "m", "time_method": "t",
            "rows": rows}  # fmt: skip


def test_markdown_table_shows_every_row_and_the_compile_time():
    rows = [_row("naive", 0.5, 500), {**_row("naive-compile", 0.4, 400), "compile_s": 61.2}]
    rows.append({**_row("efficient-cpp-min", 0, 0), "error": "RuntimeError: boom"})
    report.add_ratios(rows)
    md = report.render_markdown(_doc(rows))
    lines = [ln for ln in md.splitlines() if ln.startswith("| densenet_bc_100")]
    assert len(lines) == 3
    assert "| 61 |" in lines[1] and "0.80x" in lines[1]
    assert "error: RuntimeError: boom" in lines[2]


def test_merge_refuses_two_machines_and_combines_one():
    a, b = _doc([_row("naive", 0.5, 500)]), _doc([_row("efficient-cpp-min", 0.3, 50)])
    merged = report.merge([a, b])
    assert [r["variant"] for r in merged["rows"]] == ["naive", "efficient-cpp-min"]
    assert merged["rows"][1]["step_time_ratio"] == pytest.approx(0.6)
    with pytest.raises(SystemExit, match="different machines"):
        report.merge([a, _doc([], name="Other CPU")])


def test_merge_fills_rows_a_deadline_skipped_from_a_later_run():
    skipped = {**_row("naive-compile", 0, 0), "skipped": "deadline (--deadline-s) reached"}
    del skipped["step_time_s"], skipped["peak_activation_bytes"]
    first = _doc([_row("naive", 0.5, 500), skipped])
    rerun = _doc([_row("naive-compile", 0.4, 400)])
    merged = report.merge([first, rerun])
    assert [(r["variant"], r.get("step_time_s")) for r in merged["rows"]] == [
        ("naive", 0.5),
        ("naive-compile", 0.4),
    ]
    # ... and a later skip never hides an earlier measurement.
    assert report.merge([rerun, _doc([skipped])])["rows"][0]["step_time_s"] == 0.4


def test_write_outputs_without_matplotlib(tmp_path):
    """A machine without matplotlib gets the JSON and the table, and says the plots are
    skipped (the GPU image may lack it)."""
    code = f"""
import sys, importlib.abc, json
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "tqdm"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
from pathlib import Path
from bench import report, run
from bench.jobs import Job
doc = json.loads({json.dumps(json.dumps(_doc([_row("naive", 0.5, 500)])))})
assert report.write_outputs(doc, Path({str(tmp_path)!r}), "t") == 0
print(list(run._progress([Job("main", "m", "naive", 1, "fp32", "cpu")])))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "plots skipped" in out.stdout and "[1/1]" in out.stdout
    assert (tmp_path / "t.json").exists() and (tmp_path / "t.md").exists()


def test_partial_document_is_replaced_by_the_final_one(tmp_path):
    doc = _doc([_row("naive", 0.5, 500)])
    report.write_partial(doc, tmp_path, "run")
    assert json.loads((tmp_path / "run.partial.json").read_text())["rows"][0]["variant"] == "naive"
    report.write_outputs(doc, tmp_path, "run", plots=False)
    assert not (tmp_path / "run.partial.json").exists() and (tmp_path / "run.json").exists()


# ----------------------------------------------------------------------------- scale
def test_deepest_fitting_on_an_exact_line():
    per_layer, base = 3 * MIB, 100 * MIB
    points = [(d, per_layer * d + base) for d in (100, 250, 400, 1000)]
    fit = scale.deepest_fitting(points, 4 << 30)
    expected = scale.valid_bc_depth(int(((4 << 30) - base) // per_layer))
    assert fit["depth"] == expected and (expected - 4) % 6 == 0
    assert fit["predicted_bytes"] <= 4 << 30 < per_layer * (expected + 6) + base
    assert fit["holdout"]["relative_error"] == pytest.approx(0, abs=1e-12)


def test_deepest_fitting_reports_a_bent_line_in_its_holdout():
    points = [(d, d * d * 1e3) for d in (100, 250, 400, 1000)]  # quadratic, not affine
    assert scale.deepest_fitting(points, 4 << 30)["holdout"]["relative_error"] < -0.2


def test_scale_analysis_derives_one_predicted_row():
    rows = [
        {"suite": "scale", "model": f"densenet_bc_{d}", "variant": "efficient-cpp-min",
         "batch": 64, "device": "cpu", "peak_activation_bytes": 2 * MIB * d + 50 * MIB}
        for d in (100, 250, 400)
    ] + [{"suite": "scale", "model": "densenet_bc_1000", "variant": "naive", "batch": 64,
          "device": "cpu", "estimated": True, "peak_activation_bytes": 1 << 40}]  # fmt: skip
    (derived,) = scale.analyse(rows, 4.0)
    assert derived["predicted"] and derived["variant"] == "efficient-cpp-min"
    assert derived["model"] == f"densenet_bc_{derived['deepest_fitting']['depth']}"
    cells = report.table_rows({"settings": {}, "rows": [], "derived": [derived]})
    assert "predicted" in cells[0][-1]


def test_valid_bc_depth():
    assert [scale.valid_bc_depth(d) for d in (10, 15, 16, 1000, 2731)] == [10, 10, 16, 1000, 2728]
    with pytest.raises(ValueError):
        scale.valid_bc_depth(9)


def test_bench_modules_do_not_edit_sys_path():
    """bench is a package run with ``python -m`` from the repository root."""
    # TODO(triton): triton_roofline.py still inserts the repository root into sys.path.
    for path in sorted((ROOT / "bench").glob("*.py")):
        if path.name != "triton_roofline.py":
            assert "sys.path" not in path.read_text(), path
    assert bench_jobs.__name__ == "bench.jobs"


# ----------------------------------------------------------------------------- compile_vs_eager
def test_paired_timing_alternates_and_ratios_each_pair(monkeypatch):
    """bench.compile_vs_eager's paired timing: after warm-up, pairs alternate which variant
    runs first, and each ratio is compiled / eager of its own pair (a load spike that hits
    one pair moves one ratio, not the comparison)."""
    import argparse

    from bench import compile_vs_eager

    order: list[str] = []
    # Eager steps take 10 s, compiled 9 s, except a 3x load spike on the third pair.
    durations = {"eager": [10, 10, 30, 10, 10], "compiled": [9, 9, 27, 9, 9]}

    def fake_training_step(args, compiled, model=None):
        name = "compiled" if compiled else "eager"

        def step():
            order.append(name)
            return durations[name].pop(0) if len(order) > 2 else 1.0  # warm-up: 1 s

        return step, "model"

    monkeypatch.setattr(compile_vs_eager, "training_step", fake_training_step)
    args = argparse.Namespace(warmup=1, steps=5)
    result = compile_vs_eager.measure_paired(args)
    assert order[:2] == ["eager", "compiled"]
    pairs = [tuple(order[i : i + 2]) for i in range(2, len(order), 2)]
    assert pairs == [("eager", "compiled"), ("compiled", "eager")] * 2 + [("eager", "compiled")]
    assert result["ratios"] == pytest.approx([0.9] * 5)
    assert result["ratio_median"] == pytest.approx(0.9)


def test_paired_rounds_rotate_the_order_and_ratio_within_a_round():
    """bench.paired: round r starts with variant r mod n; each ratio divides by the first
    variant's time of the same round, so a load spike on one round cancels."""
    from bench.paired import paired_rounds, summarise

    calls: list[str] = []
    load = [1.0, 1.0, 3.0, 1.0]  # per round; round 2 runs three times slower
    base = {"a": 10.0, "b": 8.0, "c": 12.0}

    def step(name):
        def run():
            calls.append(name)
            if len(calls) <= 3:  # the warm-up round
                return 99.0
            return base[name] * load[(len(calls) - 4) // 3]

        return run

    times = paired_rounds([step("a"), step("b"), step("c")], rounds=4, warmup=1)
    rounds = [calls[i : i + 3] for i in range(3, len(calls), 3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    rows = summarise(["a", "b", "c"], times)
    assert [r["vs_first_median"] for r in rows] == pytest.approx([1.0, 0.8, 1.2])
    assert rows[1]["vs_first_quartiles"] == pytest.approx([0.8, 0.8])
    assert rows[0]["step_ms_median"] == pytest.approx(1e4)


def test_host_time_rounds_keep_the_least_time_and_the_median_marginal():
    from bench.triton_host import best_of_rounds

    def run(per_layer, per_block, marginal):
        block = {"input_channels": 24, "layers": 16, "us_per_block": per_block,
                 "us_per_layer_marginal": marginal, "launches_per_layer": 11.0}  # fmt: skip
        net = {"us_per_layer": per_layer, "launches_per_layer": 11.0, "blocks": [block]}
        return {"dense_ext": "/tree/dense_ext", "net": net}

    best = best_of_rounds([run(300.0, 4800.0, 190.0), run(200.0, 3200.0, 260.0),
                           run(250.0, 4000.0, 170.0)])  # fmt: skip
    assert best["dense_ext"] == "/tree/dense_ext"
    assert best["net"]["us_per_layer"] == 200.0
    assert best["net"]["launches_per_layer"] == 11.0
    assert best["net"]["blocks"][0]["us_per_block"] == 3200.0
    assert best["net"]["blocks"][0]["us_per_layer_marginal"] == 190.0


def test_host_time_ratio_of_each_round_then_the_median():
    from bench.triton_host import paired_ratios

    def run(per_layer):
        return {"dense_ext": "/tree", "net": {"us_per_layer": per_layer}}

    # round 2 ran under load: both trees slow, the same ratio
    ratios = paired_ratios([run(80.0), run(160.0), run(90.0)], [run(100.0), run(200.0), run(100.0)])
    assert ratios["net"]["median"] == 0.8
    assert (ratios["net"]["min"], ratios["net"]["max"]) == (0.8, 0.9)
    assert ratios["net"]["rounds"] == [0.8, 0.8, 0.9]


def test_result_files_of_the_same_day_get_new_names(tmp_path):
    from bench.report import unused_path

    first = unused_path(tmp_path, "cpu-triton-host-2026-11-26")
    assert first.name == "cpu-triton-host-2026-11-26.json"
    first.write_text("{}")
    second = unused_path(tmp_path, "cpu-triton-host-2026-11-26")
    assert second.name == "cpu-triton-host-2026-11-26b.json"
    second.write_text("{}")
    assert unused_path(tmp_path, "cpu-triton-host-2026-11-26").name.endswith("26c.json")


def test_paired_restarts_itself_with_the_allocator_pinned(monkeypatch):
    """bench.paired re-executes itself once with glibc's large-block thresholds fixed (read only
    at process start), unless they are set already or --default-malloc is given."""
    from bench import paired

    for key in paired.PINNED_MALLOC:
        monkeypatch.delenv(key, raising=False)
    execs: list[tuple] = []

    def fake_execve(path, args, env):
        execs.append((args, env))
        raise SystemExit(0)

    monkeypatch.setattr(paired.os, "execve", fake_execve)
    with pytest.raises(SystemExit):
        paired.main(["--model", "densenet_bc_16", "--rounds", "2"])
    ((args, env),) = execs
    assert args[1:] == ["-m", "bench.paired", "--model", "densenet_bc_16", "--rounds", "2"]
    assert all(env[k] == v for k, v in paired.PINNED_MALLOC.items())
    for key, value in paired.PINNED_MALLOC.items():  # the restarted process goes on
        monkeypatch.setenv(key, value)
    paired.restart_with_pinned_malloc(["--rounds", "2"])
    assert len(execs) == 1


def test_gemm_share_sorts_op_self_times_into_gemm_and_the_rest(monkeypatch):
    """bench.gemm_share counts matrix products and convolutions (forward and backward) as GEMM
    time and every other op's self time, the autograd engine's included, as the rest."""
    from bench import gemm_share

    profiled = {
        ("aten::mm", "[[8, 4], [4, 2]]"): [3, 10.0, (8, 4)],
        ("aten::addmm_", "[]"): [1, 2.0, ()],
        ("aten::convolution_backward", "[]"): [2, 5.0, ()],
        ("aten::mkldnn_convolution", "[]"): [2, 4.0, ()],
        ("dense_ext::bn_relu", "[]"): [4, 1.5, ()],
        ("aten::copy_", "[]"): [9, 0.25, ()],
        ("autograd::engine::evaluate_function: AddmmBackward0", "[]"): [1, 0.5, ()],
    }
    monkeypatch.setattr(gemm_share, "op_times", lambda step, warmup: profiled)
    assert gemm_share.split_step(None, 0) == (21.0, 2.25)


def test_gemm_share_product_rates_per_shape():
    """--products: each product shape's calls, time and rate (2mkn per call over its time),
    the most expensive first; other ops are not products."""
    from bench import gemm_share

    profiled = {
        ("dense_ext::onednn_matmul", "[[100, 20], [20, 10], [100, 10]]"): [2, 0.5, (100, 20)],
        ("aten::mm", "[[10, 4], [4, 2]]"): [3, 0.001, (10, 4)],
        ("aten::mkldnn_convolution", "[[1, 2, 3, 3]]"): [1, 9.0, (1, 2, 3, 3)],
    }
    rates = gemm_share.product_rates(profiled)
    assert [r[0] for r in rates] == [(100, 20, 10), (10, 4, 2)]
    assert rates[0][1:3] == (2, 0.5)
    assert rates[0][3] == pytest.approx(2 * 100 * 20 * 10 * 2 / 0.5e6)
    assert rates[1][3] == pytest.approx(2 * 10 * 4 * 2 * 3 / 1e3)


def test_gemm_share_prints_each_variant_and_the_budget_for_the_target(monkeypatch, capsys):
    """One pinned-allocator run on a tiny model: per variant the total is the sum of its two
    parts, and the efficient variant's budget is target x the naive total minus its GEMM time."""
    from bench import gemm_share, paired

    for key, value in paired.PINNED_MALLOC.items():
        monkeypatch.setenv(key, value)
    argv = ["--model", "densenet_bc_10", "--batch", "2", "--rounds", "2", "--warmup", "1"]
    gemm_share.main(
        [*argv, "--variants", "naive,efficient-cpp-min", "--target", "0.8", "--products", "2"]
    )
    out = capsys.readouterr().out
    products = out.split("efficient-cpp-min: matrix products")[1].splitlines()[1:3]
    assert all("GFLOP/s" in line for line in products), out  # the block's own products
    rows = {
        line.split()[0]: [float(v) for v in line.split()[1:]]
        for line in out.splitlines()
        if line.startswith(("naive ", "efficient-cpp-min "))
    }
    for total, gemm, other in rows.values():
        assert gemm > 0 and other > 0
        assert total == pytest.approx(gemm + other, abs=0.11)
    budget = float(out.split("must fit in")[1].split()[0])
    expected = 0.8 * rows["naive"][0] - rows["efficient-cpp-min"][1]
    assert budget == pytest.approx(expected, abs=0.2)


def test_a_second_bench_run_of_the_day_never_overwrites_the_first(tmp_path):
    """bench.run names its files <slug>-<day>, then <slug>-<day>b, c, ... (make bench twice a day
    overwrote the first run's table and plots before); --name is taken as given."""
    import datetime as dt

    from bench.run import result_stem

    day = dt.date(2026, 11, 26)
    assert result_stem(tmp_path, None, "cpu", day) == "cpu-2026-11-26"
    (tmp_path / "cpu-2026-11-26.json").write_text("{}")
    assert result_stem(tmp_path, None, "cpu", day) == "cpu-2026-11-26b"
    (tmp_path / "cpu-2026-11-26b.json").write_text("{}")
    assert result_stem(tmp_path, None, "cpu", day) == "cpu-2026-11-26c"
    assert result_stem(tmp_path, "mine", "cpu", day) == "mine"


def test_cpu_gemm_step_alternates_libraries_in_one_process(monkeypatch, capsys):
    """bench.cpu_gemm_step times MKL and oneDNN steps in turns and restores the library that
    was chosen before it ran (skipped where oneDNN's matmul is unavailable)."""
    from bench import cpu_gemm_step, paired
    from dense_ext import _C

    before = _C.cpu_gemm()
    if not _C.set_cpu_gemm("onednn"):
        pytest.skip("oneDNN's matmul is not available here")
    assert _C.set_cpu_gemm("mkl")
    for key, value in paired.PINNED_MALLOC.items():
        monkeypatch.setenv(key, value)
    argv = ["--model", "densenet_bc_10", "--batch", "2", "--variant", "efficient-cpp-min"]
    cpu_gemm_step.main([*argv, "--rounds", "2"])
    out = capsys.readouterr().out
    assert "2 rounds: MKL" in out and "oneDNN / MKL median" in out
    assert _C.cpu_gemm() == "mkl"
    assert _C.set_cpu_gemm(before)


def test_stem_bench_measures_the_fused_stem_against_the_modules():
    """bench.stem: the same model stepped with the ImageNet stem fused and as modules; the fused
    stem saves the ReLU output and int64 indices (2 x 4 + 4 x 8 bytes per pooled value, less
    its one byte), so the step's peak is lower by about that; the model ends as it started."""
    from bench import stem
    from bench.variants import ModelConfig, TrainStep

    step = TrainStep(
        ModelConfig("densenet121", 64, 10), "efficient-cpp-min", 2, "fp32", torch.device("cpu")
    )
    row = stem.measure(step, rounds=2, warmup=0)
    pooled = 2 * 64 * 16 * 16  # N * C * (64 / 4)^2 values after the stem
    saved = (4 * 4 + 8 - 1) * pooled / 2**20  # MiB: the ReLU output (4 per input), indices
    assert row["act_mib_modules"] - row["act_mib_fused"] >= 0.9 * saved, row
    assert row["time_ratio_median"] > 0 and len(row["time_ratio_quartiles"]) == 3


def test_roofline_smoke_runs_every_op_and_probe():
    """``bench/triton_roofline.py --smoke`` (interpreted kernels on CPU tensors) runs every op
    it times on a GPU, the probes included: a GPU session's roofline call must not fail on the
    script itself."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "triton_roofline.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    ran = [line for line in done.stdout.splitlines() if line.endswith(": ran")]
    assert any("probe: fwd 3x3 of normalised Y1" in line for line in ran), done.stdout
    assert any("probe: dgrad 1x1 reduce, transposed W1" in line for line in ran), done.stdout
    # the bottleneck shape, its 4 probes and 2 weight-layout probes; the plain shape
    assert len(ran) == 10 + 4 + 2 + 5, done.stdout


@pytest.mark.parametrize("network", ["DenseNet-BC-100 (k=12)", "DenseNet-121"])
def test_host_benchmark_blocks_have_their_network_s_growth_rate(network):
    """bench.triton_host measures each network's blocks with their own growth rate and a 4k
    bottleneck. Until 2026-11-28 it passed the growth rate and the bottleneck factor in
    torchvision's order, so every layer added 4 channels (the bottleneck width came out
    right, 4k either way)."""
    from bench.triton_host import NETWORKS, build_block

    k, blocks = NETWORKS[network]
    for c0, layers, _ in blocks:
        spec = build_block(c0, layers, k).spec
        assert (spec.growth_rate, spec.mid_channels, spec.num_layers) == (k, 4 * k, layers)
        assert spec.in_channels(layers - 1) == c0 + (layers - 1) * k
