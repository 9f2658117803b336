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
* or a stage of pytorchcv's DenseNets (``densenet121``, the CIFAR ``densenet40_k12_bc_cifar10``
  and their kin): an ``nn.Sequential`` of an optional transition ``trans<i>`` then ``unit1 ..
  unitL``, each unit a module whose forward concatenates, holding pre-activation blocks of
  exactly ``bn, activ, conv`` (``conv1`` and ``conv2``, or one 3x3 ``conv`` for the plain
  layer) and an optional ``nn.Dropout`` ``dropout`` (the layer's ``drop_rate``). The stage
  becomes a ``ConvertedStage`` holding the transition (converted when it is ``conv`` (``bn,
  activ, conv``) and a 2x2 ``pool``) and the block, saving and loading pytorchcv's keys
  (``stage2.unit1.conv1.bn.weight``, ``stage2.trans2.conv.conv.weight``);
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
converts. Hooks on a layer that is called otherwise than the converted layer (one returning
its input and new features concatenated, one taking the features as separate arguments)
raise ``ValueError``: they would see other tensors.

A model that checkpoints its layers (torchvision's and timm's ``memory_efficient=True``)
recomputes BN1 in backward in training mode, so it updates BN1's running statistics twice per
step; the converted model updates them once, as the model without checkpointing does.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

from dense_ext.block import (
    EfficientDenseBlock,
    KeyRenames,
    is_intercepted,
    norm_channels,
    norm_kind,
    register_renaming_hooks,
    rename_loaded_keys,
)
from dense_ext.transition import EfficientTransition, is_avg_pool_2x2


def convert(
    model: nn.Module,
    memory: str = "bottleneck",
    backend: str = "auto",
    *,
    library_keys: bool = True,
) -> nn.Module:
    """Replace every dense block and transition of ``model`` by its efficient version.

    Args:
        model: a module containing torchvision-structured dense blocks / transitions.
        memory: memory mode of the new ``EfficientDenseBlock``s.
        backend: backend of the new ``EfficientDenseBlock``s.
        library_keys: keep the state_dict keys of MONAI's, mmpretrain's and pytorchcv's
            models (their checkpoints load both ways). ``False`` names every key by its
            module path, as the converted model's parameters are named: what
            ``torch.distributed.checkpoint``'s state_dict API needs (it resolves each key as
            an attribute path and raises ``AttributeError`` on a library's key).

    Returns ``model`` (converted in place); if ``model`` is itself a block or transition,
    the new module is returned instead. One warning names the converted blocks that hold
    modules the fused kernels do not model (a convolution subclass, such as pytorchcv's
    X-DenseNet's masked ``XConv2d``, or a parametrized convolution) or modules with hooks
    (``torch.nn.utils.prune``'s mask): they compute the same, running their layers one by
    one, with no memory saved. Growth rate, bottleneck size and
    dropout rate are inferred from the modules. Raises ValueError if nothing convertible is
    found, or if a block looks like a dense block but cannot be represented (inconsistent
    shapes, a norm the fused block cannot model).
    """
    root = _convert_one(model, memory, backend, library_keys)
    if root is not None:
        return root
    targets = []
    for parent in model.modules():
        for name, child in parent.named_children():
            new = _convert_one(child, memory, backend, library_keys)
            if new is not None:
                targets.append((parent, name, new))
    if not targets:
        raise ValueError(
            f"convert found no torchvision-structured dense block or transition in "
            f"{type(model).__name__} (already converted, not 2-D, or not a DenseNet?)"
        )
    new_modules = [new for _, _, new in targets]
    found = [m for module in (model, *new_modules) for m in module.modules()]
    if not any(isinstance(m, EfficientDenseBlock) for m in found):
        warnings.warn(
            f"dense_ext.convert: {type(model).__name__} has transitions but no dense block that "
            "convert recognises, so only its transitions are converted and its dense blocks "
            "keep their memory cost (convert knows torchvision's, timm's, MONAI's 2-D, "
            "mmpretrain's and pytorchcv's structures: see its documentation)",
            stacklevel=2,
        )
    for parent, name, new in targets:
        setattr(parent, name, new)  # keeps the child's position in an nn.Sequential
    _warn_unfusable_blocks(model, new_modules)
    return model


def _warn_unfusable_blocks(model: nn.Module, new_modules: list[nn.Module]) -> None:
    """One warning naming the converted blocks whose modules the fused kernels cannot model
    (a convolution of a subclass such as pytorchcv's masked ``XConv2d`` or a parametrized
    one) or hold modules with hooks (``torch.nn.utils.prune``'s mask, for one): they compute
    correctly, running their layers one by one, but save no memory."""
    new_ids = {id(m) for new in new_modules for m in new.modules()}
    unfusable = [
        f"{name} ({reason})"
        for name, module in model.named_modules()
        if id(module) in new_ids and isinstance(module, EfficientDenseBlock)
        for reason in [module.structure_reason() or _hooked_inner_module(module)]
        if reason is not None
    ]
    if unfusable:
        warnings.warn(
            f"dense_ext.convert: {len(unfusable)} converted dense block(s) hold modules the "
            "fused kernels do not model, or hooks on their modules, so they run their layers "
            "one by one, with the naive block's memory (results are the same): "
            f"{'; '.join(unfusable)}",
            stacklevel=3,
        )


def _hooked_inner_module(block: nn.Module) -> str | None:
    """Which module inside ``block`` (not the block itself) has hooks or a replaced forward,
    which make the block call its modules one by one while they stay, or None."""
    for name, module in block.named_modules():
        if module is not block and is_intercepted(module):
            return f"{name} has hooks or a replaced forward"
    return None


def _convert_one(
    module: nn.Module, memory: str, backend: str, library_keys: bool
) -> nn.Module | None:
    if isinstance(module, (EfficientDenseBlock, EfficientTransition, ConvertedStage)):
        return None
    if _stage_units(module):
        return _convert_stage(module, memory, backend, library_keys)
    if _is_dense_block(module):
        return _convert_block(module, memory, backend, library_keys)
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
    return _stage_units(block) or list(block.named_children())


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
    convs = _unit_convs(layer)
    if convs is not None:  # pytorchcv: each position a pre-activation block bn, activ, conv
        names = [("norm1", "relu1", "conv1"), ("norm2", "relu2", "conv2")]
        return SimpleNamespace(**{
            name: block._modules[part]
            for block, position in zip(convs, names)
            for name, part in zip(position, _PRE_CONV_PARTS)
        })  # fmt: skip
    parts = layer._modules.get("layers") if _is_nested_layer(layer) else None
    return layer if parts is None else parts


# pytorchcv's pre-activation convolution block (PreConvBlock), its modules in order.
_PRE_CONV_PARTS = ["bn", "activ", "conv"]


def _is_pre_conv(module: nn.Module | None) -> bool:
    return module is not None and list(module._modules) == _PRE_CONV_PARTS


def _unit_convs(unit: nn.Module) -> list[nn.Module] | None:
    """The pre-activation blocks of a pytorchcv dense unit (``DenseUnit``: ``conv1``, ``conv2``;
    ``DenseSimpleUnit``: ``conv``), or None for another module. A unit's own forward adds the
    concatenation (and the optional ``dropout``)."""
    if isinstance(unit, nn.Sequential):
        return None
    names = [name for name in unit._modules if name != "dropout"]
    if names not in (["conv1", "conv2"], ["conv"]):
        return None
    convs = [unit._modules[name] for name in names]
    return convs if all(map(_is_pre_conv, convs)) else None


def _stage_units(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """A pytorchcv DenseNet stage's units with their names, or [] for another module: an
    ``nn.Sequential`` of an optional ``trans<i>`` then ``unit1 .. unitL``, units of one kind
    whose inputs grow by the growth rate from unit to unit (a pre-activation ResNet's stage
    has units too, of one width)."""
    if type(module) is not nn.Sequential:
        return []
    items = list(module._modules.items())
    if items and re.fullmatch(r"trans\d+", items[0][0]):
        items = items[1:]
    if not items or [name for name, _ in items] != [f"unit{i + 1}" for i in range(len(items))]:
        return []
    convs = []
    for _, unit in items:
        unit_convs = _unit_convs(unit)
        if unit_convs is None:
            return []
        convs.append(unit_convs)
    if len({len(c) for c in convs}) != 1:
        return []
    widths = [getattr(c[0].bn, "num_features", None) for c in convs]
    growth = getattr(convs[0][-1].conv, "out_channels", None)
    if not isinstance(widths[0], int) or not isinstance(growth, int):
        return []
    if widths != [widths[0] + i * growth for i in range(len(items))]:
        return []
    return items


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
        if isinstance(block, nn.Sequential):  # chained layers (MONAI's, pytorchcv's units...)
            why = (
                "its forward returns its input and new features concatenated, the converted "
                "layer's only the new features"
            )
            _check_no_hooks(layer, name, why)
        elif _takes_features_as_arguments(layer):  # torchvision 0.3-0.4, gpleiss's
            why = (
                "its forward takes the earlier features as separate arguments, the converted "
                "layer's as one list"
            )
            _check_no_hooks(layer, name, why)
        if _unit_convs(layer) is not None:
            _check_unit(layer, name)
        elif _is_nested_layer(layer):
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


def _takes_features_as_arguments(layer: nn.Module) -> bool:
    """A layer called as ``layer(*features)`` (torchvision 0.3-0.4's ``forward(self,
    *prev_features)``): its hooks see one argument per earlier feature map."""
    parameters = inspect.signature(type(layer).forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)


def _check_unit(unit: nn.Module, name: str) -> None:
    """A pytorchcv unit: ReLU activations, element-wise dropout, and no hooks on the
    pre-activation blocks, which the converted layer does not keep."""
    for part, block in unit._modules.items():
        if part == "dropout":
            if type(block) is not nn.Dropout:
                raise ValueError(
                    f"convert: {name}.dropout is a {type(block).__name__}; a fused dense block "
                    "applies element-wise dropout (nn.Dropout) to each layer's new features"
                )
            _check_no_hooks(block, f"{name}.dropout", "the converted layer applies dropout itself")
            continue
        assert block is not None
        if not isinstance(block.activ, nn.ReLU):
            raise ValueError(
                f"convert: {name}.{part}.activ is a {type(block.activ).__name__}, which a fused "
                "dense layer cannot model: it applies nn.ReLU"
            )
        _check_no_hooks(block, f"{name}.{part}", "the converted layer has no module to keep")


def _holds_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of any kind (``HOOK_ATTRIBUTES``) or a replaced forward."""
    return "forward" in module.__dict__ or any(getattr(module, h, None) for h in HOOK_ATTRIBUTES)


def _check_no_hooks(module: nn.Module, where: str, why: str) -> None:
    """``module`` disappears in the conversion: refuse hooks (or a forward) registered on it."""
    if _holds_hooks(module):
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


def _convert_block(
    block: nn.Module, memory: str, backend: str, library_keys: bool
) -> EfficientDenseBlock:
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
        new_layer.drop_rate = _drop_rate(old_layer)
        new_layer.training = old_layer.training
        _adopt_hooks(old_layer, new_layer)
    new.training = block.training
    if not _stage_units(block):  # a stage's hooks go to the ConvertedStage (_convert_stage)
        _adopt_hooks(block, new)
    if library_keys and _is_listed_block(block):
        new.use_layer_keys("mmpretrain")
    elif library_keys and _is_nested_layer(old_layers[0]):  # then every layer is
        new.use_layer_keys("monai")
    return new


def _drop_rate(layer: nn.Module) -> float:
    """A layer's dropout rate: torchvision's ``drop_rate``, or a pytorchcv unit's ``dropout``."""
    dropout = layer._modules.get("dropout")
    if isinstance(dropout, nn.Dropout) and _unit_convs(layer) is not None:
        return float(dropout.p)
    return float(getattr(layer, "drop_rate", 0.0))


def _convert_stage(
    stage: nn.Sequential, memory: str, backend: str, library_keys: bool
) -> ConvertedStage:
    """A pytorchcv stage as a ``ConvertedStage``: its transition, converted when it can be,
    and its units as one ``EfficientDenseBlock`` named ``block``, under pytorchcv's keys."""
    first = stage._modules.get("unit1")
    assert first is not None
    convs = _unit_convs(first)
    assert convs is not None
    unit = "unit{}.conv1" if len(convs) == 2 else "unit{}.conv"
    renames = [
        ("block.denselayer{}.norm1.", f"{unit}.bn."),
        ("block.denselayer{}.conv1.", f"{unit}.conv."),
    ]
    if len(convs) == 2:
        renames += [
            ("block.denselayer{}.norm2.", "unit{}.conv2.bn."),
            ("block.denselayer{}.conv2.", "unit{}.conv2.conv."),
        ]
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    name, transition = next(iter(stage._modules.items()))
    if name != "unit1":
        assert transition is not None
        new_transition = _convert_stage_transition(transition)
        if new_transition is not None:
            transition = new_transition
            renames += [
                (f"{name}.norm.", f"{name}.conv.bn."),
                (f"{name}.conv.", f"{name}.conv.conv."),
            ]
        modules[name] = transition
    modules["block"] = _convert_block(stage, memory, backend, library_keys)
    new = ConvertedStage(modules, renames if library_keys else [])
    new.training = stage.training
    _adopt_hooks(stage, new)
    new._rename_keys_first()
    return new


def _convert_stage_transition(module: nn.Module) -> EfficientTransition | None:
    """pytorchcv's ``TransitionBlock`` (``conv``: bn, activ, 1x1 conv; ``pool``: 2x2 average)
    as an ``EfficientTransition``, or None when it is another module, or keeps hooks on its
    pre-activation block (which the converted transition would not keep)."""
    if list(module._modules) != ["conv", "pool"] or isinstance(module, nn.Sequential):
        return None
    block, pool = module._modules["conv"], module._modules["pool"]
    if not _is_pre_conv(block) or not is_avg_pool_2x2(pool):
        return None
    assert block is not None and pool is not None
    norm, relu, conv = (block._modules[part] for part in _PRE_CONV_PARTS)
    if norm is None or norm_kind(norm) is None or not isinstance(relu, nn.ReLU):
        return None
    if conv is None or not _is_conv(conv, 1, 0):
        return None
    if _holds_hooks(block):
        return None
    assert isinstance(conv, nn.Conv2d)
    new = EfficientTransition.from_modules(norm, relu, conv, pool)
    new.training = module.training
    _adopt_hooks(module, new)
    return new


class ConvertedStage(nn.Sequential):
    """A stage of another library's DenseNet after ``dense_ext.convert``: the stage's
    transition (if it has one) and its dense layers as one ``EfficientDenseBlock`` named
    ``block``, run in order as an ``nn.Sequential``. Its state_dict keys are the library's
    (pytorchcv: ``unit1.conv1.bn.weight`` for ``block.denselayer1.norm1.weight``), when saving
    and when loading, so the library's checkpoints load into the converted model and the
    converted model's into the library's; missing and unexpected keys are reported in the
    library's names too.

    Args:
        modules: the children, in order.
        key_renames: pairs of key prefixes relative to the stage, (own, library), ``{}``
            standing for a layer's number (the same in both).
    """

    def __init__(
        self, modules: OrderedDict[str, nn.Module], key_renames: Sequence[tuple[str, str]]
    ) -> None:
        super().__init__(modules)
        self.key_renames = KeyRenames(key_renames)
        self._rename_keys_first()

    def _rename_keys_first(self) -> None:
        """Register the renaming hooks ahead of every other (``register_renaming_hooks``):
        hooks adopted from the stage the converted one replaced see the library's keys."""
        register_renaming_hooks(self, _save_library_keys, _report_library_keys)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        # The base class runs the pre-hooks (the stage has no state of its own); its strict
        # check would call every library key unexpected, so it runs after renaming.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, False, missing_keys, unexpected_keys, errors
        )
        own_key = self.key_renames.own_key
        given = rename_loaded_keys(self, state_dict, prefix, own_key, strict, unexpected_keys)
        self._load_prefix, self._load_given = prefix, given


def _save_library_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook of ``ConvertedStage``: its keys in the library's names. The stage's
    entries are the last ones written, so popping and re-adding them keeps the order of every
    key (a pytorchcv stage's order: the transition's, then unit by unit). The stage it replaced
    shares its hook dicts (convert keeps their handles working) and names its keys itself."""
    if not isinstance(module, ConvertedStage):
        return
    for key in [key for key in state_dict if key.startswith(prefix)]:
        library = module.key_renames.library_key(key[len(prefix) :])
        value = state_dict.pop(key)
        state_dict[key if library is None else prefix + library] = value


def _report_library_keys(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook of ``ConvertedStage``: the missing keys of its children, and
    the unexpected keys it renamed, in the library's names."""
    if not isinstance(module, ConvertedStage):
        return
    prefix = getattr(module, "_load_prefix", None)
    given = getattr(module, "_load_given", {})
    if prefix is None:
        return
    missing = incompatible_keys.missing_keys
    for i, key in enumerate(missing):
        if key.startswith(prefix):
            library = module.key_renames.library_key(key[len(prefix) :])
            if library is not None:
                missing[i] = prefix + library
    unexpected = incompatible_keys.unexpected_keys
    unexpected[:] = [given.get(key, key) for key in unexpected]
