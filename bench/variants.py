"""What is compared: the variants, the models, and one training step.

A variant is a way to run the same DenseNet:

* ``naive``: eager PyTorch, ``torch.cat`` per layer (quadratic activation memory).
* ``naive-checkpoint``: torchvision's ``memory_efficient=True``: concat-norm1-relu1-conv1 of
  each layer under ``torch.utils.checkpoint``.
* ``naive-compile``: the naive model under ``torch.compile`` (default options).
* ``efficient-<backend>-<memory>``: ``EfficientDenseBlock`` with that backend and memory mode.

The training step is the one a user runs: forward (optionally under bf16 autocast),
cross-entropy loss, backward, SGD with Nesterov momentum 0.9 and weight decay 1e-4 (the
DenseNet paper's optimizer). Gradients stay allocated between steps
(``zero_grad(set_to_none=False)``), like the optimizer's momentum buffers, so the memory held
before a step is parameters + gradients + optimizer state + the batch, and everything the
step allocates on top of that is activation memory (and workspace).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MEMORY_MODES = ("bottleneck", "min")
BASELINE = "naive"


@dataclass(frozen=True)
class ModelConfig:
    """A model of the benchmark: its builder name, input size and class count."""

    name: str  # "densenet_bc_<depth>" (k=12 CIFAR) or a python_models.get_model name
    image_size: int
    num_classes: int

    @property
    def label(self) -> str:
        m = re.fullmatch(r"densenet_bc_(\d+)", self.name)
        if m:
            return f"DenseNet-BC-{m.group(1)} (k=12, {self.image_size}x{self.image_size})"
        if self.name == "densenet121":
            return f"DenseNet-121 ({self.image_size}x{self.image_size})"
        return f"{self.name} ({self.image_size}x{self.image_size})"


def model_config(name: str) -> ModelConfig:
    if re.fullmatch(r"densenet_bc_\d+", name):
        return ModelConfig(name, 32, 10)
    if name.startswith("densenet") and name[len("densenet") :].isdigit():
        return ModelConfig(name, 224, 1000)  # ImageNet DenseNet-121/169/201/161/264
    raise ValueError(f"unknown benchmark model {name!r}")


def variant_names(backends: list[str], compile_naive: bool) -> list[str]:
    names = [BASELINE, "naive-checkpoint"]
    if compile_naive:
        names.append("naive-compile")
    names += [f"efficient-{b}-{m}" for b in backends for m in MEMORY_MODES]
    return names


def parse_variant(variant: str) -> dict:
    """``{"efficient": bool, "backend": str | None, "memory": str | None, ...}``."""
    if variant == "naive":
        return {"efficient": False, "checkpoint": False, "compile": False}
    if variant == "naive-checkpoint":
        return {"efficient": False, "checkpoint": True, "compile": False}
    if variant == "naive-compile":
        return {"efficient": False, "checkpoint": False, "compile": True}
    m = re.fullmatch(r"efficient-(\w+)-(bottleneck|min)", variant)
    if not m:
        raise ValueError(f"unknown variant {variant!r}")
    return {
        "efficient": True,
        "backend": m.group(1),
        "memory": m.group(2),
        "checkpoint": False,
        "compile": False,
    }


def build_model(config: ModelConfig, variant: str) -> nn.Module:
    """The model of ``config`` as ``variant`` runs it (before torch.compile)."""
    import python_models

    v = parse_variant(variant)
    kwargs: dict = {}
    if v["efficient"]:
        kwargs = {"efficient": True, "memory": v["memory"], "backend": v["backend"]}
    elif v["checkpoint"]:
        kwargs = {"memory_efficient": True}
    m = re.fullmatch(r"densenet_bc_(\d+)", config.name)
    if m:
        return python_models.densenet_bc(
            depth=int(m.group(1)), growth_rate=12, num_classes=config.num_classes, **kwargs
        )
    return python_models.get_model(config.name, **kwargs)


class TrainStep:
    """One full training step of a model on a fixed random batch; ``floor_bytes`` after a call.

    The floor (DESIGN.md section 7) is the bytes of the dense blocks' outputs, i.e.
    ``sum over blocks of N*H*W*C_total*bytes``: it is recorded by forward hooks on the modules
    named ``...denseblock<i>`` during a step, in the dtype the blocks actually produce.
    """

    def __init__(
        self,
        config: ModelConfig,
        variant: str,
        batch: int,
        dtype: str,
        device: torch.device,
        seed: int = 0,
    ):
        torch.manual_seed(seed)
        self.config = config
        self.device = device
        self.variant = variant
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[dtype]
        model = build_model(config, variant).train()
        if next(model.parameters()).device != device:
            model.to(device)
        self.model = model
        self.params = sum(p.numel() for p in model.parameters())
        self.block_out_bytes: dict[str, int] = {}
        for name, module in model.named_modules():
            if re.search(r"(^|\.)denseblock\d+$", name):
                module.register_forward_hook(self._record(name))
        self.run = torch.compile(model) if parse_variant(variant)["compile"] else model
        self.opt = torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
        self.set_batch(batch)

    def set_batch(self, batch: int) -> None:
        g = torch.Generator().manual_seed(batch)
        size = self.config.image_size
        self.x = torch.randn(batch, 3, size, size, generator=g).to(self.device)
        self.y = torch.randint(0, self.config.num_classes, (batch,), generator=g).to(self.device)
        self.batch = batch

    def _record(self, name: str):
        def hook(module, inputs, output):
            self.block_out_bytes[name] = output.numel() * output.element_size()

        return hook

    @property
    def floor_bytes(self) -> int:
        return sum(self.block_out_bytes.values())

    def __call__(self) -> None:
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            loss = F.cross_entropy(self.run(self.x), self.y)
        loss.backward()
        del loss
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
