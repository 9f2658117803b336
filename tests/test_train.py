"""The training CLI: it learns, resumes bit for bit, agrees across block kinds, fails clearly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import torch_threads

from python_models import data as D
from python_models import train, trainer
from python_models.max_batch import MemoryBudgetError, find_max_batch, step_bytes
from python_models.recipes import RECIPES


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is fastest, and far faster than two on a busy shared CPU.
    with torch_threads(1):
        yield


# A tiny CIFAR-style DenseNet-BC on 8x8 digits: a step takes milliseconds.
TINY = [
    "--model",
    "densenet_bc_10",
    "--growth-rate",
    "12",
    "--image-size",
    "8",
    "--quiet",
    "--batch-size",
    "16",
]
TINY_ANY_SIZE = [a for a in TINY if a not in ("--image-size", "8")]  # e.g. CIFAR: 32x32


def _run(tmp_path: Path, name: str, *extra: str) -> dict:
    args = train.parse_args([*TINY, "--out-dir", str(tmp_path / name), *extra])
    return train.run(args)


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "steps.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_a_few_steps_reduce_the_loss(tmp_path):
    summary = _run(
        tmp_path,
        "run",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "30",
        "--schedule",
        "cosine",
        "--batch-size",
        "32",
        "--lr",
        "0.3",
    )
    losses = _losses(tmp_path / "run")
    assert len(losses) == 30 and summary["steps"] == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # from ln(10) = 2.30 to below 1.85
    assert summary["final_test_acc"] > 0.25  # 10 classes: chance is 0.1


def test_run_writes_metrics_checkpoint_and_summary(tmp_path):
    _run(tmp_path, "run", "--epochs", "2", "--steps-per-epoch", "2")
    out = tmp_path / "run"
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "images_per_s",
        "lr",
        "memory",
    } <= set(rows[0])
    assert json.loads((out / "metrics.json").read_text())[1]["epoch"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 4
    state = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "step", "ranks", "sampler", "args"} <= set(state)
    assert state["epoch"] == 2 and state["step"] == 4


def test_resume_continues_bit_for_bit(tmp_path):
    # Dropout makes the global RNG state matter; the checkpoint must carry it.
    common = ["--epochs", "3", "--steps-per-epoch", "3", "--drop-rate", "0.2"]
    _run(tmp_path, "full", *common, "--save-every", "1")
    _run(tmp_path, "resumed", *common, "--resume", str(tmp_path / "full" / "epoch1.pt"))
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert len(full) == 9 and len(resumed) == 6
    assert resumed == full[3:]  # exact equality, not closeness
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_efficient_and_naive_train_alike(tmp_path, backend):
    common = ["--epochs", "1", "--steps-per-epoch", "6", "--seed", "3"]
    _run(tmp_path, "naive", *common, "--naive")
    _run(tmp_path, "efficient", *common, "--efficient", "--backend", backend)
    naive, efficient = _losses(tmp_path / "naive"), _losses(tmp_path / "efficient")
    assert len(naive) == 6
    torch.testing.assert_close(efficient, naive, rtol=1e-5, atol=1e-6)


def test_cifar_folder_trains(tmp_path):
    D.write_cifar(tmp_path / "data", "cifar10", train_per_file=8, test_size=8)
    args = train.parse_args(
        [*TINY_ANY_SIZE, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data")]
        + ["--epochs", "1", "--steps-per-epoch", "2", "--out-dir", str(tmp_path / "run")]
    )
    summary = train.run(args)
    assert summary["steps"] == 2 and summary["final_test_acc"] is not None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "does not exist"),
        (["--dataset", "cifar100"], "needs --data-dir"),
        (["--model", "resnet50"], "unknown model 'resnet50'"),
        (["--model", "densenet_bc_11"], "depth must be 6n+4"),
        (["--sync-bn", "--backend", "cpp"], "cpp"),
        (["--resume", "/nonexistent/run"], "no checkpoint"),
        (["--epochs", "-1"], "argument --epochs: must be an integer >= 0, got -1"),
        (["--batch-size", "3000"], "smaller than one global batch"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer or 'auto'"),
        (["--lr", "-0.1"], "argument --lr: must be a number >= 0, got -0.1"),
        (["--lr", "nan"], "argument --lr: must be a number >= 0, got nan"),
        (["--momentum", "-1"], "argument --momentum: must be a number in [0, 1), got -1"),
        (["--weight-decay", "-0.0001"], "argument --weight-decay: must be a number >= 0"),
        (["--drop-rate", "1.5"], "argument --drop-rate: must be a number in [0, 1)"),
        (["--image-size", "-5"], "argument --image-size: must be a positive integer, got -5"),
        (["--image-size", "0"], "argument --image-size: must be a positive integer, got 0"),
        (["--image-size", "2"], "2x2 images are too small for this model: a 2x2 pool needs"),
        (["--image-size", "five"], "argument --image-size: expected a positive integer"),
        (["--dataset", "cifar10", "--image-size", "64"], "cifar10 images are 32x32"),
        (["--lr-milestones", "0.75", "0.5"], "--lr-milestones must increase"),
        (["--lr-milestones", "1.5"], "a fraction of the run in (0, 1]"),
        (["--device", "banana"], "--device 'banana' is not a device; use auto, cpu, cuda"),
        (["--device", "meta"], "--device meta: only cpu and cuda devices are supported"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capfd, argv, message):
    base = TINY_ANY_SIZE if "--dataset" in argv else TINY
    status = train.main([*base, "--out-dir", str(tmp_path / "run"), "--epochs", "1", *argv])
    err = capfd.readouterr().err
    assert status == 2
    assert message in err, err
    assert err.startswith("dense-ext-train: error:") and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_clear_line(tmp_path, capfd):
    status = train.main([*TINY, "--out-dir", str(tmp_path / "run"), "--device", "cuda"])
    err = capfd.readouterr().err
    assert status == 2
    assert (
        err == "dense-ext-train: error: --device cuda: no CUDA GPU is available on this machine\n"
    )


def test_a_bad_backend_variable_is_named(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("DENSE_EXT_BACKEND", "garbage")
    status = train.main([*TINY, "--out-dir", str(tmp_path / "run"), "--epochs", "1"])
    err = capfd.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "environment variable DENSE_EXT_BACKEND='garbage' is not a backend" in err


def test_malformed_cifar_is_a_clear_error(tmp_path, capsys):
    folder = D.write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_1").write_text("garbage")
    status = train.main([*TINY_ANY_SIZE, "--dataset", "cifar10", "--data-dir", str(tmp_path)])
    assert status == 2 and "is not a CIFAR Python-pickle batch" in capsys.readouterr().err


def test_step_schedule_follows_the_paper():
    schedule = trainer.LRSchedule("step", 300 * 10)
    assert schedule(0) == 1.0 and schedule(1499) == 1.0
    assert schedule(1500) == pytest.approx(0.1) and schedule(2249) == pytest.approx(0.1)
    assert schedule(2250) == pytest.approx(0.01) and schedule(2999) == pytest.approx(0.01)
    imagenet = trainer.LRSchedule("step", 90 * 10, (1 / 3, 2 / 3))
    assert imagenet.milestones == (300, 600)  # epochs 30 and 60
    cosine = trainer.LRSchedule("cosine", 2 * 5)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == 0.0


def _lrs(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row["lr"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_short_runs_start_at_the_full_rate(tmp_path, steps):
    assert trainer.LRSchedule("step", steps)(0) == 1.0
    _run(tmp_path, "run", "--epochs", str(steps), "--steps-per-epoch", "1")
    assert _lrs(tmp_path / "run")[0] == 0.1


def test_resume_with_more_epochs_follows_the_longer_schedule(tmp_path):
    common = ["--steps-per-epoch", "2", "--lr", "0.2"]
    _run(tmp_path, "long", "--epochs", "4", *common)
    _run(tmp_path, "short", "--epochs", "2", *common)
    # Only --epochs again: the run's own options (model, lr, ...) come from its checkpoint.
    assert train.main(["--resume", str(tmp_path / "short"), "--epochs", "4", "--quiet"]) == 0
    assert _lrs(tmp_path / "long") == pytest.approx([0.2, 0.2, 0.02, 0.002])
    assert _lrs(tmp_path / "short") == pytest.approx([0.2, 0.02, 0.02, 0.002])


def test_a_model_name_carries_its_recipe_and_options_override_it():
    cifar = train.parse_args(["--model", "densenet_bc_100"])
    assert cifar.recipe == "densenet-cifar"
    assert (cifar.epochs, cifar.batch_size, cifar.lr, cifar.momentum) == (300, 64, 0.1, 0.9)
    assert cifar.weight_decay == 1e-4 and tuple(cifar.lr_milestones) == (0.5, 0.75)
    assert (cifar.schedule, cifar.lr_gamma, cifar.drop_rate) == ("step", 0.1, 0.0)
    mine = train.parse_args(["--model", "densenet_bc_100", "--epochs", "5", "--lr", "0.05"])
    assert (mine.epochs, mine.lr, mine.batch_size) == (5, 0.05, 64)
    imagenet = train.parse_args(["--model", "densenet121", "--dataset", "imagefolder"])
    assert (imagenet.recipe, imagenet.epochs, imagenet.batch_size) == ("densenet-imagenet", 90, 256)
    # A pattern-built model (the default run's) has no recipe: the CLI's short defaults.
    default = train.parse_args([])
    assert (default.recipe, default.epochs, default.model) == ("none", 6, "densenet_bc_40")
    assert train.parse_args(["--model", "densenet_bc_100", "--recipe", "none"]).epochs == 6
    forced = train.parse_args(["--recipe", "densenet-cifar"])
    assert (forced.model, forced.epochs) == ("densenet_bc_40", 300)


def test_the_delugenet_recipe_is_the_papers():
    # parse_args does not build the model: the family's names carry their recipe already.
    args = train.parse_args(["--model", "delugenet146", "--dataset", "cifar100"])
    assert args.recipe == "delugenet-cifar" == RECIPES["delugenet-cifar"].name
    assert (args.epochs, args.batch_size, args.lr, args.momentum) == (300, 64, 0.1, 0.9)
    assert args.weight_decay == 1e-4 and args.schedule == "step" and args.lr_gamma == 0.1
    milestones = trainer.LRSchedule(args.schedule, 300, args.lr_milestones).milestones
    assert milestones == (150, 225)  # epochs, at one step per epoch
    for name in ("delugenet218", "wide_delugenet146"):
        assert train.parse_args(["--model", name]).recipe == "delugenet-cifar"


def test_the_run_line_names_the_recipe_and_the_overrides(tmp_path, capsys):
    _run(tmp_path, "run", "--recipe", "densenet-cifar", "--epochs", "1", "--steps-per-epoch", "1")
    out = capsys.readouterr().out
    assert "recipe densenet-cifar (Huang et al. 2017, CIFAR): 300 epochs, batch 64" in out
    assert "(overridden: --batch-size, --epochs)" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"] == "densenet-cifar" and config["epochs"] == 1


def test_find_max_batch_is_exact_on_a_line_and_on_steps():
    probes = []

    def linear(b):
        probes.append(b)
        return 1000 + 37 * b

    found = find_max_batch(linear, budget=1000 + 37 * 523 + 36, cap=10**6)
    assert found.max_batch == 523 and found.bytes_per_sample == pytest.approx(37)
    assert len(probes) <= 8, probes

    def stepped(b):  # an allocator that rounds up to 4 KiB and runs out above 700
        return None if b > 700 else ((5000 + 51 * b) // 4096 + 1) * 4096

    budget = stepped(400)
    best = find_max_batch(stepped, budget, cap=10**6).max_batch
    assert stepped(best) <= budget < (stepped(best + 1) or budget + 1)
    assert find_max_batch(linear, budget=10**9, cap=50).max_batch == 50
    with pytest.raises(MemoryBudgetError, match="batch 1 needs"):
        find_max_batch(linear, budget=10, cap=50)


def test_find_max_batch_searches_down_and_reuses_known_probes():
    probes = []

    def linear(b):
        probes.append(b)
        return 37 * b

    found = find_max_batch(linear, budget=37 * 11, cap=1000, start=64, known={64: 37 * 64})
    assert found.max_batch == 11 and 64 not in probes and len(probes) <= 6, probes
    assert {p["batch"] for p in found.as_dict()["probes"]} == {64, *probes}


def test_cpu_probe_counts_activations():
    precision = trainer.Precision(None, False)
    torch.manual_seed(0)
    from python_models import get_model

    model = get_model("densenet_bc_10", growth_rate=4, num_classes=10, efficient=True)
    cpu = torch.device("cpu")
    small = step_bytes(model, 4, (3, 8, 8), 10, cpu, precision)
    large = step_bytes(model, 64, (3, 8, 8), 10, cpu, precision)
    state = sum(p.numel() * 4 for p in model.parameters())
    assert state < small < large
    # At least the feature buffers of the 60 extra samples: blocks of 12, 10 and 9 channels
    # (stem 2k = 8, k = 4, compression 0.5) at 8x8, 4x4, 2x2, float32.
    per_sample = 4 * (12 * 8 * 8 + 10 * 4 * 4 + 9 * 2 * 2)
    assert large - small > 60 * per_sample


def test_batch_size_auto_reports_what_it_found_and_nothing_else(tmp_path, capfd):
    _run(
        tmp_path,
        "auto",
        *("--batch-size", "auto", "--memory-budget", "0.02", "--epochs", "0"),
        *("--backend", "reference"),  # no fallback warning where the extension is not built
    )
    out, err = capfd.readouterr()
    assert err == ""  # no profiler start/stop lines
    assert "--batch-size auto: using batch size" in out
    found = int(out.split("using batch size")[1].split()[0])
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["resolved_batch_size"] == found and 2 <= found < 1438


class _Exited(Exception):
    """What the test's stand-in for os._exit raises, with the exit status."""


def test_a_finished_torchrun_run_of_the_cli_ends_its_process_without_teardown(
    tmp_path, monkeypatch
):
    # As if under torchrun with 2 ranks: this process stands for rank 0 in a one-process gloo
    # group (its collectives and barrier run alone). The command line's finished run leaves
    # with os._exit(0) and never destroys the group (gloo's teardown could abort a finished
    # run), while run() called as a library function returns and tears down.
    import torch.distributed as dist

    from python_models import ddp

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    try:
        _check_cli_exit_path(tmp_path, monkeypatch, ddp)
    finally:
        dist.destroy_process_group()


def _check_cli_exit_path(tmp_path: Path, monkeypatch, ddp) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(ddp, "init_distributed", lambda device: ddp.DistInfo(world_size=2))
    monkeypatch.setattr(ddp, "wrap_ddp", lambda model, info: model)
    monkeypatch.setattr(ddp, "cleanup", lambda info, finished=False: calls.append(("cleanup",)))

    def fake_exit(status: int) -> None:
        calls.append(("exit", status))
        raise _Exited(status)

    monkeypatch.setattr(ddp.os, "_exit", fake_exit)
    argv = [*TINY, "--epochs", "1", "--steps-per-epoch", "1", "--no-checkpoint"]
    with pytest.raises(_Exited):
        train.main([*argv, "--out-dir", str(tmp_path / "cli")])
    assert calls == [("exit", 0)]
    assert (tmp_path / "cli" / "summary.json").is_file()
    calls.clear()
    train.run(train.parse_args([*argv, "--out-dir", str(tmp_path / "lib")]))
    assert calls == [("cleanup",)]
