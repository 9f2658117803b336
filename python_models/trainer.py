"""The training loop: setting a run up from its arguments, training, evaluating, checkpoints.

The command line lives in ``python_models.train``; this module takes its parsed arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import time
from collections.abc import Callable
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
    model = model.to(device=device, memory_format=precision.memory_format)
    _check_image_size(model, bundle, device, precision)
    return model


@torch.no_grad()
def _check_image_size(
    model: nn.Module, bundle: D.DataBundle, device: torch.device, precision: Precision
) -> None:
    # One evaluation-mode forward of a blank image: too small an image fails here, with
    # the model's own reason, rather than at the first training step.
    size = bundle.image_size
    x = torch.zeros(1, bundle.in_channels, size, size, device=device)
    try:
        with precision.autocast(device):
            model.eval()(x.contiguous(memory_format=precision.memory_format))
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{size}x{size} images are too small for this model: {reason}") from None
    finally:
        model.train()


def _check_backend(backend: str, device: torch.device) -> None:
    # Fail before training, with the backend's own reason, not at the first forward.
    try:
        get_backend(backend, device)
    except BackendUnavailableError as exc:
        raise UsageError(str(exc)) from None


class LRSchedule:
    """The learning-rate factor of each optimiser step; the rate is ``--lr * factor(step)``.

    ``step``: multiplied by ``gamma`` at each milestone, a fraction of all steps (Huang et
    al.: /10 at 50 % and 75 %, epochs 150 and 225 of 300; counting steps keeps short runs
    sensible too). A milestone is rounded up to a whole step and is at least step 1, so the
    first step always runs at the full rate: a run of 1-3 steps does not start at lr/100.
    ``cosine``: ``(1 + cos(pi * step / total)) / 2``.

    A function of the step alone, rebuilt from the arguments when a run resumes: a resumed
    run given more ``--epochs`` follows the longer schedule.
    """

    def __init__(
        self,
        kind: str,
        total_steps: int,
        milestones: tuple[float, ...] = (0.5, 0.75),
        gamma: float = 0.1,
    ) -> None:
        self.kind = kind
        self.total = max(1, total_steps)
        # The 1e-9 keeps a product such as (1/3) * 300 = 100.00000000000001 at step 100.
        self.milestones = tuple(max(1, math.ceil(f * self.total - 1e-9)) for f in milestones)
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))
        return self.gamma ** sum(step >= m for m in self.milestones)


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum when ``--momentum`` > 0) on every parameter."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    _set_hyperparameters(optimizer, args)
    return optimizer


def _set_hyperparameters(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> None:
    # Also after loading a checkpoint's optimiser state, which carries the saved values.
    for group in optimizer.param_groups:
        group.update(
            momentum=args.momentum,
            nesterov=args.momentum > 0,
            weight_decay=args.weight_decay,
            dampening=0.0,
        )


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


# ----------------------------------------------------------------------------- state


@dataclass
class EpochProgress:
    """This rank's part of the epoch under way: where it stands and what it has measured."""

    offset: int = 0  # batches of the epoch already trained
    losses: list[Tensor] = field(default_factory=list)  # this rank's step losses (detached)
    correct: float | Tensor = 0.0  # right predictions so far
    seen: int = 0  # samples so far
    elapsed: float = 0.0  # seconds trained in this epoch before the current process started

    def state_dict(self) -> dict:
        """Tensors and plain values, for the checkpoint."""
        losses = torch.stack(self.losses).cpu() if self.losses else torch.zeros(0)
        return {
            "offset": self.offset,
            "losses": losses,
            "correct": float(self.correct),
            "seen": self.seen,
            "elapsed": self.elapsed,
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> EpochProgress:
        """The progress ``state_dict`` saved, with the losses back on ``device``."""
        losses = state["losses"].to(device)
        return cls(
            offset=int(state["offset"]),
            losses=list(losses.unbind()) if losses.numel() else [],
            correct=torch.tensor(float(state["correct"]), device=device),
            seen=int(state["seen"]),
            elapsed=float(state["elapsed"]),
        )


@dataclass
class Trainer:
    """The state a training run carries from step to step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None
    bundle: D.DataBundle
    precision: Precision
    info: DistInfo
    args: argparse.Namespace
    batch_size: int
    steps_per_epoch: int
    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best_acc: float = 0.0
    history: list[dict] = field(default_factory=list)
    progress: EpochProgress = field(default_factory=EpochProgress)

    @property
    def device(self) -> torch.device:
        """The training device."""
        return self.info.device

    def lr(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based)."""
        return self.args.lr * self.schedule(step)

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
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.step += 1
        return loss.detach(), (logits.argmax(1) == y).sum()

    def checkpoint(self) -> dict | None:
        """The checkpoint of this run on rank 0, None on the others.

        A collective under DDP: every rank sends its generator states and its part of the
        unfinished epoch, so a resumed run repeats every rank's step bit for bit.
        """
        mine = {"rng": ckpt.capture_rng(self.device), "progress": self.progress.state_dict()}
        ranks = ddp.gather_objects(mine, self.info)
        if ranks is None:
            return None
        return {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "model": ddp.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "sampler": self._sampler(),
            "ranks": ranks,
            "best_acc": self.best_acc,
            "history": self.history,
            "batch_size": self.batch_size,
            "args": {k: v for k, v in vars(self.args).items() if not k.startswith("_")},
        }

    def _sampler(self) -> dict:
        return {
            "seed": self.args.seed,
            "epoch": self.epoch,
            "offset": self.progress.offset,
            "batch_size": self.batch_size,
            "world_size": self.info.world_size,
        }

    def restore(self, state: dict) -> list[str]:
        """Continue from a checkpoint (``checkpoint``'s dict, read by ``checkpoint.load``).

        Returns notes on what could not be restored exactly (missing keys of an older or
        hand-made checkpoint, another number of processes); an exact resume returns none.
        """
        model = ddp.unwrap(self.model)
        problem = ckpt.model_mismatch(model, state["model"])
        if problem is not None:
            saved = (state.get("args") or {}).get("model", "another model")
            raise UsageError(
                f"--resume: the checkpoint holds {saved}, which does not fit "
                f"--model {self.args.model}: {problem}"
            )
        model.load_state_dict(state["model"])
        notes = []
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            _set_hyperparameters(self.optimizer, self.args)
        else:
            notes.append("the checkpoint has no optimiser state: momentum starts from zero")
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.step = state.get("step", self.epoch * self.steps_per_epoch)
        self.best_acc = state.get("best_acc", 0.0)
        self.history = list(state.get("history", []))
        notes += self._restore_ranks(state)
        return notes

    def _restore_ranks(self, state: dict) -> list[str]:
        ranks, sampler = state.get("ranks"), state.get("sampler")
        if not ranks or len(ranks) != self.info.world_size:
            # Fresh, distinct streams: a valid continuation, not the interrupted run's.
            torch.manual_seed(self.args.seed + self.info.rank + self.step)
            have = f"{len(ranks)} process(es)" if ranks else "no generator states"
            return [
                f"the checkpoint holds {have}, this run has {self.info.world_size}: "
                "dropout draws fresh random streams (not bit-identical to an uninterrupted run)"
            ]
        mine = ranks[self.info.rank]
        ckpt.restore_rng(mine["rng"], self.device)
        if sampler is None or sampler.get("offset", 0) == 0:
            return []
        if sampler != self._sampler() | {"offset": sampler["offset"]}:
            return [
                "the checkpoint stopped inside an epoch of another seed or batch: the epoch "
                "restarts from its first batch"
            ]
        self.progress = EpochProgress.from_state_dict(mine["progress"], self.device)
        return []


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
    batch = _resumed_batch_size(args, state, info) if state is not None else args.batch_size
    if batch == "auto":
        batch = auto_batch_size(args, model, bundle, info.device, precision, info)
    # With --epochs 0 (set up and stop) a batch larger than the data is not an error.
    spe = (
        steps_per_epoch(len(bundle.train), batch, info, args.steps_per_epoch) if args.epochs else 1
    )
    model = ddp.wrap_ddp(model, info)
    optimizer = build_optimizer(model, args)
    schedule = LRSchedule(args.schedule, args.epochs * spe, args.lr_milestones, args.lr_gamma)
    scaler = (
        torch.amp.GradScaler(info.device.type) if precision.amp_dtype == torch.float16 else None
    )
    trainer = Trainer(model, optimizer, schedule, scaler, bundle, precision, info, args, batch, spe)
    if state is not None:
        for note in trainer.restore(state):
            if info.is_main:
                print(f"--resume: {note}", flush=True)
    return trainer


def _resumed_batch_size(args, state: dict, info: DistInfo) -> int | str:
    # The interrupted run's batches; without a record of them, the command line's.
    saved = state.get("batch_size")
    if saved is None:
        if info.is_main:
            print(
                f"--resume: the checkpoint does not record its batch size; using "
                f"--batch-size {args.batch_size}",
                flush=True,
            )
        return args.batch_size
    if args.batch_size not in ("auto", saved) and info.is_main:
        print(f"--resume: using the checkpoint's batch size {saved}, not {args.batch_size}")
    return saved


# ----------------------------------------------------------------------------- the loop


def train_epoch(t: Trainer, bar_factory, save: Callable[[], None]) -> dict:
    """Train the rest of epoch ``t.epoch`` (from ``t.progress``); returns loss, accuracy,
    images/s and the per-step losses. ``save`` is called every ``--save-steps`` steps."""
    t.model.train()
    args, info, p = t.args, t.info, t.progress
    batches = D.epoch_batches(
        len(t.bundle.train),
        t.batch_size,
        info.rank,
        info.world_size,
        args.seed,
        t.epoch,
        shuffle=True,
        drop_last=True,
    )[: t.steps_per_epoch]
    t.bundle.train.set_epoch(args.seed, t.epoch)
    aug = D.Augmentation.draw(len(t.bundle.train), t.bundle.pad, t.bundle.flip, args.seed, t.epoch)
    if not torch.is_tensor(p.correct):
        p.correct = torch.tensor(float(p.correct), device=t.device)
    bar = bar_factory(total=len(batches), desc=f"epoch {t.epoch + 1}/{args.epochs}")
    bar.update(p.offset)
    start = time.perf_counter() - p.elapsed
    for images, labels, indices in D.iterate(
        t.bundle.train, batches[p.offset :], args.workers, t.device.type == "cuda"
    ):
        x = t.inputs(images, indices, aug)
        y = labels.to(t.device, non_blocking=True)
        loss, right = t.train_step(x, y)
        p.losses.append(loss)
        p.correct += right
        p.seen += y.numel()
        p.offset += 1
        _update_bar(bar, t, start)
        if args.save_steps and t.step % args.save_steps == 0 and p.offset < len(batches):
            p.elapsed = time.perf_counter() - start
            save()
    bar.close()
    return _epoch_train_metrics(t, time.perf_counter() - start)


def _update_bar(bar, t: Trainer, start: float) -> None:
    bar.update(1)
    # Reading the loss synchronises with the GPU; do it every 10 steps, not every step.
    if bar.disable or (bar.n % 10 and bar.n != bar.total):
        return
    p = t.progress
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(
        loss=f"{p.losses[-1].item():.4f}",
        acc=f"{float(p.correct) / p.seen:.3f}",
        img_s=f"{p.seen * t.info.world_size / elapsed:.0f}",
        mem=current_memory(t.device),
        refresh=False,
    )


def _epoch_train_metrics(t: Trainer, elapsed: float) -> dict:
    p = t.progress
    local = (
        torch.stack(p.losses).double().cpu() if p.losses else torch.zeros(0, dtype=torch.float64)
    )
    # Step losses averaged over ranks: each rank's loss is the mean over its equal share.
    step_losses = [v / t.info.world_size for v in ddp.all_reduce_sum(local.tolist(), t.info)]
    right, count = ddp.all_reduce_sum([float(p.correct), float(p.seen)], t.info)
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
    """Train from where ``t`` stands to ``--epochs``, evaluating and checkpointing each epoch
    (and every ``--save-steps`` steps)."""
    args, main = t.args, t.info.is_main
    bars = progress_bars(main and not args.quiet)
    start = time.perf_counter()
    while t.epoch < args.epochs:
        lr = t.lr(t.step - t.progress.offset)  # the rate of the epoch's first step
        train = train_epoch(t, bars, lambda: save_checkpoints(t, log.dir))
        test = evaluate(t)
        t.epoch += 1
        t.progress = EpochProgress()
        t.best_acc = max(t.best_acc, test["test_acc"])
        row = _record_epoch(t, log, train, test, lr)
        if main:
            print(epoch_line(row), flush=True)
        save_checkpoints(t, log.dir, epoch_end=True)
    return summary(t, time.perf_counter() - start, log.dir)


def save_checkpoints(t: Trainer, out_dir: Path, epoch_end: bool = False) -> None:
    """last.pt (and epoch<N>.pt every ``--save-every`` epochs); a collective under DDP."""
    if t.args.no_checkpoint:
        return
    state = t.checkpoint()
    if state is None:  # not rank 0
        return
    if epoch_end and t.args.save_every and t.epoch % t.args.save_every == 0:
        ckpt.save(state, out_dir / f"epoch{t.epoch}.pt")
    ckpt.save(state, out_dir / "last.pt")


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
