"""``TritonStageBackend``: the reference layer loop with the CLDC in Triton kernels."""

from __future__ import annotations

import torch

from dense_ext.deluge.backends.base import add_running_stats_cldc_grad
from dense_ext.deluge.backends.reference import ReferenceStageBackend
from dense_ext.deluge.backends.triton import kernels

__all__ = ["TritonStageBackend", "get_backend"]


class TritonStageBackend(ReferenceStageBackend):
    """CLDC forward and backward as Triton kernels; CUDA (sm_80+) compiled, or CPU tensors
    under ``TRITON_INTERPRET=1``.

    The kernels get the whole slot buffers (and read or write only their first ``k`` slots),
    never a channel slice of one: under torch.compile a launcher's strides are read once, from
    the traced tensors, and a view (above all a mutated one, which functionalization clones
    and scatters back) is where the tensor inductor hands the kernel can differ from it. The
    Triton dense-block ops take whole buffers and column offsets for the same reason."""

    name = "triton"

    def cldc_forward(self, buf, mean, invstd, weight, bias):
        acc = mean.dtype
        scale = (weight.to(acc).t() * invstd).contiguous()
        shift = bias.to(acc).sum(dim=1).contiguous()
        return kernels.cldc_forward(buf, mean.contiguous(), scale, shift)

    def cldc_backward(self, grad_y, buf, mean, invstd, weight, batch_stats, grad_buf):
        c, k = weight.shape
        acc = mean.dtype
        mean = mean.contiguous()
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        sums = kernels.cldc_grad_sums(grad_y, buf, mean)
        sum_x, sum_g = sums[:k], sums[k]
        alpha = (weight.to(acc).t() * invstd).contiguous()
        if batch_stats:
            count = grad_y.numel() // c
            beta = (alpha * (sum_g / count)).contiguous()
            gamma = (alpha * invstd * invstd * sum_x / count).contiguous()
            kernels.cldc_grad_apply(grad_y, buf, mean, alpha, beta, gamma, grad_buf)
        else:
            add_running_stats_cldc_grad(grad_y, alpha, grad_buf)
        grad_w = (invstd * sum_x).t().contiguous()
        grad_b = sum_g[:, None].expand(c, k).contiguous()
        return grad_w, grad_b


_BACKEND = TritonStageBackend()


def get_backend() -> TritonStageBackend:
    return _BACKEND
