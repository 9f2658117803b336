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
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dense_ext.backends import BACKEND_NAMES, BackendUnavailableError
from python_models import MODEL_NAMES, ddp
from python_models import checkpoint as ckpt
from python_models import data as D
from python_models.max_batch import MemoryBudgetError
from python_models.runlog import RunLog, default_out_dir, summary_line
from python_models.trainer import Trainer, UsageError, build_trainer, fit

__all__ = ["UsageError", "build_parser", "main", "parse_args", "run"]


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


# ----------------------------------------------------------------------------- the run


def _block_backend(model: nn.Module, device: torch.device) -> str:
    """The backend the model's first efficient block resolves to."""
    from dense_ext.backends import resolve_backend_name
    from dense_ext.block import EfficientDenseBlock

    for module in model.modules():
        if isinstance(module, EfficientDenseBlock):
            return resolve_backend_name(module.backend, device)
    return "no efficient block"


def _describe(t: Trainer, out_dir: Path) -> str:
    m = ddp.unwrap(t.model)
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


def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` says; returns the summary (also written to summary.json)."""
    info = ddp.init_distributed(args.device)
    try:
        state = ckpt.load(ckpt.resolve(args.resume)) if args.resume else None
        trainer = build_trainer(args, info, state)
        out_dir = _out_dir(args)
        log = RunLog(out_dir, enabled=info.is_main)
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
            print(summary_line(summary), flush=True)
        return summary
    finally:
        ddp.cleanup(info)


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out_dir:
        return Path(args.out_dir)
    if args.resume:
        return ckpt.resolve(args.resume).parent  # continue the interrupted run's folder
    return default_out_dir()


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for a usage or data error)."""
    try:
        run(parse_args(argv))
    except (
        UsageError,
        D.DatasetError,
        ckpt.CheckpointError,
        MemoryBudgetError,
        BackendUnavailableError,
    ) as exc:
        print(f"dense-ext-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
