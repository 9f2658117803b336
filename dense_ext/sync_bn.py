"""Synchronised batch norm across processes (``torch.distributed``), for dense_ext models.

``DistributedStatsSync`` is the ``StatsSync`` that the efficient blocks call: in forward it
merges each channel's batch mean and variance over all processes, in backward it sums the
two BN-backward reductions. Only per-channel vectors travel, never activations, so the cost
is one small collective per BN per pass, as with ``nn.SyncBatchNorm``.

``SyncBatchNorm`` is a batch norm with the same semantics for the BNs outside dense blocks
(stem, transitions, final norm). It is written here, on the same ``StatsSync``, because the
stock ``nn.SyncBatchNorm`` refuses CPU tensors, and CPU (gloo) is where we test.

``enable_sync_bn(model)`` wires both into a model in place. The fused transition
(``EfficientTransition``) and head normalise with ``native_batch_norm`` and have no sync
hook, so under sync BN a transition becomes a ``SyncTransition`` (the same modules and
math, unfused: it keeps its normalised map for backward) and a model's fused head
(``efficient_head``) is switched off.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dense_ext.backends import get_backend
from dense_ext.backends.base import LOCAL, StatsSync, stats_dtype
from dense_ext.block import EfficientDenseBlock
from dense_ext.transition import EfficientTransition


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
    Training (or no running statistics) uses statistics merged by ``stats_sync``; the
    running statistics are updated like ``nn.BatchNorm2d``'s with the global count for the
    unbiased variance. Evaluation with running statistics is the plain ``F.batch_norm``.
    """

    def __init__(self, num_features: int, stats_sync: StatsSync = LOCAL, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.stats_sync = stats_sync

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2-D input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not (self.training or self.running_mean is None):
            return super().forward(x)
        weight, bias = self._affine(x)
        y, mean, var = _SyncBatchNormFunction.apply(x, weight, bias, self.eps, self.stats_sync)
        if self.training and self.track_running_stats:
            count = self.stats_sync.world_count(x.numel() // x.shape[1])
            self._update_running(mean, var, count)
        return y

    def _affine(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.affine:
            return self.weight, self.bias
        ones = torch.ones(self.num_features, device=x.device)
        return ones, torch.zeros_like(ones)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, count: int) -> None:
        if count < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got {count} in all"
            )
        self.num_batches_tracked.add_(1)
        factor = self.momentum
        if factor is None:  # cumulative moving average, as nn.BatchNorm2d
            factor = 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)

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


class SyncTransition(nn.Module):
    """``conv(pool(relu(norm(x))))`` with a ``SyncBatchNorm``: the sync-BN EfficientTransition.

    Same submodules and keys (``norm``, ``relu``, ``conv``, ``pool``) and the same
    pool-before-conv order as ``EfficientTransition``, but built from ordinary modules, so
    autograd keeps the normalised map (one block output's worth of memory per transition).
    """

    def __init__(
        self, norm: SyncBatchNorm, relu: nn.Module, conv: nn.Conv2d, pool: nn.Module
    ) -> None:
        super().__init__()
        self.norm, self.relu, self.conv, self.pool = norm, relu, conv, pool

    @classmethod
    def from_transition(cls, t: EfficientTransition, stats_sync: StatsSync) -> SyncTransition:
        """A SyncTransition sharing ``t``'s parameters and buffers."""
        return cls(SyncBatchNorm.from_batch_norm(t.norm, stats_sync), t.relu, t.conv, t.pool)

    def forward(self, x: Tensor) -> Tensor:
        """[N, C_in, H, W] -> [N, C_out, H // 2, W // 2]."""
        return self.conv(self.pool(self.relu(self.norm(x))))


def enable_sync_bn(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make every batch norm of ``model`` synchronised over ``process_group``, in place.

    Efficient dense blocks (and any module with a ``stats_sync`` attribute, such as a fused
    transition) get a ``DistributedStatsSync``; their BNs stay as they are, since the block
    does the normalisation itself. Every other ``BatchNorm*d`` is replaced by a
    ``SyncBatchNorm`` that shares its parameters and buffers, an ``EfficientTransition`` by a
    ``SyncTransition``, and a module's ``efficient_head`` flag is set to False (the fused head
    has no sync hook; the unfused one runs ``features.norm5`` as a module). A block whose backend is
    ``"auto"`` but resolves to one without sync support is switched to ``"reference"``; a
    block with such a backend named explicitly raises ``ValueError``. Returns ``model``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "enable_sync_bn needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    sync = DistributedStatsSync(process_group)
    if isinstance(model, _BatchNorm):
        return SyncBatchNorm.from_batch_norm(model, sync)
    _convert(model, sync)
    return model


def _convert(module: nn.Module, sync: StatsSync) -> None:
    for name, child in module.named_children():
        if isinstance(child, EfficientDenseBlock):
            _check_block_backend(child, name)
            child.stats_sync = sync
        elif hasattr(child, "stats_sync"):
            child.stats_sync = sync
        elif isinstance(child, EfficientTransition):
            setattr(module, name, SyncTransition.from_transition(child, sync))
        elif isinstance(child, _BatchNorm) and not isinstance(child, SyncBatchNorm):
            setattr(module, name, SyncBatchNorm.from_batch_norm(child, sync))
        else:
            _convert(child, sync)
    if getattr(module, "efficient_head", False):
        module.efficient_head = False


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
