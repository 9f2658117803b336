// CUDA kernels of the ImageNet stem's ReLU + 3x3 / stride-2 / padding-1 max pool
// (cpu/stem_pool.cpp has the design, common/stem_pool.cuh the per-element arithmetic, which the
// CPU ops relu_max_pool_reference / relu_max_pool_backward_reference run on the host in tests).
// Not yet run on a GPU.
//
// Forward: one thread per output element, consecutive threads on consecutive channels of one
// pixel, so the channels_last stores coalesce; each reads its 3x3 window from the NCHW map.
// Backward: one thread per input element (NCHW order, coalesced stores), gathering the output
// gradients of the at most 2x2 windows covering it in output order: no atomics, deterministic,
// the same sums as the CPU op's scatter. Indices are 32-bit (no 64-bit division per element,
// tests/test_cuda_static.py): maps of 2^31 elements or more are refused here, and
// dense_ext/stem.py runs the modules for them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/stem_pool.cuh"
#include "tiling.cuh"

namespace dense_ext {
namespace {

#define DENSE_EXT_KERNEL __global__ void __launch_bounds__(kThreads, 4)

// Calls body(i) for every i < total, grid-stride: the loop counter 64-bit (i + stride may pass
// 2^31 near the end), the index handed to body (and its arithmetic) of type I.
template <typename I, typename Body>
__device__ __forceinline__ void for_each_element(I total, Body body) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < total; j += stride) {
    body(static_cast<I>(j));
  }
}

template <typename T, typename I>
DENSE_EXT_KERNEL stem_pool_forward_kernel(const T* __restrict__ z, T* __restrict__ out,
                                          uint8_t* __restrict__ offsets, I c, I h, I w, I ho, I wo,
                                          I total) {
  for_each_element(total, [&](I i) {
    // i enumerates the output in channels_last order: (image, oh, ow, channel)
    const I channel = i % c;
    I rest = i / c;
    const I ow = rest % wo;
    rest /= wo;
    const I oh = rest % ho;
    const I plane = rest / ho * c + channel;
    acc_t<T> best;
    const uint8_t offset =
        stem_pool_window(z + static_cast<int64_t>(plane) * h * w, h, w, oh, ow, best);
    out[i] = static_cast<T>(best);
    offsets[(plane * ho + oh) * wo + ow] = offset;
  });
}

template <typename T, typename I>
DENSE_EXT_KERNEL stem_pool_backward_kernel(const T* __restrict__ g, int64_t gs_n, int64_t gs_c,
                                           int64_t gs_h, int64_t gs_w,
                                           const uint8_t* __restrict__ offsets,
                                           T* __restrict__ grad_z, I c, I h, I w, I ho, I wo,
                                           I total) {
  for_each_element(total, [&](I i) {
    const I iw = i % w;
    I rest = i / w;
    const I ih = rest % h;
    const I plane = rest / h;
    const T* gp = g + (plane / c) * gs_n + (plane % c) * gs_c;
    grad_z[i] = static_cast<T>(
        stem_pool_input_grad(gp, gs_h, gs_w, offsets + plane * ho * wo, ho, wo, ih, iw));
  });
}

// Blocks for `total` elements: enough to fill the GPU a few times over, the rest by the
// grid-stride loops.
unsigned blocks_for(int64_t total) {
  const int64_t most = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, most));
}

void check_index_range(int64_t numel) {
  TORCH_CHECK(numel < (int64_t(1) << 31),
              "dense_ext: relu_max_pool on CUDA takes maps of fewer "
              "than 2^31 elements (32-bit indices), got ",
              numel);
}

std::tuple<at::Tensor, at::Tensor> relu_max_pool_cuda(const at::Tensor& z) {
  TORCH_CHECK(z.dim() == 4, "dense_ext: relu_max_pool input must be [N, C, H, W], got ", z.sizes());
  TORCH_CHECK(z.is_contiguous(), "dense_ext: relu_max_pool input must be NCHW-contiguous");
  TORCH_CHECK(z.size(2) >= 1 && z.size(3) >= 1, "dense_ext: relu_max_pool needs H, W >= 1");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), c = z.size(1), h = z.size(2), w = z.size(3);
  const int64_t ho = stem_pool_extent(h), wo = stem_pool_extent(w);
  at::Tensor out =
      at::empty({n, c, ho, wo}, z.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor offsets = at::empty({n, c, ho, wo}, z.options().dtype(at::kByte));
  const int64_t total = out.numel();
  if (total == 0) return {out, offsets};
  check_index_range(z.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "relu_max_pool", [&] {
    using I = int32_t;
    stem_pool_forward_kernel<scalar_t, I>
        <<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            z.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
            offsets.mutable_data_ptr<uint8_t>(), I(c), I(h), I(w), I(ho), I(wo), I(total));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, offsets};
}

at::Tensor relu_max_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& offsets,
                                       int64_t h, int64_t w) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.sizes() == offsets.sizes(),
              "dense_ext: relu_max_pool_backward: grad_out ", grad_out.sizes(), " and offsets ",
              offsets.sizes(), " must be the same [N, C, Ho, Wo]");
  TORCH_CHECK(offsets.scalar_type() == at::kByte && offsets.is_contiguous(),
              "dense_ext: relu_max_pool_backward: offsets must be relu_max_pool's (contiguous "
              "uint8)");
  TORCH_CHECK(grad_out.device() == offsets.device(),
              "dense_ext: relu_max_pool_backward: grad_out and offsets on different devices");
  const int64_t ho = stem_pool_extent(h), wo = stem_pool_extent(w);
  TORCH_CHECK(h >= 1 && w >= 1 && ho == grad_out.size(2) && wo == grad_out.size(3),
              "dense_ext: relu_max_pool_backward: an input of ", h, "x", w, " pools to ", ho, "x",
              wo, ", not ", grad_out.size(2), "x", grad_out.size(3));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t n = grad_out.size(0), c = grad_out.size(1);
  at::Tensor grad_z = at::empty({n, c, h, w}, grad_out.options());
  const int64_t total = grad_z.numel();
  if (total == 0) return grad_z;
  check_index_range(total);
  const auto st = grad_out.strides();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "relu_max_pool_backward", [&] {
        using I = int32_t;
        stem_pool_backward_kernel<scalar_t, I>
            <<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                grad_out.const_data_ptr<scalar_t>(), st[0], st[1], st[2], st[3],
                offsets.const_data_ptr<uint8_t>(), grad_z.mutable_data_ptr<scalar_t>(), I(c), I(h),
                I(w), I(ho), I(wo), I(total));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_z;
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CUDA, m) {
  m.impl("relu_max_pool", TORCH_FN(relu_max_pool_cuda));
  m.impl("relu_max_pool_backward", TORCH_FN(relu_max_pool_backward_cuda));
}

}  // namespace dense_ext
