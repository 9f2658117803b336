"""Synchronised batch norm across processes (``torch.distributed``), for dense_ext models.

``DistributedStatsSync`` is the ``StatsSync`` that the efficient blocks call: in forward it
merges each channel's batch mean and variance over all processes, in backward it sums the
two BN-backward reductions. Only per-channel vectors travel, never activations, so the cost
is one small collective per BN per pass, as with ``nn.SyncBatchNorm``.

``SyncBatchNorm`` is a batch norm with the same semantics for the BNs outside dense blocks
(stem, transitions, final norm). It is written here, on the same ``StatsSync``, because the
stock ``nn.SyncBatchNorm`` refuses CPU tensors, and CPU (gloo) is where we test.

``enable_sync_bn(model)`` wires both into a model in place. The fused transitions
(``EfficientTransition``) take the same hook as the blocks, and the fused head function
(``dense_ext.transition.norm_relu_pool``) takes it from its BN once that is a
``SyncBatchNorm``: under sync BN a model keeps every fused module, and each process holds the
activation memory of a single-process run on its share of the batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dense_ext.backends import get_backend
from dense_ext.backends.base import LOCAL, StatsSync, stats_dtype
from dense_ext.block import EfficientDenseBlock
from dense_ext.norm import fold_running_stats, norm_call


class DistributedStatsSync(StatsSync):
    """Combines BN statistics over the processes of ``process_group`` (default: WORLD).

    Forward statistics are merged with Chan's parallel formula from every rank's
    ``(count, mean, M2)``: unlike all-reducing raw sums and sums of squares it loses no
    precision when the mean is large against the spread. Ranks may hold different counts.

    The global count of a local count is remembered from the last ``stats`` call with that
    local count, so ``world_count`` (called after ``stats`` for the same batch, in forward and
    backward) needs no collective of its own. That assumes one local count maps to one global
    count per step, which holds when all ranks see inputs of the same spatial size.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.group = process_group
        self._global_counts: dict[int, int] = {}

    def _world_size(self) -> int:
        return dist.get_world_size(self.group)

    def world_count(self, count: int) -> int:
        """Values per channel over all ranks, given ``count`` on this rank."""
        cached = self._global_counts.get(count)
        if cached is not None:
            return cached
        # Not seen in forward (should not happen in a normal step): ask the other ranks.
        total = torch.tensor([float(count)], dtype=torch.float64, device=self._device())
        dist.all_reduce(total, group=self.group)
        self._global_counts[count] = int(total.item())
        return self._global_counts[count]

    def stats(self, mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """Mean and biased variance of the global batch from this rank's statistics."""
        c = mean.numel()
        # float64 for the exchange and the merge: counts stay exact and the merge adds
        # nothing to the float32 error of the local statistics.
        local = torch.empty(2 * c + 1, dtype=torch.float64, device=mean.device)
        local[:c] = mean
        local[c : 2 * c] = var
        local[2 * c] = count
        gathered = [torch.empty_like(local) for _ in range(self._world_size())]
        dist.all_gather(gathered, local, group=self.group)
        table = torch.stack(gathered)  # [world, 2C+1]: means, variances, count per rank
        means, variances, counts = table[:, :c], table[:, c : 2 * c], table[:, 2 * c :]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        m2 = (counts * variances).sum(0) + (counts * (means - global_mean).square()).sum(0)
        self._global_counts[count] = int(total.item())
        return global_mean.to(mean.dtype), (m2 / total).to(var.dtype)

    def grad_sums(self, sums: Tensor) -> Tensor:
        """``[2, C]`` sums of ``g`` and ``g * xhat`` over all ranks (sums ``sums`` in place)."""
        sums = sums.contiguous()
        dist.all_reduce(sums, group=self.group)
        return sums

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _reduce_dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def _channel_shape(x: Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with global batch statistics.

    Returns ``(y, mean, var)``; ``mean`` and ``var`` (biased) are for the running statistics
    and carry no gradient. Backward sums the two reductions over ranks; the weight and bias
    gradients stay local (DDP averages them), as in ``nn.SyncBatchNorm``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, sync: StatsSync):
        acc = stats_dtype(x.dtype)
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x.to(acc), dim=_reduce_dims(x), correction=0)
        mean, var = sync.stats(mean, var, count)
        invstd = torch.rsqrt(var + eps)
        shape = _channel_shape(x)
        scale = (weight.to(acc) * invstd).view(shape)
        y = (x.to(acc) - mean.view(shape)).mul_(scale).add_(bias.to(acc).view(shape))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.sync = sync
        ctx.world_count = sync.world_count(count)
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        acc = mean.dtype
        shape, dims = _channel_shape(x), _reduce_dims(x)
        g = grad_y.to(acc)
        xhat = (x.to(acc) - mean.view(shape)).mul_(invstd.view(shape))
        local = torch.stack([g.sum(dims), (g * xhat).sum(dims)])
        grad_bias, grad_weight = local[0].clone(), local[1].clone()
        # Every rank must join the collective, whatever it needs, or the others would hang.
        sum_g, sum_gxhat = ctx.sync.grad_sums(local)
        n = ctx.world_count
        g = g.sub_((sum_g / n).view(shape)).sub_(xhat.mul_((sum_gxhat / n).view(shape)))
        grad_x = g.mul_((weight.to(acc) * invstd).view(shape)).to(x.dtype)
        return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch of all processes, on CPU and CUDA.

    Same parameters and buffers as ``nn.BatchNorm2d`` (state_dicts move between them).
    Training uses statistics merged by ``stats_sync``; the running statistics are updated
    like ``nn.BatchNorm2d``'s with the global count for the unbiased variance. Evaluation is
    the plain, local ``F.batch_norm`` (on running statistics, or on this process's batch
    when there are none), as in ``nn.SyncBatchNorm``.
    """

    def __init__(self, num_features: int, stats_sync: StatsSync = LOCAL, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.stats_sync = stats_sync

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2-D input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        call = norm_call(self)
        weight, bias = self._affine(x)
        y, mean, var = _SyncBatchNormFunction.apply(x, weight, bias, self.eps, self.stats_sync)
        count = self.stats_sync.world_count(x.numel() // x.shape[1])
        if count < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {count} in all"
            )
        fold_running_stats(call, mean, var, count)
        return y

    def _affine(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.affine:
            return self.weight, self.bias
        ones = torch.ones(self.num_features, device=x.device)
        return ones, torch.zeros_like(ones)

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm, stats_sync: StatsSync) -> SyncBatchNorm:
        """A SyncBatchNorm sharing ``bn``'s parameters and buffers (no copy)."""
        new = cls(
            bn.num_features,
            stats_sync,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
        )
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        return new


def enable_sync_bn(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make every batch norm of ``model`` synchronised over ``process_group``, in place.

    Efficient dense blocks and fused transitions (any module with a ``stats_sync``
    attribute) get a ``DistributedStatsSync``; their BNs stay as they are, since those modules
    normalise themselves. Every other ``BatchNorm*d`` is replaced by a ``SyncBatchNorm`` that
    shares its parameters and buffers; a fused head that normalises with such a BN
    (``norm_relu_pool``) follows it. A block whose backend is ``"auto"`` but resolves to one
    without sync support is switched to ``"reference"``; a block with such a backend named
    explicitly raises ``ValueError``. Returns ``model``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "enable_sync_bn needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return _convert(model, DistributedStatsSync(process_group), "model")


def _convert(module: nn.Module, sync: StatsSync, name: str) -> nn.Module:
    """``module`` synchronised: the same module with its hook set, a new ``SyncBatchNorm``
    for a plain BN, or the same module with its children converted."""
    if isinstance(module, EfficientDenseBlock):
        _check_block_backend(module, name)
    if hasattr(module, "stats_sync"):  # a block, a fused transition, a SyncBatchNorm
        module.stats_sync = sync
    elif isinstance(module, _BatchNorm):
        return SyncBatchNorm.from_batch_norm(module, sync)
    else:
        for child_name, child in module.named_children():
            new = _convert(child, sync, child_name)
            if new is not child:
                setattr(module, child_name, new)
    return module


def _check_block_backend(block: EfficientDenseBlock, name: str) -> None:
    device = block.denselayer1.conv1.weight.device
    if get_backend(block.backend, device).supports_sync:
        return
    if block.backend == "auto":
        block.backend = "reference"
        return
    raise ValueError(
        f"dense block {name!r} uses backend {block.backend!r}, which does not support "
        "synchronised batch norm; use backend='reference' (or 'auto') with sync BN"
    )
