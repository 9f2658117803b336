// CUDA kernels of the CLDC ops. Same arithmetic as cpu/cldc.cpp (common/cldc_math.cuh),
// launched on the current stream of the tensors' device.
//
// cldc_forward and cldc_grad_apply are elementwise over (row, channel) [and slot]: consecutive
// threads take consecutive channels, so a warp reads 32 contiguous values of a slot row. The
// reduction cldc_grad_sums uses a 3-D grid: blockIdx.x picks 32 channels (threadIdx.x),
// blockIdx.y a range of rows that the block's 8 threadIdx.y rows stride through, blockIdx.z the
// slot (z = k: the sum of grad_y alone); each block writes one partial per channel and a second
// kernel adds the partials of a channel in a fixed order (deterministic, no atomics).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../deluge_ops.h"
#include "../common/cldc_math.cuh"

namespace dense_ext {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsY = 8;

// The elementwise kernels run on a 2-D grid over [rows, width]: a block is 32 columns x 8 rows,
// blockIdx.x picks the columns, blockIdx.y strides over the rows. A column index never needs a
// 64-bit division by the width (a ~70-instruction call per element; tests/test_cuda_static.py).
const dim3 kTile(kWarp, kRowsY);

dim3 rows_grid(int64_t rows, int64_t width) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t gx = (width + kWarp - 1) / kWarp;
  int64_t gy = std::max<int64_t>(1, 32 * sms / gx);
  gy = std::min<int64_t>({gy, (rows + kRowsY - 1) / kRowsY, int64_t(65535)});
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(std::max<int64_t>(1, gy)));
}

// Row ranges of the reduction: about 4 blocks per SM over all channel blocks and slots, each
// range at least 64 rows.
int64_t row_blocks(int64_t rows, int64_t channel_blocks) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t g = (4 * sms + channel_blocks - 1) / channel_blocks;
  g = std::min<int64_t>(g, (rows + 63) / 64);
  return std::max<int64_t>(1, std::min<int64_t>(g, 65535));
}

template <typename scalar_t, typename acc>
__global__ void cldc_forward_kernel(const scalar_t* __restrict__ x, int64_t ldx,
                                    scalar_t* __restrict__ out, int64_t ldo, int64_t M, int64_t C,
                                    int64_t k, const acc* __restrict__ mean,
                                    const acc* __restrict__ scale, const acc* __restrict__ shift) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  // Not unrolled: the unroller's trip count would be a 64-bit division per thread.
  DENSE_EXT_NO_UNROLL
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += int64_t(gridDim.y) * blockDim.y) {
    const scalar_t* xr = x + r * ldx + c;
    acc y = shift[c];
    for (int64_t i = 0; i < k; ++i) {
      y += cldc_term(static_cast<acc>(xr[i * C]), mean[i * C + c], scale[i * C + c]);
    }
    out[r * ldo + c] = static_cast<scalar_t>(y);
  }
}

void cldc_forward_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                       const at::Tensor& shift, const at::Tensor& out) {
  const CldcShape s = check_cldc_forward(x, mean, scale, shift, out);
  const RowsView vo = rows_view(out, "out");
  if (s.x.rows == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_forward", [&] {
    using acc = acc_t<scalar_t>;
    cldc_forward_kernel<scalar_t, acc><<<rows_grid(s.x.rows, s.c), kTile, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), s.x.ld, out.data_ptr<scalar_t>(), vo.ld, s.x.rows, s.c, s.k,
        mean.const_data_ptr<acc>(), scale.const_data_ptr<acc>(), shift.const_data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ACCUMULATE (cldc_grad_step): each block also adds alpha[i, c] * g to grad_x for its rows.
template <typename scalar_t, typename acc, bool ACCUMULATE>
__global__ void cldc_sums_partial_kernel(const scalar_t* __restrict__ g, int64_t ldg,
                                         const scalar_t* __restrict__ x, int64_t ldx, int64_t M,
                                         int64_t C, int64_t k, int64_t rows_per_block,
                                         const acc* __restrict__ mean,
                                         acc* __restrict__ part,  // [k + 1, G, C]
                                         const acc* __restrict__ alpha,
                                         scalar_t* __restrict__ grad_x, int64_t ldd) {
  __shared__ acc sh[kRowsY][kWarp];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kWarp + tx;
  const int64_t G = gridDim.y, i = blockIdx.z;  // i == k: the sum of g alone
  acc sum = 0;
  if (c < C) {
    const acc m = i < k ? mean[i * C + c] : acc(0);
    const int64_t r0 = int64_t(blockIdx.y) * rows_per_block;
    const int64_t r1 = min(M, r0 + rows_per_block);
    const acc a = ACCUMULATE && i < k ? alpha[i * C + c] : acc(0);
    for (int64_t r = r0 + ty; r < r1; r += kRowsY) {
      const acc gv = static_cast<acc>(g[r * ldg + c]);
      sum += i < k ? gv * (static_cast<acc>(x[r * ldx + i * C + c]) - m) : gv;
      if (ACCUMULATE && i < k) {
        scalar_t* d = grad_x + r * ldd + i * C + c;
        *d = static_cast<scalar_t>(static_cast<acc>(*d) + a * gv);
      }
    }
  }
  sh[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int j = 1; j < kRowsY; ++j) sum += sh[j][tx];
    part[(i * G + blockIdx.y) * C + c] = sum;
  }
}

template <typename acc>
__global__ void cldc_sums_finalize_kernel(const acc* __restrict__ part, int64_t G, int64_t width,
                                          int64_t C, acc* __restrict__ sums) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // j = i * C + c
  if (j >= width) return;
  // j < k * C < 2^31 (checked on the host): 32-bit arithmetic.
  const int64_t i = static_cast<int>(j) / static_cast<int>(C), c = j - i * C;
  acc total = 0;
  for (int64_t b = 0; b < G; ++b) total += part[(i * G + b) * C + c];
  sums[j] = total;
}

void cldc_grad_sums_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& sums) {
  const CldcShape s = check_cldc_grad_sums(grad_y, x, mean, sums);
  const RowsView vg = rows_view(grad_y, "grad_y");
  if (s.x.rows == 0) {
    sums.zero_();
    return;
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t channel_blocks = (s.c + kWarp - 1) / kWarp;
  const int64_t G = row_blocks(s.x.rows, channel_blocks * (s.k + 1));
  const int64_t rows_per_block = (s.x.rows + G - 1) / G;
  TORCH_CHECK(s.k + 1 <= 65535, "dense_ext: cldc_grad_sums supports at most 65534 slots");
  at::Tensor part = at::empty({s.k + 1, G, s.c}, sums.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_grad_sums", [&] {
    using acc = acc_t<scalar_t>;
    dim3 block(kWarp, kRowsY), grid(channel_blocks, G, s.k + 1);
    cldc_sums_partial_kernel<scalar_t, acc, false><<<grid, block, 0, stream>>>(
        grad_y.const_data_ptr<scalar_t>(), vg.ld, x.const_data_ptr<scalar_t>(), s.x.ld, s.x.rows,
        s.c, s.k, rows_per_block, mean.const_data_ptr<acc>(), part.data_ptr<acc>(), nullptr,
        nullptr, 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t width = (s.k + 1) * s.c;
    cldc_sums_finalize_kernel<acc><<<(width + 127) / 128, 128, 0, stream>>>(
        part.data_ptr<acc>(), G, width, s.c, sums.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename acc>
__global__ void cldc_grad_apply_kernel(const scalar_t* __restrict__ g, int64_t ldg,
                                       const scalar_t* __restrict__ x, int64_t ldx,
                                       scalar_t* __restrict__ grad_x, int64_t ldd, int64_t M,
                                       int64_t C, int64_t k, const acc* __restrict__ mean,
                                       const acc* __restrict__ alpha, const acc* __restrict__ beta,
                                       const acc* __restrict__ gamma) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // j = i * C + c
  if (j >= k * C) return;
  const int64_t c = static_cast<int>(j) % static_cast<int>(C);  // 32-bit: k * C < 2^31
  // Not unrolled: the unroller's trip count would be a 64-bit division per thread.
  DENSE_EXT_NO_UNROLL
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += int64_t(gridDim.y) * blockDim.y) {
    const acc xc = static_cast<acc>(x[r * ldx + j]) - mean[j];
    const acc dx =
        cldc_grad_input(static_cast<acc>(g[r * ldg + c]), xc, alpha[j], beta[j], gamma[j]);
    scalar_t* d = grad_x + r * ldd + j;
    *d = static_cast<scalar_t>(static_cast<acc>(*d) + dx);
  }
}

void cldc_grad_apply_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& gamma,
                          const at::Tensor& grad_x) {
  const CldcShape s = check_cldc_grad_apply(grad_y, x, mean, alpha, beta, gamma, grad_x);
  const RowsView vg = rows_view(grad_y, "grad_y"), vd = rows_view(grad_x, "grad_x");
  if (s.x.rows == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_grad_apply", [&] {
        using acc = acc_t<scalar_t>;
        cldc_grad_apply_kernel<scalar_t, acc><<<rows_grid(s.x.rows, s.k * s.c), kTile, 0, stream>>>(
            grad_y.const_data_ptr<scalar_t>(), vg.ld, x.const_data_ptr<scalar_t>(), s.x.ld,
            grad_x.data_ptr<scalar_t>(), vd.ld, s.x.rows, s.c, s.k, mean.const_data_ptr<acc>(),
            alpha.const_data_ptr<acc>(), beta.const_data_ptr<acc>(), gamma.const_data_ptr<acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// cldc_grad_step: the sums kernel with the alpha * g accumulation, then (with next_out) the
// forward kernel over the first k' slots: the same values, read a second time from L2/HBM.
void cldc_grad_step_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& alpha, const at::Tensor& grad_x, const at::Tensor& sums,
                         const std::optional<at::Tensor>& next_mean,
                         const std::optional<at::Tensor>& next_scale,
                         const std::optional<at::Tensor>& next_shift,
                         const std::optional<at::Tensor>& next_out) {
  const CldcShape s = check_cldc_grad_step(grad_y, x, mean, alpha, grad_x, sums);
  const int64_t kn = check_cldc_next(x, s, next_mean, next_scale, next_shift, next_out);
  const RowsView vg = rows_view(grad_y, "grad_y"), vd = rows_view(grad_x, "grad_x");
  if (s.x.rows == 0) {
    sums.zero_();
    return;
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t channel_blocks = (s.c + kWarp - 1) / kWarp;
  const int64_t G = row_blocks(s.x.rows, channel_blocks * (s.k + 1));
  const int64_t rows_per_block = (s.x.rows + G - 1) / G;
  TORCH_CHECK(s.k + 1 <= 65535, "dense_ext: cldc_grad_step supports at most 65534 slots");
  at::Tensor part = at::empty({s.k + 1, G, s.c}, sums.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_grad_step", [&] {
    using acc = acc_t<scalar_t>;
    dim3 block(kWarp, kRowsY), grid(channel_blocks, G, s.k + 1);
    cldc_sums_partial_kernel<scalar_t, acc, true><<<grid, block, 0, stream>>>(
        grad_y.const_data_ptr<scalar_t>(), vg.ld, x.const_data_ptr<scalar_t>(), s.x.ld, s.x.rows,
        s.c, s.k, rows_per_block, mean.const_data_ptr<acc>(), part.data_ptr<acc>(),
        alpha.const_data_ptr<acc>(), grad_x.data_ptr<scalar_t>(), vd.ld);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t width = (s.k + 1) * s.c;
    cldc_sums_finalize_kernel<acc><<<(width + 127) / 128, 128, 0, stream>>>(
        part.data_ptr<acc>(), G, width, s.c, sums.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (kn > 0) {
      const RowsView vo = rows_view(*next_out, "next_out");
      cldc_forward_kernel<scalar_t, acc><<<rows_grid(s.x.rows, s.c), kTile, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), s.x.ld, next_out->data_ptr<scalar_t>(), vo.ld, s.x.rows,
          s.c, kn, next_mean->const_data_ptr<acc>(), next_scale->const_data_ptr<acc>(),
          next_shift->const_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

template <typename scalar_t, typename acc>
__global__ void cldc_grad_correct_kernel(const scalar_t* __restrict__ x, int64_t ldx,
                                         scalar_t* __restrict__ grad_x, int64_t ldd, int64_t M,
                                         int64_t width, const acc* __restrict__ mean,
                                         const acc* __restrict__ beta,
                                         const acc* __restrict__ gamma) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= width) return;
  // Not unrolled: the unroller's trip count would be a 64-bit division per thread.
  DENSE_EXT_NO_UNROLL
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += int64_t(gridDim.y) * blockDim.y) {
    const acc xc = static_cast<acc>(x[r * ldx + j]) - mean[j];
    scalar_t* d = grad_x + r * ldd + j;
    *d = static_cast<scalar_t>(static_cast<acc>(*d) + cldc_grad_correction(xc, beta[j], gamma[j]));
  }
}

void cldc_grad_correct_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& beta,
                            const at::Tensor& gamma, const at::Tensor& grad_x) {
  const CldcShape s = check_cldc_grad_correct(x, mean, beta, gamma, grad_x);
  const RowsView vd = rows_view(grad_x, "grad_x");
  if (s.x.rows == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_grad_correct", [&] {
        using acc = acc_t<scalar_t>;
        cldc_grad_correct_kernel<scalar_t, acc>
            <<<rows_grid(s.x.rows, s.k * s.c), kTile, 0, stream>>>(
                x.const_data_ptr<scalar_t>(), s.x.ld, grad_x.data_ptr<scalar_t>(), vd.ld, s.x.rows,
                s.k * s.c, mean.const_data_ptr<acc>(), beta.const_data_ptr<acc>(),
                gamma.const_data_ptr<acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CUDA, m) {
  m.impl("cldc_grad_step", static_cast<CldcGradStepFn*>(&cldc_grad_step_cuda));
  m.impl("cldc_grad_correct", static_cast<CldcGradCorrectFn*>(&cldc_grad_correct_cuda));
  m.impl("cldc_forward", static_cast<CldcForwardFn*>(&cldc_forward_cuda));
  m.impl("cldc_grad_sums", static_cast<CldcGradSumsFn*>(&cldc_grad_sums_cuda));
  m.impl("cldc_grad_apply", static_cast<CldcGradApplyFn*>(&cldc_grad_apply_cuda));
}

}  // namespace dense_ext
