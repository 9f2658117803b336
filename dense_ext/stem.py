"""The ImageNet stem's ``norm0 -> relu0 -> pool0`` as one function on the CPU.

torchvision's DenseNet stem is ``conv0`` (7x7 / 2), ``norm0``, ``relu0`` and ``pool0`` (3x3 max
pool, stride 2, padding 1). ``norm_relu_max_pool`` computes the last three as they do (ATen's
``native_batch_norm`` on the NCHW map, then the extension's ``relu_max_pool``: ReLU and pool in
one pass that writes the channels_last map the dense blocks read, csrc/cpu/stem_pool.cpp) and
saves for backward only the BN's input, its statistics and one byte per pooled value (the window
offset of its maximum, or "the ReLU passed nothing"); torchvision's modules save the BN input,
the ReLU output and int64 pool indices. Output, input gradient, parameter gradients and running
statistics equal the modules' bit for bit (tests/test_stem.py).

On a GPU the same op runs as CUDA kernels (csrc/cuda/stem_pool.cu, float16 and bfloat16 too:
autocast's stem), not yet run on a GPU; there the BN is ATen's native kernel where
``nn.BatchNorm2d`` may pick cuDNN's, so the numbers agree up to rounding, not bit for bit.

Where it does not apply (another device or dtype, a channels_last or empty input, hooks on the
three modules, tracing and ``torch.func``, ``torch.compile``, a BN of another kind, another
pool) the modules are called one by one, so everything they do happens as in torchvision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dense_ext.block import is_intercepted, module_norm_call, unfused_reason
from dense_ext.function import first_order
from dense_ext.norm import NormCall
from dense_ext.transition import _native_batch_norm

try:
    from dense_ext import _C  # noqa: F401  (loading the library registers the ops)

    _HAS_OPS = hasattr(torch.ops.dense_ext, "relu_max_pool")
except Exception:  # not built: the modules run instead
    _HAS_OPS = False


def _has_cuda_kernels() -> bool:
    """Whether the extension was built with the op's CUDA kernels (csrc/cuda/stem_pool.cu)."""
    return _HAS_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
        "dense_ext::relu_max_pool", "CUDA"
    )


def _pool_fits(pool: nn.Module) -> bool:
    """Whether ``pool`` is the stem's 3x3 / stride-2 / padding-1 max pool in floor mode."""
    if not isinstance(pool, nn.MaxPool2d) or pool.return_indices or pool.ceil_mode:
        return False
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return all(
        torch.nn.modules.utils._pair(value) == expected
        for value, expected in (
            (pool.kernel_size, (3, 3)),
            (stride, (2, 2)),
            (pool.padding, (1, 1)),
            (pool.dilation, (1, 1)),
        )
    )


def unfused_stem_reason(x: Tensor, norm: nn.Module, relu: nn.Module, pool: nn.Module) -> str | None:
    """Why ``norm_relu_max_pool`` calls the modules one by one for this input, or None."""
    if not _HAS_OPS:
        return "the C++ extension dense_ext._C is not built"
    if torch.compiler.is_compiling():
        return "torch.compile (its own fusion of the modules)"
    if type(norm) is not nn.BatchNorm2d:
        return f"norm is a {type(norm).__name__}"
    if type(relu) is not nn.ReLU or not _pool_fits(pool):
        return "relu and pool are not a ReLU and a 3x3 / 2 / padding-1 max pool"
    if is_intercepted(relu) or is_intercepted(pool):
        return "a hook or a replaced forward on relu or pool"
    reason = unfused_reason(norm, called=False)  # hooks on norm, global hooks, tracing
    if reason is not None:
        return reason
    if x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.float64):
            return f"a {x.dtype} input on the CPU (the op takes float32 and float64)"
    elif x.device.type != "cuda" or not _has_cuda_kernels():
        return f"an input on {x.device.type} (no kernel of the op there)"
    elif x.numel() >= 2**31:
        return "a map of 2^31 elements or more (the CUDA kernels index in 32 bits)"
    if x.dim() != 4 or not x.is_contiguous() or x.shape[0] == 0 or x.shape[1] == 0:
        return f"an input of shape {tuple(x.shape)} that is not a non-empty NCHW map"
    if x.shape[0] * x.shape[2] * x.shape[3] == 1:
        return "one value per channel (the BN raises its own error)"
    # A float16/bfloat16 map with float32 BN parameters (autocast's stem on a GPU) is what
    # native_batch_norm takes there, as nn.BatchNorm2d's call does.
    dtypes = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    if any(p.dtype not in dtypes or p.device != x.device for p in params):
        return "BN parameters of another dtype or device than the input"
    return None


def norm_relu_max_pool(x: Tensor, norm: nn.Module, relu: nn.Module, pool: nn.Module) -> Tensor:
    """``pool(relu(norm(x)))`` for the ImageNet stem; ``norm``'s running statistics and counter
    update as if it were called. Fused as the module docstring says, else the modules run."""
    if unfused_stem_reason(x, norm, relu, pool) is not None:
        return pool(relu(norm(x)))
    return NormReluMaxPoolFunction.apply(x, norm.weight, norm.bias, module_norm_call(norm))


class NormReluMaxPoolFunction(torch.autograd.Function):
    """``apply(x, weight, bias, call) -> max_pool3x3s2p1(relu(batch_norm(x)))``, channels_last.

    ``x`` is an NCHW-contiguous map (``unfused_stem_reason`` says which); ``call`` a
    ``NormCall``. Saves ``x``, the BN's statistics and the pool's one-byte offsets.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight, bias, call: NormCall):
        z, mean, invstd = _native_batch_norm(x, weight, bias, call)
        if not call.batch_stats:
            # Evaluation: keep copies, so a later change to the buffers cannot skew backward.
            assert call.running_mean is not None and call.running_var is not None
            mean, invstd = call.running_mean.clone(), call.running_var.clone()
        out, offsets = torch.ops.dense_ext.relu_max_pool(z)
        del z
        ctx.call = call
        ctx.save_for_backward(x, weight, mean, invstd, offsets)
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out: Tensor):
        x, weight, mean, invstd, offsets = ctx.saved_tensors
        call: NormCall = ctx.call
        grad_z = torch.ops.dense_ext.relu_max_pool_backward(
            grad_out, offsets, x.shape[2], x.shape[3]
        )
        # As autograd's NativeBatchNormBackward0: with batch statistics the saved mean and
        # invstd, else the running mean and var (copied in forward).
        running = (None, None) if call.batch_stats else (mean, invstd)
        saved = (mean, invstd) if call.batch_stats else (None, None)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_z,
            x,
            weight,
            *running,
            *saved,
            call.batch_stats,
            call.eps,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
        )
        return grad_x, grad_w, grad_b, None


if _HAS_OPS:

    @torch.library.register_fake("dense_ext::relu_max_pool")
    def _(z):
        n, c, h, w = z.shape
        shape = (n, c, (h - 1) // 2 + 1, (w - 1) // 2 + 1)
        out = z.new_empty(shape).contiguous(memory_format=torch.channels_last)
        return out, z.new_empty(shape, dtype=torch.uint8)

    @torch.library.register_fake("dense_ext::relu_max_pool_backward")
    def _(grad_out, offsets, h, w):
        return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], h, w))
