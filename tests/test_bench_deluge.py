"""The DelugeNet suites of the benchmark: their plan, models, floor and one measured job."""

from __future__ import annotations

import pytest

from bench import run
from bench.jobs import DEFAULT_SUITES, Job, Settings, plan
from bench.report import SUITE_ORDER
from bench.variants import TrainStep, build_model, model_config


def test_default_run_measures_delugenet_146_and_the_depth_sweep():
    assert {"deluge", "deluge-depth"} <= set(DEFAULT_SUITES) <= set(SUITE_ORDER)
    jobs = plan(Settings.for_device("cpu"), ["reference", "cpp"], ["deluge", "deluge-depth"])
    main = [j for j in jobs if j.suite == "deluge"]
    assert {j.model for j in main} == {"delugenet146"} and {j.batch for j in main} == {16}
    assert [j.variant for j in main] == [
        "naive",
        "naive-channels_last",
        "efficient-reference-bottleneck",
        "efficient-reference-min",
        "efficient-cpp-bottleneck",
        "efficient-cpp-min",
    ]
    assert all(j.steps > 0 and j.max_batch_bytes for j in main)
    sweep = [j for j in jobs if j.suite == "deluge-depth"]
    assert {j.variant for j in sweep} == {"naive", "efficient-cpp-min", "efficient-cpp-bottleneck"}
    assert sorted({j.model for j in sweep}) == sorted(
        f"delugenet_cifar_{n}" for n in Settings.for_device("cpu").deluge_sweep_ns
    )


def test_models_and_labels():
    assert model_config("delugenet146").label == "DelugeNet-146 (32x32)"
    assert model_config("wide_delugenet146").label == "Wide-DelugeNet-146 (32x32)"
    assert model_config("delugenet_cifar_4").label == "DelugeNet-74 (n=4, 32x32)"
    assert model_config("delugenet122").image_size == 224
    model = build_model(model_config("delugenet_cifar_2"), "efficient-reference-min")
    assert model.stage_slots == (2, 5, 7) and model.efficient
    with pytest.raises(ValueError, match="checkpointing"):
        build_model(model_config("delugenet_cifar_2"), "naive-checkpoint")


@pytest.mark.parametrize("variant", ["naive", "efficient-reference-min"])
def test_floor_is_every_stage_s_slots(variant):
    step = TrainStep(model_config("delugenet_cifar_1"), variant, 2, "fp32", _cpu())
    step()
    # Stage slots (1, 3, 4) of (64, 128, 256) channels at 32, 16 and 8 pixels, float32.
    expected = 2 * 4 * (1 * 64 * 32 * 32 + 3 * 128 * 16 * 16 + 4 * 256 * 8 * 8)
    assert step.floor_bytes == expected


def test_worker_measures_a_delugenet_job():
    job = Job("deluge", "delugenet_cifar_1", "efficient-cpp-min", 2, "fp32", "cpu", steps=1)
    row = run.run_worker(job, timeout=600)
    if row.get("error") and "unavailable" in row["error"]:
        pytest.skip(row["error"])
    assert not row.get("error"), row.get("stderr_tail")
    assert row["peak_activation_bytes"] > row["floor_bytes"] > 0 and row["step_time_s"] > 0


def _cpu():
    import torch

    return torch.device("cpu")
