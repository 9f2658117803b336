"""A torchvision-compatible DenseNet, naive or efficient, with ImageNet and CIFAR builders.

Module names and state_dict keys are torchvision's (``features.conv0``, ``features.norm0``,
``features.denseblock1.denselayer1.norm1.weight``, ``features.transition1.conv.weight``,
``features.norm5``, ``classifier``), so torchvision checkpoints load unchanged, and a naive
and an efficient model of the same configuration exchange state_dicts.

``small_inputs=True`` gives the CIFAR stem of Huang et al.: a single 3x3 stride-1
convolution, key ``features.conv0`` (no ``norm0``/``relu0``/``pool0``); the first dense
block's first BN normalises its output.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from dense_ext.block import EfficientDenseBlock, is_intercepted, unfused_reason
from dense_ext.stem import norm_relu_max_pool
from dense_ext.tracing import NotScriptable
from dense_ext.transition import EfficientTransition, norm_relu_pool


def _bn_without_update(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn(x)`` with the statistics ``bn(x)`` would use, but no running-statistics update.

    Used when checkpointing recomputes a BN: the batch statistics are functions of the same
    input, so the output is the same, and the running statistics stay updated once. The
    call mirrors ``nn.BatchNorm2d.forward`` (same arguments, so checkpoint sees the same
    saved tensors) except momentum 0, which leaves the running buffers as they are, and no
    ``num_batches_tracked`` increment.
    """
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    return F.batch_norm(
        x,
        bn.running_mean if use_running else None,
        bn.running_var if use_running else None,
        bn.weight,
        bn.bias,
        batch_stats,
        0.0,
        bn.eps,
    )


class _DenseLayer(nn.Module):
    """One naive dense layer: concatenate all previous features, then H_l.

    ``bn_size`` > 0: BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k) (DenseNet-BC);
    ``bn_size`` None or 0: BN-ReLU-Conv3x3(k), with the 3x3 convolution named ``conv1``.
    ``memory_efficient=True`` checkpoints the concatenation, first BN-ReLU and first
    convolution (torchvision's variant), but unlike torchvision it updates the first BN's
    running statistics once per forward, not again during the recomputation.
    """

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int | None,
        drop_rate: float,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        if bn_size:
            mid = bn_size * growth_rate
            self.conv1 = nn.Conv2d(num_input_features, mid, kernel_size=1, stride=1, bias=False)
            self.norm2 = nn.BatchNorm2d(mid)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(mid, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(
                num_input_features, growth_rate, kernel_size=3, stride=1, padding=1, bias=False
            )
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    @property
    def bottleneck(self) -> bool:
        """Whether the layer has the 1x1 bottleneck (DenseNet-BC)."""
        return hasattr(self, "conv2")

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        """conv1(relu1(norm1(cat(inputs)))), the part that holds O(C_in) channels."""
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def _checkpointed(self, inputs: list[Tensor]) -> Tensor:
        calls = [0]

        def closure(*tensors: Tensor) -> Tensor:
            # The first call is the forward; later calls are checkpoint's recomputation,
            # which must not fold the batch into the running statistics a second time.
            first = calls[0] == 0
            calls[0] += 1
            cat = torch.cat(tensors, 1)
            normed = self.norm1(cat) if first else _bn_without_update(self.norm1, cat)
            return self.conv1(self.relu1(normed))

        return cp.checkpoint(closure, *inputs, use_reentrant=False)

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        """New ``k`` feature maps from the list of all previous ones (or a single tensor)."""
        inputs = [input] if isinstance(input, Tensor) else list(input)
        # requires_grad asked only when checkpointing (as torchvision asks): under torch.fx it
        # is a proxy, which cannot decide a branch.
        if (
            self.memory_efficient
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in inputs)
        ):
            out = self._checkpointed(inputs)
        else:
            out = self.bn_function(inputs)
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    """A naive dense block (torchvision's): output = cat(input, every layer's new features)."""

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int | None,
        growth_rate: int,
        drop_rate: float,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        """[N, C0, H, W] -> [N, C0 + L*k, H, W]."""
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """A naive transition (torchvision's): BN-ReLU-Conv1x1-AvgPool2x2."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(
            num_input_features, num_output_features, kernel_size=1, stride=1, bias=False
        )
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Max pool of a copy of ``x`` in channels_last; the gradient comes back as ATen's NCHW
    pool backward computes it.

    Saved for backward are ``x`` itself and the indices, as ``nn.MaxPool2d`` saves them (in the
    stem ``x`` is also the ReLU's saved output): the channels_last copy is freed after forward,
    so the pool costs no memory the NCHW pool does not. Backward runs ATen's NCHW kernel on
    NCHW copies of the gradient and indices (a channel-plane index means the same in both
    layouts), so the input gradient is the NCHW pool's bit for bit and in the layout the stem
    ReLU's backward expects (a channels_last gradient there made its threshold_backward mix
    layouts: 11.9 ms against 3.1 ms on DenseNet-121's stem at batch 4)."""

    @staticmethod
    def forward(ctx, x: Tensor, params: tuple) -> Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), *params
        )
        ctx.save_for_backward(x, indices)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, *ctx.params, indices.contiguous()
        )
        return grad_x, None


class ChannelsLastMaxPool2d(NotScriptable, nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a 4-D NCHW CPU input in channels_last: the efficient models'
    stem.

    ATen's NCHW max pool is slow on the CPU: on DenseNet-121 (batch 4, 224x224, 2-core CPU) it
    took 12.5-14.4 ms of a ~460 ms training step; a channels_last copy plus the channels_last
    pool take about 3 ms, and the stem's ops went from 42.9 to 34.4 ms per step (medians,
    docs/decisions.md). A max is exact in any layout: output values and input gradient are
    ``nn.MaxPool2d``'s bit for bit (ties and NaN resolve alike), the output is channels_last
    (the layout the efficient blocks work in), the input gradient NCHW. The convolution and BN
    before it keep the input's layout, and so PyTorch's NCHW numerics. A channels_last input,
    other devices, 3-D inputs and ``return_indices=True`` pool as ``nn.MaxPool2d`` does.
    """

    def forward(self, input: Tensor) -> Tensor:
        if (
            # Tracing, torch.export and torch.func transforms (which refuse an autograd.Function
            # without setup_context) get nn.MaxPool2d's operator; asked first, since a torch.fx
            # proxy cannot answer the questions below and vmap cannot answer the layout one.
            unfused_reason(self) is not None
            or input.device.type != "cpu"
            or input.dim() != 4
            or self.return_indices
            or input.is_contiguous(memory_format=torch.channels_last)
        ):
            return super().forward(input)
        stride = self.stride if self.stride is not None else self.kernel_size
        params = (
            _pair(self.kernel_size),
            _pair(stride),
            _pair(self.padding),
            _pair(self.dilation),
            self.ceil_mode,
        )
        return _ChannelsLastMaxPool.apply(input, params)


def _stem(
    num_init_features: int, small_inputs: bool, efficient: bool
) -> list[tuple[str, nn.Module]]:
    if small_inputs:
        conv = nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
        return [("conv0", conv)]
    pool = ChannelsLastMaxPool2d if efficient else nn.MaxPool2d
    return [
        ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", nn.BatchNorm2d(num_init_features)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", pool(kernel_size=3, stride=2, padding=1)),
    ]


class DenseNet(NotScriptable, nn.Module):
    """DenseNet (Huang et al., CVPR 2017) with torchvision's structure and keys.

    Args:
        growth_rate: channels each layer adds (``k``).
        block_config: layers per dense block.
        num_init_features: channels of the stem convolution.
        bn_size: bottleneck factor (1x1 conv to ``bn_size*k``); None or 0 for plain layers.
        drop_rate: dropout on each layer's new features during training.
        num_classes: classifier outputs.
        memory_efficient: torchvision's checkpointed naive layers (the "checkpointing"
            baseline); incompatible with ``efficient=True``.
        compression: a transition outputs ``floor(compression * C)`` channels, in (0, 1].
        small_inputs: CIFAR stem (one 3x3 stride-1 conv, key ``features.conv0``) instead of
            the ImageNet 7x7/2 conv + BN-ReLU + 3x3/2 max pool.
        efficient: use ``dense_ext.EfficientDenseBlock`` and ``EfficientTransition`` (same
            parameters and keys), and the fused head (``efficient_head``).
        memory: ``"bottleneck"`` or ``"min"``, the efficient blocks' memory mode.
        backend: the efficient blocks' backend (``"auto"``, ``"reference"``, ...).

    Attribute ``efficient_head`` (default: ``efficient``) computes the final norm5-ReLU-
    global-average-pool as one function that saves only its input, not the normalised map
    (``dense_ext.transition.norm_relu_pool``; synchronised when ``features.norm5`` is a
    ``dense_ext.sync_bn.SyncBatchNorm``). Set it after ``dense_ext.convert(model)`` to get
    the fused head on a converted model.

    Attribute ``efficient_stem`` (default: ``efficient``) computes the ImageNet stem's
    norm0-ReLU-max pool as one function on the CPU that saves one byte per pooled value instead
    of the ReLU output and int64 indices, equal to the modules bit for bit
    (``dense_ext.stem.norm_relu_max_pool``; the modules run where it does not apply). Like the
    fused head, it needs ``features`` without hooks of its own.
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int | None = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        memory_efficient: bool = False,
        *,
        compression: float = 0.5,
        small_inputs: bool = False,
        efficient: bool = False,
        memory: str = "bottleneck",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_config(growth_rate, block_config, num_init_features, compression, num_classes)
        if efficient and memory_efficient:
            raise ValueError(
                "memory_efficient (checkpointing) applies to naive blocks only; "
                "choose efficient=True or memory_efficient=True, not both"
            )
        self.efficient_head = bool(efficient)
        self.efficient_stem = bool(efficient)
        stem = _stem(num_init_features, small_inputs, efficient)
        self.features = nn.Sequential(OrderedDict(stem))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            if efficient:
                block: nn.Module = EfficientDenseBlock(
                    num_layers,
                    num_features,
                    growth_rate,
                    bn_size,
                    drop_rate,
                    memory=memory,
                    backend=backend,
                )
            else:
                block = _DenseBlock(
                    num_layers, num_features, bn_size, growth_rate, drop_rate, memory_efficient
                )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(math.floor(compression * num_features))
                if out_features < 1:  # a zero-channel map: every later layer would be empty
                    raise ValueError(
                        f"compression {compression!r} leaves transition{i + 1} "
                        f"floor({compression!r} * {num_features}) = 0 output channels"
                    )
                cls = EfficientTransition if efficient else _Transition
                self.features.add_module(f"transition{i + 1}", cls(num_features, out_features))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Images [N, 3, H, W] -> logits [N, num_classes].

        The fused head never calls ``features`` as a whole nor ``features.norm5``, the fused
        stem neither ``features`` nor norm0, relu0 and pool0; when these have hooks (or
        ``dense_ext.block.unfused_reason`` says so: tracing, ``torch.func``, a global hook) they
        run as torchvision's do, so the hooks fire as there."""
        # _features calls features' children one by one: only for the Sequential built here,
        # whose call would run nothing else.
        features = self.features
        features_free = type(features) is nn.Sequential and not is_intercepted(features)
        head = features_free and self.efficient_head
        head = head and unfused_reason(self.features.norm5, called=False) is None
        if head or (features_free and self._stem_fusable()):
            out = self._features(x, skip_norm5=head)
        else:
            out = self.features(x)
        if head:
            out = norm_relu_pool(out, self.features.norm5, pool="global")
        else:
            out = F.relu(out, inplace=True)
            out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)

    def _stem_fusable(self) -> bool:
        """Whether ``_features`` may replace the ImageNet stem's norm0-relu0-pool0 (the input
        decides the rest: ``dense_ext.stem.unfused_stem_reason``). Not under global module
        hooks or tracing (``unfused_reason``): those see ``features`` called as a module."""
        norm = self.features._modules.get("norm0")
        return (
            getattr(self, "efficient_stem", False)
            and norm is not None
            and all(name in self.features._modules for name in ("relu0", "pool0"))
            and unfused_reason(norm, called=False) is None
        )

    def _features(self, x: Tensor, skip_norm5: bool) -> Tensor:
        """``features(x)`` with its children called one by one (without norm5 when
        ``skip_norm5``); with ``efficient_stem``, the ImageNet stem's norm0-relu0-pool0 through
        ``dense_ext.stem.norm_relu_max_pool``."""
        children = dict(self.features.named_children())
        stem = ("norm0", "relu0", "pool0")
        fuse_stem = self._stem_fusable()
        out = x
        for name, module in children.items():
            if (skip_norm5 and name == "norm5") or (fuse_stem and name in stem[1:]):
                continue
            if fuse_stem and name == "norm0":
                out = norm_relu_max_pool(out, *(children[n] for n in stem))
            else:
                out = module(out)
        return out


def _check_config(growth_rate, block_config, num_init_features, compression, num_classes):
    for name, value in (
        ("growth_rate", growth_rate),
        ("num_init_features", num_init_features),
        ("num_classes", num_classes),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not block_config or any(not isinstance(n, int) or n < 1 for n in block_config):
        raise ValueError(
            f"block_config must be a non-empty sequence of positive integers, got {block_config!r}"
        )
    if not 0.0 < float(compression) <= 1.0:
        raise ValueError(f"compression must be in (0, 1], got {compression!r}")


def _init_weights(model: nn.Module) -> None:
    """torchvision's initialisation, by module type."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0)


def _densenet(
    growth_rate: int,
    block_config: tuple[int, ...],
    num_init_features: int,
    efficient: bool,
    kwargs: dict[str, Any],
) -> DenseNet:
    config = dict(
        growth_rate=growth_rate,
        block_config=block_config,
        num_init_features=num_init_features,
        efficient=efficient,
    )
    return DenseNet(**{**config, **kwargs})


def densenet121(efficient: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (ImageNet, k=32, blocks 6-12-24-16); ``kwargs`` go to ``DenseNet``."""
    return _densenet(32, (6, 12, 24, 16), 64, efficient, kwargs)


def densenet161(efficient: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (ImageNet, k=48, blocks 6-12-36-24, 96 stem features)."""
    return _densenet(48, (6, 12, 36, 24), 96, efficient, kwargs)


def densenet169(efficient: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (ImageNet, k=32, blocks 6-12-32-32)."""
    return _densenet(32, (6, 12, 32, 32), 64, efficient, kwargs)


def densenet201(efficient: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (ImageNet, k=32, blocks 6-12-48-32)."""
    return _densenet(32, (6, 12, 48, 32), 64, efficient, kwargs)


def densenet264(efficient: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-264 (ImageNet, k=32, blocks 6-12-64-48)."""
    return _densenet(32, (6, 12, 64, 48), 64, efficient, kwargs)


def densenet_bc(
    depth: int = 100,
    growth_rate: int = 12,
    num_classes: int = 10,
    efficient: bool = False,
    **kwargs: Any,
) -> DenseNet:
    """CIFAR DenseNet-BC (L=depth, k=growth_rate): 3 blocks of (L-4)/6 bottleneck layers.

    Stem of ``2k`` features, compression 0.5, small-input stem. ``kwargs`` (e.g.
    ``drop_rate``, ``memory``, ``backend``) go to ``DenseNet`` and may override the defaults.
    """
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"DenseNet-BC depth must be 6n+4 with n >= 1 (e.g. 100, 190, 250), got {depth!r}"
        )
    n = (depth - 4) // 6
    config = dict(bn_size=4, compression=0.5, small_inputs=True, num_classes=num_classes)
    return _densenet(growth_rate, (n, n, n), 2 * growth_rate, efficient, {**config, **kwargs})


def densenet(
    depth: int = 40,
    growth_rate: int = 12,
    num_classes: int = 10,
    efficient: bool = False,
    **kwargs: Any,
) -> DenseNet:
    """CIFAR plain DenseNet (L=depth, k=growth_rate): 3 blocks of (L-4)/3 BN-ReLU-Conv3x3 layers.

    16 stem features, no compression, small-input stem. The paper uses ``drop_rate=0.2``
    without data augmentation; pass it in ``kwargs``.
    """
    if not isinstance(depth, int) or depth < 7 or (depth - 4) % 3:
        raise ValueError(
            f"plain DenseNet depth must be 3n+4 with n >= 1 (e.g. 40, 100), got {depth!r}"
        )
    n = (depth - 4) // 3
    config = dict(bn_size=None, compression=1.0, small_inputs=True, num_classes=num_classes)
    return _densenet(growth_rate, (n, n, n), 16, efficient, {**config, **kwargs})
