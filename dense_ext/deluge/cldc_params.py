"""The parameters and buffers of a cross-layer depthwise convolution, shared by the naive CLDC
(``python_models.delugenet.CrossLayerDepthwiseConv``) and the efficient one
(``dense_ext.deluge.modules.EfficientCLDC``), so their state_dicts are the same by construction.
"""

from __future__ import annotations

import torch
from torch import nn


class CLDCParameters(nn.Module):
    """CLDC(C, S): ``S`` batch norms over ``C`` channels (one per input slot), summed.

    Parameters ``weight`` and ``bias`` are [C, S] (the per-slot affine maps; ``weight`` starts
    at ``1/S``, so the sum starts as a mean); with ``track_running_stats`` the buffers
    ``running_mean``, ``running_var`` ([C, S]) and ``num_batches_tracked`` follow
    ``nn.BatchNorm2d``'s, else they are None. ``eps``, ``momentum`` and ``track_running_stats``
    are read at forward time, as ``nn.BatchNorm2d`` reads them. Subclasses define ``forward``.
    """

    def __init__(
        self,
        channels: int,
        num_inputs: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if channels < 1 or num_inputs < 1:
            raise ValueError(f"CLDC needs channels, num_inputs >= 1, got {channels}, {num_inputs}")
        self.channels = channels
        self.num_inputs = num_inputs
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.full((channels, num_inputs), 1.0 / num_inputs))
        self.bias = nn.Parameter(torch.zeros(channels, num_inputs))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(channels, num_inputs))
            self.register_buffer("running_var", torch.ones(channels, num_inputs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, num_inputs={self.num_inputs}, eps={self.eps}, "
            f"momentum={self.momentum}, track_running_stats={self.track_running_stats}"
        )
