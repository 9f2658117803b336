"""The contract every backend implements: a whole dense block, forward and backward.

The autograd Function (``dense_ext.function``) owns everything that is the same for all
backends: input checks, running-statistics updates, saving tensors, the gradient buffer.
A backend owns the arithmetic of the layer loop. Both sides share one ``BlockCall``:

``Backend.forward(x, params, call) -> (feat, state)``
    ``x`` is the [N, C0, H, W] input (any memory format) in the buffer dtype, ``params`` the
    flat parameter tuple in the order of ``dense_ext.spec``. Returns the [N, C_total, H, W]
    channels_last buffer and a ``ForwardState``. Saves nothing when ``call.save`` is False.

``Backend.backward(grad_feat, feat, state, params, call) -> grads``
    ``grad_feat`` is a fresh channels_last buffer holding the output gradient, which the backend
    may overwrite; it accumulates every layer's input gradient into ``grad_feat[:, :C_in]`` so
    that on return ``grad_feat[:, :C0]`` is the input gradient. Returns one gradient per entry
    of ``params``.

Each BN normalises as its ``NormCall`` says (batch or running statistics, its own eps): BNs of
one block may differ, exactly as separate ``nn.BatchNorm2d`` modules may. Each layer drops out
with its own rate (``call.drop_rates``, 0 for a layer in eval mode). Backends never touch
running statistics except to read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dense_ext.norm import NormCall
from dense_ext.spec import BlockSpec


@dataclass
class ForwardState:
    """What forward leaves for backward, besides the feature buffer.

    Attributes:
        stats1: ``[2, C_total]`` batch mean and biased variance of every buffer channel
            (float32, float64 for float64 buffers) when some layer's first BN uses batch
            statistics; else empty.
        stats2: ``[L, 2, bottleneck_factor*k]`` the same for each layer's bottleneck when some
            second BN uses batch statistics (rows of layers whose BN uses running statistics
            are unspecified); else empty.
        bottlenecks: each layer's conv1 output (``memory="bottleneck"``), else empty.
        dropout: backend-specific information to replay the dropout masks exactly.
        weights: backend-specific forms of the weights that forward computed for backward
            (the triton backend's), or None.
    """

    stats1: Tensor
    stats2: Tensor
    bottlenecks: list[Tensor] = field(default_factory=list)
    dropout: Any = None
    weights: Any = None

    def tensors(self) -> list[Tensor]:
        return [self.stats1, self.stats2, *self.bottlenecks]


class StatsSync:
    """How batch statistics combine across processes; this base class is local (no sync).

    Synchronised BN (``dense_ext.sync_bn``) overrides the three methods with collectives:
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


@dataclass
class BlockCall:
    """Everything about one block call that is not a differentiable tensor.

    Attributes:
        spec: the block's static configuration.
        backend: the backend that runs the layer loop.
        norms: one ``NormCall`` per BN, in parameter order (``norm1``, then ``norm2`` for
            bottleneck layers, layer after layer).
        drop_rates: one dropout probability per layer (0 for layers in eval mode).
        sync: how batch statistics combine across processes (``LOCAL``: not at all).
        save: keep what backward needs (grad enabled and something requires grad).
    """

    spec: BlockSpec
    backend: Backend
    norms: Sequence[NormCall]
    drop_rates: Sequence[float]
    # No default: torch 2.11's dynamo cannot wrap a default object (LOCAL) of a dataclass
    # built inside a compiled forward (an error under fullgraph=True).
    sync: StatsSync
    save: bool = True

    def __post_init__(self) -> None:
        spec = self.spec
        if len(self.norms) != spec.num_layers * spec.bns_per_layer:
            raise ValueError(
                f"BlockCall needs {spec.num_layers * spec.bns_per_layer} NormCalls, "
                f"got {len(self.norms)}"
            )
        if len(self.drop_rates) != spec.num_layers:
            raise ValueError(
                f"BlockCall needs {spec.num_layers} drop rates, got {len(self.drop_rates)}"
            )
        if self.sync is not LOCAL and not self.backend.supports_sync:
            raise ValueError(
                f"dense_ext backend {self.backend.name!r} does not support synchronised batch "
                "norm; use backend='reference'"
            )

    def bn1(self, layer: int) -> NormCall:
        """The first BN (over the layer's input) of layer ``layer``."""
        return self.norms[layer * self.spec.bns_per_layer]

    def bn2(self, layer: int) -> NormCall:
        """The bottleneck BN of layer ``layer`` (bottleneck layers only)."""
        return self.norms[layer * self.spec.bns_per_layer + 1]

    @property
    def stats1_needed(self) -> bool:
        """Whether some first BN normalises with batch statistics of buffer channels."""
        return any(self.bn1(layer).batch_stats for layer in range(self.spec.num_layers))

    @property
    def stats2_needed(self) -> bool:
        """Whether some bottleneck BN normalises with batch statistics."""
        return self.spec.has_bottleneck and any(
            self.bn2(layer).batch_stats for layer in range(self.spec.num_layers)
        )

    @property
    def any_batch_stats(self) -> bool:
        return any(norm.batch_stats for norm in self.norms)

    @property
    def dropout(self) -> bool:
        """Whether some layer drops out."""
        return any(p > 0 for p in self.drop_rates)

    def running_tensors(self, like: Tensor) -> list[Tensor]:
        """Flat ``(mean, var)`` per BN: the running buffers of BNs that read them, empty
        placeholders (on ``like``'s device) for BNs that normalise with batch statistics."""
        out: list[Tensor] = []
        for norm in self.norms:
            if norm.batch_stats:
                empty = like.new_empty(0)
                out += [empty, empty]
            else:
                if norm.running_mean is None or norm.running_var is None:  # as F.batch_norm
                    raise ValueError("running_mean and running_var must be defined in eval mode")
                out += [norm.running_mean, norm.running_var]
        return out


class Backend:
    """Base class of the block backends (see the module docstring for the contract).

    Backends with ``supports_sync = False`` are only called with the local ``StatsSync``.
    """

    name = "base"
    supports_sync = False

    def forward(
        self, x: Tensor, params: Sequence[Tensor], call: BlockCall
    ) -> tuple[Tensor, ForwardState]:
        raise NotImplementedError

    def backward(
        self,
        grad_feat: Tensor,
        feat: Tensor,
        state: ForwardState,
        params: Sequence[Tensor],
        call: BlockCall,
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


def new_stats(x: Tensor, call: BlockCall) -> ForwardState:
    """A ``ForwardState`` with the statistics tensors ``call`` needs allocated (unfilled)."""
    spec = call.spec
    acc = stats_dtype(x.dtype)
    empty = torch.empty(0, dtype=acc, device=x.device)
    state = ForwardState(stats1=empty, stats2=empty)
    if call.stats1_needed:
        state.stats1 = torch.empty((2, spec.num_features), dtype=acc, device=x.device)
    if call.stats2_needed:
        shape = (spec.num_layers, 2, spec.mid_channels)
        state.stats2 = torch.empty(shape, dtype=acc, device=x.device)
    return state


class LayerView:
    """One layer's parameters, normalisation constants and channel range, for backends that
    run the layer loop in Python."""

    def __init__(
        self,
        layer: int,
        params: Sequence[Tensor],
        call: BlockCall,
        state: ForwardState,
    ) -> None:
        spec = call.spec
        self.layer = layer
        self.c_in = spec.in_channels(layer)
        self.c_out = self.c_in + spec.growth_rate
        first = layer * spec.params_per_layer
        self.params = params[first : first + spec.params_per_layer]
        self.drop_rate = float(call.drop_rates[layer])
        self._call, self._state = call, state
        self.norm1 = call.bn1(layer)
        self.mean1, self.invstd1 = self._normaliser(
            self.norm1,
            state.stats1[0, : self.c_in] if self.norm1.batch_stats else None,
            state.stats1[1, : self.c_in] if self.norm1.batch_stats else None,
        )

    @property
    def batch_stats1(self) -> bool:
        return self.norm1.batch_stats

    @property
    def norm2(self) -> NormCall:
        return self._call.bn2(self.layer)

    def _normaliser(
        self, norm: NormCall, mean: Tensor | None, var: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        acc = self._state.stats1.dtype
        if not norm.batch_stats:
            mean, var = norm.running_mean, norm.running_var
        assert mean is not None and var is not None
        return mean.to(acc), torch.rsqrt(var.to(acc) + norm.eps)

    def bn2(self) -> tuple[Tensor, Tensor]:
        """Mean and inverse std of the bottleneck BN (batch statistics must be written)."""
        norm = self.norm2
        if norm.batch_stats:
            mean2, var2 = self._state.stats2[self.layer]
            return self._normaliser(norm, mean2, var2)
        return self._normaliser(norm, None, None)


class DropoutReplay:
    """Draws each layer's dropout mask and replays it exactly in backward.

    The mask is drawn like ``F.dropout`` draws it on the CPU (a contiguous [N, k, H, W]
    tensor filled by ``bernoulli_(1 - p)`` and divided by ``1 - p``; all zeros without a draw
    for ``p == 1``), from the device's default generator, so a seeded naive model and the
    block use the same masks on the CPU. Instead of keeping the masks, the generator state
    before each draw is kept (a few KiB per layer on the CPU, 16 bytes on CUDA).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.states: dict[int, Tensor] = {}

    def _get_state(self) -> Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _draw(self, shape: tuple[int, ...], p: float, dtype: torch.dtype) -> Tensor:
        if p >= 1:
            return torch.zeros(shape, dtype=dtype, device=self.device)
        mask = torch.empty(shape, dtype=dtype, device=self.device).bernoulli_(1 - p)
        return mask.div_(1 - p)

    def draw(self, layer: int, shape: tuple[int, ...], p: float, dtype: torch.dtype) -> Tensor:
        self.states[layer] = self._get_state()
        return self._draw(shape, p, dtype)

    def replay(self, layer: int, shape: tuple[int, ...], p: float, dtype: torch.dtype) -> Tensor:
        cuda = self.device.type == "cuda"
        devices = [self.device] if cuda else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            if cuda:
                torch.cuda.set_rng_state(self.states[layer], self.device)
            else:
                torch.set_rng_state(self.states[layer])
            return self._draw(shape, p, dtype)
