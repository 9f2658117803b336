"""What is compared: the variants, the models, and one training step.

A variant is a way to run the same DenseNet (or DelugeNet):

* ``naive``: eager PyTorch, ``torch.cat`` per layer (quadratic activation memory), contiguous
  (NCHW) tensors: the model as torchvision and python_models build it.
* ``naive-channels_last``: the same model and input converted to channels_last (NHWC), which
  oneDNN (CPU) and cuDNN (GPU) often run faster.
* ``naive-checkpoint``: torchvision's ``memory_efficient=True``: concat-norm1-relu1-conv1 of
  each layer under ``torch.utils.checkpoint``.
* ``naive-compile``: the naive model under ``torch.compile`` (default options); the first
  step's compile time is reported apart from the steady-state step.
* ``efficient-<backend>-<memory>``: ``EfficientDenseBlock`` with that backend and memory mode;
  ``efficient-<backend>-<memory>-compile`` the same model under ``torch.compile``.
* ``...-graph`` (CUDA only): the whole training step (forward, backward, optimizer) captured
  once in a CUDA graph after warm-up steps on a side stream, then replayed: what a user does
  when a step is host-bound (PyTorch's "whole-network capture"). Timed only: a replay
  allocates nothing, so its memory is the row without ``-graph``.

The grammar: ``naive[-checkpoint][-channels_last][-compile][-graph]`` and
``efficient-<backend>-<bottleneck|min>[-compile][-graph]``.

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
        size = f"{self.image_size}x{self.image_size}"
        m = re.fullmatch(r"densenet_bc_(\d+)", self.name)
        if m:
            return f"DenseNet-BC-{m.group(1)} (k=12, {size})"
        if self.name == "densenet121":
            return f"DenseNet-121 ({size})"
        m = re.fullmatch(r"delugenet_cifar_(\d+)", self.name)
        if m:
            return f"DelugeNet-{18 * int(m.group(1)) + 2} (n={m.group(1)}, {size})"
        m = re.fullmatch(r"(wide_)?delugenet(\d+)", self.name)
        if m:
            return f"{'Wide-' if m.group(1) else ''}DelugeNet-{m.group(2)} ({size})"
        return f"{self.name} ({size})"


_CIFAR_DELUGENETS = ("delugenet146", "delugenet218", "wide_delugenet146")


def model_config(name: str) -> ModelConfig:
    if re.fullmatch(r"densenet_bc_\d+", name):
        return ModelConfig(name, 32, 10)
    if name.startswith("densenet") and name[len("densenet") :].isdigit():
        return ModelConfig(name, 224, 1000)  # ImageNet DenseNet-121/169/201/161/264
    if name in _CIFAR_DELUGENETS or re.fullmatch(r"delugenet_cifar_\d+", name):
        return ModelConfig(name, 32, 10)  # width 1 CIFAR DelugeNet, n slots in stage 1
    if name in ("delugenet92", "delugenet104", "delugenet122"):
        return ModelConfig(name, 224, 1000)
    raise ValueError(f"unknown benchmark model {name!r}")


@dataclass(frozen=True)
class Variant:
    """A parsed variant name; see the module docstring for the grammar."""

    name: str
    efficient: bool
    backend: str | None = None  # efficient only
    memory: str | None = None  # efficient only
    checkpoint: bool = False  # naive only: torchvision's memory_efficient=True
    channels_last: bool = False  # naive only: model and input in channels_last
    compile: bool = False  # the model under torch.compile
    graph: bool = False  # the step captured in a CUDA graph and replayed


_NAIVE = re.compile(
    r"naive(?P<checkpoint>-checkpoint)?(?P<cl>-channels_last)?(?P<compile>-compile)?(?P<graph>-graph)?"
)
_EFFICIENT = re.compile(
    r"efficient-(?P<backend>\w+?)-(?P<memory>bottleneck|min)(?P<compile>-compile)?(?P<graph>-graph)?"
)


def parse_variant(variant: str) -> Variant:
    """The ``Variant`` a name stands for; ValueError for a name outside the grammar."""
    m = _NAIVE.fullmatch(variant)
    if m:
        return Variant(
            variant,
            efficient=False,
            checkpoint=bool(m["checkpoint"]),
            channels_last=bool(m["cl"]),
            compile=bool(m["compile"]),
            graph=bool(m["graph"]),
        )
    m = _EFFICIENT.fullmatch(variant)
    if m:
        return Variant(
            variant,
            efficient=True,
            backend=m["backend"],
            memory=m["memory"],
            compile=bool(m["compile"]),
            graph=bool(m["graph"]),
        )
    raise ValueError(f"unknown variant {variant!r}")


def variant_names(
    backends: list[str], compiled: bool, compiled_backend: str | None, graphs: bool = False
) -> list[str]:
    """The variants of the main and imagenet suites, in table order.

    The naive peers a user would pick instead (eager contiguous, channels_last, torchvision's
    checkpointing and, with ``compiled``, ``torch.compile``), then every backend in both
    memory modes and, with ``compiled``, ``compiled_backend``'s two modes under torch.compile.
    With ``graphs`` (CUDA), the naive peers and every backend's modes captured in CUDA graphs.
    """
    names = [BASELINE, "naive-channels_last", "naive-checkpoint"]
    if compiled:
        names.append("naive-compile")
    names += [f"efficient-{b}-{m}" for b in backends for m in MEMORY_MODES]
    if compiled and compiled_backend is not None:
        names += [f"efficient-{compiled_backend}-{m}-compile" for m in MEMORY_MODES]
    if graphs:
        names += ["naive-graph", "naive-channels_last-graph"]
        names += [f"efficient-{b}-{m}-graph" for b in backends for m in MEMORY_MODES]
    return names


def build_model(config: ModelConfig, variant: str) -> nn.Module:
    """The model of ``config`` as ``variant`` runs it (before torch.compile)."""
    import python_models

    v = parse_variant(variant)
    kwargs: dict = {}
    if v.efficient:
        kwargs = {"efficient": True, "memory": v.memory, "backend": v.backend}
    elif v.checkpoint:
        kwargs = {"memory_efficient": True}
    m = re.fullmatch(r"densenet_bc_(\d+)", config.name)
    d = re.fullmatch(r"delugenet_cifar_(\d+)", config.name)
    if "delugenet" in config.name and v.checkpoint:
        raise ValueError("DelugeNets have no checkpointing variant")
    if m:
        model = python_models.densenet_bc(
            depth=int(m.group(1)), growth_rate=12, num_classes=config.num_classes, **kwargs
        )
    elif d:
        model = python_models.delugenet_cifar(
            int(d.group(1)), 1.0, num_classes=config.num_classes, **kwargs
        )
    else:
        model = python_models.get_model(config.name, **kwargs)
    if v.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class TrainStep:
    """One full training step of a model on a fixed random batch; ``floor_bytes`` after a call.

    The floor (docs/design.md, "Memory") is the bytes of the dense blocks' outputs, i.e.
    ``sum over blocks of N*H*W*C_total*bytes``: it is recorded by forward hooks on the modules
    named ``...denseblock<i>`` during a step, in the dtype the blocks actually produce. For a
    DelugeNet, the same of its stages (``stage<i>``): all slots, a list (naive) or one buffer.
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
        self.variant = parse_variant(variant)
        if self.variant.graph and device.type != "cuda":
            raise ValueError(f"{variant}: CUDA graphs need a CUDA device, not {device}")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[dtype]
        model = build_model(config, variant).train()
        if next(model.parameters()).device != device:
            model.to(device)
        self.model = model
        self.params = sum(p.numel() for p in model.parameters())
        self.block_out_bytes: dict[str, int] = {}
        for name, module in model.named_modules():
            if re.search(r"(^|\.)(denseblock|stage)\d+$", name):
                module.register_forward_hook(self._record(name))
        self.run = torch.compile(model) if self.variant.compile else model
        self.opt = torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
        self.set_batch(batch)

    def set_batch(self, batch: int) -> None:
        g = torch.Generator().manual_seed(batch)
        size = self.config.image_size
        x = torch.randn(batch, 3, size, size, generator=g).to(self.device)
        if self.variant.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.x = x
        self.y = torch.randint(0, self.config.num_classes, (batch,), generator=g).to(self.device)
        self.batch = batch
        self.graph = None  # a captured step reads the old input's memory: capture again

    def _record(self, name: str):
        def hook(module, inputs, output):
            outputs = output if isinstance(output, (list, tuple)) else [output]
            self.block_out_bytes[name] = sum(t.numel() * t.element_size() for t in outputs)

        return hook

    @property
    def floor_bytes(self) -> int:
        return sum(self.block_out_bytes.values())

    def __call__(self) -> None:
        if not self.variant.graph:
            self._step()
            return
        if self.graph is None:
            self.graph = self._capture()
        self.graph.replay()

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Three eager steps on a side stream (cuDNN autotuning, Triton compiles, the
        optimizer's momentum buffers: nothing may be created for the first time inside a
        capture), then one step captured; its kernels run only when the graph replays."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        return graph

    def _step(self) -> None:
        # A captured autocast region must not cache casts (torch.cuda.graph's documentation).
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
            cache_enabled=not self.variant.graph,
        ):
            loss = F.cross_entropy(self.run(self.x), self.y)
        loss.backward()
        del loss
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
