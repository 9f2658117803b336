"""Train a DenseNet: ``python -m python_models.train`` (console script ``dense-ext-train``).

With no arguments it trains a small efficient DenseNet-BC on scikit-learn's bundled digits
(no download) for a few epochs on whatever device there is. See ``--help`` for the rest:
CIFAR-10/100 and image folders, the paper's SGD schedule or cosine, AMP, channels_last,
``--batch-size auto``, checkpoints and ``--resume``, DDP under ``torchrun`` with ``--sync-bn``.

Everything random is seeded from ``--seed``: model initialisation, the data order and
augmentation (a function of seed and epoch, see ``python_models.data``) and dropout (the
global RNG, saved in every checkpoint). A resumed run therefore repeats an uninterrupted one
step for step. (Under DDP, ranks other than 0 draw dropout masks from ``seed + rank``; the
checkpoint holds rank 0's RNG state, so after a resume with dropout they draw rank 0's
stream: still a valid run, no longer bit-identical to the uninterrupted one.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dense_ext.backends import BACKEND_NAMES, BackendUnavailableError, get_backend
from dense_ext.backends.base import LOCAL
from python_models import MODEL_NAMES, get_model
from python_models import data as D
from python_models import distributed as dist_utils
from python_models.distributed import DistInfo

GIB = 1024**3


class UsageError(ValueError):
    """A bad command line or configuration: reported as one line, not a traceback."""


# ----------------------------------------------------------------------------- arguments


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="dense-ext-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_args(p.add_argument_group("model"))
    _data_args(p.add_argument_group("data"))
    _optim_args(p.add_argument_group("optimisation"))
    _device_args(p.add_argument_group("device and memory"))
    _run_args(p.add_argument_group("run, logging and checkpoints"))
    return p


def _model_args(g) -> None:
    g.add_argument(
        "--model",
        default="densenet_bc_40",
        help=f"one of {', '.join(MODEL_NAMES)}, or densenet_bc_<6n+4> / "
        "densenet_<3n+4> (CIFAR-style)",
    )
    g.add_argument(
        "--growth-rate", type=int, default=None, help="override the model's growth rate k"
    )
    g.add_argument("--drop-rate", type=float, default=0.0, help="dropout after each layer")
    kind = g.add_mutually_exclusive_group()
    kind.add_argument(
        "--efficient",
        dest="efficient",
        action="store_true",
        default=True,
        help="dense_ext blocks: linear activation memory",
    )
    kind.add_argument(
        "--naive",
        dest="efficient",
        action="store_false",
        default=argparse.SUPPRESS,
        help="torchvision-style blocks (torch.cat per layer)",
    )
    g.add_argument(
        "--backend",
        default="auto",
        choices=("auto", *BACKEND_NAMES),
        help="backend of the efficient blocks; with --sync-bn 'auto' means "
        "'reference' (the backend with synchronised BN)",
    )
    g.add_argument(
        "--memory",
        default="bottleneck",
        choices=("bottleneck", "min"),
        help="efficient blocks: keep each bottleneck output or recompute it",
    )


def _data_args(g) -> None:
    g.add_argument(
        "--dataset",
        default="digits",
        choices=D.DATASETS,
        help="digits: scikit-learn's bundled 8x8 digits upsampled (no download); "
        "cifar10/cifar100: the Python-pickle folder; imagefolder: "
        "<dir>/{train,val}/<class>/<image>",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder holding (or being) cifar-10-batches-py / cifar-100-python, "
        "or the image-folder root",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image side (digits: 16, imagefolder: 224; CIFAR is always 32)",
    )
    g.add_argument(
        "--workers", type=int, default=0, help="data-loading processes (image folders only)"
    )


def _optim_args(g) -> None:
    g.add_argument(
        "--epochs",
        type=int,
        default=6,
        help="epochs (0: set up, and with --batch-size auto measure, then stop)",
    )
    g.add_argument(
        "--batch-size",
        type=_batch_size,
        default=64,
        help="per-process batch, or 'auto': the largest that fits --memory-budget",
    )
    g.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument(
        "--schedule",
        default="step",
        choices=("step", "cosine"),
        help="step: lr/10 at 50%% and 75%% of the epochs (Huang et al.); "
        "cosine: cosine decay to 0 over all steps",
    )
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        default=None,
        help="cap on training steps per epoch (quick runs)",
    )


def _device_args(g) -> None:
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "none", "bf16", "fp16"),
        help="autocast dtype; auto: bf16 on CUDA GPUs that support it, none on CPU",
    )
    g.add_argument(
        "--channels-last",
        default="auto",
        choices=("auto", "on", "off"),
        help="channels_last memory format; auto: on for CUDA",
    )
    g.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        help="GiB for --batch-size auto (per process); default: the GPU's free "
        "memory, or half of the available RAM on CPU",
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="synchronise batch-norm statistics over DDP processes (efficient "
        "blocks use the 'reference' backend, the one that supports it)",
    )


def _run_args(g) -> None:
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out-dir", default=None, help="default: runs/<timestamp>")
    g.add_argument(
        "--resume",
        default=None,
        help="checkpoint file, or a run folder (its last.pt), to continue from",
    )
    g.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also keep epoch<N>.pt every N epochs (last.pt is always written)",
    )
    g.add_argument("--no-checkpoint", action="store_true", help="write no checkpoints")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default: ``sys.argv[1:]``)."""
    args = build_parser().parse_args(argv)
    for name in ("epochs", "workers", "save_every"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        raise UsageError("--steps-per-epoch must be >= 1")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise UsageError("--memory-budget must be positive (GiB)")
    return args


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
        _check_backend(args, kwargs["backend"], device)
    return model.to(device=device, memory_format=precision.memory_format)


def _check_backend(args: argparse.Namespace, backend: str, device: torch.device) -> None:
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


# ----------------------------------------------------------------------------- memory


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(device: torch.device, processes: int = 1) -> int:
    """The GPU's free memory, or half of the available RAM shared by ``processes``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_ram_bytes() // 2 // processes


def current_memory(device: torch.device) -> str:
    """Memory for the progress bar: peak allocated on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / GIB:.2f}G"
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return f"{pages * os.sysconf('SC_PAGE_SIZE') / GIB:.2f}G"
    except (OSError, ValueError, IndexError):
        return "?"


def _cpu_peak_bytes(work: Callable[[], None]) -> int:
    """Peak live bytes of the c10 CPU allocator above the start level while ``work`` runs.

    The profiler's memory events see every allocation the allocator serves, including those
    made inside C++ ops (convolution workspaces, the extension's buffers).
    """
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            work()
        events = prof.profiler.kineto_results.events()
    cpu = torch._C._autograd.DeviceType.CPU
    deltas = sorted(
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(events)
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    live = peak = 0
    for _, _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


def _local_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose synchronised batch norms (if any) are local."""
    synced = {m: m.stats_sync for m in model.modules() if hasattr(m, "stats_sync")}
    try:
        for m in synced:
            m.stats_sync = LOCAL  # process groups cannot (and must not) be copied
        # The memo keeps LOCAL itself (not a copy): blocks test ``sync is LOCAL``.
        return copy.deepcopy(model, memo={id(LOCAL): LOCAL})
    finally:
        for m, sync in synced.items():
            m.stats_sync = sync


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def measure_step(
    model: nn.Module, batch: int, bundle: D.DataBundle, device: torch.device, precision: Precision
) -> int | None:
    """Bytes one training step at ``batch`` needs: parameters, buffers, gradients, momentum,
    input and the activation peak. None if it runs out of memory (CUDA).

    Runs on a copy of the model with its own optimiser and forked RNG, so training is not
    affected by the probe; the copy's batch norms are local (only one rank probes).
    """
    probe = _local_copy(model).train()
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0, momentum=0.9, nesterov=True)
    size = bundle.image_size
    devices = [device] if device.type == "cuda" else []

    def step() -> None:
        x = torch.randn(batch, bundle.in_channels, size, size, device=device)
        x = x.contiguous(memory_format=precision.memory_format)
        y = torch.randint(0, bundle.num_classes, (batch,), device=device)
        with precision.autocast(device):
            loss = F.cross_entropy(probe(x), y)
        loss.backward()
        optimizer.step()

    with torch.random.fork_rng(devices=devices, device_type=device.type):
        if device.type != "cuda":
            return _state_bytes(probe) + _cpu_peak_bytes(step)
        return _cuda_step_bytes(step, device, probe)


def _cuda_step_bytes(
    step: Callable[[], None], device: torch.device, probe: nn.Module
) -> int | None:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device) - _state_bytes(probe)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step()
        torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()
    return torch.cuda.max_memory_allocated(device) - before


def find_batch_size(
    measure: Callable[[int], int | None],
    budget: int,
    max_batch: int,
    log: Callable[[str], None] = print,
) -> int:
    """The largest batch whose ``measure(batch)`` (bytes, None: out of memory) is <= budget.

    Memory grows linearly with the batch, so each probe aims at the batch where the line
    through the two nearest measurements meets the budget (secant steps); bisection takes
    over when a guess falls outside the bracket. Typically 4-6 probes.
    """
    points: dict[int, int] = {}

    def fits(b: int) -> bool:
        bytes_ = measure(b)
        log(
            f"  batch {b:>6}: " + ("out of memory" if bytes_ is None else f"{bytes_ / GIB:.3f} GiB")
        )
        if bytes_ is not None:
            points[b] = bytes_
        return bytes_ is not None and bytes_ <= budget

    lo, hi = 1, max_batch + 1  # lo fits (once checked), hi does not (or is past the cap)
    first = min(2, max_batch)
    if not fits(first):
        raise UsageError(
            f"batch {first} needs more than the memory budget of {budget / GIB:.2f} GiB"
        )
    lo = first
    while hi - lo > 1:
        guess = _secant_guess(points, lo, hi, budget)
        if not lo < guess < hi:
            guess = (lo + hi) // 2
        if fits(guess):
            lo = guess
        else:
            hi = guess
    return lo


def _secant_guess(points: dict[int, int], lo: int, hi: int, budget: int) -> int:
    # The line through the bracket's ends when both were measured (regula falsi), else
    # through lo and its nearest measured neighbour.
    others = sorted((b for b in points if b != lo), key=lambda b: abs(b - lo))
    if not others:
        return 2 * lo  # one point: double to get a slope
    b2 = hi if hi in points else others[0]
    slope = (points[b2] - points[lo]) / (b2 - lo)
    if slope <= 0:
        return 2 * lo
    return lo + max(1, int((budget - points[lo]) // slope))


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
        batch = find_batch_size(
            lambda b: measure_step(model, b, bundle, device, precision), budget, cap
        )
        print(f"--batch-size auto: using batch size {batch}")
    return dist_utils.broadcast_int(batch, info)


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


def steps_per_epoch(num_train: int, batch: int, info: DistInfo, cap: int | None) -> int:
    """Training steps per epoch (incomplete global batches are dropped)."""
    steps = num_train // (batch * info.world_size)
    if steps == 0:
        raise UsageError(
            f"the training set ({num_train} images) is smaller than one global "
            f"batch ({batch} x {info.world_size} processes)"
        )
    return min(steps, cap) if cap else steps


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
    step_losses = [v / t.info.world_size for v in dist_utils.all_reduce_sum(local.tolist(), t.info)]
    right, count = dist_utils.all_reduce_sum([float(correct), float(seen)], t.info)
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
    model = dist_utils.unwrap(t.model).eval()
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
    total_loss, total_right, total = dist_utils.all_reduce_sum(
        [float(loss_sum), float(right), float(count)], t.info
    )
    return {"test_loss": total_loss / max(1.0, total), "test_acc": total_right / max(1.0, total)}


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(t: Trainer, path: Path) -> None:
    """Model, optimiser, scheduler, scaler, epoch, step, RNG state and arguments, atomically."""
    state = {
        "model": dist_utils.unwrap(t.model).state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "epoch": t.epoch,
        "step": t.step,
        "best_acc": t.best_acc,
        "batch_size": t.batch_size,
        "history": t.history,
        "rng": _rng_state(),
        "args": vars(t.args),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while saving never leaves a truncated checkpoint


def resolve_resume(path: str) -> Path:
    """The checkpoint file ``--resume`` names (a file, or a run folder's last.pt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise UsageError(f"--resume: no checkpoint at {str(p)!r}")
    return p


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (clear error if it is not one)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UsageError(f"--resume: cannot read {str(path)!r}: {exc}") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise UsageError(f"--resume: {str(path)!r} is not a training checkpoint")
    return state


def restore(t: Trainer, state: dict) -> None:
    """Load a checkpoint's model, optimiser, scheduler, scaler, counters and RNG state."""
    try:
        dist_utils.unwrap(t.model).load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UsageError(
            f"--resume: the checkpoint does not fit --model {t.args.model}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    t.epoch, t.step = state["epoch"], state["step"]
    t.best_acc, t.history = state.get("best_acc", 0.0), list(state.get("history", []))
    _set_rng_state(state["rng"])


# ----------------------------------------------------------------------------- logging


class RunLog:
    """Files of a run: config.json, metrics.csv/.json (per epoch), steps.csv, summary.json."""

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


def default_out_dir() -> Path:
    """runs/<timestamp> under the current folder."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _record_epoch(t: Trainer, log: RunLog, train: dict, test: dict, lr: float) -> dict:
    step_losses = train.pop("step_losses")
    first = t.step - len(step_losses)
    log.append_csv(
        "steps.csv",
        [
            {"epoch": t.epoch, "step": first + i + 1, "loss": repr(v)}
            for i, v in enumerate(step_losses)
        ],
    )
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
    log.append_csv("metrics.csv", [row])
    log.write_json("metrics.json", t.history)
    return row


# ----------------------------------------------------------------------------- the run


def _bar_factory(enabled: bool):
    from tqdm.auto import tqdm

    def make(total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)

    return make


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


def build_trainer(args: argparse.Namespace, info: DistInfo) -> tuple[Trainer, dict | None]:
    """Data, model, optimiser and (when resuming) the checkpoint to restore."""
    bundle = D.load_dataset(args.dataset, args.data_dir, args.image_size)
    precision = resolve_precision(args, info.device)
    model = _setup_model(args, bundle, info, precision)
    state = load_checkpoint(resolve_resume(args.resume)) if args.resume else None
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
    model = dist_utils.wrap_ddp(model, info)
    optimizer, scheduler = build_optimizer(model, args, spe)
    scaler = (
        torch.amp.GradScaler(info.device.type) if precision.amp_dtype == torch.float16 else None
    )
    trainer = Trainer(model, optimizer, scheduler, scaler, bundle, precision, info, args, batch)
    return trainer, state


def _block_backend(model: nn.Module, device: torch.device) -> str:
    """The backend the model's first efficient block resolves to."""
    from dense_ext.backends import resolve_backend_name
    from dense_ext.block import EfficientDenseBlock

    for module in model.modules():
        if isinstance(module, EfficientDenseBlock):
            return resolve_backend_name(module.backend, device)
    return "no efficient block"


def _describe(t: Trainer, out_dir: Path) -> str:
    m = dist_utils.unwrap(t.model)
    params = sum(p.numel() for p in m.parameters())
    kind = f"efficient ({_block_backend(m, t.device)} backend)" if t.args.efficient else "naive"
    amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[t.precision.amp_dtype]
    return (
        f"{kind} {t.args.model} ({params / 1e6:.2f}M parameters) on {t.args.dataset} "
        f"({len(t.bundle.train)} train / {len(t.bundle.test)} test, {t.bundle.num_classes} "
        f"classes, {t.bundle.image_size}x{t.bundle.image_size}); {t.info.device}, "
        f"{t.info.world_size} process(es), batch {t.batch_size}/process, {amp}, "
        f"{'channels_last' if t.precision.channels_last else 'contiguous'}"
        f"{', sync BN' if t.args.sync_bn and t.info.distributed else ''}; output {out_dir}"
    )


def _epoch_line(row: dict) -> str:
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc "
        f"{row['train_acc']:.4f} | test loss {row['test_loss']:.4f} acc "
        f"{row['test_acc']:.4f} | {row['images_per_s']:.0f} img/s, "
        f"{row['epoch_time_s']:.1f} s, lr {row['lr']:.4g}, mem {row['memory']}"
    )


def fit(t: Trainer, log: RunLog) -> dict:
    """Train from ``t.epoch`` to ``--epochs``, evaluating and checkpointing each epoch."""
    args, main = t.args, t.info.is_main
    bars = _bar_factory(main and not args.quiet)
    start = time.perf_counter()
    while t.epoch < args.epochs:
        lr = t.optimizer.param_groups[0]["lr"]
        train = train_epoch(t, bars)
        test = evaluate(t)
        t.epoch += 1
        t.best_acc = max(t.best_acc, test["test_acc"])
        row = _record_epoch(t, log, train, test, lr)
        if main:
            print(_epoch_line(row), flush=True)
            _save(t, log)
    return _summary(t, time.perf_counter() - start, log.dir)


def _save(t: Trainer, log: RunLog) -> None:
    if t.args.no_checkpoint:
        return
    save_checkpoint(t, log.dir / "last.pt")
    if t.args.save_every and t.epoch % t.args.save_every == 0:
        save_checkpoint(t, log.dir / f"epoch{t.epoch}.pt")


def _summary(t: Trainer, elapsed: float, out_dir: Path) -> dict:
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


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` says; returns the summary (also written to summary.json)."""
    info = dist_utils.init_distributed(args.device)
    try:
        trainer, state = build_trainer(args, info)
        out_dir = _out_dir(args)
        log = RunLog(out_dir, enabled=info.is_main)
        if state is not None:
            restore(trainer, state)
        if info.is_main:
            print(_describe(trainer, out_dir), flush=True)
            log.write_json(
                "config.json",
                {
                    **vars(args),
                    "resolved_batch_size": trainer.batch_size,
                    "torch": torch.__version__,
                },
            )
        summary = fit(trainer, log)
        if info.is_main:
            log.write_json("summary.json", summary)
            _print_summary(summary)
        return summary
    finally:
        dist_utils.cleanup(info)


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out_dir:
        return Path(args.out_dir)
    if args.resume:
        return resolve_resume(args.resume).parent  # continue the interrupted run's folder
    return default_out_dir()


def _print_summary(s: dict) -> None:
    acc = (
        "n/a"
        if s["final_test_acc"] is None
        else (f"{s['final_test_acc']:.4f} (best {s['best_test_acc']:.4f})")
    )
    print(
        f"done: {s['epochs']} epochs, {s['steps']} steps in {s['train_time_s']:.1f} s; "
        f"test accuracy {acc}; peak memory {s['peak_memory']}; results in {s['out_dir']}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for a usage or data error)."""
    try:
        run(parse_args(argv))
    except (UsageError, D.DatasetError, BackendUnavailableError) as exc:
        print(f"dense-ext-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
