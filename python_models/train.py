"""Train a DenseNet or DelugeNet: ``python -m python_models.train`` (console script
``dense-ext-train``).

With no arguments it trains a small efficient DenseNet-BC on scikit-learn's bundled digits
(no download) for a few epochs on whatever device there is. See ``--help`` for the rest:
CIFAR-10/100 and image folders, the papers' recipes, the step schedule or cosine, AMP,
channels_last, ``--batch-size auto``, checkpoints and ``--resume``, DDP under ``torchrun``
with ``--sync-bn``.

Where an option's value comes from, lowest to highest: the CLI's defaults; the recipe of
``--model`` (``python_models.recipes``; ``--recipe`` picks another or none); when resuming,
the interrupted run's options (saved in its checkpoint); the command line itself.

Everything random is seeded from ``--seed``: model initialisation, the data order and
augmentation (a function of seed and epoch, see ``python_models.data``) and dropout (each
rank's global generators, all saved in every checkpoint with the position in the epoch). A
resumed run therefore repeats an uninterrupted one step for step, on every rank.

This module is the command line; ``python_models.trainer`` is the loop.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dense_ext.backends import BACKEND_NAMES, BackendUnavailableError
from python_models import MODEL_NAMES, ddp
from python_models import checkpoint as ckpt
from python_models import data as D
from python_models.max_batch import MemoryBudgetError
from python_models.recipes import RECIPES, recipe_for
from python_models.runlog import RunLog, default_out_dir, summary_line
from python_models.trainer import Trainer, UsageError, build_trainer, fit

__all__ = ["UsageError", "build_parser", "main", "parse_args", "run"]

PROG = "dense-ext-train"
# Options that describe this invocation, not the run: never taken from a checkpoint.
_PER_INVOCATION = frozenset(
    {"resume", "out_dir", "quiet", "device", "workers", "memory_budget", "no_checkpoint"}
)


# ----------------------------------------------------------------------------- values


def _number(kind: Callable[[str], float], what: str, ok: Callable[[float], bool]):
    """An argparse type: ``kind(text)`` that must satisfy ``ok`` (``what`` says how)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_count = _number(int, "an integer >= 0", lambda v: v >= 0)
_non_negative = _number(float, "a number >= 0", lambda v: v >= 0)
_positive = _number(float, "a number > 0", lambda v: v > 0)
_fraction = _number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
_milestone = _number(float, "a fraction of the run in (0, 1]", lambda v: 0 < v <= 1)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'auto', got {text!r}"
        ) from None


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse, with its error as one line (no usage block): ``prog: error: ...``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_args(p.add_argument_group("model"))
    _data_args(p.add_argument_group("data"))
    _optim_args(p.add_argument_group("optimisation (defaults: the --recipe, else these)"))
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
        "--growth-rate",
        type=_positive_int,
        default=None,
        help="override the model's growth rate k",
    )
    g.add_argument("--drop-rate", type=_fraction, default=0.0, help="dropout after each layer")
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
        type=_positive_int,
        default=None,
        help="image side (digits: 16, imagefolder: 224; CIFAR is always 32)",
    )
    g.add_argument(
        "--workers", type=_count, default=0, help="data-loading processes (image folders only)"
    )


def _optim_args(g) -> None:
    g.add_argument(
        "--recipe",
        default="auto",
        choices=("auto", "none", *RECIPES),
        help="a model's published hyperparameters as defaults (python_models.recipes); "
        "auto: the one --model carries (named paper configurations), none: these defaults",
    )
    g.add_argument(
        "--epochs",
        type=_count,
        default=6,
        help="epochs (0: set up, and with --batch-size auto measure, then stop)",
    )
    g.add_argument(
        "--batch-size",
        type=_batch_size,
        default=64,
        help="per-process batch, or 'auto': the largest that fits --memory-budget",
    )
    g.add_argument("--lr", type=_non_negative, default=0.1, help="initial learning rate")
    g.add_argument(
        "--momentum",
        type=_fraction,
        default=0.9,
        help="SGD momentum (Nesterov when > 0)",
    )
    g.add_argument("--weight-decay", type=_non_negative, default=1e-4, help="on every parameter")
    g.add_argument(
        "--schedule",
        default="step",
        choices=("step", "cosine"),
        help="step: lr x --lr-gamma at each of --lr-milestones; cosine: cosine decay to 0 "
        "over all steps",
    )
    g.add_argument(
        "--lr-milestones",
        type=_milestone,
        nargs="+",
        default=(0.5, 0.75),
        metavar="FRACTION",
        help="where the step schedule lowers the lr, as fractions of the run (0.5 0.75 of "
        "300 epochs: epochs 150 and 225, Huang et al.)",
    )
    g.add_argument("--lr-gamma", type=_positive, default=0.1, help="the step schedule's factor")
    g.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
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
        type=_positive,
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
        help="checkpoint file, or a run folder (its newest valid checkpoint), to continue "
        "from; the run's own options apply unless given again",
    )
    g.add_argument(
        "--save-every",
        type=_count,
        default=0,
        help="also keep epoch<N>.pt every N epochs (last.pt is always written)",
    )
    g.add_argument(
        "--save-steps",
        type=_count,
        default=0,
        help="also write last.pt every N optimiser steps inside an epoch (long epochs); "
        "--resume continues from that step",
    )
    g.add_argument("--no-checkpoint", action="store_true", help="write no checkpoints")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------- resolution


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and apply the model's recipe.

    Exits with status 2 and an ``error:`` line for a malformed option (argparse); raises
    ``UsageError`` for options that do not go together.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._explicit = _explicit_options(argv)
    args.recipe = _apply_recipe(args, args.recipe)
    check_args(args)
    return args


def _explicit_options(argv: list[str]) -> frozenset[str]:
    # The options the command line itself gives: parsed again with every default suppressed.
    shadow = build_parser()
    for action in shadow._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(shadow.parse_args(argv)))


def _explicit(args: argparse.Namespace) -> frozenset[str]:
    # Namespaces built by hand (not by parse_args) count every option as given.
    return getattr(args, "_explicit", frozenset(vars(args)))


def _apply_recipe(args: argparse.Namespace, choice: str) -> str:
    """Set the recipe's values on the options not given explicitly; its name, or 'none'."""
    recipe = {"auto": recipe_for(args.model), "none": None}.get(choice, RECIPES.get(choice))
    if recipe is None:
        return "none"
    for name, value in recipe.values.items():
        if name not in _explicit(args):
            setattr(args, name, value)
    return recipe.name


def check_args(args: argparse.Namespace) -> None:
    """Checks that need more than one option, or the environment (``UsageError``)."""
    milestones = list(args.lr_milestones)
    if milestones != sorted(milestones):
        raise UsageError(f"--lr-milestones must increase, got {' '.join(map(str, milestones))}")
    if args.dataset.startswith("cifar") and args.image_size not in (None, 32):
        raise UsageError(f"--image-size {args.image_size}: {args.dataset} images are 32x32")
    env = os.environ.get("DENSE_EXT_BACKEND", "")
    if env not in ("", "auto", *BACKEND_NAMES):
        raise UsageError(
            f"environment variable DENSE_EXT_BACKEND={env!r} is not a backend; set it to "
            f"one of auto, {', '.join(BACKEND_NAMES)}, or unset it"
        )


def resume_args(args: argparse.Namespace, saved: dict | None) -> None:
    """Take the interrupted run's options (``saved``, from its checkpoint) for every option
    the command line does not give, except those of this invocation (device, output...)."""
    if not saved:
        return
    for name, value in saved.items():
        if name in _PER_INVOCATION or name in _explicit(args) or not hasattr(args, name):
            continue
        setattr(args, name, value)
    if "recipe" in _explicit(args):  # asked for again: it beats the saved values
        args.recipe = _apply_recipe(args, args.recipe)
    check_args(args)


# ----------------------------------------------------------------------------- the run


def _block_backend(model: nn.Module, device: torch.device) -> str:
    """The backend the model's first efficient block (or DelugeNet stage) resolves to."""
    from dense_ext.backends import resolve_backend_name
    from dense_ext.block import EfficientDenseBlock
    from dense_ext.deluge import EfficientDelugeStage
    from dense_ext.deluge.backends import resolve_backend_name as resolve_stage_backend_name

    for module in model.modules():
        if isinstance(module, EfficientDenseBlock):
            return resolve_backend_name(module.backend, device)
        if isinstance(module, EfficientDelugeStage):
            return resolve_stage_backend_name(module.backend, device)
    return "no efficient block"


def _describe(t: Trainer, out_dir: Path) -> str:
    m = ddp.unwrap(t.model)
    params = sum(p.numel() for p in m.parameters())
    kind = f"efficient ({_block_backend(m, t.device)} backend)" if t.args.efficient else "naive"
    amp = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[t.precision.amp_dtype]
    line = (
        f"{kind} {t.args.model} ({params / 1e6:.2f}M parameters) on {t.args.dataset} "
        f"({len(t.bundle.train)} train / {len(t.bundle.test)} test, {t.bundle.num_classes} "
        f"classes, {t.bundle.image_size}x{t.bundle.image_size}); {t.info.device}, "
        f"{t.info.world_size} process(es), batch {t.batch_size}/process, {amp}, "
        f"{'channels_last' if t.precision.channels_last else 'contiguous'}"
        f"{', sync BN' if t.args.sync_bn and t.info.distributed else ''}; output {out_dir}"
    )
    recipe = RECIPES.get(t.args.recipe)
    if recipe is not None:
        given = sorted(n for n in recipe.values if n in _explicit(t.args))
        overrides = f" (overridden: {', '.join('--' + n.replace('_', '-') for n in given)})"
        line += f"\nrecipe {recipe.describe()}{overrides if given else ''}"
    return line


def run(args: argparse.Namespace, *, exit_when_distributed: bool = False) -> dict:
    """Train as ``args`` says; returns the summary (also written to summary.json).

    ``exit_when_distributed`` (the command line's choice): a finished run under torchrun
    ends its process (``ddp.exit_finished_process``) instead of returning."""
    info = ddp.init_distributed(args.device)
    finished = False
    try:
        out_dir = Path(args.out_dir) if args.out_dir else None
        state = None
        if args.resume:
            path, state = _find_checkpoint(args.resume, info)
            resume_args(args, state.get("args"))
            out_dir = out_dir or path.parent  # continue the interrupted run's folder
        trainer = build_trainer(args, info, state)
        del state  # its tensors are memory-mapped from the file: let the file go
        out_dir = out_dir or default_out_dir()
        log = RunLog(out_dir, enabled=info.is_main)
        if args.resume:
            log.truncate(trainer.epoch)  # later rows are trained again
        if info.is_main:
            print(_describe(trainer, out_dir), flush=True)
            log.write_json("config.json", _config(args, trainer))
        summary = fit(trainer, log)
        if info.is_main:
            summary["reuse_picture"] = _draw_reuse(trainer, out_dir)
            log.write_json("summary.json", summary)
            print(summary_line(summary), flush=True)
        finished = True
        return summary
    finally:
        if finished and exit_when_distributed and info.distributed:
            ddp.exit_finished_process()
        ddp.cleanup(info, finished)


def _draw_reuse(trainer: Trainer, out_dir: Path) -> str | None:
    """The trained model's feature-reuse heat maps (``python_models.reuse``) in
    ``out_dir/reuse.png``; the path, or None when there is nothing to draw."""
    from python_models import reuse

    if trainer.step == 0:
        return None  # untrained weights say nothing about reuse
    try:
        maps = reuse.reuse_maps(ddp.unwrap(trainer.model).state_dict())
        title = f"feature reuse: {trainer.args.model}, epoch {trainer.epoch}"
        path = reuse.draw(maps, out_dir / "reuse.png", title=title)
    except (ValueError, ImportError) as exc:  # not a DenseNet/DelugeNet, or no matplotlib
        print(f"feature reuse: not drawn ({exc})", flush=True)
        return None
    print(f"feature reuse: {path}", flush=True)
    return str(path)


def _config(args: argparse.Namespace, trainer: Trainer) -> dict:
    return {
        **{k: v for k, v in vars(args).items() if not k.startswith("_")},
        "explicit_options": sorted(_explicit(args)),
        "resolved_batch_size": trainer.batch_size,
        "torch": torch.__version__,
    }


def _find_checkpoint(resume: str, info: ddp.DistInfo) -> tuple[Path, dict]:
    try:
        path, state = ckpt.find(resume)
    except ckpt.CheckpointError as exc:
        raise UsageError(f"--resume: {exc}") from None
    if info.is_main:
        print(
            f"--resume: continuing from {path} (epoch {state['epoch']}, "
            f"step {state.get('step', '?')})",
            flush=True,
        )
    return path, state


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status: 2 for a usage, data or checkpoint error,
    1 when a checkpoint cannot be written (one ``error:`` line on stderr either way)."""
    try:
        run(parse_args(argv), exit_when_distributed=True)
    except SystemExit as exc:  # argparse: --help (0) or a malformed option (2)
        return exc.code if isinstance(exc.code, int) else 2
    except (
        UsageError,
        D.DatasetError,
        ddp.LaunchError,
        MemoryBudgetError,
        BackendUnavailableError,
    ) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except ckpt.CheckpointWriteError as exc:
        print(f"{PROG}: error: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
