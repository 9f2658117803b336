"""The static shape of a DelugeNet stage, shared by the Function and every stage backend.

A stage keeps ``S`` slots of ``C`` channels in one channels_last buffer ``[N, S*C, H, W]``
(physically ``[N*H*W, S*C]`` rows): slot ``i`` is channels ``[i*C, (i+1)*C)``. Slot 0 is the
stage input, copied in once; composite layer ``k`` (``1 <= k < S``) reads slots ``0..k-1``
and writes slot ``k`` in place.

Parameters are passed to backends as one flat tuple, layer after layer (``k = 1 .. S-1``)::

    [cldc.weight [C, k], cldc.bias [C, k]]     (only for k >= 2)
    norm.weight [C], norm.bias [C], conv1.weight [C/2, C, 1, 1],
    norm1.weight [C/2], norm1.bias [C/2], conv2.weight [C/2, C/2, 3, 3],
    norm2.weight [C/2], norm2.bias [C/2], conv3.weight [C, C/2, 1, 1]

Each layer has up to four normalisations, in this order: the CLDC (``k >= 2``; its ``k`` BNs
share one module and so one train/eval flag), ``norm`` (of the CLDC output, or of slot 0 for
``k = 1``), ``norm1`` and ``norm2`` (of the bottleneck convolutions' outputs).
"""

from __future__ import annotations

from dataclasses import dataclass

MEMORY_MODES = ("min", "bottleneck")


@dataclass(frozen=True)
class StageSpec:
    """Static configuration of a DelugeNet stage.

    Attributes:
        channels: channels ``C`` of every slot (even: the bottleneck has ``C/2``).
        num_slots: slots ``S``, slot 0 (the stage input) included; ``S - 1`` composite layers.
        memory: ``"min"`` keeps only the slot buffer for backward and recomputes each layer's
            bottleneck; ``"bottleneck"`` also keeps each layer's 3x3-convolution output
            (``C/2`` channels per layer), so backward skips that convolution.
    """

    channels: int
    num_slots: int
    memory: str = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.channels, int) or self.channels < 2 or self.channels % 2:
            raise ValueError(f"channels must be an even integer >= 2, got {self.channels!r}")
        if not isinstance(self.num_slots, int) or self.num_slots < 1:
            raise ValueError(f"num_slots must be a positive integer, got {self.num_slots!r}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")

    @property
    def mid_channels(self) -> int:
        """Channels of the bottleneck, ``C/2``."""
        return self.channels // 2

    @property
    def num_layers(self) -> int:
        """Composite layers ``S - 1``."""
        return self.num_slots - 1

    @property
    def buffer_channels(self) -> int:
        """Channels of the slot buffer ``S*C``."""
        return self.num_slots * self.channels

    @property
    def keeps_bottleneck(self) -> bool:
        """Whether forward saves each layer's 3x3-convolution output for backward."""
        return self.memory == "bottleneck"

    @staticmethod
    def has_cldc(layer: int) -> bool:
        """Whether composite layer ``layer`` (1-based) starts with a CLDC (``layer >= 2``)."""
        return layer >= 2

    @staticmethod
    def params_per_layer(layer: int) -> int:
        return 11 if layer >= 2 else 9

    def first_param(self, layer: int) -> int:
        """Index in the flat parameter tuple of layer ``layer``'s first parameter."""
        return sum(self.params_per_layer(k) for k in range(1, layer))

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Expected shape of every entry of the flat parameter tuple."""
        c, mid = self.channels, self.mid_channels
        shapes: list[tuple[int, ...]] = []
        for k in range(1, self.num_slots):
            if self.has_cldc(k):
                shapes += [(c, k), (c, k)]
            shapes += [(c,), (c,), (mid, c, 1, 1), (mid,), (mid,), (mid, mid, 3, 3)]
            shapes += [(mid,), (mid,), (c, mid, 1, 1)]
        return shapes
