"""The static shape of a dense block, shared by the Function and every backend.

A dense block with ``L`` layers, ``C0`` input channels and growth rate ``k`` writes its
features into one buffer of ``C0 + L*k`` channels. Layer ``l`` (0-based) reads the channel
prefix ``[0, C0 + l*k)`` and writes ``[C0 + l*k, C0 + (l+1)*k)``.

Parameters are passed to backends as one flat tuple, layer after layer:

* bottleneck layer (``bottleneck_factor > 0``): ``norm1.weight, norm1.bias,
  conv1.weight [bottleneck_factor*k, C_in, 1, 1], norm2.weight, norm2.bias,
  conv2.weight [k, bottleneck_factor*k, 3, 3]``;
* plain layer (``bottleneck_factor == 0``): ``norm1.weight, norm1.bias,
  conv1.weight [k, C_in, 3, 3]``.

Batch-norm constants (``eps``) and running buffers follow the same order, one entry per BN.

Names: inside dense_ext ``bn`` means batch norm only. torchvision's ``bn_size`` (the
bottleneck factor) stays the keyword of the public modules (``EfficientDenseBlock``,
``DenseNet``); here it is ``bottleneck_factor``. ``has_bottleneck`` says what the layers
are (DenseNet-BC), ``saves_bottleneck_outputs`` what ``memory="bottleneck"`` keeps for
backward.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

MEMORY_MODES = ("bottleneck", "min")


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"BlockSpec.{old} is deprecated; use BlockSpec.{new}", DeprecationWarning, stacklevel=3
    )


@dataclass(frozen=True, init=False)
class BlockSpec:
    """Static configuration of a dense block.

    Attributes:
        num_layers: number of dense layers ``L``.
        num_input_features: channels of the block input ``C0``.
        growth_rate: channels each layer adds ``k``.
        bottleneck_factor: the 1x1 convolution has ``bottleneck_factor * k`` outputs
            (torchvision's ``bn_size``); ``0`` selects the plain layer BN-ReLU-Conv3x3.
        memory: ``"bottleneck"`` saves each layer's bottleneck (1x1-conv) output for
            backward, ``"min"`` recomputes it (only the feature buffer is held).

    ``BlockSpec(..., bn_size=n)`` and ``spec.bn_size`` still work, with a DeprecationWarning.
    """

    num_layers: int
    num_input_features: int
    growth_rate: int
    bottleneck_factor: int = 4
    memory: str = "bottleneck"

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        growth_rate: int,
        bottleneck_factor: int = 4,
        memory: str = "bottleneck",
        *,
        bn_size: int | None = None,
    ) -> None:
        if bn_size is not None:
            _deprecated("bn_size", "bottleneck_factor")
            bottleneck_factor = bn_size
        for name, value in (
            ("num_layers", num_layers),
            ("num_input_features", num_input_features),
            ("growth_rate", growth_rate),
            ("bottleneck_factor", bottleneck_factor),
            ("memory", memory),
        ):
            object.__setattr__(self, name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_input_features", "growth_rate"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        factor = self.bottleneck_factor
        if not isinstance(factor, int) or factor < 0:
            raise ValueError(
                f"bn_size (the bottleneck factor) must be None, 0 or a positive integer, "
                f"got {factor!r}"
            )
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")

    @property
    def has_bottleneck(self) -> bool:
        """Whether layers are BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 (DenseNet-BC) rather than plain."""
        return self.bottleneck_factor > 0

    @property
    def mid_channels(self) -> int:
        """Channels of the bottleneck (conv1 output); 0 for plain layers."""
        return self.bottleneck_factor * self.growth_rate

    @property
    def num_features(self) -> int:
        """Channels of the block output ``C0 + L*k``."""
        return self.num_input_features + self.num_layers * self.growth_rate

    @property
    def params_per_layer(self) -> int:
        """Entries of the flat parameter tuple per layer."""
        return 6 if self.has_bottleneck else 3

    @property
    def bns_per_layer(self) -> int:
        """Batch norms per layer."""
        return 2 if self.has_bottleneck else 1

    @property
    def saves_bottleneck_outputs(self) -> bool:
        """Whether forward saves each layer's conv1 output for backward (``memory="bottleneck"``
        on bottleneck layers)."""
        return self.has_bottleneck and self.memory == "bottleneck"

    def __setstate__(self, state: dict) -> None:
        # A spec pickled before the rename (a whole model saved with torch.save) holds bn_size.
        state = dict(state)
        if "bn_size" in state:
            state["bottleneck_factor"] = state.pop("bn_size")
        self.__dict__.update(state)

    @property
    def bn_size(self) -> int:
        """Deprecated: ``bottleneck_factor``."""
        _deprecated("bn_size", "bottleneck_factor")
        return self.bottleneck_factor

    @property
    def bottleneck(self) -> bool:
        """Deprecated: ``has_bottleneck``."""
        _deprecated("bottleneck", "has_bottleneck")
        return self.has_bottleneck

    @property
    def keeps_bottleneck(self) -> bool:
        """Deprecated: ``saves_bottleneck_outputs``."""
        _deprecated("keeps_bottleneck", "saves_bottleneck_outputs")
        return self.saves_bottleneck_outputs

    def in_channels(self, layer: int) -> int:
        """Input channels of layer ``layer`` (0-based)."""
        return self.num_input_features + layer * self.growth_rate

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Expected shape of every entry of the flat parameter tuple."""
        shapes: list[tuple[int, ...]] = []
        k, mid = self.growth_rate, self.mid_channels
        for layer in range(self.num_layers):
            c_in = self.in_channels(layer)
            if self.has_bottleneck:
                shapes += [(c_in,), (c_in,), (mid, c_in, 1, 1), (mid,), (mid,), (k, mid, 3, 3)]
            else:
                shapes += [(c_in,), (c_in,), (k, c_in, 3, 3)]
        return shapes
