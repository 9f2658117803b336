"""The training loop: setting a run up from its arguments, training, evaluating, checkpoints.

The command line lives in ``python_models.train``; this module takes its parsed arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dense_ext.backends import BackendUnavailableError, get_backend
from python_models import checkpoint as ckpt
from python_models import data as D
from python_models import ddp, get_model
from python_models.ddp import DistInfo
from python_models.max_batch import find_max_batch, step_bytes
from python_models.memory import GIB, current_memory, default_budget
from python_models.runlog import RunLog, epoch_line, progress_bars


class UsageError(ValueError):
    """A bad command line or configuration: reported as one line, not a traceback."""


# ----------------------------------------------------------------------------- setup


@dataclass
class Precision:
    """How the step runs: autocast dtype (None: off) and memory format."""

    amp_dtype: torch.dtype | None
    channels_last: bool

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format of the model and its inputs."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self, device: torch.device):
        """The autocast context of a forward pass."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)


def resolve_precision(args: argparse.Namespace, device: torch.device) -> Precision:
    """``--amp`` and ``--channels-last`` for ``device``."""
    cuda = device.type == "cuda"
    amp = args.amp
    if amp == "auto":
        amp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "none"
    if amp == "fp16" and not cuda:
        raise UsageError("--amp fp16 needs a CUDA GPU (on CPU use --amp bf16)")
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and cuda)
    return Precision(dtype, channels_last)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_backend(args: argparse.Namespace, device: torch.device) -> str:
    """The efficient blocks' backend; with ``--sync-bn`` one that supports it."""
    if not args.sync_bn or not args.efficient:
        return args.backend
    if args.backend == "auto":
        return "reference"
    if not get_backend(args.backend, device).supports_sync:
        raise UsageError(
            f"--sync-bn needs a backend with synchronised batch norm; "
            f"--backend {args.backend} has none (use --backend reference or auto)"
        )
    return args.backend


def build_model(
    args: argparse.Namespace, bundle: D.DataBundle, device: torch.device, precision: Precision
) -> nn.Module:
    """The model named by ``--model`` for ``bundle``, on ``device``."""
    kwargs: dict[str, Any] = dict(
        num_classes=bundle.num_classes,
        efficient=args.efficient,
        small_inputs=bundle.small_inputs,
        drop_rate=args.drop_rate,
    )
    if args.growth_rate is not None:
        kwargs["growth_rate"] = args.growth_rate
    if args.efficient:
        kwargs.update(memory=args.memory, backend=resolve_backend(args, device))
    try:
        model = get_model(args.model, **kwargs)
    except (ValueError, TypeError) as exc:  # unknown name, bad depth or growth rate
        raise UsageError(f"cannot build --model {args.model}: {exc}") from None
    if args.efficient:
        _check_backend(kwargs["backend"], device)
    return model.to(device=device, memory_format=precision.memory_format)


def _check_backend(backend: str, device: torch.device) -> None:
    # Fail before training, with the backend's own reason, not at the first forward.
    try:
        get_backend(backend, device)
    except BackendUnavailableError as exc:
        raise UsageError(str(exc)) from None


class StepSchedule:
    """The learning-rate factor at each optimiser step (a picklable ``LambdaLR`` lambda).

    ``step``: 1, then 0.1 after 50 % and 0.01 after 75 % of all steps (for 300 epochs: from
    epochs 150 and 225, as Huang et al.; counting steps keeps short runs sensible too).
    ``cosine``: ``(1 + cos(pi * step / total)) / 2``.
    """

    def __init__(self, kind: str, epochs: int, steps_per_epoch: int) -> None:
        self.kind = kind
        self.total = max(1, epochs * steps_per_epoch)

    def __call__(self, step: int) -> float:
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))
        milestones = (self.total // 2, (3 * self.total) // 4)
        return 0.1 ** sum(step >= m for m in milestones)


def build_optimizer(model: nn.Module, args: argparse.Namespace, steps_per_epoch: int):
    """SGD with Nesterov momentum and the per-step learning-rate schedule."""
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        nesterov=args.momentum > 0,
        weight_decay=args.weight_decay,
    )
    schedule = StepSchedule(args.schedule, args.epochs, steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def auto_batch_size(args, model, bundle, device, precision, info: DistInfo) -> int:
    """``--batch-size auto``: rank 0 probes, every rank uses its answer."""
    batch = 0
    if info.is_main:
        budget = (
            int(args.memory_budget * GIB)
            if args.memory_budget
            else default_budget(device, info.world_size)
        )
        cap = len(bundle.train) // info.world_size
        print(
            f"--batch-size auto: largest batch within {budget / GIB:.2f} GiB per process "
            f"({'efficient' if args.efficient else 'naive'} {args.model}, "
            f"{bundle.image_size}x{bundle.image_size}, {device.type}, at most {cap})"
        )
        shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
        batch = find_max_batch(
            lambda b: step_bytes(model, b, shape, bundle.num_classes, device, precision),
            budget,
            cap,
            log=print,
        ).max_batch
        print(f"--batch-size auto: using batch size {batch}")
    return ddp.broadcast_int(batch, info)


# ----------------------------------------------------------------------------- steps


@dataclass
class Trainer:
    """The state a training run carries from step to step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    bundle: D.DataBundle
    precision: Precision
    info: DistInfo
    args: argparse.Namespace
    batch_size: int
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best_acc: float = 0.0
    history: list[dict] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        """The training device."""
        return self.info.device

    def inputs(self, images: Tensor, indices: Tensor, aug: D.Augmentation | None) -> Tensor:
        """uint8 images -> augmented (training), normalised model input on the device."""
        images = images.to(self.device, non_blocking=True)
        if aug is not None:
            images = aug.apply(images, indices, self.bundle.pad)
        x = D.normalize(images, self.bundle.mean, self.bundle.std)
        return x.contiguous(memory_format=self.precision.memory_format)

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimiser step; returns the (detached) loss and the number correct."""
        with self.precision.autocast(self.device):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.detach(), (logits.argmax(1) == y).sum()

    def state_dict(self) -> dict:
        """Model, optimiser, scheduler, scaler, counters, RNG state and arguments."""
        return {
            "model": ddp.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "best_acc": self.best_acc,
            "batch_size": self.batch_size,
            "history": self.history,
            "rng": ckpt.rng_state(),
            "args": vars(self.args),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint: everything ``state_dict`` saved."""
        try:
            ddp.unwrap(self.model).load_state_dict(state["model"])
        except RuntimeError as exc:
            raise UsageError(
                f"--resume: the checkpoint does not fit --model {self.args.model}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_acc, self.history = state.get("best_acc", 0.0), list(state.get("history", []))
        ckpt.set_rng_state(state["rng"])


def steps_per_epoch(num_train: int, batch: int, info: DistInfo, cap: int | None) -> int:
    """Training steps per epoch (incomplete global batches are dropped)."""
    steps = num_train // (batch * info.world_size)
    if steps == 0:
        raise UsageError(
            f"the training set ({num_train} images) is smaller than one global "
            f"batch ({batch} x {info.world_size} processes)"
        )
    return min(steps, cap) if cap else steps


def _setup_model(args, bundle, info: DistInfo, precision: Precision) -> nn.Module:
    seed_everything(args.seed)  # the same initial weights on every rank
    model = build_model(args, bundle, info.device, precision)
    if info.rank:
        torch.manual_seed(args.seed + info.rank)  # each rank its own dropout masks
    if args.sync_bn:
        if not info.distributed:
            print("--sync-bn: one process, nothing to synchronise; batch norm stays local")
        else:
            from dense_ext.distributed import enable_sync_bn

            model = enable_sync_bn(model)
    return model


def build_trainer(args: argparse.Namespace, info: DistInfo, state: dict | None = None) -> Trainer:
    """Data, model and optimiser for ``args``; restored from ``state`` when resuming."""
    bundle = D.load_dataset(args.dataset, args.data_dir, args.image_size)
    precision = resolve_precision(args, info.device)
    model = _setup_model(args, bundle, info, precision)
    batch = args.batch_size
    if state is not None:
        batch = state["batch_size"]  # the same batches as the interrupted run
        if args.batch_size not in ("auto", batch) and info.is_main:
            print(f"--resume: using the checkpoint's batch size {batch}, not {args.batch_size}")
    elif batch == "auto":
        batch = auto_batch_size(args, model, bundle, info.device, precision, info)
    spe = (
        steps_per_epoch(len(bundle.train), batch, info, args.steps_per_epoch) if args.epochs else 1
    )
    model = ddp.wrap_ddp(model, info)
    optimizer, scheduler = build_optimizer(model, args, spe)
    scaler = (
        torch.amp.GradScaler(info.device.type) if precision.amp_dtype == torch.float16 else None
    )
    trainer = Trainer(model, optimizer, scheduler, scaler, bundle, precision, info, args, batch)
    if state is not None:
        trainer.load_state_dict(state)
    return trainer


# ----------------------------------------------------------------------------- the loop


def train_epoch(t: Trainer, bar_factory) -> dict:
    """One epoch of training; returns loss, accuracy, images/s and the per-step losses."""
    t.model.train()
    args, info = t.args, t.info
    batches = D.epoch_batches(
        len(t.bundle.train),
        t.batch_size,
        info.rank,
        info.world_size,
        args.seed,
        t.epoch,
        shuffle=True,
        drop_last=True,
    )
    batches = batches[
        : steps_per_epoch(len(t.bundle.train), t.batch_size, info, args.steps_per_epoch)
    ]
    t.bundle.train.set_epoch(args.seed, t.epoch)
    aug = D.Augmentation.draw(len(t.bundle.train), t.bundle.pad, t.bundle.flip, args.seed, t.epoch)
    losses, correct, seen = [], torch.zeros((), device=t.device), 0
    bar = bar_factory(total=len(batches), desc=f"epoch {t.epoch + 1}/{args.epochs}")
    start = time.perf_counter()
    for images, labels, indices in D.iterate(
        t.bundle.train, batches, args.workers, t.device.type == "cuda"
    ):
        x = t.inputs(images, indices, aug)
        y = labels.to(t.device, non_blocking=True)
        loss, right = t.train_step(x, y)
        losses.append(loss)
        correct += right
        seen += y.numel()
        _update_bar(bar, t, losses, correct, seen, start)
    bar.close()
    return _epoch_train_metrics(t, losses, correct, seen, time.perf_counter() - start)


def _update_bar(bar, t: Trainer, losses, correct, seen, start) -> None:
    bar.update(1)
    # Reading the loss synchronises with the GPU; do it every 10 steps, not every step.
    if bar.disable or (bar.n % 10 and bar.n != bar.total):
        return
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(
        loss=f"{losses[-1].item():.4f}",
        acc=f"{float(correct) / seen:.3f}",
        img_s=f"{seen * t.info.world_size / elapsed:.0f}",
        mem=current_memory(t.device),
        refresh=False,
    )


def _epoch_train_metrics(t: Trainer, losses, correct, seen, elapsed) -> dict:
    local = torch.stack(losses).double().cpu() if losses else torch.zeros(0, dtype=torch.float64)
    # Step losses averaged over ranks: each rank's loss is the mean over its equal share.
    step_losses = [v / t.info.world_size for v in ddp.all_reduce_sum(local.tolist(), t.info)]
    right, count = ddp.all_reduce_sum([float(correct), float(seen)], t.info)
    return {
        "train_loss": sum(step_losses) / max(1, len(step_losses)),
        "train_acc": right / max(1.0, count),
        "images_per_s": count / max(elapsed, 1e-9),
        "epoch_time_s": elapsed,
        "step_losses": step_losses,
    }


@torch.no_grad()
def evaluate(t: Trainer) -> dict:
    """Loss and accuracy on the whole test split (each rank takes a share)."""
    # The bare module: DDP's forward is a collective, and ranks may hold different numbers
    # of test batches. Evaluation normalises with running statistics, so nothing is synced.
    model = ddp.unwrap(t.model).eval()
    batches = D.epoch_batches(
        len(t.bundle.test),
        t.batch_size,
        t.info.rank,
        t.info.world_size,
        shuffle=False,
        drop_last=False,
    )
    loss_sum = torch.zeros((), dtype=torch.float64, device=t.device)
    right = torch.zeros((), dtype=torch.float64, device=t.device)
    count = 0
    for images, labels, indices in D.iterate(
        t.bundle.test, batches, t.args.workers, t.device.type == "cuda"
    ):
        x = t.inputs(images, indices, None)
        y = labels.to(t.device, non_blocking=True)
        with t.precision.autocast(t.device):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        right += (logits.argmax(1) == y).sum()
        count += y.numel()
    total_loss, total_right, total = ddp.all_reduce_sum(
        [float(loss_sum), float(right), float(count)], t.info
    )
    return {"test_loss": total_loss / max(1.0, total), "test_acc": total_right / max(1.0, total)}


def _record_epoch(t: Trainer, log: RunLog, train: dict, test: dict, lr: float) -> dict:
    step_losses = train.pop("step_losses")
    row = {
        "epoch": t.epoch,
        "lr": lr,
        **train,
        **test,
        "memory": current_memory(t.device),
        "batch_size": t.batch_size,
        "world_size": t.info.world_size,
    }
    t.history.append(row)
    log.record_epoch(row, step_losses, t.step - len(step_losses))
    log.write_json("metrics.json", t.history)
    return row


def fit(t: Trainer, log: RunLog) -> dict:
    """Train from ``t.epoch`` to ``--epochs``, evaluating and checkpointing each epoch."""
    args, main = t.args, t.info.is_main
    bars = progress_bars(main and not args.quiet)
    start = time.perf_counter()
    while t.epoch < args.epochs:
        lr = t.optimizer.param_groups[0]["lr"]
        train = train_epoch(t, bars)
        test = evaluate(t)
        t.epoch += 1
        t.best_acc = max(t.best_acc, test["test_acc"])
        row = _record_epoch(t, log, train, test, lr)
        if main:
            print(epoch_line(row), flush=True)
            _save(t, log.dir)
    return summary(t, time.perf_counter() - start, log.dir)


def _save(t: Trainer, out_dir: Path) -> None:
    if t.args.no_checkpoint:
        return
    state = t.state_dict()
    ckpt.save(state, out_dir / "last.pt")
    if t.args.save_every and t.epoch % t.args.save_every == 0:
        ckpt.save(state, out_dir / f"epoch{t.epoch}.pt")


def summary(t: Trainer, elapsed: float, out_dir: Path) -> dict:
    """The run's summary (summary.json)."""
    last = t.history[-1] if t.history else {}
    return {
        "model": t.args.model,
        "efficient": t.args.efficient,
        "dataset": t.args.dataset,
        "epochs": t.epoch,
        "steps": t.step,
        "batch_size": t.batch_size,
        "world_size": t.info.world_size,
        "device": str(t.info.device),
        "final_test_acc": last.get("test_acc"),
        "best_test_acc": t.best_acc if t.history else None,
        "final_train_loss": last.get("train_loss"),
        "train_time_s": elapsed,
        "peak_memory": current_memory(t.device),
        "out_dir": str(out_dir),
    }
