"""DelugeNet modules over one shared slot buffer per stage.

``EfficientDelugeStage`` replaces a naive stage (a list of slot tensors, one ``F.batch_norm``
per CLDC input); ``EfficientDelugeTransition`` and ``EfficientDelugeHead`` read the stage's
buffer through ``EfficientCLDC``. Parameter and buffer names are those of
``python_models.delugenet`` (``layer3.cldc.weight``, ``layer3.norm1.running_mean`` ...), so
state_dicts move between the naive and the efficient model.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from dense_ext.block import (
    DenseDtypeError,
    DenseInputError,
    _autocast_enabled,
    _compute_dtype,
    channels_match,
    check_input,
    conv_mismatch,
    norm_kind,
    stored_param,
    unfused_reason,
)
from dense_ext.deluge.backends import get_backend
from dense_ext.deluge.backends.base import LayerNorms, StageBackend, StageCall
from dense_ext.deluge.cldc_params import CLDCParameters
from dense_ext.deluge.function import CLDCCall, CLDCFunction, DelugeStageFunction, norm_call
from dense_ext.deluge.recompute import (
    PreActBottleneckFunction,
    TransitionCall,
    TransitionFunction,
)
from dense_ext.deluge.spec import StageSpec
from dense_ext.norm import advance_batch_counters
from dense_ext.tracing import NotScriptable
from dense_ext.transition import norm_relu_pool


def _backend(name: str, device: torch.device) -> StageBackend:
    """The stage backend ``name`` selects for ``device`` (the reference one for meta tensors)."""
    # Meta tensors carry shapes only: the pure-PyTorch backend propagates them (as the dense
    # block does), whatever backend the module names.
    return get_backend("reference" if device.type == "meta" else name, device)


def _unfused(module: nn.Module) -> bool:
    """Whether ``module`` must call its submodules one by one, as the naive DelugeNet does,
    rather than run fused: a hook on a module inside it (or a global one), a submodule replaced
    by a kind the fused path does not model, ``torch.jit.trace``, ``torch.fx``, ``torch.func``
    or ``torch.export`` (``dense_ext.block.unfused_reason``, the dense block's rule; export's
    training IR could not differentiate the fused Functions' ``out=`` kernels either)."""
    return unfused_reason(module, fusable=_fusable) is not None


def _fusable(child: nn.Module) -> bool:
    if type(child) is nn.BatchNorm2d:
        return norm_kind(child) == "batch_norm"  # not a weight without a bias, say
    return type(child) in (EfficientCompositeLayer, EfficientCLDC, nn.Conv2d)


class EfficientCLDC(CLDCParameters):
    """Cross-layer depthwise convolution CLDC(C, S) over a stage's slot buffer.

    Same parameters and buffers as the naive CLDC (``weight``, ``bias``, ``running_mean``,
    ``running_var``: [C, S]; ``num_batches_tracked``), the same semantics (``S`` batch norms,
    one per slot, with this module's train/eval flag, eps and momentum, summed). ``forward``
    takes the [N, S*C, H, W] buffer of a stage and returns [N, C, H, W].
    """

    def __init__(
        self,
        channels: int,
        num_inputs: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(channels, num_inputs, eps, momentum, track_running_stats)
        self.backend = backend
        self.stats_sync = None  # see _refuse_sync

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def forward(self, buf: Tensor) -> Tensor:
        """[N, S*C, H, W] slot buffer -> [N, C, H, W]."""
        weight = stored_param(self, "weight")
        _check_input(buf, self.num_inputs * self.channels, "EfficientCLDC", weight)
        if _unfused(self):  # indexed, not list(): a torch.fx proxy cannot be iterated
            slots = buf.split(self.channels, 1)
            return self.forward_slots([slots[i] for i in range(self.num_inputs)])
        if _batch_stats(self):
            _refuse_sync(self)
            _check_batch_size(buf)
        norm = norm_call(self)
        call = CLDCCall(self.channels, _backend(self.backend, buf.device), norm)
        # A stage's buffer is channels_last already; anything else is copied once.
        buf = buf.to(_compute_dtype(buf)).contiguous(memory_format=torch.channels_last)
        return CLDCFunction.apply(buf, call, self.weight, self.bias)


class EfficientCompositeLayer(NotScriptable, nn.Module):
    """Holds composite layer ``k``'s modules with the naive layer's names; the stage runs it.

    ``cldc`` (``k >= 2``), ``norm``, ``conv1`` (1x1, C -> C/2), ``norm1``, ``conv2`` (3x3),
    ``norm2``, ``conv3`` (1x1, C/2 -> C).
    """

    def __init__(self, channels: int, index: int) -> None:
        super().__init__()
        mid = channels // 2
        self.index = index
        if StageSpec.has_cldc(index):
            self.cldc = EfficientCLDC(channels, index)
        self.norm = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, mid, kernel_size=1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, channels, kernel_size=1, bias=False)

    def norms(self) -> list[nn.Module]:
        """The normalisations in ``spec`` order: [cldc,] norm, norm1, norm2."""
        cldc = [self.cldc] if hasattr(self, "cldc") else []
        return [*cldc, self.norm, self.norm1, self.norm2]

    def convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2, self.conv3]

    def mismatch(self, channels: int, mid: int) -> str | None:
        """Why the fused stage cannot compute this layer from its parameters as a layer of
        ``channels`` channels and bottleneck width ``mid``, or None: a conv that is not the
        bias-free one the kernels compute from its weight alone, or other channel counts (a
        structured pruning changed them, say)."""
        reason = _convs_reason(self, (("conv1", 1, 1), ("conv2", 3, 1), ("conv3", 1, 1)))
        if reason is not None:
            return reason
        modules = cast(dict[str, nn.Module], self._modules)
        expected = (
            ("norm", "conv1", channels, mid),
            ("norm1", "conv2", mid, mid),
            ("norm2", "conv3", mid, channels),
        )
        for norm, conv, c, out in expected:
            if not channels_match(modules[norm], modules[conv], c, out):
                return f"{norm} or {conv} has other channels than the stage's spec"
        return None

    def forward(self, slots: list[Tensor]) -> Tensor:
        """The new slot from the list of the ``k`` earlier ones, through this layer's modules as
        the naive layer computes it: what the stage calls when it runs unfused (``_unfused``)."""
        if len(slots) != self.index:
            raise ValueError(
                f"composite layer {self.index} reads {self.index} slots, got {len(slots)}"
            )
        x = self.cldc(torch.cat(slots, 1)) if hasattr(self, "cldc") else slots[0]
        x = self.conv1(torch.relu(self.norm(x)))
        x = self.conv2(torch.relu(self.norm1(x)))
        return self.conv3(torch.relu(self.norm2(x)))


class EfficientDelugeStage(NotScriptable, nn.ModuleDict):
    """A DelugeNet stage over one preallocated, channels_last slot buffer.

    Args:
        channels: channels ``C`` of every slot.
        num_slots: slots ``S`` (slot 0, the input, included): layers ``layer1 .. layer{S-1}``.
        memory: ``"min"`` keeps only the slot buffer for backward; ``"bottleneck"`` also each
            layer's 3x3-convolution output (C/2 channels), saving that convolution's recompute.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.

    ``forward(x)`` maps the [N, C, H, W] slot 0 to the [N, S*C, H, W] buffer of all slots
    (``torch.cat`` of the naive stage's list), channels_last. Each BN and CLDC follows its own
    ``training`` flag, like the modules of the naive stage.
    """

    def __init__(
        self, channels: int, num_slots: int, memory: str = "min", backend: str = "auto"
    ) -> None:
        super().__init__()
        self.spec = StageSpec(channels, num_slots, memory)
        self.backend = backend
        self.stats_sync = None  # see _refuse_sync
        for k in range(1, num_slots):
            self.add_module(f"layer{k}", EfficientCompositeLayer(channels, k))

    @property
    def memory(self) -> str:
        return self.spec.memory

    @memory.setter
    def memory(self, value: str) -> None:
        self.spec = StageSpec(self.spec.channels, self.spec.num_slots, value)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"channels={s.channels}, num_slots={s.num_slots}, memory={s.memory!r}, "
            f"backend={self.backend!r}"
        )

    def layers(self) -> list[EfficientCompositeLayer]:
        return [cast(EfficientCompositeLayer, layer) for layer in self.values()]

    def forward(self, x: Tensor) -> Tensor:
        """[N, C, H, W] slot 0 -> [N, S*C, H, W] slot buffer."""
        layers = self.layers()
        first = stored_param(layers[0].conv1, "weight") if layers else None
        _check_input(x, self.spec.channels, "EfficientDelugeStage", first)
        if _unfused(self):
            slots = [x]
            for layer in layers:
                slots.append(layer(slots))
            return torch.cat(slots, 1)
        dtype = _compute_dtype(x)
        if not layers:  # a stage of one slot is its input
            return x.to(dtype).contiguous(memory_format=torch.channels_last)
        if any(_batch_stats(m) for layer in layers for m in layer.norms()):
            _refuse_sync(self)
            _check_batch_size(x)
        # Only now, with the input accepted: every BN's and CLDC's num_batches_tracked += 1 (in
        # one foreach call, not one op per module: host time), then each one's decisions
        # (a cumulative average's factor reads the incremented counter).
        advance_batch_counters([m for layer in layers for m in layer.norms()])
        norms = [
            LayerNorms(*[_norm_call(m, count=False) for m in _pad(layer.norms())])
            for layer in layers
        ]
        call = StageCall(self.spec, _backend(self.backend, x.device), norms)
        params = self._flat_params(x, dtype)
        call.save = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
        )
        return DelugeStageFunction.apply(x.to(dtype), call, *params)

    def structure_reason(self) -> str | None:
        """Why the fused path cannot compute this stage from its layers' parameters (each
        layer's ``mismatch``, against this stage's spec), or None."""
        channels, mid = self.spec.channels, self.spec.mid_channels
        for layer in self.layers():
            reason = layer.mismatch(channels, mid)
            if reason is not None:
                return f"layer{layer.index}: {reason}"
        return None

    def _flat_params(self, x: Tensor, dtype: torch.dtype) -> list[Tensor]:
        params: list[Tensor] = []
        for layer in self.layers():
            if hasattr(layer, "cldc"):
                params += [layer.cldc.weight, layer.cldc.bias]
            for bn, conv in zip((layer.norm, layer.norm1, layer.norm2), layer.convs()):
                params += [*_affine(bn, x.device), _weight(conv, dtype, x)]
        return params


class EfficientDelugeTransition(NotScriptable, nn.Module):
    """``CLDC(C, S) -> BN -> conv3x3 stride 2 (C -> out)`` over a stage's slot buffer.

    Same modules and names as the naive transition: ``cldc``, ``norm``, ``conv``. Keeps only
    the buffer (the stage's) for backward and recomputes the CLDC and BN outputs
    (``dense_ext.deluge.recompute.TransitionFunction``).
    """

    def __init__(
        self, channels: int, num_slots: int, out_channels: int, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.cldc = EfficientCLDC(channels, num_slots, backend=backend)
        self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(
            channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False
        )

    def structure_reason(self) -> str | None:
        """Why the fused transition cannot compute ``conv`` from its weight, or None."""
        return _convs_reason(self, (("conv", 3, 2),))

    def forward(self, buf: Tensor) -> Tensor:
        """[N, S*C, H, W] -> [N, out, ceil(H/2), ceil(W/2)]."""
        cldc = self.cldc
        weight = stored_param(cldc, "weight")
        _check_input(buf, cldc.num_inputs * cldc.channels, "EfficientDelugeTransition", weight)
        # An empty batch: the stock modules' answer. (_unfused first: under torch.fx the shape
        # is a proxy, which cannot decide a branch.)
        if _unfused(self) or buf.shape[0] * buf.shape[2] * buf.shape[3] == 0:
            return self.conv(self.norm(cldc(buf)))
        if _batch_stats(cldc) or _batch_stats(self.norm):
            _refuse_sync(cldc)
            _check_batch_size(buf)
        dtype = _compute_dtype(buf)
        call = TransitionCall(
            _backend(cldc.backend, buf.device), norm_call(cldc), norm_call(self.norm)
        )
        return TransitionFunction.apply(
            buf.to(dtype).contiguous(memory_format=torch.channels_last),
            call,
            cldc.weight,
            cldc.bias,
            *_affine(self.norm, buf.device),
            _weight(self.conv, dtype, buf),
        )


class EfficientPreActBottleneck(NotScriptable, nn.Module):
    """The CIFAR DelugeNet's entry (slot 0 of the first stage): BN-ReLU-conv1x1 (in -> mid),
    BN-ReLU-conv3x3 (mid), BN-ReLU-conv1x1 (mid -> out), no shortcut; keeps only its input for
    backward (``dense_ext.deluge.recompute.PreActBottleneckFunction``). Same names as the naive
    entry: ``norm1, conv1, norm2, conv2, norm3, conv3``.
    """

    def __init__(self, in_channels: int, mid: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, kernel_size=1, bias=False)

    def structure_reason(self) -> str | None:
        """Why the fused entry cannot compute its convs from their weights, or None."""
        return _convs_reason(self, (("conv1", 1, 1), ("conv2", 3, 1), ("conv3", 1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        pairs = ((self.norm1, self.conv1), (self.norm2, self.conv2), (self.norm3, self.conv3))
        # The stock modules where the entry runs unfused (before any check of ours: a module
        # replaced there, an nn.Identity for a BN say, answers for itself), and for an empty
        # batch.
        unfused = _unfused(self)
        if not unfused:
            first = stored_param(self.conv1, "weight")
            _check_input(x, self.norm1.num_features, "EfficientPreActBottleneck", first)
        if unfused or x.shape[0] * x.shape[2] * x.shape[3] == 0:
            for norm, conv in pairs:
                x = conv(torch.relu(norm(x)))
            return x
        if any(_batch_stats(norm) for norm, _ in pairs):
            _check_batch_size(x)
        dtype = _compute_dtype(x)
        norms = [norm_call(norm) for norm, _ in pairs]
        params = [
            t for norm, conv in pairs for t in (*_affine(norm, x.device), _weight(conv, dtype, x))
        ]
        return PreActBottleneckFunction.apply(x.to(dtype), norms, *params)


class EfficientDelugeHead(NotScriptable, nn.Module):
    """``CLDC(C, S) -> BN -> ReLU -> global average pool`` over the last stage's buffer.

    Same modules and names as the naive head (``cldc``, ``norm``); the BN-ReLU-pool keeps only
    its input for backward (``dense_ext.transition.norm_relu_pool``).
    """

    def __init__(self, channels: int, num_slots: int, backend: str = "auto") -> None:
        super().__init__()
        self.cldc = EfficientCLDC(channels, num_slots, backend=backend)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, buf: Tensor) -> Tensor:
        """[N, S*C, H, W] -> [N, C]."""
        y = self.cldc(buf)
        # The naive head's modules where the head runs unfused, and for an empty batch.
        if _unfused(self) or y.numel() == 0:
            return torch.relu(self.norm(y)).mean(dim=(2, 3))
        return norm_relu_pool(y, self.norm, "global")


def _convs_reason(module: nn.Module, convs: tuple[tuple[str, int, int], ...]) -> str | None:
    """The first of ``module``'s convs (name, kernel, stride) that is not the bias-free conv the
    fused Functions compute from its weight alone, as a reason; else None."""
    modules = cast(dict[str, nn.Module], module._modules)
    for name, kernel, stride in convs:
        reason = conv_mismatch(modules.get(name), kernel, stride)
        if reason is not None:
            return f"{name} {reason}"
    return None


def _pad(norms: list[nn.Module]) -> list[nn.Module | None]:
    """The four normalisations of a layer, None for layer 1's missing CLDC."""
    padded: list[nn.Module | None] = [None] if len(norms) == 3 else []
    return padded + list(norms)


def _batch_stats(module: nn.Module) -> bool:
    """Whether ``module`` (a BN or CLDC) normalises with batch statistics, as nn.BatchNorm2d."""
    return module.training or (module.running_mean is None and module.running_var is None)


def _norm_call(module: nn.Module | None, count: bool = True):
    return None if module is None else norm_call(module, count)


def _check_input(x: Tensor, channels: int, who: str, param: Tensor | None) -> None:
    """``dense_ext.block.check_input``, and a parameter dtype that matches the input's (or
    autocast's). Nothing to check on a ``torch.fx`` proxy (no shapes, no dtype)."""
    if isinstance(x, torch.fx.Proxy):
        return
    check_input(x, channels, who, param)
    if param is not None and param.dtype != _compute_dtype(x):
        if not _autocast_enabled(x.device.type):
            raise DenseDtypeError(
                f"{who}: input dtype {x.dtype} does not match parameter dtype {param.dtype}; "
                f"convert the module (e.g. .to({x.dtype})) or use torch.autocast"
            )


def _refuse_sync(module: nn.Module) -> None:
    """Synchronised batch norm (``dense_ext.distributed.enable_sync_bn`` sets ``stats_sync``)
    is not implemented for DelugeNets: refuse rather than normalise with local statistics."""
    if module.stats_sync is not None:
        raise RuntimeError(
            f"dense_ext: synchronised batch norm is not implemented for {type(module).__name__} "
            "(DelugeNets); train without --sync-bn / enable_sync_bn"
        )


def _check_batch_size(x: Tensor) -> None:
    if x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise DenseInputError(
            "Expected more than 1 value per channel when training, got input size "
            f"{list(x.shape)}: batch statistics need N*H*W > 1"
        )


def _affine(bn: nn.BatchNorm2d, device: torch.device) -> list[Tensor]:
    """gamma and beta of a BN; constants 1 and 0 when it has no affine parameters."""
    if bn.weight is not None:
        return [bn.weight, bn.bias]
    ones = torch.ones(bn.num_features, device=device)
    return [ones, torch.zeros_like(ones)]


def _weight(conv: nn.Conv2d, dtype: torch.dtype, x: Tensor) -> Tensor:
    return conv.weight if conv.weight.dtype == dtype else conv.weight.to(dtype)
