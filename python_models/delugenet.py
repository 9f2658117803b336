"""DelugeNets (Kuen, Kong, Wang, CVPR 2017), naive or efficient, with CIFAR and ImageNet builders.

A DelugeNet stage keeps ``S`` *slots* of ``C`` channels each. Slot 0 is the stage's entry (a
plain bottleneck in the first CIFAR stage, a bare 1x1 convolution in the first ImageNet stage,
the transition's output afterwards); composite layer ``k`` (1 <= k < S) reads slots ``0..k-1``
and writes slot ``k``::

    pre(k) -> conv1x1 C->C/2 -> BN -> ReLU -> conv3x3 C/2->C/2 -> BN -> ReLU -> conv1x1 C/2->C

with ``pre(1) = BN -> ReLU`` on slot 0 and ``pre(k) = CLDC(C, k) -> BN -> ReLU`` for k >= 2.
The cross-layer depthwise convolution ``CLDC(C, S)`` gives every input slot its own batch
normalisation, whose affine parameters are the CLDC's weights, and sums the results::

    y[c] = sum_i ( w[c, i] * (h_i[c] - mean_i[c]) / sqrt(var_i[c] + eps) + b[c, i] )

A transition is ``CLDC(C, S) -> BN -> conv3x3 stride 2 (C -> 2C)`` (no ReLU), the head
``CLDC -> BN -> ReLU -> global average pool -> Linear``. All of it follows the authors' Lua code
(github.com/xternalz/DelugeNets, ``delugenet.lua`` and ``CrossLayerDepthwiseConvolution.lua``),
except that CLDC column ``i`` is slot ``i`` counted from the oldest (the Lua code lists the
newest input first).

The naive model below is what a PyTorch user would write: a list of slot tensors and one
``F.batch_norm`` per CLDC input. ``efficient=True`` builds the same modules (same parameter and
buffer names, so state_dicts move between the two) whose stages run over one shared slot buffer
(``dense_ext.deluge``).

Module names: ``stem`` (``conv``, and for ImageNet ``norm``, ``relu``, ``pool``), ``entry``,
``stage1``.. with composite layers ``layer1``.. (``cldc``, ``norm``, ``conv1``, ``norm1``,
``conv2``, ``norm2``, ``conv3``), ``transition1``.. (``cldc``, ``norm``, ``conv``), ``head``
(``cldc``, ``norm``) and ``classifier``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from dense_ext.block import is_intercepted, unfused_reason
from dense_ext.deluge.cldc_params import CLDCParameters
from dense_ext.stem import norm_relu_max_pool
from dense_ext.tracing import NotScriptable
from python_models.densenet import ChannelsLastMaxPool2d


class CrossLayerDepthwiseConv(CLDCParameters):
    """CLDC(C, S): a per-channel learned sum over ``S`` inputs, each batch-normalised on its own.

    Holds ``weight``, ``bias``, ``running_mean`` and ``running_var`` as ``[C, S]`` tensors
    (column ``i`` belongs to input ``i``) and ``num_batches_tracked``; behaves like ``S``
    ``nn.BatchNorm2d`` modules (eps, momentum, ``momentum=None``, ``track_running_stats``, train
    and eval mode) whose outputs are summed. Init: ``weight = 1/S``, ``bias = 0``.
    """

    def forward(self, inputs: list[Tensor]) -> Tensor:
        """``sum_i batch_norm_i(inputs[i])``; every input is [N, C, H, W]."""
        return self.forward_slots(inputs)


class CompositeLayer(nn.Module):
    """Composite layer ``k`` of a stage: reads slots ``0..k-1``, returns slot ``k``."""

    def __init__(self, channels: int, index: int) -> None:
        super().__init__()
        if index < 1:
            raise ValueError(f"composite layers are numbered from 1, got {index}")
        mid = channels // 2
        self.index = index
        if index >= 2:
            self.cldc = CrossLayerDepthwiseConv(channels, index)
        self.norm = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, mid, kernel_size=1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, channels, kernel_size=1, bias=False)

    def forward(self, slots: list[Tensor]) -> Tensor:
        """The new slot from the list of the ``k`` earlier ones."""
        x = self.cldc(slots) if self.index >= 2 else slots[0]
        x = self.conv1(F.relu(self.norm(x)))
        x = self.conv2(F.relu(self.norm1(x)))
        return self.conv3(F.relu(self.norm2(x)))


class DelugeStage(nn.ModuleDict):
    """A naive stage of ``num_slots`` slots: ``layer1 .. layer{S-1}``; returns the list of slots."""

    def __init__(self, channels: int, num_slots: int) -> None:
        super().__init__()
        if num_slots < 1:
            raise ValueError(f"a stage needs at least one slot, got {num_slots}")
        self.channels = channels
        self.num_slots = num_slots
        for k in range(1, num_slots):
            self.add_module(f"layer{k}", CompositeLayer(channels, k))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Slot 0 is ``x``; returns all ``S`` slots, oldest first."""
        slots = [x]
        for layer in self.values():
            slots.append(layer(slots))
        return slots


class DelugeTransition(nn.Module):
    """``CLDC(C, S) -> BN -> conv3x3 stride 2 (C -> 2C)``, no ReLU; its output is slot 0 of the
    next stage."""

    def __init__(self, channels: int, num_slots: int, out_channels: int) -> None:
        super().__init__()
        self.cldc = CrossLayerDepthwiseConv(channels, num_slots)
        self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(
            channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False
        )

    def forward(self, slots: list[Tensor]) -> Tensor:
        return self.conv(self.norm(self.cldc(slots)))


class DelugeHead(nn.Module):
    """``CLDC(C, S) -> BN -> ReLU -> global average pool``: [N, C] features for the classifier."""

    def __init__(self, channels: int, num_slots: int) -> None:
        super().__init__()
        self.cldc = CrossLayerDepthwiseConv(channels, num_slots)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, slots: list[Tensor]) -> Tensor:
        return F.relu(self.norm(self.cldc(slots))).mean(dim=(2, 3))


class PreActBottleneck(nn.Module):
    """Slot 0 of the first CIFAR stage: BN-ReLU-conv1x1 (C_in -> mid) -BN-ReLU-conv3x3 (mid)
    -BN-ReLU-conv1x1 (mid -> C_out), no shortcut."""

    def __init__(self, in_channels: int, mid: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(F.relu(self.norm1(x)))
        x = self.conv2(F.relu(self.norm2(x)))
        return self.conv3(F.relu(self.norm3(x)))


class DelugeNet(NotScriptable, nn.Module):
    """A DelugeNet: stem, entry (slot 0 of stage 1), stages with transitions, head, classifier.

    Args:
        stage_slots: slots per stage (slot 0 included), e.g. ``(8, 17, 25)`` for DelugeNet-146.
        stage_channels: channels ``C`` of each stage's slots; stage ``s+1`` must have
            ``2 * C_s`` (the transition doubles the channels).
        stem_channels: output channels of the stem.
        num_classes: classifier outputs.
        small_inputs: CIFAR layout (3x3 stem convolution, pre-activation bottleneck entry)
            instead of ImageNet's (7x7/2 convolution, BN, ReLU, 3x3/2 max pool; bare 1x1
            convolution entry).
        efficient: stages, transitions and head over one shared slot buffer per stage
            (``dense_ext.deluge``), same parameter and buffer names.
        memory, backend: the efficient stages' memory mode and backend (``efficient`` only).
        drop_rate: accepted for a uniform model interface; DelugeNets have no dropout, so
            anything but 0 raises ValueError.

    Attribute ``efficient_stem`` (default: ``efficient``): the ImageNet stem's norm-ReLU-max
    pool through ``dense_ext.stem.norm_relu_max_pool`` (as DenseNet's; the modules run when
    ``stem`` has hooks or the function does not apply).
    """

    def __init__(
        self,
        stage_slots: tuple[int, ...],
        stage_channels: tuple[int, ...],
        stem_channels: int,
        num_classes: int = 10,
        small_inputs: bool = True,
        *,
        efficient: bool = False,
        memory: str = "min",
        backend: str = "auto",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _check_config(stage_slots, stage_channels, stem_channels, num_classes)
        if drop_rate:
            raise ValueError(f"DelugeNets have no dropout; drop_rate must be 0, got {drop_rate!r}")
        self.stage_slots = tuple(stage_slots)
        self.stage_channels = tuple(stage_channels)
        self.efficient = efficient
        self.efficient_stem = bool(efficient)
        c1 = stage_channels[0]
        kinds = _efficient_kinds(memory, backend) if efficient else _NAIVE_KINDS
        stage, transition, head, entry = kinds
        if small_inputs:
            self.stem = nn.Sequential(
                OrderedDict(conv=nn.Conv2d(3, stem_channels, 3, padding=1, bias=False))
            )
            self.entry = entry(stem_channels, c1 // 2, c1)
        else:
            self.stem = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False),
                    norm=nn.BatchNorm2d(stem_channels),
                    relu=nn.ReLU(inplace=True),
                    pool=(ChannelsLastMaxPool2d if efficient else nn.MaxPool2d)(
                        kernel_size=3, stride=2, padding=1
                    ),
                )
            )
            self.entry = nn.Conv2d(stem_channels, c1, kernel_size=1, bias=False)
        last = len(stage_slots) - 1
        for s, (slots, channels) in enumerate(zip(stage_slots, stage_channels)):
            self.add_module(f"stage{s + 1}", stage(channels, slots))
            if s < last:
                self.add_module(
                    f"transition{s + 1}", transition(channels, slots, stage_channels[s + 1])
                )
        self.head = head(stage_channels[-1], stage_slots[-1])
        self.classifier = nn.Linear(stage_channels[-1], num_classes)
        _init_weights(self)

    def _stem(self, x: Tensor) -> Tensor:
        # The stem is called as a module under hooks on it, global module hooks and tracing
        # (unfused_reason), which would see that call; the input decides the rest.
        stem = self.stem
        fusable = getattr(self, "efficient_stem", False) and type(stem) is nn.Sequential
        fusable = fusable and len(stem) == 4
        if fusable and not is_intercepted(stem) and unfused_reason(stem.norm, called=False) is None:
            return norm_relu_max_pool(stem.conv(x), stem.norm, stem.relu, stem.pool)
        return stem(x)

    def stages(self) -> list[nn.Module]:
        """The stages, first to last."""
        return [getattr(self, f"stage{s + 1}") for s in range(len(self.stage_slots))]

    def transitions(self) -> list[nn.Module]:
        """The transitions, first to last (one fewer than the stages)."""
        return [getattr(self, f"transition{s + 1}") for s in range(len(self.stage_slots) - 1)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.entry(self._stem(x))
        stages, transitions = self.stages(), self.transitions()
        for s, stage in enumerate(stages):
            slots = stage(x)
            if s < len(transitions):
                x = transitions[s](slots)
        return self.classifier(self.head(slots))


_NAIVE_KINDS = (DelugeStage, DelugeTransition, DelugeHead, PreActBottleneck)


def _efficient_kinds(memory: str, backend: str):
    from dense_ext.deluge import (
        EfficientDelugeHead,
        EfficientDelugeStage,
        EfficientDelugeTransition,
        EfficientPreActBottleneck,
    )

    def stage(channels: int, slots: int) -> nn.Module:
        return EfficientDelugeStage(channels, slots, memory=memory, backend=backend)

    def transition(channels: int, slots: int, out_channels: int) -> nn.Module:
        return EfficientDelugeTransition(channels, slots, out_channels, backend=backend)

    def head(channels: int, slots: int) -> nn.Module:
        return EfficientDelugeHead(channels, slots, backend=backend)

    return stage, transition, head, EfficientPreActBottleneck


def _check_config(stage_slots, stage_channels, stem_channels, num_classes) -> None:
    if len(stage_slots) < 1 or len(stage_slots) != len(stage_channels):
        raise ValueError(
            f"stage_slots and stage_channels must have one entry per stage, got "
            f"{stage_slots!r} and {stage_channels!r}"
        )
    if any(not isinstance(s, int) or s < 1 for s in stage_slots):
        raise ValueError(f"every stage needs at least one slot, got {stage_slots!r}")
    if any(not isinstance(c, int) or c < 2 or c % 2 for c in stage_channels):
        raise ValueError(f"stage channels must be even integers >= 2, got {stage_channels!r}")
    for a, b in zip(stage_channels, stage_channels[1:]):
        if b != 2 * a:
            raise ValueError(f"each transition doubles the channels, got {stage_channels!r}")
    if not isinstance(stem_channels, int) or stem_channels < 1:
        raise ValueError(f"stem_channels must be a positive integer, got {stem_channels!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def _init_weights(model: nn.Module) -> None:
    """The Lua code's init: convolutions N(0, sqrt(2 / (k*k*C_out))), BN gamma 1 / beta 0,
    CLDC weight 1/S / bias 0 (set at construction), Linear bias 0 (weight: PyTorch's default,
    the same uniform bound as Lua's nn.Linear)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / k))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def delugenet_cifar(
    n: int, width: float = 1.0, num_classes: int = 10, efficient: bool = False, **block_kwargs: Any
) -> DelugeNet:
    """The CIFAR DelugeNet with ``n`` (depth 18n + 2) and ``width``: stem 32w channels, stages of
    ``n``, ``2n+1`` and ``3n+1`` slots with 64w, 128w and 256w channels at 32, 16 and 8 pixels.

    ``block_kwargs`` (``memory``, ``backend``) configure the efficient stages; ``small_inputs``
    (default True) and ``drop_rate`` go to ``DelugeNet``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    stem = 32 * width
    if width <= 0 or stem != int(stem):
        raise ValueError(f"32 * width must be a positive integer, got width {width!r}")
    stem = int(stem)
    return DelugeNet(
        stage_slots=(n, 2 * n + 1, 3 * n + 1),
        stage_channels=(2 * stem, 4 * stem, 8 * stem),
        stem_channels=stem,
        num_classes=num_classes,
        efficient=efficient,
        **{"small_inputs": True, **block_kwargs},
    )


def delugenet146(**kwargs: Any) -> DelugeNet:
    """DelugeNet-146 (CIFAR, n=8, width 1; 6.7M parameters with 10 classes)."""
    return delugenet_cifar(8, 1.0, **kwargs)


def delugenet218(**kwargs: Any) -> DelugeNet:
    """DelugeNet-218 (CIFAR, n=12, width 1; 10.0M parameters with 10 classes)."""
    return delugenet_cifar(12, 1.0, **kwargs)


def wide_delugenet146(**kwargs: Any) -> DelugeNet:
    """Wide-DelugeNet-146 (CIFAR, n=8, width 1.75; 20.2M parameters with 10 classes)."""
    return delugenet_cifar(8, 1.75, **kwargs)


def _delugenet_imagenet(
    stage_slots: tuple[int, ...], num_classes: int, efficient: bool, kwargs: dict[str, Any]
) -> DelugeNet:
    return DelugeNet(
        stage_slots=stage_slots,
        stage_channels=(128, 256, 512, 1024),
        stem_channels=64,
        num_classes=num_classes,
        efficient=efficient,
        **{"small_inputs": False, **kwargs},
    )


def delugenet92(num_classes: int = 1000, efficient: bool = False, **kwargs: Any) -> DelugeNet:
    """DelugeNet-92 (ImageNet, 8/8/9/9 slots per stage; 43.4M parameters)."""
    return _delugenet_imagenet((8, 8, 9, 9), num_classes, efficient, kwargs)


def delugenet104(num_classes: int = 1000, efficient: bool = False, **kwargs: Any) -> DelugeNet:
    """DelugeNet-104 (ImageNet, 8/9/10/11 slots per stage; 51.4M parameters)."""
    return _delugenet_imagenet((8, 9, 10, 11), num_classes, efficient, kwargs)


def delugenet122(num_classes: int = 1000, efficient: bool = False, **kwargs: Any) -> DelugeNet:
    """DelugeNet-122 (ImageNet, 8/10/12/14 slots per stage; 63.6M parameters)."""
    return _delugenet_imagenet((8, 10, 12, 14), num_classes, efficient, kwargs)
