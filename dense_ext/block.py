"""``EfficientDenseBlock``: a drop-in for torchvision's ``_DenseBlock`` in linear memory.

The block normally runs fused: one autograd Function over a shared buffer, reading its layers'
modules only for their parameters, buffers and flags. Some uses need the modules themselves to
run, one call after another, as torchvision's block runs them; then the block does exactly that
(``unfused_reason`` says when), with torchvision's numbers and memory:

* a forward or backward hook on a module inside the block (a layer, a BN, a conv, a ReLU), or a
  global module hook, or a forward replaced on a module's instance (HF accelerate's offload and
  device-map hooks do that): hooks and such forwards run only on modules that are called;
* a module inside replaced by a kind the fused block does not model (a LoRA wrapper around a
  conv, ``nn.SyncBatchNorm``, a SiLU for a ReLU, an ``nn.Identity`` for a BN), or changed into
  one (a conv given a bias, a stride, another padding): its own forward must run. The fused
  path reads a conv's weight only, so each position is checked, not just each module's type
  (``structure_reason``);
* ``torch.jit.trace``, ``torch.fx`` symbolic tracing (torchvision's ``create_feature_extractor``)
  and ``torch.func`` transforms (``grad``, ``vmap``, ``functional_call`` under them), which
  cannot see through an autograd Function with a hand-written backward;
* ``torch.export``: the exported program is torchvision's graph of ATen operators, which the
  programs that take exported models (ONNX, ExecuTorch, AOTInductor) know; dense_ext's custom
  operators they do not.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dense_ext.backends import check_backend_name, get_backend
from dense_ext.backends.base import LOCAL, BlockCall
from dense_ext.function import DenseBlockFunction, autocast_available
from dense_ext.norm import NormCall, advance_batch_counters, norm_call
from dense_ext.spec import BlockSpec
from dense_ext.tracing import NotScriptable, is_exporting


class DenseInputError(ValueError, RuntimeError):
    """An input the block cannot take: wrong rank, channel count, or batch size.

    A ``ValueError`` that is also a ``RuntimeError``, so code written for either of
    ``nn.BatchNorm2d``'s and ``nn.Conv2d``'s errors catches it.
    """


class DenseDtypeError(TypeError, RuntimeError):
    """An input whose dtype the block cannot take (integer, or not the parameters' dtype)."""


def check_input(x: Tensor, channels: int, who: str, param: Tensor | None = None) -> None:
    """The checks every efficient module makes of its input, with errors that name ``who``:
    a Tensor, 4-D, ``channels`` channels, floating point, on the device of ``param`` (one of
    the module's parameters, when given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise DenseInputError(f"{who} expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise DenseInputError(
            f"{who} expects {channels} input channels, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )
    if not x.is_floating_point():
        raise DenseDtypeError(f"{who} expects a floating-point input, got {x.dtype}")
    if param is not None and param.device != x.device:
        raise RuntimeError(
            f"{who}: input is on {x.device} but the parameters are on {param.device}"
        )


def stored_param(module: nn.Module, name: str) -> Tensor:
    """``module``'s parameter ``name`` as stored, for device and dtype checks. For a parametrized
    one (``torch.nn.utils.parametrize``: ``spectral_norm``, ``weight_norm`` ...) its first
    original: reading the attribute computes the parametrization, and ``spectral_norm``'s
    power iteration advances its vectors on every read, so a check that reads it once more
    than the naive model changes the model's numbers."""
    if not parametrize.is_parametrized(module, name):
        return getattr(module, name)
    originals = cast(nn.ModuleDict, module.parametrizations)[name]
    return originals.original if hasattr(originals, "original") else originals.original0


class EfficientDenseLayer(NotScriptable, nn.Module):
    """Holds one dense layer's modules with torchvision's names; the block runs it.

    Bottleneck layers have ``norm1, relu1, conv1 (1x1), norm2, relu2, conv2 (3x3)``; plain
    layers (``bn_size`` 0) have ``norm1, relu1, conv1 (3x3)``. The ReLU modules hold nothing;
    they are there so the layer prints like torchvision's.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float):
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

    # Read from ``_modules`` (where nn.Module keeps submodules) rather than through
    # ``Module.__getattr__``: the block reads them for every layer on every call (host time).
    def norms(self) -> list[nn.Module]:
        modules = cast(dict[str, nn.Module], self._modules)
        norm1 = modules["norm1"]
        return [norm1] if "norm2" not in modules else [norm1, modules["norm2"]]

    def convs(self) -> list[nn.Module]:
        modules = cast(dict[str, nn.Module], self._modules)
        conv1 = modules["conv1"]
        return [conv1] if "conv2" not in modules else [conv1, modules["conv2"]]

    def mismatch(self, c_in: int, k: int, mid: int) -> str | None:
        """Why the fused block cannot compute this layer from its modules' parameters as a
        layer with ``c_in`` inputs, growth ``k`` and bottleneck width ``mid`` (0: none), or
        None: a BN the kernels do not model, a ReLU replaced, a conv that is not the
        bias-free stride-1 1x1 or 3x3 one they compute from its weight alone, or channel
        counts other than these (a structured pruning changed them, say)."""
        modules = cast(dict[str, nn.Module], self._modules)
        if not mid:
            return _position_reason(modules, 1, 3, c_in, k)
        return _position_reason(modules, 1, 1, c_in, mid) or _position_reason(modules, 2, 3, mid, k)

    def forward(self, features: Tensor | list[Tensor]) -> Tensor:
        """torchvision's ``_DenseLayer.forward``: the ``k`` new feature maps from the list of all
        previous ones. The block calls it only when it runs unfused (see the module docstring)."""
        inputs = [features] if isinstance(features, Tensor) else list(features)
        out = self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))
        if hasattr(self, "conv2"):
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


@functools.cache
def _key_pattern(template: str) -> re.Pattern[str]:
    """A key prefix template (``"unit{}.conv1.bn."``: ``{}`` a layer's number) as a regex."""
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)"))


class KeyRenames:
    """How another library names a module's state_dict keys: pairs of key prefixes (own,
    library), relative to the module, ``{}`` standing for a layer's number, which is
    ``library_offset`` more in the library's names (mmpretrain counts layers from 0)."""

    def __init__(self, pairs: Sequence[tuple[str, str]], library_offset: int = 0) -> None:
        self.pairs = tuple(pairs)
        self.library_offset = library_offset

    def library_key(self, key: str) -> str | None:
        """An own key in the library's names, or None where no pair matches."""
        return self._renamed(key, to_library=True)

    def own_key(self, key: str) -> str | None:
        """A library key in the module's own names, or None where no pair matches."""
        return self._renamed(key, to_library=False)

    def _renamed(self, key: str, to_library: bool) -> str | None:
        for own, library in self.pairs:
            source, target = (own, library) if to_library else (library, own)
            match = _key_pattern(source).match(key)
            if match is not None:
                shift = self.library_offset if to_library else -self.library_offset
                numbers = [int(n) + shift for n in match.groups()]
                return target.format(*numbers) + key[match.end() :]
        return None


LAYER_KEY_STYLES = {
    "monai": KeyRenames([("denselayer{}.", "denselayer{}.layers.")]),  # MONAI's _DenseBlock
    "mmpretrain": KeyRenames([("denselayer{}.", "block.{}.")], library_offset=-1),
}


def _rename_layer_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook of ``use_layer_keys``: the block's keys under ``prefix`` in its
    layer key style. The block's entries are the last ones written, so popping and re-adding
    them keeps the order of every key. Only for a block with a style: the block it replaced
    shares its hook dicts (convert keeps their handles working) and names its keys itself."""
    style = getattr(module, "_layer_key_style", None)
    if style is None:
        return
    for key in [key for key in state_dict if key.startswith(prefix)]:
        value = state_dict.pop(key)
        library = LAYER_KEY_STYLES[style].library_key(key[len(prefix) :])
        state_dict[key if library is None else prefix + library] = value


def _report_missing_keys(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook of ``use_layer_keys``: the missing keys of the block's layers
    (named by the layers) in the block's layer key style, as the state_dict names them."""
    style = getattr(module, "_layer_key_style", None)
    prefix = getattr(module, "_load_prefix", None)
    if style is None or prefix is None:
        return
    names = LAYER_KEY_STYLES[style]
    missing = incompatible_keys.missing_keys
    for i, key in enumerate(missing):
        library = names.library_key(key[len(prefix) :]) if key.startswith(prefix) else None
        if library is not None:
            missing[i] = prefix + library


def register_renaming_hooks(module: nn.Module, saving: Callable, loaded: Callable) -> None:
    """Register ``saving`` (a state_dict post-hook that writes another library's key names)
    and ``loaded`` (a load_state_dict post-hook that reports keys in those names) on
    ``module``, ahead of every other hook (dicts keep insertion order): hooks adopted from the
    module it replaced see the keys they were written for. Registered once: earlier copies
    of the two are removed. Loading renames after the pre-hooks (``rename_loaded_keys``)."""
    for hooks in (module._state_dict_hooks, module._load_state_dict_post_hooks):
        for key in [key for key, hook in hooks.items() if hook in (saving, loaded)]:
            del hooks[key]
    for hooks, ours in (
        (module._state_dict_hooks, module.register_state_dict_post_hook(saving)),
        (module._load_state_dict_post_hooks, module.register_load_state_dict_post_hook(loaded)),
    ):
        hooks.update({key: hooks.pop(key) for key in list(hooks) if key != ours.id})


def rename_loaded_keys(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    own_key: Callable[[str], str | None],
    strict: bool,
    unexpected_keys: list[str],
) -> dict[str, str]:
    """For the ``_load_from_state_dict`` of a module without state of its own whose children
    load another library's keys: rename the keys under ``prefix`` (``own_key``: a key relative
    to the module in the module's own names, or None to leave it) before the children load,
    then make ``nn.Module``'s strict check, keys no child takes, reporting each as given.
    Returns {renamed key: the key as given}."""
    given = {}
    for key in [key for key in state_dict if key.startswith(prefix)]:
        own = own_key(key[len(prefix) :])
        if own is not None:
            state_dict[prefix + own] = state_dict.pop(key)
            given[prefix + own] = key
    if strict:

        def unexpected(key: str) -> bool:
            head, dot, _ = key[len(prefix) :].partition(".")
            return key != prefix + "_extra_state" and (not dot or head not in module._modules)

        unexpected_keys.extend(
            given.get(key, key) for key in state_dict if key.startswith(prefix) and unexpected(key)
        )
    return given


class EfficientDenseBlock(NotScriptable, nn.ModuleDict):
    """A DenseNet dense block over one shared, preallocated feature buffer.

    Args:
        num_layers: number of dense layers ``L``.
        num_input_features: input channels ``C0``.
        growth_rate: channels added per layer ``k``.
        bn_size: bottleneck factor (1x1 conv to ``bn_size*k`` channels); ``None`` or 0 for
            the plain BN-ReLU-Conv3x3 layer.
        drop_rate: dropout on each layer's new features during training.
        memory: ``"bottleneck"`` keeps each layer's conv1 output for backward (5k channels
            per layer held); ``"min"`` recomputes it (k channels per layer held). Default:
            ``"min"`` with ``memory_efficient=True``, else ``"bottleneck"``.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"``.
        memory_efficient: torchvision's flag (its block checkpoints each bottleneck when set),
            accepted so that code written for ``_DenseBlock`` builds this block unchanged:
            torchvision's ``DenseNet`` passes every argument by keyword. ``True`` asks for the
            least memory, so it selects ``memory="min"`` when ``memory`` is not given; this
            block never checkpoints.

    Attribute ``stats_sync`` (default None) may hold a ``dense_ext.backends.base.StatsSync``
    that combines batch statistics across processes (synchronised BN).

    ``forward(x)`` maps ``[N, C0, H, W]`` to ``[N, C0 + L*k, H, W]`` and returns the shared
    buffer itself, in channels_last layout. Parameter and buffer names are torchvision's
    (``denselayer1.norm1.weight`` ...), so ``_DenseBlock`` state_dicts load unchanged.

    The argument order is not torchvision's: its (private) ``_DenseBlock`` and timm's
    ``DenseBlock`` take ``bn_size`` before ``growth_rate``. Code ported from either should pass
    them by keyword, as torchvision's own ``DenseNet`` does (or use ``dense_ext.convert``,
    which reads them from the modules).
    """

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        growth_rate: int,
        bn_size: int | None = 4,
        drop_rate: float = 0.0,
        memory: str | None = None,
        backend: str = "auto",
        *,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if memory is None:
            memory = "min" if memory_efficient else "bottleneck"
        self.spec = BlockSpec(
            num_layers=num_layers,
            num_input_features=num_input_features,
            growth_rate=growth_rate,
            bottleneck_factor=bn_size or 0,
            memory=memory,
        )
        if not 0.0 <= float(drop_rate) <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        self.backend = backend
        self.stats_sync = None
        for i in range(num_layers):
            layer = EfficientDenseLayer(
                self.spec.in_channels(i), growth_rate, self.spec.bottleneck_factor, drop_rate
            )
            self.add_module(f"denselayer{i + 1}", layer)

    @property
    def backend(self) -> str:
        """The backend name: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"`` (checked
        when set; availability is checked at the first forward on a device)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        check_backend_name(name)
        self._backend = name

    @property
    def memory(self) -> str:
        return self.spec.memory

    @memory.setter
    def memory(self, value: str) -> None:
        self.spec = BlockSpec(**{**self.spec.__dict__, "memory": value})

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"num_layers={s.num_layers}, num_input_features={s.num_input_features}, "
            f"growth_rate={s.growth_rate}, bn_size={s.bottleneck_factor or None}, "
            f"drop_rate={self.denselayer1.drop_rate}, memory={s.memory!r}, "
            f"backend={self.backend!r}"
        )

    def layers(self) -> list[EfficientDenseLayer]:
        return list(self.values())

    # Set by use_layer_keys: a key of LAYER_KEY_STYLES, or None for the block's own names.
    _layer_key_style: str | None = None

    def use_layer_keys(self, style: str) -> None:
        """Name this block's state_dict entries as another library's dense block does, when
        saving and when loading; parameter names stay the block's own. ``style`` is
        ``"monai"`` (MONAI's ``_DenseBlock``: each layer's modules one level down,
        ``denselayer1.layers.norm1.weight``) or ``"mmpretrain"`` (mmpretrain's ``DenseBlock``:
        a list of layers, ``block.0.norm1.weight``). ``dense_ext.convert`` calls it for those
        libraries' blocks, so that their checkpoints load both ways."""
        if style not in LAYER_KEY_STYLES:
            raise ValueError(f"unknown layer key style {style!r}; known: {list(LAYER_KEY_STYLES)}")
        if self._layer_key_style is not None:
            if self._layer_key_style != style:
                raise ValueError(
                    f"this block already names its keys as {self._layer_key_style!r} does"
                )
            return
        self._layer_key_style = style
        register_renaming_hooks(self, _rename_layer_keys, _report_missing_keys)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        style = self._layer_key_style
        # With a style, the unexpected keys are looked for after renaming (the block has no
        # state of its own, so the pre-hooks are all the base class does besides that check).
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict and style is None,
            missing_keys,
            unexpected_keys,
            errors,
        )
        if style is None:
            return
        self._load_prefix = prefix  # for _report_missing_keys
        own_key = LAYER_KEY_STYLES[style].own_key
        rename_loaded_keys(self, state_dict, prefix, own_key, strict, unexpected_keys)

    def structure_reason(self) -> str | None:
        """Why the fused path cannot compute this block from its layers' parameters (each
        layer's ``mismatch``, against this block's spec), or None."""
        spec = self.spec
        k, mid = spec.growth_rate, spec.mid_channels
        for i, layer in enumerate(self.values()):
            reason = layer.mismatch(spec.in_channels(i), k, mid if spec.has_bottleneck else 0)
            if reason is not None:
                return f"denselayer{i + 1}: {reason}"
        return None

    def forward(self, x: Tensor) -> Tensor:
        reason = unfused_reason(self)
        if reason is not None:
            return self._forward_unfused(x, reason)
        self._check_input(x)
        dtype = _compute_dtype(x)
        call = self._block_call(x)
        params = self._flat_params(x, dtype)
        call.save = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in params)
        )
        return DenseBlockFunction.apply(x.to(dtype), call, *params)

    def _forward_unfused(self, x: Tensor, reason: str) -> Tensor:
        """torchvision's ``_DenseBlock.forward``: each layer called on the list of features."""
        if self.stats_sync is not None:
            raise RuntimeError(
                f"EfficientDenseBlock: synchronised batch norm (stats_sync) is not available "
                f"when the block runs its layers one by one ({reason})"
            )
        features = [x]
        for layer in self.layers():
            features.append(layer(features))
        return torch.cat(features, 1)

    def _block_call(self, x: Tensor) -> BlockCall:
        """This call's decisions, read from each BN and layer as torchvision's modules would
        read them at forward time (each BN's own train/eval flag, momentum, eps; each layer's
        own drop_rate and training flag)."""
        layers = self.layers()
        bns = [bn for layer in layers for bn in layer.norms()]
        norms = [module_norm_call(bn, count=False) for bn in bns]
        advance_batch_counters(bns)
        batch_stats = any(norm.batch_stats for norm in norms)
        if batch_stats:
            _check_batch_size(x)
        # nn.SyncBatchNorm merges statistics only in training mode; evaluation with batch
        # statistics (no running statistics) stays local. The hook is per block: with some BNs
        # training and others evaluating on batch statistics, all of them are merged.
        synced = self.stats_sync is not None and any(
            bn.training for layer in layers for bn in layer.norms()
        )
        # Meta tensors carry shapes only: the pure-PyTorch backend propagates them.
        backend = "reference" if x.device.type == "meta" else self.backend
        return BlockCall(
            spec=self.spec,
            backend=get_backend(backend, x.device),
            norms=norms,
            drop_rates=[_drop_rate(layer) for layer in layers],
            sync=self.stats_sync if synced and batch_stats else LOCAL,
        )

    def _flat_params(self, x: Tensor, dtype: torch.dtype) -> list[Tensor]:
        params: list[Tensor] = []
        for layer in self.layers():
            for bn, conv in zip(layer.norms(), layer.convs()):
                params += [*_affine(bn, x.device), _weight(conv, dtype, x)]
        return params

    def _check_input(self, x: Tensor) -> None:
        s = self.spec
        check_input(x, s.num_input_features, "EfficientDenseBlock", self.denselayer1.conv1.weight)


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for types without autocast: meta)."""
    return autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The buffer dtype: autocast's when autocast is on for this device, else the input's."""
    if _autocast_enabled(x.device.type) and x.dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _drop_rate(layer: EfficientDenseLayer) -> float:
    """The layer's dropout probability in this call, as torchvision's layer applies it:
    ``F.dropout(new, p=layer.drop_rate, training=layer.training)``."""
    p = float(layer.drop_rate)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return p if layer.training else 0.0


def _check_batch_size(x: Tensor) -> None:
    if x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise DenseInputError(
            "Expected more than 1 value per channel when training, got input size "
            f"{list(x.shape)}: batch statistics need N*H*W > 1"
        )


def _affine(bn: nn.BatchNorm2d, device: torch.device) -> list[Tensor]:
    """gamma and beta of a BN; constants 1 and 0 when it has no affine parameters."""
    # A BN registers both (None when not affine): read them from the dict, not through
    # Module.__getattr__ (host time per layer); FrozenBatchNorm2d keeps them as buffers.
    params = bn._parameters
    if "weight" in params:
        weight, bias = params["weight"], params["bias"]
    else:
        weight, bias = bn.weight, bn.bias
    if weight is not None:
        assert isinstance(bias, Tensor), f"{type(bn).__name__} has a weight but no bias"
        return [weight, bias]
    ones = torch.ones(bn.num_features, device=device)
    return [ones, torch.zeros_like(ones)]


def _weight(conv: nn.Conv2d, dtype: torch.dtype, x: Tensor) -> Tensor:
    weight = conv._parameters["weight"]
    assert weight is not None, "a convolution of a dense layer without a weight"
    if weight.dtype == dtype:
        return weight
    if _autocast_enabled(x.device.type):
        return weight.to(dtype)
    raise DenseDtypeError(
        f"EfficientDenseBlock: input dtype {x.dtype} does not match parameter dtype "
        f"{weight.dtype}; convert the module (e.g. .to({x.dtype})) or use torch.autocast"
    )


# ----------------------------------------------------------------------------- fused or not


def norm_kind(norm: nn.Module) -> str | None:
    """How the fused kernels can model ``norm`` (a BN followed by a ReLU), or None.

    ``"batch_norm"``: exactly ``nn.BatchNorm2d`` or ``dense_ext.sync_bn.SyncBatchNorm`` (the
    ReLU is a separate module);
    ``"batch_norm_relu"``: timm's ``BatchNormAct2d`` with a ReLU and no dropout (its forward is
    ``nn.BatchNorm2d``'s, then the ReLU); ``"frozen"``: torchvision's ``FrozenBatchNorm2d``
    (running statistics and affine constants in buffers, never updated, no gradients).
    Recognised by type and structure: neither timm nor torchvision is imported. A BN with a
    weight but no bias (or the reverse) is none of them: the kernels take both or neither.
    """
    cls = type(norm)
    params = norm._parameters
    if (params.get("weight") is None) != (params.get("bias") is None):
        return None  # a weight without a bias (or the reverse): valid for BN, not modelled
    if cls is nn.BatchNorm2d:
        return "batch_norm"
    if cls.__name__ == "SyncBatchNorm" and cls.__module__ == "dense_ext.sync_bn":
        # nn.BatchNorm2d's rules with statistics merged through its stats_sync, which the
        # fused modules read (dense_ext.sync_bn; importing it here would be circular).
        return "batch_norm"
    if cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm."):
        act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
        if type(act) is nn.ReLU and type(drop) is nn.Identity:
            return "batch_norm_relu"
        return None
    if cls.__name__ == "FrozenBatchNorm2d" and cls.__module__.startswith("torchvision."):
        return "frozen"
    return None


def norm_channels(norm: nn.Module) -> int:
    """Channels ``norm`` normalises (``FrozenBatchNorm2d`` has no ``num_features``)."""
    if hasattr(norm, "num_features"):
        return int(norm.num_features)
    weight = norm.weight
    assert isinstance(weight, Tensor), f"{type(norm).__name__} has no weight tensor"
    return int(weight.shape[0])


def _position_reason(
    modules: dict[str, nn.Module], n: int, kernel: int, channels: int, out_channels: int
) -> str | None:
    """Why a dense layer's ``norm{n}``-``relu{n}``-``conv{n}`` is not what the fused kernels
    compute for ``channels`` inputs and ``out_channels`` outputs, or None."""
    norm_name, relu_name, conv_name = _POSITIONS[n]
    norm = modules.get(norm_name)
    if norm is None or norm_kind(norm) is None:
        return f"{norm_name} is a {type(norm).__name__}, not a batch norm the kernels model"
    reason = relu_mismatch(modules.get(relu_name), norm)
    if reason is not None:
        return f"{relu_name} {reason}"
    conv = modules.get(conv_name)
    reason = conv_mismatch(conv, kernel)
    if reason is not None:
        return f"{conv_name} {reason}"
    if not channels_match(norm, conv, channels, out_channels):
        return f"{norm_name} or {conv_name} has other channels than the block's spec"
    return None


_POSITIONS = {n: (f"norm{n}", f"relu{n}", f"conv{n}") for n in (1, 2)}


def channels_match(norm: nn.Module, conv: nn.Module, channels: int, out_channels: int) -> bool:
    """Whether ``norm`` normalises ``channels`` channels and ``conv`` maps them to
    ``out_channels``, as far as they say (a BN without parameters or buffers takes any; a
    conv without a plain weight parameter, a parametrized one, is the structure check's)."""
    tensor = norm._parameters.get("weight")
    if tensor is None:
        tensor = norm._buffers.get("running_mean")
    if tensor is not None and tensor.shape[0] != channels:
        return False
    weight = conv._parameters.get("weight")
    return weight is None or (weight.shape[0] == out_channels and weight.shape[1] == channels)


def relu_mismatch(relu: nn.Module | None, norm: nn.Module) -> str | None:
    """Why ``relu``, after ``norm``, is not the ReLU the fused kernels apply, or None: it must be
    an ``nn.ReLU``, or an ``nn.Identity`` after a BN that applies the ReLU itself (timm's)."""
    if type(relu) is nn.ReLU:
        return None
    if type(relu) is nn.Identity and norm_kind(norm) == "batch_norm_relu":
        return None
    return f"is a {type(relu).__name__}, not a ReLU"


def conv_mismatch(
    conv: nn.Module | None, kernel: int, stride: int = 1, *, weight_only: bool = True
) -> str | None:
    """Why ``conv`` is not the ``kernel`` x ``kernel`` convolution (stride ``stride``, padding
    ``kernel // 2``, dense, zero-padded) a fused path computes, or None. ``weight_only``: the
    path reads the weight alone, so a bias must be absent too (a module the fused path calls
    itself may have one, and any groups or dilation when it is 1x1)."""
    if type(conv) is not nn.Conv2d:  # a parametrized (weight_norm...) conv is another type
        return f"is a {type(conv).__name__}, not an nn.Conv2d"
    expected = ((kernel, kernel), (stride, stride), (kernel // 2, kernel // 2))
    geometry = (conv.kernel_size, conv.stride, conv.padding)
    if geometry != expected:
        return f"has kernel, stride, padding {geometry}, not {expected}"
    if (weight_only or kernel != 1) and (
        conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"
    ):
        return "is dilated, grouped or not zero-padded"
    if weight_only and conv._parameters.get("bias") is not None:
        return "has a bias"
    return None


def module_norm_call(norm: nn.Module, count: bool = True) -> NormCall:
    """``norm``'s decisions for one call (``dense_ext.norm.norm_call``, ``count`` as there); a
    ``FrozenBatchNorm2d`` always normalises with its running statistics and updates nothing."""
    if norm_kind(norm) == "frozen":
        return NormCall(
            eps=float(norm.eps),
            batch_stats=False,
            running_mean=norm.running_mean,
            running_var=norm.running_var,
        )
    return norm_call(norm, count)


_FUSABLE_TYPES = (nn.Conv2d, nn.ReLU, nn.AvgPool2d, nn.Identity)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre) or backward (pre) hooks of its own."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def is_intercepted(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's forward: hooks of its own, or a
    forward replaced on the instance (HF accelerate's offload hooks do that). A fused path
    that skips such a module's call must not skip it."""
    return has_hooks(module) or "forward" in module.__dict__


def unfused_reason(
    module: nn.Module, called: bool = True, fusable: Callable[[nn.Module], bool] | None = None
) -> str | None:
    """Why ``module`` must call its submodules one by one rather than run fused, or None (see
    the module docstring). Hooks on ``module`` itself count only when it is not ``called``
    (a norm whose forward the fused head replaces); a called module's hooks fire either way.
    ``fusable`` says which submodules the fused path models (default: a dense block's); a
    ``module`` whose class defines ``structure_reason`` (a dense block, a transition, the
    DelugeNet modules) also says what its positions, and those of the modules inside it,
    must hold."""
    fusable = fusable or _fusable
    if is_exporting():
        return "torch.export"
    if not torch.compiler.is_compiling():
        if torch.jit.is_tracing():
            return "torch.jit.trace"
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return "torch.fx symbolic tracing"
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return "a torch.func transform"
    nn_module = torch.nn.modules.module
    if (
        nn_module._global_forward_hooks
        or nn_module._global_forward_pre_hooks
        or nn_module._global_backward_hooks
        or nn_module._global_backward_pre_hooks
    ):
        return "a global module hook"
    structure_reason = getattr(type(module), "structure_reason", None)
    if structure_reason is not None:  # it covers the modules inside (a block's layers)
        reason = structure_reason(module)
        if reason is not None:
            return reason
    for child in _submodules(module):
        if child is module and called:
            continue
        if has_hooks(child):
            return f"a hook on {_module_name(module, child)}"
        if "forward" in child.__dict__:  # patched on the instance (accelerate's offload hooks)
            return f"{_module_name(module, child)}'s forward is replaced"
        if not fusable(child):
            return f"{_module_name(module, child)} is a {type(child).__name__}"
    return None


def _submodules(module: nn.Module) -> list[nn.Module]:
    """``module`` and its submodules, each once (``module.modules()``'s set, without building
    the names: this runs on every forward)."""
    seen = {id(module)}
    found = [module]
    for parent in found:  # grows while it is walked
        for child in parent._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


def _module_name(root: nn.Module, child: nn.Module) -> str:
    """``child``'s qualified name in ``root`` (the class name for ``root`` itself)."""
    for name, candidate in root.named_modules():
        if candidate is child:
            return name or type(root).__name__
    return type(child).__name__


def _fusable(child: nn.Module) -> bool:
    if isinstance(child, EfficientDenseLayer):
        return True
    if type(child) in _FUSABLE_TYPES:
        return True
    return norm_kind(child) is not None
