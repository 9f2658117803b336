"""The parameters and buffers of a cross-layer depthwise convolution, shared by the naive CLDC
(``python_models.delugenet.CrossLayerDepthwiseConv``) and the efficient one
(``dense_ext.deluge.modules.EfficientCLDC``), so their state_dicts are the same by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dense_ext.tracing import NotScriptable


class CLDCParameters(NotScriptable, nn.Module):
    """CLDC(C, S): ``S`` batch norms over ``C`` channels (one per input slot), summed.

    Parameters ``weight`` and ``bias`` are [C, S] (the per-slot affine maps; ``weight`` starts
    at ``1/S``, so the sum starts as a mean); with ``track_running_stats`` the buffers
    ``running_mean``, ``running_var`` ([C, S]) and ``num_batches_tracked`` follow
    ``nn.BatchNorm2d``'s, else they are None. ``eps``, ``momentum`` and ``track_running_stats``
    are read at forward time, as ``nn.BatchNorm2d`` reads them. Subclasses define ``forward``;
    ``forward_slots`` is the plain-PyTorch formula both can run.
    """

    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

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

    def forward_slots(self, inputs: list[Tensor]) -> Tensor:
        """``sum_i batch_norm_i(inputs[i])``, one ``F.batch_norm`` per [N, C, H, W] input: the
        naive CLDC's forward, and the efficient one's when it runs unfused (hooks, tracing,
        ``torch.func``, export)."""
        if len(inputs) != self.num_inputs:
            raise ValueError(f"CLDC expects {self.num_inputs} inputs, got {len(inputs)}")
        # The choices of nn.BatchNorm2d.forward, once for all S normalisations.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        out: Tensor | None = None
        for i, h in enumerate(inputs):
            # Contiguous columns: torch 2.14's CPU batch-norm backward misreads a strided weight
            # or running statistic when input and gradient are channels_last, and cuDNN updates
            # a contiguous copy of strided running statistics, dropping the update
            # (pytorch/pytorch#33867). Updated copies are written back below (a column that is
            # contiguous already, S = 1, is the buffer itself, updated in place).
            columns = [None if t is None else t[:, i] for t in (running_mean, running_var)]
            mean, var = [None if t is None else t.contiguous() for t in columns]
            y = F.batch_norm(
                h,
                mean,
                var,
                self.weight[:, i].contiguous(),
                self.bias[:, i].contiguous(),
                batch_stats,
                factor,
                self.eps,
            )
            if batch_stats:
                for column, updated in zip(columns, (mean, var)):
                    if column is not None and updated is not None and updated is not column:
                        column.copy_(updated)
            out = y if out is None else out + y
        assert out is not None  # num_inputs >= 1
        return out
