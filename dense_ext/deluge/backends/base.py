"""The contract every DelugeNet stage backend implements, and the call objects it reads.

The autograd Functions (``dense_ext.deluge.function``) own what is the same for every backend:
input checks, the train/eval choices of every normalisation module, running-statistics
updates, saving for backward and the gradient buffer. A backend owns the arithmetic:

``stage_forward(x0, params, call) -> (buf, state)``
    copies the [N, C, H, W] stage input into slot 0 of a fresh channels_last buffer
    [N, S*C, H, W], runs composite layers 1..S-1 (each appends its slot in place) and returns
    the buffer and a ``StageState`` (batch statistics it computed, tensors kept for backward).
``stage_backward(grad_buf, buf, state, params, call) -> grads``
    ``grad_buf`` holds the gradient of the whole buffer and is the backend's to overwrite; it
    accumulates every layer's input gradient into it, so that on return ``grad_buf[:, :C]`` is
    the gradient of the stage input. Returns one gradient per parameter (``spec`` order).
``slot_stats(buf, channels) -> [2, S*C]``
    batch mean and biased variance of every channel of the buffer.
``cldc_forward(buf, mean, invstd, weight, bias) -> y``
    ``y[c] = sum_i weight[c, i] * invstd[i, c] * (slot_i[c] - mean[i, c]) + bias[c, i]`` over
    the first ``k = weight.shape[1]`` slots of ``buf`` (``mean``/``invstd`` are [k, C]).
``cldc_backward(grad_y, buf, mean, invstd, weight, batch_stats, grad_buf) -> (dw, db)``
    the CLDC's backward: accumulates the slots' input gradients into ``grad_buf[:, :k*C]``.

Slot statistics are computed once per slot, when it is written, and read by every later
normalisation in batch mode; every module still keeps its own running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dense_ext.deluge.spec import StageSpec


@dataclass
class NormCall:
    """How one normalisation module (a BN, or a CLDC's per-input BNs) acts in one call.

    Attributes:
        eps: the module's epsilon.
        batch_stats: normalise with this batch's statistics (else ``eval_mean/eval_var``).
        eval_mean, eval_var: a snapshot of the running statistics used without batch
            statistics ([C], or [C, S] for a CLDC), taken at forward time so that a later
            change of the buffers cannot skew backward; None with batch statistics.
        running_mean, running_var: the module's live running buffers, updated once after
            forward when ``update`` (None when there is nothing to update).
        factor: the update's weight of this batch (momentum, or 1/num_batches_tracked).
    """

    eps: float
    batch_stats: bool
    eval_mean: Tensor | None = None
    eval_var: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    factor: float = 0.0

    @property
    def update(self) -> bool:
        """Whether this batch is folded into the running statistics."""
        return self.batch_stats and self.running_mean is not None

    def running(self) -> tuple[Tensor, Tensor]:
        """The running ``(mean, var)`` snapshot this call normalises with."""
        if self.eval_mean is None or self.eval_var is None:
            raise ValueError(
                "dense_ext: a normalisation without batch statistics needs running ones"
            )
        return self.eval_mean, self.eval_var

    def updated(self) -> tuple[Tensor, Tensor]:
        """The live running ``(mean, var)`` buffers this call updates."""
        if self.running_mean is None or self.running_var is None:
            raise ValueError("dense_ext: this normalisation has no running statistics to update")
        return self.running_mean, self.running_var


@dataclass
class LayerNorms:
    """The normalisations of composite layer ``k``: ``cldc`` is None for ``k = 1``."""

    cldc: NormCall | None
    norm: NormCall
    norm1: NormCall
    norm2: NormCall


@dataclass
class StageState:
    """What forward leaves for backward, besides the slot buffer.

    Attributes:
        slot_stats: ``[2, S*C]`` batch mean and biased variance of each buffer channel
            (float32, float64 for float64 buffers); only slots read in batch mode are
            written (the others hold zeros).
        layer_stats: ``[S-1, 2, 2C]`` batch statistics of each layer's ``norm`` input
            (channels ``[0, C)``; for layer 1 a copy of slot 0's), ``norm1`` input
            (``[C, 3C/2)``) and ``norm2`` input (``[3C/2, 2C)``); zeros where unused.
        kept: each layer's 3x3-convolution output (``memory="bottleneck"``), else empty.
    """

    slot_stats: Tensor
    layer_stats: Tensor
    kept: list[Tensor] = field(default_factory=list)

    def tensors(self) -> list[Tensor]:
        return [self.slot_stats, self.layer_stats, *self.kept]


class StageBackend:
    """Base class of the stage backends (see the module docstring for the contract)."""

    name = "base"

    def stage_forward(
        self, x0: Tensor, params: Sequence[Tensor], call: StageCall
    ) -> tuple[Tensor, StageState]:
        raise NotImplementedError

    def stage_backward(
        self,
        grad_buf: Tensor,
        buf: Tensor,
        state: StageState,
        params: Sequence[Tensor],
        call: StageCall,
    ) -> list[Tensor | None]:
        raise NotImplementedError

    def slot_stats(self, buf: Tensor, channels: int) -> Tensor:
        raise NotImplementedError

    def cldc_forward(
        self, buf: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor
    ) -> Tensor:
        raise NotImplementedError

    def cldc_backward(
        self,
        grad_y: Tensor,
        buf: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor,
        batch_stats: bool,
        grad_buf: Tensor,
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


@dataclass
class StageCall:
    """Everything about one stage call that is not a differentiable tensor.

    Attributes:
        spec: the stage's static configuration.
        backend: the backend that runs it.
        layers: one ``LayerNorms`` per composite layer (index ``k - 1``).
        save: keep what backward needs (grad enabled and something requires grad).
    """

    spec: StageSpec
    backend: StageBackend
    layers: list[LayerNorms]
    save: bool = True

    def slot_needs_stats(self, slot: int) -> bool:
        """Whether some normalisation of this stage reads slot ``slot`` with batch statistics.

        Slot 0 is read by layer 1's ``norm``; slot ``i`` by the CLDC of every layer ``k > i``
        (``k >= 2``). The last slot is only read after the stage (transition or head).
        """
        if slot == 0 and self.layers and self.layers[0].norm.batch_stats:
            return True
        return any(
            ln.cldc is not None and ln.cldc.batch_stats for ln in self.layers[max(slot, 1) :]
        )


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of statistics: float64 for float64 buffers, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normaliser(
    norm: NormCall, batch_mean: Tensor, batch_var: Tensor, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(mean, invstd)`` a BN normalises with: this batch's, or its running snapshot's."""
    mean, var = (batch_mean, batch_var) if norm.batch_stats else norm.running()
    return mean.to(acc), torch.rsqrt(var.to(acc) + norm.eps)


def add_running_stats_cldc_grad(grad_y: Tensor, alpha: Tensor, grad_buf: Tensor) -> None:
    """``grad_buf[:, i*C:(i+1)*C] += alpha[i] * grad_y`` for each of the ``k`` inputs of a CLDC
    that normalises with running statistics (``alpha = weight.t() * invstd``, [k, C]): its
    input gradient, which does not read the input. The batch-statistics kernels' ``(x - mean)
    * 0`` term would turn a NaN input into a NaN gradient there, where a BN's evaluation
    backward gives a number."""
    k, c = alpha.shape
    g = grad_y.to(alpha.dtype)
    for i in range(k):
        dx = g * alpha[i].view(1, c, 1, 1)
        grad_buf[:, i * c : (i + 1) * c].add_(dx.to(grad_buf.dtype))


def cldc_normaliser(
    norm: NormCall, slot_stats: Tensor | None, num_inputs: int, channels: int, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(mean, invstd)``, both [k, C], of a CLDC over the first ``k`` slots: the slots' batch
    statistics (``slot_stats``, [2, >= k*C]) or the CLDC's running snapshot."""
    if norm.batch_stats:
        if slot_stats is None:
            raise ValueError("dense_ext: a CLDC with batch statistics needs the slots' statistics")
        stats = slot_stats[:, : num_inputs * channels].view(2, num_inputs, channels)
        mean, var = stats[0], stats[1]
    else:
        running_mean, running_var = norm.running()
        mean, var = running_mean.t().to(acc), running_var.t().to(acc)
    return mean.contiguous(), torch.rsqrt(var + norm.eps).contiguous()


def new_slot_buffer(x0: Tensor, spec: StageSpec) -> Tensor:
    """The stage's buffer [N, S*C, H, W], channels_last, with ``x0`` copied into slot 0."""
    n, _, h, w = x0.shape
    buf = torch.empty(
        (n, spec.buffer_channels, h, w),
        dtype=x0.dtype,
        device=x0.device,
        memory_format=torch.channels_last,
    )
    buf[:, : spec.channels].copy_(x0)
    return buf
