"""How one batch norm behaves in one call, decided exactly as ``nn.BatchNorm2d.forward`` decides.

Every efficient module (dense block, transition, head) reads its BNs through ``norm_call`` at
forward time, so each BN follows its *own* flags and attributes as they are at that moment:
``training``, ``track_running_stats``, ``momentum`` (``None``: cumulative average), ``eps`` and
whether it has running buffers. That is what makes frozen-BN fine-tuning (``model.train()``
then every BN ``.eval()``) and BN re-calibration (``model.eval()`` with the BNs in ``.train()``)
give the naive model's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
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


def norm_call(bn: _BatchNorm) -> NormCall:
    """``bn``'s decisions for a call now; increments ``num_batches_tracked`` when
    ``nn.BatchNorm2d.forward`` would (training with tracked statistics).

    Call it exactly once per forward of the module that owns ``bn``.
    """
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    passes_running = not bn.training or bn.track_running_stats
    return NormCall(
        eps=float(bn.eps),
        batch_stats=batch_stats,
        running_mean=bn.running_mean if passes_running else None,
        running_var=bn.running_var if passes_running else None,
        momentum=bn.momentum,
        num_batches_tracked=bn.num_batches_tracked,
    )
