"""The contract every backend implements: a whole dense block, forward and backward.

The autograd Function (``dense_ext.function``) owns everything that is the same for all
backends: input checks, running-statistics updates, saving tensors, the gradient buffer.
A backend owns the arithmetic of the layer loop.

Forward receives
    x        [N, C0, H, W] input (any memory format), dtype = buffer dtype;
    params   flat parameter tuple in the order of ``dense_ext.spec``;
    running  flat tuple ``(running_mean, running_var)`` per BN (same order as the BNs), used
             only when ``batch_stats`` is False (eval mode with tracked statistics);
    eps      one float per BN;
    spec     the BlockSpec; ``spec.drop_rate`` is already 0 outside training;
    batch_stats  normalise with batch statistics (training, or no running statistics);
    save     whether backward will run (if False, save nothing).
and returns ``(feat, state)``: ``feat`` is the [N, C_total, H, W] channels_last buffer and
``state`` a ``ForwardState``.

Backward receives ``grad_feat``, a fresh channels_last buffer holding the output gradient,
which the backend may overwrite; it accumulates every layer's input gradient into
``grad_feat[:, :C_in]`` so that on return ``grad_feat[:, :C0]`` is the input gradient. It
returns one gradient per entry of ``params`` (``None`` where not needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dense_ext.spec import BlockSpec


@dataclass
class ForwardState:
    """What forward leaves for backward, besides the feature buffer.

    Attributes:
        stats1: ``[2, C_total]`` batch mean and biased variance of every buffer channel
            (float32, float64 for float64 buffers); empty without batch statistics.
        stats2: ``[L, 2, bn_size*k]`` the same for each layer's bottleneck; empty when not
            used.
        bottlenecks: each layer's conv1 output (``memory="bottleneck"``), else empty.
        dropout: backend-specific information to replay the dropout masks exactly.
    """

    stats1: Tensor
    stats2: Tensor
    bottlenecks: list[Tensor] = field(default_factory=list)
    dropout: Any = None

    def tensors(self) -> list[Tensor]:
        return [self.stats1, self.stats2, *self.bottlenecks]


class StatsSync:
    """How batch statistics combine across processes; this base class is local (no sync).

    Synchronised BN (``dense_ext.distributed``) overrides the three methods with collectives:
    forward statistics become those of the global batch, and the two BN-backward reductions
    are summed over processes (parameter gradients stay local, as in ``nn.SyncBatchNorm``).
    """

    def world_count(self, count: int) -> int:
        """Values per channel in the global batch, given ``count`` locally."""
        return count

    def stats(self, mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """Global mean and biased variance from this process's ``count``-value statistics."""
        return mean, var

    def grad_sums(self, sums: Tensor) -> Tensor:
        """``[2, C]`` sums of ``g`` and ``g * xhat`` over all processes."""
        return sums


LOCAL = StatsSync()


class Backend:
    """Base class of the block backends (see the module docstring for the contract).

    Backends with ``supports_sync = False`` are only called with the local ``StatsSync``.
    """

    name = "base"
    supports_sync = False

    def forward(
        self,
        x: Tensor,
        params: Sequence[Tensor],
        running: Sequence[Tensor],
        eps: Sequence[float],
        spec: BlockSpec,
        batch_stats: bool,
        save: bool,
        sync: StatsSync = LOCAL,
    ) -> tuple[Tensor, ForwardState]:
        raise NotImplementedError

    def backward(
        self,
        grad_feat: Tensor,
        feat: Tensor,
        state: ForwardState,
        params: Sequence[Tensor],
        running: Sequence[Tensor],
        eps: Sequence[float],
        spec: BlockSpec,
        batch_stats: bool,
        sync: StatsSync = LOCAL,
    ) -> list[Tensor | None]:
        raise NotImplementedError


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of channel statistics: float64 for float64 buffers, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_feature_buffer(x: Tensor, spec: BlockSpec) -> Tensor:
    """The block's shared buffer [N, C_total, H, W], channels_last, with x copied in."""
    n, _, h, w = x.shape
    feat = torch.empty(
        (n, spec.num_features, h, w),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last,
    )
    feat[:, : spec.num_input_features].copy_(x)
    return feat
