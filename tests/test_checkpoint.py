"""Checkpoints: nothing in one runs, a failed save loses nothing, resume finds the newest
valid one and continues bit for bit (also from inside an epoch)."""

from __future__ import annotations

import csv
import errno
import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import torch_threads

from python_models import checkpoint as ckpt
from python_models import train, trainer


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is fastest, and far faster than two on a busy shared CPU.
    with torch_threads(1):
        yield


# A tiny CIFAR-style DenseNet-BC on 8x8 digits with dropout: the generator states matter.
TINY = [
    "--model",
    "densenet_bc_10",
    "--growth-rate",
    "4",
    "--image-size",
    "8",
    "--batch-size",
    "16",
    "--drop-rate",
    "0.2",
    "--quiet",
]


def _main(tmp_path: Path, name: str, *extra: str) -> int:
    return train.main([*TINY, "--out-dir", str(tmp_path / name), *extra])


def _steps(run_dir: Path) -> list[tuple[str, str, str]]:
    with open(run_dir / "steps.csv") as f:
        return [(r["epoch"], r["step"], r["loss"]) for r in csv.DictReader(f)]


class _RunsCode:
    """Unpickling this calls ``os.system`` (what a crafted checkpoint does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("dense-ext-train: error:"), err
    return err


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("as_folder", [False, True])
def test_a_malicious_checkpoint_does_not_run(tmp_path, capsys, as_folder):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "run"
    folder.mkdir()
    evil = folder / "last.pt"
    torch.save({"model": {}, "epoch": _RunsCode(f"touch {marker}")}, evil)
    status = _main(tmp_path, "out", "--resume", str(folder if as_folder else evil))
    assert not marker.exists()
    assert status == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "refuses" in err and "posix.system" in err


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint at all", "not a complete torch.save archive"),
        ({"features.conv0.weight": torch.zeros(1)}, "found a bare state_dict"),
        ({"model": {}}, "no 'epoch' count"),
        ([1, 2, 3], "expected a dict with 'model' and 'epoch'"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    assert _main(tmp_path, "out", "--resume", str(path)) == 2
    assert message in _one_error_line(capsys.readouterr().err)


def test_every_torch_load_in_the_repository_is_weights_only():
    import ast

    root = Path(__file__).resolve().parents[1]
    unsafe = []
    for folder in ("dense_ext", "python_models", "bench", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and ast.unparse(node.func) == "torch.load"
                    and not any(
                        k.arg == "weights_only" and getattr(k.value, "value", None) is True
                        for k in node.keywords
                    )
                ):
                    unsafe.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_generator_states_round_trip_as_plain_data(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    state = ckpt.capture_rng(torch.device("cpu"))
    torch.save(state, tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.standard_normal(2), random.random())
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.standard_normal(2), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2] == want[2]


def test_checkpoints_load_with_weights_only(tmp_path):
    assert _main(tmp_path, "run", "--epochs", "1", "--steps-per-epoch", "2") == 0
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["format"] == ckpt.FORMAT and state["epoch"] == 1 and state["step"] == 2
    assert len(state["ranks"]) == 1 and state["sampler"]["offset"] == 0
    assert state["args"]["model"] == "densenet_bc_10" and state["batch_size"] == 16


def test_a_checkpoint_of_another_model_names_the_whole_mismatch(tmp_path, capsys):
    assert _main(tmp_path, "run", "--epochs", "1", "--steps-per-epoch", "1") == 0
    other = ["--model", "densenet_bc_16", "--growth-rate", "6"]
    assert _main(tmp_path, "run", "--resume", str(tmp_path / "run"), *other) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "holds densenet_bc_10, which does not fit --model densenet_bc_16" in err
    # densenet_bc_16 has 2 layers per block where densenet_bc_10 has 1, and k=6, not 4.
    assert "missing: features.denseblock1.denselayer2" in err
    assert "of another shape (checkpoint vs model): features.conv0.weight [8, 3, 3, 3] vs " in err


def test_a_checkpoint_without_batch_size_resumes(tmp_path, capsys):
    assert _main(tmp_path, "run", "--epochs", "1", "--steps-per-epoch", "1") == 0
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for key in ("batch_size", "optimizer", "step", "ranks", "sampler", "args"):
        del state[key]
    torch.save(state, tmp_path / "bare.pt")
    resume = ["--resume", str(tmp_path / "bare.pt"), "--epochs", "2", "--steps-per-epoch", "1"]
    status = _main(tmp_path, "resumed", *resume)
    out = capsys.readouterr().out
    assert status == 0
    assert "does not record its batch size; using --batch-size 16" in out
    assert "momentum starts from zero" in out and "fresh random streams" in out


# ----------------------------------------------------------------------------- writing


def _failing_save(fail_on_call: int):
    """A torch.save that writes half of the archive on its ``fail_on_call``-th call, then
    reports a full disk."""
    real = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] != fail_on_call:
            return real(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real(obj, buffer)
        data = buffer.getvalue()
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
        else:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_failed_save_keeps_the_previous_checkpoint_and_resume_continues(
    tmp_path, capsys, monkeypatch
):
    common = ["--epochs", "3", "--steps-per-epoch", "2"]
    assert _main(tmp_path, "full", *common) == 0
    monkeypatch.setattr(torch, "save", _failing_save(fail_on_call=2))  # epoch 2's last.pt
    assert _main(tmp_path, "run", *common) == 1
    assert "No space left on device" in _one_error_line(capsys.readouterr().err)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.suffix in (".pt", ".tmp")) == ["last.pt"]
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert train.main(["--resume", str(run), "--quiet"]) == 0  # the run's own options
    assert _steps(run) == _steps(tmp_path / "full")  # epoch 2 logged once, bit for bit


def test_save_fsyncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os,
        "replace",
        lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))[1],
    )
    stale = tmp_path / ".last.pt.k1ll3d.tmp"  # a save that was killed: a partial file
    stale.write_bytes(b"PK")
    ckpt.save({"model": {}, "epoch": 0}, tmp_path / "last.pt")
    assert events == ["fsync", ("replace", "last.pt"), "fsync"]  # file, rename, folder
    assert ckpt.load(tmp_path / "last.pt")["epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_resume_of_a_folder_picks_the_newest_valid_checkpoint(tmp_path, capsys):
    assert (
        _main(tmp_path, "run", "--epochs", "2", "--steps-per-epoch", "1", "--save-every", "1") == 0
    )
    run = tmp_path / "run"
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])  # e.g. copied by a non-atomic tool
    torch.save({"model": {}, "epoch": _RunsCode("true"), "step": 99}, run / "epoch9.pt")
    path, state = ckpt.latest(run)
    assert path.name == "epoch2.pt" and state["step"] == 2
    capsys.readouterr()
    assert train.main(["--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    assert f"continuing from {run / 'epoch2.pt'}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- resuming


class _Crash(Exception):
    pass


def test_resume_inside_an_epoch_is_bit_for_bit(tmp_path, monkeypatch):
    common = ["--epochs", "2", "--steps-per-epoch", "5"]
    assert _main(tmp_path, "full", *common) == 0
    real = trainer.save_checkpoints

    def save_then_crash(t, out_dir, epoch_end=False):
        real(t, out_dir, epoch_end)
        raise _Crash  # the machine goes down right after the first save: step 3 of epoch 1

    monkeypatch.setattr(trainer, "save_checkpoints", save_then_crash)
    with pytest.raises(_Crash):
        train.run(
            train.parse_args(
                [*TINY, *common, "--save-steps", "3", "--out-dir", str(tmp_path / "run")]
            )
        )
    monkeypatch.undo()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and state["step"] == 3 and state["sampler"]["offset"] == 3
    assert train.main(["--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert _steps(tmp_path / "run") == _steps(tmp_path / "full")
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["ranks"][0]["rng"]["torch"], b["ranks"][0]["rng"]["torch"])
