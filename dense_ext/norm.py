"""How one batch norm behaves in one call, decided exactly as ``nn.BatchNorm2d.forward`` decides.

Every efficient module (dense block, transition, head) reads its BNs through ``norm_call`` at
forward time, so each BN follows its *own* flags and attributes as they are at that moment:
``training``, ``track_running_stats``, ``momentum`` (``None``: cumulative average), ``eps`` and
whether it has running buffers. That is what makes frozen-BN fine-tuning (``model.train()``
then every BN ``.eval()``) and BN re-calibration (``model.eval()`` with the BNs in ``.train()``)
give the naive model's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class NormCall:
    """One BN's decisions for one call.

    Attributes:
        eps: added to the variance.
        batch_stats: normalise with this batch's statistics (else with the running ones).
        running_mean, running_var: the running buffers this call reads (``batch_stats`` False)
            or updates (``update``); None when ``nn.BatchNorm2d`` would pass None to
            ``F.batch_norm``.
        momentum: the BN's momentum; None selects the cumulative average, whose factor is
            ``1 / num_batches_tracked``.
        num_batches_tracked: the BN's counter (already incremented for this call).
    """

    eps: float
    batch_stats: bool
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    momentum: float | None = 0.1
    num_batches_tracked: Tensor | None = None

    @property
    def update(self) -> bool:
        """Whether this call folds the batch statistics into the running ones."""
        return self.batch_stats and self.running_mean is not None

    def factor(self) -> float:
        """The exponential-average factor ``F.batch_norm`` receives (reads the counter on the
        host when momentum is None, as ``nn.BatchNorm2d`` does)."""
        if self.momentum is not None:
            return float(self.momentum)
        if not self.update or self.num_batches_tracked is None:
            return 0.0
        return 1.0 / float(self.num_batches_tracked)


def counts_batches(bn: nn.Module) -> bool:
    """Whether ``nn.BatchNorm2d.forward`` would increment ``bn.num_batches_tracked`` now
    (training with tracked statistics). False for a module without that buffer (torchvision's
    ``FrozenBatchNorm2d``). The buffer is read from ``_buffers`` (where _BatchNorm and the CLDC
    register it, None included) rather than through ``Module.__getattr__``: this runs for every
    BN of every fused call (host time per layer)."""
    tracked = bn._buffers.get("num_batches_tracked")
    return tracked is not None and bn.training and bool(bn.track_running_stats)


def advance_batch_counters(bns: Sequence[nn.Module]) -> None:
    """``num_batches_tracked += 1`` for each of ``bns`` that counts this call
    (``counts_batches``), in one foreach call: one op per BN is a kernel launch per BN on a
    GPU. For the fused modules, which then take each BN's ``norm_call(bn, count=False)``."""
    counting = [bn for bn in bns if counts_batches(bn)]
    counters = [cast(Tensor, bn._buffers["num_batches_tracked"]) for bn in counting]
    if counters:
        torch._foreach_add_(counters, 1)


def norm_call(bn: _BatchNorm, count: bool = True) -> NormCall:
    """``bn``'s decisions for a call now; increments ``num_batches_tracked`` when
    ``nn.BatchNorm2d.forward`` would (``counts_batches``), unless ``count`` is False (the
    caller then increments the counters of several BNs at once, before using the calls).

    Call it exactly once per forward of the module that owns ``bn``.
    """
    # Buffers read from ``_buffers``, as in counts_batches (host time per layer).
    buffers = bn._buffers
    tracked = buffers["num_batches_tracked"]
    running_mean, running_var = buffers["running_mean"], buffers["running_var"]
    training = bn.training
    if count and tracked is not None and counts_batches(bn):
        tracked.add_(1)
    batch_stats = training or (running_mean is None and running_var is None)
    passes_running = not training or bn.track_running_stats
    return NormCall(
        eps=float(bn.eps),
        batch_stats=batch_stats,
        running_mean=running_mean if passes_running else None,
        running_var=running_var if passes_running else None,
        momentum=bn.momentum,
        num_batches_tracked=tracked,
    )


@torch.no_grad()
def fold_running_stats(norm: NormCall, mean: Tensor, var: Tensor, count: int) -> None:
    """Fold a batch's ``mean`` and biased ``var`` over ``count`` values per channel into the
    running statistics ``norm`` updates, as ``F.batch_norm`` does (unbiased variance, the BN's
    momentum or ``1 / num_batches_tracked``). For statistics computed outside ATen's kernel:
    synchronised BN, whose ``count`` is the global batch's."""
    if not norm.update:
        return
    assert norm.running_mean is not None and norm.running_var is not None
    factor = norm.factor()
    unbiased = var * (count / (count - 1)) if count > 1 else torch.full_like(var, float("nan"))
    norm.running_mean.mul_(1 - factor).add_(mean.to(norm.running_mean.dtype), alpha=factor)
    norm.running_var.mul_(1 - factor).add_(unbiased.to(norm.running_var.dtype), alpha=factor)
