"""``convert(model)``: swap torchvision-structured dense blocks and transitions in place.

Recognised by structure (duck typing; neither torchvision nor timm is imported):

* a dense block is an ``nn.ModuleDict`` whose children are ``denselayer1 .. denselayerL``,
  each with ``norm1`` and ``conv1`` and, for DenseNet-BC, ``norm2`` and ``conv2``, with the
  shapes of a dense block: torchvision's ``_DenseBlock``, timm's ``DenseBlock`` and
  ``python_models``' naive block;
* or another ``nn.Module`` with those children (torchvision 0.3 and 0.4, whose layers are
  ``nn.Sequential``s of the six modules with a forward of their own);
* or an ``nn.Sequential`` of ``denselayer1 .. denselayerL``, each an ``nn.Sequential`` of
  exactly ``norm1, relu1, conv1, norm2, relu2, conv2`` whose class's forward adds the
  concatenation (torchvision before 0.3, and the many copies of it: torchxrayvision's, for
  one), or each with one child ``layers``, such an ``nn.Sequential`` (MONAI's 2-D
  ``DenseNet``: each layer returns ``cat([x, layers(x)])``). The latter keeps MONAI's
  state_dict keys (``denselayer1.layers.norm1.weight``:
  ``EfficientDenseBlock.use_layer_keys``), so MONAI checkpoints load into the
  converted model and its checkpoints into MONAI's. A
  ``dropout`` in ``layers`` (MONAI's ``dropout_prob > 0``: a ``Dropout2d``, which zeroes whole
  channels) raises ``ValueError``: the fused block drops single values, as torchvision does;
* or a module whose one child ``block`` is an ``nn.ModuleList`` of layers of exactly ``norm1,
  conv1, act, norm2, conv2`` (mmpretrain's ``DenseBlock``: one ``act`` ReLU serves both
  positions of a layer); it keeps mmpretrain's state_dict keys (``block.0.norm1.weight``), as
  MONAI's blocks keep MONAI's;
* a transition is an ``nn.Sequential`` of exactly ``norm``, ``relu`` (``nn.ReLU``), ``conv``
  (bias-free 1x1 ``nn.Conv2d``) and ``pool`` (``nn.AvgPool2d(2)``) (torchvision; mmpretrain
  names the ReLU ``act``), or of ``norm``, ``conv`` and ``pool`` with a norm that applies the
  ReLU itself (timm).

A norm is an ``nn.BatchNorm2d``, timm's ``BatchNormAct2d`` with a ReLU, or torchvision's
``FrozenBatchNorm2d`` (``dense_ext.block.norm_kind``); a dense block with any other norm (a
``SyncBatchNorm``, another activation) raises ``ValueError`` naming it. A transition of another
form (timm's blur-pool transitions) is left as it is.

The new modules reuse the original BN and convolution modules themselves, so every
Parameter and buffer object is kept (an optimizer built before converting keeps working),
with its device, dtype and values; every module's training/eval flag and each layer's
``drop_rate`` are kept too. So are the hooks registered on a replaced block, layer or
transition (module hooks and state_dict hooks; their handles still remove them): timm's
hook-based feature extractor, for one, registers its hooks on the blocks before anyone
converts.

A model that checkpoints its layers (torchvision's and timm's ``memory_efficient=True``)
recomputes BN1 in backward in training mode, so it updates BN1's running statistics twice per
step; the converted model updates them once, as the model without checkpointing does.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
from torch import nn

from dense_ext.block import EfficientDenseBlock, norm_channels, norm_kind
from dense_ext.transition import EfficientTransition, is_avg_pool_2x2


def convert(model: nn.Module, memory: str = "bottleneck", backend: str = "auto") -> nn.Module:
    """Replace every dense block and transition of ``model`` by its efficient version.

    Args:
        model: a module containing torchvision-structured dense blocks / transitions.
        memory: memory mode of the new ``EfficientDenseBlock``s.
        backend: backend of the new ``EfficientDenseBlock``s.

    Returns ``model`` (converted in place); if ``model`` is itself a block or transition,
    the new module is returned instead. Growth rate, bottleneck size and dropout rate are
    inferred from the modules. Raises ValueError if nothing convertible is found, or if a
    block looks like a dense block but cannot be represented (inconsistent shapes, a norm the
    fused block cannot model).
    """
    root = _convert_one(model, memory, backend)
    if root is not None:
        return root
    targets = []
    for parent in model.modules():
        for name, child in parent.named_children():
            new = _convert_one(child, memory, backend)
            if new is not None:
                targets.append((parent, name, new))
    if not targets:
        raise ValueError(
            f"convert found no torchvision-structured dense block or transition in "
            f"{type(model).__name__} (already converted, not 2-D, or not a DenseNet?)"
        )
    new_modules = [new for _, _, new in targets]
    if not any(isinstance(m, EfficientDenseBlock) for m in [*model.modules(), *new_modules]):
        warnings.warn(
            f"dense_ext.convert: {type(model).__name__} has transitions but no dense block that "
            "convert recognises, so only its transitions are converted and its dense blocks "
            "keep their memory cost (convert knows torchvision's, timm's, MONAI's 2-D and "
            "mmpretrain's structures: see its documentation)",
            stacklevel=2,
        )
    for parent, name, new in targets:
        setattr(parent, name, new)  # keeps the child's position in an nn.Sequential
    return model


def _convert_one(module: nn.Module, memory: str, backend: str) -> nn.Module | None:
    if isinstance(module, (EfficientDenseBlock, EfficientTransition)):
        return None
    if _is_dense_block(module):
        return _convert_block(module, memory, backend)
    if _is_transition(module):
        return _convert_transition(module)
    return None


def _is_dense_block(module: nn.Module) -> bool:
    if _is_listed_block(module):
        return True
    layers: list[nn.Module | SimpleNamespace]
    if isinstance(module, nn.ModuleDict):
        layers = list(module.values())
    elif isinstance(module, nn.Sequential):
        if not all(map(_is_chained_layer, module)):
            return False
        if len({_is_nested_layer(layer) for layer in module}) > 1:
            return False  # one block, one layout of its layers' keys
        layers = [_layer_parts(layer) for layer in module]
    else:  # a block whose forward concatenates (torchvision 0.3-0.4: an nn.Module)
        layers = list(module.children())
    names = [name for name, _ in module.named_children()]
    if not layers or names != [f"denselayer{i + 1}" for i in range(len(names))]:
        return False
    return all(
        isinstance(getattr(layer, "norm1", None), nn.Module)
        and isinstance(getattr(layer, "conv1", None), nn.Conv2d)
        for layer in layers
    )


# An mmpretrain DenseLayer's modules, in order: one ReLU module serves both positions.
_LISTED_LAYER_PARTS = ["norm1", "conv1", "act", "norm2", "conv2"]


def _is_listed_block(module: nn.Module) -> bool:
    """mmpretrain's ``DenseBlock``: its one child ``block`` lists the layers, each a module of
    ``_LISTED_LAYER_PARTS`` whose forward takes the list of earlier features."""
    if isinstance(module, (nn.ModuleDict, nn.ModuleList, nn.Sequential)):
        return False
    layers = module._modules.get("block")
    return (
        list(module._modules) == ["block"]
        and isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and all(list(layer._modules) == _LISTED_LAYER_PARTS for layer in layers)
    )


def _named_layers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """A recognised block's layers, each with its name in the block."""
    if _is_listed_block(block):
        return [(f"block.{i}", layer) for i, layer in enumerate(block.block)]
    return list(block.named_children())


def _is_nested_layer(layer: nn.Module) -> bool:
    """A layer that keeps its modules in one ``layers`` Sequential (MONAI's ``_DenseLayer``)."""
    return list(layer._modules) == ["layers"] and isinstance(layer.layers, nn.Sequential)


def _is_chained_layer(layer: nn.Module) -> bool:
    """A layer of a block that chains its layers (an ``nn.Sequential``), so returns its input
    with its new features: MONAI's, or torchvision's before 0.3 (copied by torchxrayvision and
    many research repositories), an ``nn.Sequential`` of the norms, ReLUs and convs whose class
    adds the concatenation (and ``drop_rate``) in its own forward."""
    if _is_nested_layer(layer):
        return True
    return isinstance(layer, nn.Sequential) and type(layer).forward is not nn.Sequential.forward


# A bottleneck layer's modules, in order (torchvision's names).
_LAYER_PARTS = ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]


def _layer_parts(layer: nn.Module) -> nn.Module | SimpleNamespace:
    """What holds a dense layer's norms, ReLUs and convs as attributes of torchvision's names."""
    if list(layer._modules) == _LISTED_LAYER_PARTS:  # mmpretrain: act is relu1 and relu2
        m = layer._modules
        return SimpleNamespace(
            norm1=m["norm1"], relu1=m["act"], conv1=m["conv1"],
            norm2=m["norm2"], relu2=m["act"], conv2=m["conv2"],
        )  # fmt: skip
    parts = layer._modules.get("layers") if _is_nested_layer(layer) else None
    return layer if parts is None else parts


def _is_transition(module: nn.Module) -> bool:
    if not isinstance(module, nn.Sequential):
        return False
    children = dict(module.named_children())
    names = list(children)
    if names in (["norm", "relu", "conv", "pool"], ["norm", "act", "conv", "pool"]):
        norm_ok = norm_kind(children["norm"]) is not None
        relu_ok = isinstance(children[names[1]], nn.ReLU)
    elif list(children) == ["norm", "conv", "pool"]:
        norm_ok = relu_ok = norm_kind(children["norm"]) == "batch_norm_relu"
    else:
        return False
    return (
        norm_ok
        and relu_ok
        and _is_conv(children["conv"], 1, 0)
        and is_avg_pool_2x2(children["pool"])
    )


def _is_conv(conv: nn.Module, kernel: int, padding: int) -> bool:
    """A bias-free, stride-1, dense (ungrouped, undilated) ``kernel`` x ``kernel`` conv."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.bias is None
        and conv.kernel_size == (kernel, kernel)
        and conv.stride == (1, 1)
        and conv.padding == (padding, padding)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _convert_transition(module: nn.Sequential) -> EfficientTransition:
    # mmpretrain names the ReLU act; timm's norm applies it
    relu = module._modules.get("relu") or module._modules.get("act") or nn.ReLU(inplace=True)
    new = EfficientTransition.from_modules(module.norm, relu, module.conv, module.pool)
    new.training = module.training
    _adopt_hooks(module, new)
    return new


# Where nn.Module keeps the hooks registered on a module (torch 2.x); one missing from a
# future torch is skipped, one added there would be lost: tests/test_convert.py lists them.
HOOK_ATTRIBUTES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _adopt_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new`` takes over the hooks registered on ``old``, which it replaces: the same dicts,
    so the handles returned at registration still remove them."""
    for name in HOOK_ATTRIBUTES:
        if name in old.__dict__:
            setattr(new, name, old.__dict__[name])


def _block_shape(block: nn.Module) -> tuple[int, int, int]:
    """(C0, growth rate, bn_size) of a naive block; ValueError if inconsistent."""
    named_layers = _named_layers(block)
    first = _layer_parts(named_layers[0][1])
    c0 = norm_channels(first.norm1)
    bottleneck = hasattr(first, "conv2")
    k = (first.conv2 if bottleneck else first.conv1).out_channels
    mid = first.conv1.out_channels if bottleneck else 0
    if bottleneck and mid % k:
        raise ValueError(f"convert: bottleneck width {mid} is not a multiple of growth rate {k}")
    listed = _is_listed_block(block)
    if listed:
        _check_no_hooks(block.block, "block", "the converted block has no list of layers")
    for i, (name, layer) in enumerate(named_layers):
        act = layer._modules.get("act") if listed else None
        if act is not None and not isinstance(act, nn.ReLU):  # any mmcv activation fits there
            raise ValueError(
                f"convert: {name}.act is a {type(act).__name__}, which a fused dense layer "
                "cannot model: it applies nn.ReLU"
            )
        if _is_nested_layer(layer):
            _check_nested_layer(layer, name)
        elif isinstance(layer, nn.Sequential):  # it runs every module it holds
            _check_layer_modules(layer, name)
        _check_layer(_layer_parts(layer), name, c0 + i * k, k, mid)
    return c0, k, mid // k


def _check_layer_modules(modules: nn.Sequential, where: str) -> None:
    """A Sequential runs every module it holds: they must be those a fused layer models, no
    more."""
    parts = list(modules._modules)
    if "dropout" in parts:
        dropout = modules.dropout
        raise ValueError(
            f"convert: {where}.dropout is a {type(dropout).__name__}"
            f"(p={getattr(dropout, 'p', '?')}); a "
            "fused dense block applies element-wise dropout to each layer's new features (as "
            "torchvision's drop_rate does), not channel dropout. Build the model without "
            "dropout (MONAI: dropout_prob=0) to convert it."
        )
    if parts != _LAYER_PARTS:
        raise ValueError(
            f"convert: {where} holds {parts}; a fused dense layer models exactly {_LAYER_PARTS}"
        )


def _check_nested_layer(layer: nn.Module, name: str) -> None:
    """A nested layer's ``layers``: the modules a fused layer models, and nothing the converted
    layer could not keep."""
    _check_layer_modules(layer.layers, f"{name}.layers")
    _check_no_hooks(layer.layers, f"{name}.layers", "the converted layer has no module to keep")


def _check_no_hooks(module: nn.Module, where: str, why: str) -> None:
    """``module`` disappears in the conversion: refuse hooks (or a forward) registered on it."""
    if "forward" in module.__dict__ or any(getattr(module, h, None) for h in HOOK_ATTRIBUTES):
        raise ValueError(
            f"convert: {where} has hooks (or a replaced forward), which {why}; register them "
            "on the layers or their modules instead"
        )


def _check_layer(layer: nn.Module, name: str, c_in: int, k: int, mid: int) -> None:
    norms = [layer.norm1] + ([getattr(layer, "norm2", None)] if mid else [])
    for norm_name, norm in zip(("norm1", "norm2"), norms):
        if norm is not None and norm_kind(norm) is None:
            raise ValueError(
                f"convert: {name}.{norm_name} is a {type(norm).__name__}, which a fused dense "
                "block cannot model; it fuses nn.BatchNorm2d, timm's BatchNormAct2d with a ReLU "
                "and torchvision's FrozenBatchNorm2d. (For synchronised BN, convert first, then "
                "use dense_ext.distributed.enable_sync_bn.)"
            )
    if mid:
        ok = (
            _is_conv(layer.conv1, 1, 0)
            and _is_conv(getattr(layer, "conv2", None), 3, 1)
            and layer.conv1.weight.shape == (mid, c_in, 1, 1)
            and layer.conv2.weight.shape == (k, mid, 3, 3)
        )
    else:
        ok = (
            not hasattr(layer, "conv2")
            and _is_conv(layer.conv1, 3, 1)
            and layer.conv1.weight.shape == (k, c_in, 3, 3)
        )
    relu_names = ("relu1", "relu2") if mid else ("relu1",)
    relus = [getattr(layer, name, nn.ReLU()) for name in relu_names]
    ok = ok and all(isinstance(relu, nn.ReLU) for relu in relus)
    ok = ok and [norm_channels(bn) for bn in norms] == [c_in] + ([mid] if mid else [])
    if not ok:
        raise ValueError(
            f"convert: {name} does not have the shape of a dense layer with "
            f"{c_in} inputs, growth rate {k} and bottleneck width {mid}"
        )


def _convert_block(block: nn.Module, memory: str, backend: str) -> EfficientDenseBlock:
    c0, k, bn_size = _block_shape(block)
    # Built on the meta device: its own parameters are placeholders, replaced just below.
    old_layers = [layer for _, layer in _named_layers(block)]
    with torch.device("meta"):
        new = EfficientDenseBlock(
            len(old_layers), c0, k, bn_size or None, memory=memory, backend=backend
        )
    for old_layer, new_layer in zip(old_layers, new.values()):
        parts = _layer_parts(old_layer)
        for name in _LAYER_PARTS:
            # A missing ReLU module (a functional ReLU in forward) keeps the new one.
            if hasattr(new_layer, name) and hasattr(parts, name):
                setattr(new_layer, name, getattr(parts, name))
        # Each layer keeps its own dropout rate and train/eval flag (the BNs, reused, keep theirs).
        new_layer.drop_rate = float(getattr(old_layer, "drop_rate", 0.0))
        new_layer.training = old_layer.training
        _adopt_hooks(old_layer, new_layer)
    new.training = block.training
    _adopt_hooks(block, new)
    if _is_listed_block(block):
        new.use_layer_keys("mmpretrain")
    elif _is_nested_layer(old_layers[0]):  # then every layer is (_is_dense_block)
        new.use_layer_keys("monai")
    return new
