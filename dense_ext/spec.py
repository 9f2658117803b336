"""The static shape of a dense block, shared by the Function and every backend.

A dense block with ``L`` layers, ``C0`` input channels and growth rate ``k`` writes its
features into one buffer of ``C0 + L*k`` channels. Layer ``l`` (0-based) reads the channel
prefix ``[0, C0 + l*k)`` and writes ``[C0 + l*k, C0 + (l+1)*k)``.

Parameters are passed to backends as one flat tuple, layer after layer:

* bottleneck layer (``bn_size > 0``): ``norm1.weight, norm1.bias,
  conv1.weight [bn_size*k, C_in, 1, 1], norm2.weight, norm2.bias,
  conv2.weight [k, bn_size*k, 3, 3]``;
* plain layer (``bn_size == 0``): ``norm1.weight, norm1.bias, conv1.weight [k, C_in, 3, 3]``.

Batch-norm constants (``eps``) and running buffers follow the same order, one entry per BN.
"""

from __future__ import annotations

from dataclasses import dataclass

MEMORY_MODES = ("bottleneck", "min")


@dataclass(frozen=True)
class BlockSpec:
    """Static configuration of a dense block.

    Attributes:
        num_layers: number of dense layers ``L``.
        num_input_features: channels of the block input ``C0``.
        growth_rate: channels each layer adds ``k``.
        bn_size: bottleneck width factor; the 1x1 convolution has ``bn_size * k`` outputs.
            ``0`` selects the plain layer BN-ReLU-Conv3x3.
        memory: ``"bottleneck"`` keeps each layer's 1x1-conv output for backward,
            ``"min"`` recomputes it (only the feature buffer is held).
    """

    num_layers: int
    num_input_features: int
    growth_rate: int
    bn_size: int = 4
    memory: str = "bottleneck"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_input_features", "growth_rate"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.bn_size, int) or self.bn_size < 0:
            raise ValueError(f"bn_size must be None, 0 or a positive integer, got {self.bn_size!r}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")

    @property
    def bottleneck(self) -> bool:
        """Whether layers are BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 (DenseNet-BC) rather than plain."""
        return self.bn_size > 0

    @property
    def mid_channels(self) -> int:
        """Channels of the bottleneck (conv1 output); 0 for plain layers."""
        return self.bn_size * self.growth_rate

    @property
    def num_features(self) -> int:
        """Channels of the block output ``C0 + L*k``."""
        return self.num_input_features + self.num_layers * self.growth_rate

    @property
    def params_per_layer(self) -> int:
        return 6 if self.bottleneck else 3

    @property
    def bns_per_layer(self) -> int:
        return 2 if self.bottleneck else 1

    @property
    def keeps_bottleneck(self) -> bool:
        """Whether forward saves each layer's conv1 output for backward."""
        return self.bottleneck and self.memory == "bottleneck"

    def in_channels(self, layer: int) -> int:
        """Input channels of layer ``layer`` (0-based)."""
        return self.num_input_features + layer * self.growth_rate

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Expected shape of every entry of the flat parameter tuple."""
        shapes: list[tuple[int, ...]] = []
        k, mid = self.growth_rate, self.mid_channels
        for layer in range(self.num_layers):
            c_in = self.in_channels(layer)
            if self.bottleneck:
                shapes += [(c_in,), (c_in,), (mid, c_in, 1, 1), (mid,), (mid,), (k, mid, 3, 3)]
            else:
                shapes += [(c_in,), (c_in,), (k, c_in, 3, 3)]
        return shapes
