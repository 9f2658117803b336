// CUDA kernels of the per-channel ops: the arithmetic of common/math.cuh (shared with
// cpu/kernels.cpp), launched on the current stream of the tensors' device. Argument checks are in
// common/checks.h; every op returns before touching the device when it has nothing to compute.
//
// Reductions over the M = N*H*W rows of a [M, C] matrix (row stride ld) use a 2-D grid: blockIdx.x
// picks 32 consecutive channels (threadIdx.x, so a warp reads 32 contiguous values of a row),
// blockIdx.y a contiguous range of rows that the block's 8 threadIdx.y rows stride through. Each
// block writes one partial result per channel; a second small kernel merges the partials of a
// channel in a fixed order (deterministic, no atomics).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/math.cuh"
#include "../common/static_switch.h"
#include "../ops.h"

namespace dense_ext {
namespace {

constexpr int kWarp = 32;  // channels per block
constexpr int kRowsY = 8;  // threadIdx.y extent of reduction blocks
constexpr int kThreads = 256;

// Number of row ranges (blockIdx.y) of a reduction: about 4 blocks per SM in total, each range
// at least 64 rows.
int64_t row_blocks(int64_t rows, int64_t cols) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t channel_blocks = (cols + kWarp - 1) / kWarp;
  int64_t g = (4 * sms + channel_blocks - 1) / channel_blocks;
  g = std::min<int64_t>(g, (rows + 63) / 64);
  return std::max<int64_t>(1, std::min<int64_t>(g, 65535));
}

int64_t elementwise_blocks(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 32 * sms));
}

// ---------------------------------------------------------------------------------------------
// channel_stats

template <typename scalar_t, typename acc>
__global__ void stats_partial_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t C,
                                     int64_t ld, int64_t rows_per_block,
                                     acc* __restrict__ part) {  // [3, G, C]: n, mean, m2
  __shared__ acc sh_n[kRowsY][kWarp], sh_mean[kRowsY][kWarp], sh_m2[kRowsY][kWarp];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kWarp + tx;
  const int64_t G = gridDim.y;
  acc n = 0, mean = 0, m2 = 0;
  if (c < C) {
    const acc shift = static_cast<acc>(x[c]);  // "Shifted statistics" in common/math.cuh
    const int64_t r0 = int64_t(blockIdx.y) * rows_per_block;
    const int64_t r1 = min(M, r0 + rows_per_block);
    for (int64_t r = r0 + ty; r < r1; r += kRowsY) {
      n += acc(1);
      welford_add(mean, m2, static_cast<acc>(x[r * ld + c]) - shift, acc(1) / n);
    }
  }
  sh_n[ty][tx] = n, sh_mean[ty][tx] = mean, sh_m2[ty][tx] = m2;
  __syncthreads();
  if (ty == 0 && c < C) {
    MeanM2<acc> total{sh_n[0][tx], sh_mean[0][tx], sh_m2[0][tx]};
    for (int i = 1; i < kRowsY; ++i)
      chan_merge(total, MeanM2<acc>{sh_n[i][tx], sh_mean[i][tx], sh_m2[i][tx]});
    part[(0 * G + blockIdx.y) * C + c] = total.n;
    part[(1 * G + blockIdx.y) * C + c] = total.mean;
    part[(2 * G + blockIdx.y) * C + c] = total.m2;
  }
}

template <typename scalar_t, typename acc>
__global__ void stats_finalize_kernel(const scalar_t* __restrict__ x, const acc* __restrict__ part,
                                      int64_t G, int64_t C, acc* __restrict__ mean_out,
                                      acc* __restrict__ var_out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  MeanM2<acc> total = meanm2_empty<acc>();
  for (int64_t g = 0; g < G; ++g) {
    chan_merge(total,
               MeanM2<acc>{part[g * C + c], part[(G + g) * C + c], part[(2 * G + g) * C + c]});
  }
  mean_out[c] = static_cast<acc>(x[c]) + total.mean;
  var_out[c] = meanm2_var(total);
}

void channel_stats_cuda(const at::Tensor& x, const at::Tensor& stats, int64_t lo) {
  const RowsView v = check_channel_stats(x, stats, lo);
  if (v.empty()) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t G = row_blocks(v.rows, v.cols);
  const int64_t rows_per_block = (v.rows + G - 1) / G;
  at::Tensor part = at::empty({3, G, v.cols}, stats.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    dim3 block(kWarp, kRowsY), grid((v.cols + kWarp - 1) / kWarp, G);
    stats_partial_kernel<scalar_t, acc><<<grid, block, 0, stream>>>(
        xp, v.rows, v.cols, v.ld, rows_per_block, part.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    acc* sp = stats.data_ptr<acc>();
    stats_finalize_kernel<scalar_t, acc><<<(v.cols + 127) / 128, 128, 0, stream>>>(
        xp, part.data_ptr<acc>(), G, v.cols, sp + lo, sp + stats.stride(0) + lo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// bn_relu

template <typename acc>
struct BnParams {
  const acc* mean;
  const acc* var;
  const acc* gamma;
  const acc* beta;
  double eps;
};

template <typename acc>
BnParams<acc> bn_params(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma,
                        const at::Tensor& beta, double eps) {
  return {mean.const_data_ptr<acc>(), var.const_data_ptr<acc>(), gamma.const_data_ptr<acc>(),
          beta.const_data_ptr<acc>(), eps};
}

template <typename scalar_t, typename acc>
__global__ void bn_relu_kernel(const scalar_t* __restrict__ x, int64_t ldx,
                               scalar_t* __restrict__ out, int64_t ldo, int64_t M, int64_t C,
                               BnParams<acc> p) {
  const int64_t n = M * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i - r * C;
    const acc scale = p.gamma[c] * bn_invstd(p.var[c], p.eps);
    const acc y = bn_pre(static_cast<acc>(x[r * ldx + c]), p.mean[c], scale, p.beta[c]);
    out[r * ldo + c] = static_cast<scalar_t>(relu(y));
  }
}

void bn_relu_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                  const at::Tensor& gamma, const at::Tensor& beta, double eps,
                  const at::Tensor& out) {
  const BnReluViews v = check_bn_relu(x, mean, var, gamma, beta, out);
  if (v.x.empty()) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu", [&] {
    using acc = acc_t<scalar_t>;
    bn_relu_kernel<scalar_t, acc><<<elementwise_blocks(v.x.rows * v.x.cols), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), v.x.ld, out.data_ptr<scalar_t>(), v.out.ld, v.x.rows,
        v.x.cols, bn_params<acc>(mean, var, gamma, beta, eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// BN backward. The reduce phase sums g = relu_grad(grad_z) and g * xhat per channel: per-block
// partials, then a finalize kernel that merges them in a fixed order into (sum_g, sum_gxhat),
// written (bn_relu_backward: grad_beta, grad_gamma) or added (bn_relu_backward_reduce: sums).
// With kAddScaledGrad the partial kernel also adds scale * g to grad_x for each element it visits
// (the fixed-statistics part of dx, before the sums are complete). Then dx for every element:
// bn_grad_input_kernel (whole batch) or bn_backward_apply_kernel (the batch-mean terms).

template <typename scalar_t, typename acc, bool kAddScaledGrad>
__global__ void bn_backward_reduce_kernel(const scalar_t* __restrict__ grad_z, int64_t ldg,
                                          const scalar_t* __restrict__ x, int64_t ldx,
                                          scalar_t* __restrict__ grad_x, int64_t ldd, int64_t M,
                                          int64_t C, int64_t rows_per_block, BnParams<acc> p,
                                          acc* __restrict__ part) {  // [2, G, C]
  __shared__ acc sh_g[kRowsY][kWarp], sh_gx[kRowsY][kWarp];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kWarp + tx;
  const int64_t G = gridDim.y;
  acc sg = 0, sgx = 0;
  if (c < C) {
    const acc invstd = bn_invstd(p.var[c], p.eps);
    const acc mean = p.mean[c], scale = p.gamma[c] * invstd, beta = p.beta[c];
    const int64_t r0 = int64_t(blockIdx.y) * rows_per_block;
    const int64_t r1 = min(M, r0 + rows_per_block);
    for (int64_t r = r0 + ty; r < r1; r += kRowsY) {
      const acc xv = static_cast<acc>(x[r * ldx + c]);
      const acc g = relu_grad(static_cast<acc>(grad_z[r * ldg + c]), bn_pre(xv, mean, scale, beta));
      sg += g;
      sgx += g * ((xv - mean) * invstd);
      if constexpr (kAddScaledGrad) {
        scalar_t* d = grad_x + r * ldd + c;
        *d = static_cast<scalar_t>(static_cast<acc>(*d) +
                                   bn_grad_input(g, acc(0), scale, acc(0), acc(0), false));
      }
    }
  }
  sh_g[ty][tx] = sg, sh_gx[ty][tx] = sgx;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int i = 1; i < kRowsY; ++i) sg += sh_g[i][tx], sgx += sh_gx[i][tx];
    part[int64_t(blockIdx.y) * C + c] = sg;
    part[(G + blockIdx.y) * C + c] = sgx;
  }
}

template <typename acc, bool kAccumulate>
__global__ void bn_backward_finalize_kernel(const acc* __restrict__ part, int64_t G, int64_t C,
                                            acc* __restrict__ sum_g, acc* __restrict__ sum_gxhat) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc sg = 0, sgx = 0;
  for (int64_t g = 0; g < G; ++g) sg += part[g * C + c], sgx += part[(G + g) * C + c];
  sum_g[c] = kAccumulate ? sum_g[c] + sg : sg;
  sum_gxhat[c] = kAccumulate ? sum_gxhat[c] + sgx : sgx;
}

// Launches the reduce phase over all rows of v; sum_g and sum_gxhat receive (or, with
// accumulate, add) the per-channel totals.
template <typename scalar_t, typename acc>
void launch_bn_backward_reduce(const at::Tensor& grad_z, const at::Tensor& x,
                               const at::Tensor& grad_x, const BnBackwardViews& v, BnParams<acc> p,
                               bool add_scaled_grad, bool accumulate, acc* sum_g, acc* sum_gxhat,
                               cudaStream_t stream) {
  const int64_t M = v.x.rows, C = v.x.cols;
  const int64_t G = row_blocks(M, C);
  const int64_t rows_per_block = (M + G - 1) / G;
  at::Tensor part = at::empty({2, G, C}, x.options().dtype(acc_dtype(x.scalar_type())));
  dim3 block(kWarp, kRowsY), grid((C + kWarp - 1) / kWarp, G);
  BOOL_SWITCH(add_scaled_grad, kAddScaledGrad, [&] {
    bn_backward_reduce_kernel<scalar_t, acc, kAddScaledGrad><<<grid, block, 0, stream>>>(
        grad_z.const_data_ptr<scalar_t>(), v.grad_z.ld, x.const_data_ptr<scalar_t>(), v.x.ld,
        kAddScaledGrad ? grad_x.data_ptr<scalar_t>() : nullptr, v.grad_x.ld, M, C, rows_per_block,
        p, part.data_ptr<acc>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  BOOL_SWITCH(accumulate, kAccumulate, [&] {
    bn_backward_finalize_kernel<acc, kAccumulate>
        <<<(C + 127) / 128, 128, 0, stream>>>(part.data_ptr<acc>(), G, C, sum_g, sum_gxhat);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc>
__global__ void bn_grad_input_kernel(const scalar_t* __restrict__ grad_z, int64_t ldg,
                                     const scalar_t* __restrict__ x, int64_t ldx,
                                     scalar_t* __restrict__ grad_x, int64_t ldd, int64_t M,
                                     int64_t C, BnParams<acc> p, const acc* __restrict__ sum_g,
                                     const acc* __restrict__ sum_gxhat, acc inv_count,
                                     bool batch_stats, bool accumulate) {
  const int64_t n = M * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i - r * C;
    const acc invstd = bn_invstd(p.var[c], p.eps);
    const acc mean = p.mean[c], scale = p.gamma[c] * invstd;
    const acc xv = static_cast<acc>(x[r * ldx + c]);
    const acc g =
        relu_grad(static_cast<acc>(grad_z[r * ldg + c]), bn_pre(xv, mean, scale, p.beta[c]));
    acc dx = bn_grad_input(g, (xv - mean) * invstd, scale, sum_g[c] * inv_count,
                           sum_gxhat[c] * inv_count, batch_stats);
    scalar_t* d = grad_x + r * ldd + c;
    if (accumulate) dx += static_cast<acc>(*d);
    *d = static_cast<scalar_t>(dx);
  }
}

void bn_relu_backward_cuda(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta,
                           double eps, bool batch_stats, bool accumulate, const at::Tensor& grad_x,
                           const at::Tensor& grad_gamma, const at::Tensor& grad_beta) {
  const BnBackwardViews v =
      check_bn_relu_backward(grad_z, x, mean, var, gamma, beta, grad_x, grad_gamma, grad_beta);
  if (v.empty()) {  // sums over no rows are zero; dx has no elements
    grad_gamma.zero_();
    grad_beta.zero_();
    return;
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t M = v.x.rows, C = v.x.cols;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward", [&] {
        using acc = acc_t<scalar_t>;
        const auto p = bn_params<acc>(mean, var, gamma, beta, eps);
        acc* sum_g = grad_beta.data_ptr<acc>();
        acc* sum_gxhat = grad_gamma.data_ptr<acc>();
        launch_bn_backward_reduce<scalar_t, acc>(grad_z, x, grad_x, v, p, false, false, sum_g,
                                                 sum_gxhat, stream);
        bn_grad_input_kernel<scalar_t, acc><<<elementwise_blocks(M * C), kThreads, 0, stream>>>(
            grad_z.const_data_ptr<scalar_t>(), v.grad_z.ld, x.const_data_ptr<scalar_t>(), v.x.ld,
            grad_x.data_ptr<scalar_t>(), v.grad_x.ld, M, C, p, sum_g, sum_gxhat, acc(1) / acc(M),
            batch_stats, accumulate);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void bn_relu_backward_reduce_cuda(const at::Tensor& grad_z, const at::Tensor& x,
                                  const at::Tensor& mean, const at::Tensor& var,
                                  const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                  const at::Tensor& grad_x, const at::Tensor& sums) {
  const BnBackwardViews v =
      check_bn_relu_backward_reduce(grad_z, x, mean, var, gamma, beta, grad_x, sums);
  if (v.empty()) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_reduce", [&] {
        using acc = acc_t<scalar_t>;
        acc* sp = sums.data_ptr<acc>();
        launch_bn_backward_reduce<scalar_t, acc>(grad_z, x, grad_x, v,
                                                 bn_params<acc>(mean, var, gamma, beta, eps), true,
                                                 true, sp, sp + v.x.cols, stream);
      });
}

template <typename scalar_t, typename acc>
__global__ void bn_backward_apply_kernel(const scalar_t* __restrict__ x, int64_t ldx,
                                         scalar_t* __restrict__ grad_x, int64_t ldd, int64_t M,
                                         int64_t C, BnParams<acc> p, const acc* __restrict__ sums,
                                         acc inv_count) {
  const int64_t n = M * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i - r * C;
    const acc invstd = bn_invstd(p.var[c], p.eps);
    const acc xhat = (static_cast<acc>(x[r * ldx + c]) - p.mean[c]) * invstd;
    const acc terms = bn_grad_batch_terms(xhat, p.gamma[c] * invstd, sums[c] * inv_count,
                                          sums[C + c] * inv_count);
    scalar_t* d = grad_x + r * ldd + c;
    *d = static_cast<scalar_t>(static_cast<acc>(*d) + terms);
  }
}

void bn_relu_backward_apply_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                 const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                 const at::Tensor& sums, int64_t count, const at::Tensor& grad_x) {
  const BnBackwardViews v =
      check_bn_relu_backward_apply(x, mean, var, gamma, beta, sums, count, grad_x);
  if (v.empty()) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward_apply", [&] {
        using acc = acc_t<scalar_t>;
        bn_backward_apply_kernel<scalar_t, acc>
            <<<elementwise_blocks(v.x.rows * v.x.cols), kThreads, 0, stream>>>(
                x.const_data_ptr<scalar_t>(), v.x.ld, grad_x.data_ptr<scalar_t>(), v.grad_x.ld,
                v.x.rows, v.x.cols, bn_params<acc>(mean, var, gamma, beta, eps),
                sums.const_data_ptr<acc>(), acc(1) / acc(count));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// ---------------------------------------------------------------------------------------------
// dropout_store

template <typename scalar_t, typename acc>
__global__ void dropout_store_kernel(const scalar_t* __restrict__ src, int64_t lds,
                                     scalar_t* __restrict__ dst, int64_t ldd, int64_t M, int64_t C,
                                     bool drop, uint64_t seed, int64_t key, uint64_t threshold,
                                     acc scale) {
  const int64_t n = M * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i - r * C;
    const scalar_t v = src[r * lds + c];
    if (!drop) {
      dst[r * ldd + c] = v;
    } else {
      // The element index r * C + c is the CPU kernel's, so both devices draw the same mask.
      const bool keep = dropout_keep(seed, key, i, threshold);
      dst[r * ldd + c] = static_cast<scalar_t>(static_cast<acc>(v) * dropout_factor(keep, scale));
    }
  }
}

void dropout_store_cuda(const at::Tensor& src, double p, int64_t seed, int64_t key,
                        const at::Tensor& dst) {
  const DropoutViews v = check_dropout_store(src, p, dst);
  if (v.src.empty()) return;
  c10::cuda::CUDAGuard guard(src.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, src.scalar_type(), "dropout_store", [&] {
        using acc = acc_t<scalar_t>;
        dropout_store_kernel<scalar_t, acc>
            <<<elementwise_blocks(v.src.rows * v.src.cols), kThreads, 0, stream>>>(
                src.const_data_ptr<scalar_t>(), v.src.ld, dst.data_ptr<scalar_t>(), v.dst.ld,
                v.src.rows, v.src.cols, p > 0, static_cast<uint64_t>(seed), key,
                dropout_threshold(p), static_cast<acc>(1.0 / (1.0 - p)));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CUDA, m) {
  m.impl("channel_stats", static_cast<ChannelStatsFn*>(&channel_stats_cuda));
  m.impl("bn_relu", static_cast<BnReluFn*>(&bn_relu_cuda));
  m.impl("bn_relu_backward", static_cast<BnReluBackwardFn*>(&bn_relu_backward_cuda));
  m.impl("bn_relu_backward_reduce",
         static_cast<BnReluBackwardReduceFn*>(&bn_relu_backward_reduce_cuda));
  m.impl("bn_relu_backward_apply",
         static_cast<BnReluBackwardApplyFn*>(&bn_relu_backward_apply_cuda));
  m.impl("dropout_store", static_cast<DropoutStoreFn*>(&dropout_store_cuda));
}

}  // namespace dense_ext
