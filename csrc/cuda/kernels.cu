// CUDA kernels of the per-channel ops: the arithmetic of common/math.cuh (shared with
// cpu/kernels.cpp), launched on the current stream of the tensors' device. Argument checks are in
// common/checks.h; every op returns before touching the device when it has nothing to compute.
//
// Geometry (cuda/tiling.cuh): a 2-D grid of lanes_c x lanes_r blocks, blockIdx.x over channel
// tiles, blockIdx.y over rows. A thread keeps the same `vec` channels (one vector load per row)
// and visits its rows kUnroll at a time with all loads issued first. Reductions give each row
// block a contiguous range of rows, merge the row lanes in shared memory (a tree in fixed
// order) and write one partial per channel and row block; a finalize kernel merges the at most
// kMaxPartials partials of a channel, again as a fixed-order tree: deterministic, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/math.cuh"
#include "../common/static_switch.h"
#include "../ops.h"
#include "tiling.cuh"

namespace dense_ext {
namespace {

// Every kernel: 256 threads, at least 4 resident blocks per SM (ptxas keeps to 64 registers
// and, unlike with a bare thread bound, does not spill to reach its own occupancy target).
#define DENSE_EXT_KERNEL __global__ void __launch_bounds__(kThreads, 4)

#define DENSE_EXT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// V = 2 channels per thread when the tiling chose it (16-bit types only), else 1; float and
// double instantiate only V = 1.
#define VEC_SWITCH(VEC, V, ...)                               \
  [&] {                                                       \
    if (VEC == 2) {                                           \
      constexpr static int V = sizeof(scalar_t) == 2 ? 2 : 1; \
      return __VA_ARGS__();                                   \
    } else {                                                  \
      constexpr static int V = 1;                             \
      return __VA_ARGS__();                                   \
    }                                                         \
  }()

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

dim3 grid_of(const Tiling& t) {
  return dim3(static_cast<unsigned>(t.channel_blocks), static_cast<unsigned>(t.row_blocks));
}

dim3 block_of(const Tiling& t) { return dim3(t.lanes_c, t.lanes_r); }

// Finalize kernels: 32 channels x 8 partial lanes per block.
constexpr int kFinalLanesC = 32;
constexpr int kFinalLanesR = kThreads / kFinalLanesC;

int64_t final_blocks(int64_t C) { return (C + kFinalLanesC - 1) / kFinalLanesC; }

// ---------------------------------------------------------------------------------------------
// BN parameters (device pointers, accumulation dtype) and the per-thread constants of its
// channels, computed once per thread.

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

template <typename acc, int V>
struct ChannelConsts {
  acc mean[V], invstd[V], scale[V], beta[V];
};

template <typename acc, int V>
__device__ ChannelConsts<acc, V> channel_consts(const BnParams<acc>& p, int64_t c) {
  ChannelConsts<acc, V> k;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    k.mean[v] = p.mean[c + v];
    k.invstd[v] = bn_invstd(p.var[c + v], p.eps);
    k.scale[v] = p.gamma[c + v] * k.invstd[v];
    k.beta[v] = p.beta[c + v];
  }
  return k;
}

// Shared-memory tree over the row lanes of a block: after it, the row-0 lane's slot holds the
// merge of all lanes, combined in a fixed order. `slot` is the thread's first slot,
// (ty * lanes_c + tx) * V; lane ty merges lane ty + half at each level.
template <typename T, int V, typename Merge>
__device__ void tree_over_row_lanes(T* sh, int slot, int ty, const Tiling& t, Merge merge) {
  __syncthreads();
  for (int half = t.lanes_r / 2; half > 0; half /= 2) {
    if (ty < half) {
#pragma unroll
      for (int v = 0; v < V; ++v) merge(sh[slot + v], sh[slot + half * t.lanes_c * V + v]);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// channel_stats

template <typename scalar_t, typename acc, int V>
DENSE_EXT_KERNEL stats_partial_kernel(const scalar_t* __restrict__ x, int64_t ld, int64_t M,
                                      int64_t C, Tiling t,
                                      acc* __restrict__ part) {  // [3, G, C]: n, mean, m2
  __shared__ MeanM2<acc> sh[kThreads * V];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = thread_channel(t, blockIdx.x, tx);
  MeanM2<acc> s[V];
#pragma unroll
  for (int v = 0; v < V; ++v) s[v] = meanm2_empty<acc>();
  if (c < C) {
    acc shift[V];  // "Shifted statistics" in common/math.cuh: the channel's first value
#pragma unroll
    for (int v = 0; v < V; ++v) shift[v] = static_cast<acc>(x[c + v]);
    stats_thread<scalar_t, acc, V>(x, ld, c, reduction_rows(t, blockIdx.y, ty, M), shift, s);
  }
  const int slot = (ty * t.lanes_c + tx) * V;
#pragma unroll
  for (int v = 0; v < V; ++v) sh[slot + v] = s[v];
  tree_over_row_lanes<MeanM2<acc>, V>(
      sh, slot, ty, t, [](MeanM2<acc>& a, const MeanM2<acc>& b) { chan_merge(a, b); });
  if (ty == 0 && c < C) {
    const int64_t G = t.row_blocks, g = blockIdx.y;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      part[(0 * G + g) * C + c + v] = sh[slot + v].n;
      part[(1 * G + g) * C + c + v] = sh[slot + v].mean;
      part[(2 * G + g) * C + c + v] = sh[slot + v].m2;
    }
  }
}

template <typename scalar_t, typename acc>
DENSE_EXT_KERNEL stats_finalize_kernel(const scalar_t* __restrict__ x, const acc* __restrict__ part,
                                       int64_t G, int64_t C, acc* __restrict__ mean_out,
                                       acc* __restrict__ var_out) {
  __shared__ MeanM2<acc> sh[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kFinalLanesC + tx;
  const bool active = c < C;
  MeanM2<acc> total = meanm2_empty<acc>();
  if (active) {
    const acc* p = part + ty * C + c;  // partial g of channel c: p[(k * G + g - ty) * C]
    for (int64_t g = ty; g < G; g += kFinalLanesR, p += kFinalLanesR * C) {
      chan_merge(total, MeanM2<acc>{p[0], p[G * C], p[2 * G * C]});
    }
  }
  const int slot = ty * kFinalLanesC + tx;
  sh[slot] = total;
  const Tiling lanes{1, kFinalLanesC, kFinalLanesR, 0, 0, 0};
  tree_over_row_lanes<MeanM2<acc>, 1>(
      sh, slot, ty, lanes, [](MeanM2<acc>& a, const MeanM2<acc>& b) { chan_merge(a, b); });
  if (ty == 0 && active) {
    mean_out[c] = static_cast<acc>(x[c]) + sh[slot].mean;
    var_out[c] = meanm2_var(sh[slot]);
  }
}

void channel_stats_cuda(const at::Tensor& x, const at::Tensor& stats, int64_t lo) {
  const RowsView v = check_channel_stats(x, stats, lo);
  if (v.empty()) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  DENSE_EXT_DISPATCH(x.scalar_type(), "channel_stats", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int vec = vector_width(sizeof(scalar_t), v.cols, {{xp, v.ld}});
    const Tiling t = reduction_tiling(v.rows, v.cols, vec, sm_count());
    at::Tensor part = at::empty({3, t.row_blocks, v.cols}, stats.options());
    VEC_SWITCH(t.vec, V, [&] {
      stats_partial_kernel<scalar_t, acc, V><<<grid_of(t), block_of(t), 0, stream>>>(
          xp, v.ld, v.rows, v.cols, t, part.data_ptr<acc>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    acc* sp = stats.data_ptr<acc>();
    stats_finalize_kernel<scalar_t, acc>
        <<<final_blocks(v.cols), dim3(kFinalLanesC, kFinalLanesR), 0, stream>>>(
            xp, part.data_ptr<acc>(), t.row_blocks, v.cols, sp + lo, sp + stats.stride(0) + lo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// bn_relu

template <typename scalar_t, typename acc, int V>
DENSE_EXT_KERNEL bn_relu_kernel(const scalar_t* __restrict__ x, int64_t ldx,
                                scalar_t* __restrict__ out, int64_t ldo, int64_t M, int64_t C,
                                Tiling t, BnParams<acc> p) {
  const int64_t c = thread_channel(t, blockIdx.x, threadIdx.x);
  if (c >= C) return;
  const ChannelConsts<acc, V> k = channel_consts<acc, V>(p, c);
  const RowRange range = elementwise_rows(t, blockIdx.y, threadIdx.y, M);
  const int64_t sx = range.step * ldx, so = range.step * ldo;
  for_rows(range, [&](int64_t r, auto batch) {
    constexpr int N = decltype(batch)::value;
    const scalar_t* xr = x + r * ldx + c;
    scalar_t* orow = out + r * ldo + c;
    Vec<scalar_t, V> xv[N];
#pragma unroll
    for (int u = 0; u < N; ++u) xv[u] = load_vec<V>(xr + u * sx);
#pragma unroll
    for (int u = 0; u < N; ++u) {
      Vec<scalar_t, V> o;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const acc y = bn_pre(static_cast<acc>(xv[u].v[v]), k.mean[v], k.scale[v], k.beta[v]);
        o.v[v] = static_cast<scalar_t>(relu(y));
      }
      store_vec<V>(orow + u * so, o);
    }
  });
}

void bn_relu_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                  const at::Tensor& gamma, const at::Tensor& beta, double eps,
                  const at::Tensor& out) {
  const BnReluViews v = check_bn_relu(x, mean, var, gamma, beta, out);
  if (v.x.empty()) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  DENSE_EXT_DISPATCH(x.scalar_type(), "bn_relu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int vec = vector_width(sizeof(scalar_t), v.x.cols, {{xp, v.x.ld}, {op, v.out.ld}});
    const Tiling t = elementwise_tiling(v.x.rows, v.x.cols, vec, sm_count());
    VEC_SWITCH(t.vec, V, [&] {
      bn_relu_kernel<scalar_t, acc, V>
          <<<grid_of(t), block_of(t), 0, stream>>>(xp, v.x.ld, op, v.out.ld, v.x.rows, v.x.cols, t,
                                                   bn_params<acc>(mean, var, gamma, beta, eps));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// BN backward. The reduce phase sums g = relu_grad(grad_z) and g * xhat per channel: per-block
// partials, then a finalize kernel that merges them into (sum_g, sum_gxhat), written
// (bn_relu_backward: grad_beta, grad_gamma) or added (bn_relu_backward_reduce: sums). With
// kAddScaledGrad the partial kernel also adds scale * g to grad_x for each element it visits (the
// fixed-statistics part of dx, before the sums are complete). Then dx for every element:
// bn_grad_input_kernel (whole batch) or bn_backward_apply_kernel (the batch-mean terms).

template <typename scalar_t, typename acc, int V, bool kAddScaledGrad>
DENSE_EXT_KERNEL bn_backward_reduce_kernel(const scalar_t* __restrict__ grad_z, int64_t ldg,
                                           const scalar_t* __restrict__ x, int64_t ldx,
                                           scalar_t* __restrict__ grad_x, int64_t ldd, int64_t M,
                                           int64_t C, Tiling t, BnParams<acc> p,
                                           acc* __restrict__ part) {  // [2, G, C]
  __shared__ acc sh[2][kThreads * V];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = thread_channel(t, blockIdx.x, tx);
  acc sg[V], sgx[V];
#pragma unroll
  for (int v = 0; v < V; ++v) sg[v] = sgx[v] = acc(0);
  if (c < C) {
    const ChannelConsts<acc, V> k = channel_consts<acc, V>(p, c);
    const RowRange range = reduction_rows(t, blockIdx.y, ty, M);
    const int64_t sx = range.step * ldx, sg_ = range.step * ldg, sd = range.step * ldd;
    for_rows(range, [&](int64_t r, auto batch) {
      constexpr int N = decltype(batch)::value;
      const scalar_t* xr = x + r * ldx + c;
      const scalar_t* gr = grad_z + r * ldg + c;
      [[maybe_unused]] scalar_t* dr = kAddScaledGrad ? grad_x + r * ldd + c : nullptr;
      Vec<scalar_t, V> xv[N], gv[N];
      [[maybe_unused]] Vec<scalar_t, V> dv[N];
#pragma unroll
      for (int u = 0; u < N; ++u) {
        xv[u] = load_vec<V>(xr + u * sx);
        gv[u] = load_vec<V>(gr + u * sg_);
        if constexpr (kAddScaledGrad) dv[u] = load_vec<V>(dr + u * sd);
      }
#pragma unroll
      for (int u = 0; u < N; ++u) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const acc xval = static_cast<acc>(xv[u].v[v]);
          const acc g = relu_grad(static_cast<acc>(gv[u].v[v]),
                                  bn_pre(xval, k.mean[v], k.scale[v], k.beta[v]));
          sg[v] += g;
          sgx[v] += g * ((xval - k.mean[v]) * k.invstd[v]);
          if constexpr (kAddScaledGrad) {
            const acc dx = bn_grad_input(g, acc(0), k.scale[v], acc(0), acc(0), false);
            dv[u].v[v] = static_cast<scalar_t>(static_cast<acc>(dv[u].v[v]) + dx);
          }
        }
        if constexpr (kAddScaledGrad) store_vec<V>(dr + u * sd, dv[u]);
      }
    });
  }
  const int slot = (ty * t.lanes_c + tx) * V;
#pragma unroll
  for (int v = 0; v < V; ++v) sh[0][slot + v] = sg[v], sh[1][slot + v] = sgx[v];
  __syncthreads();
  for (int half = t.lanes_r / 2; half > 0; half /= 2) {
    if (ty < half) {
      const int other = slot + half * t.lanes_c * V;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        sh[0][slot + v] += sh[0][other + v];
        sh[1][slot + v] += sh[1][other + v];
      }
    }
    __syncthreads();
  }
  if (ty == 0 && c < C) {
    const int64_t G = t.row_blocks, g = blockIdx.y;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      part[g * C + c + v] = sh[0][slot + v];
      part[(G + g) * C + c + v] = sh[1][slot + v];
    }
  }
}

template <typename acc, bool kAccumulate>
DENSE_EXT_KERNEL bn_backward_finalize_kernel(const acc* __restrict__ part, int64_t G, int64_t C,
                                             acc* __restrict__ sum_g, acc* __restrict__ sum_gxhat) {
  __shared__ acc sh[2][kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kFinalLanesC + tx;
  acc sg = 0, sgx = 0;
  if (c < C) {
#pragma unroll 4
    for (int64_t g = ty; g < G; g += kFinalLanesR)
      sg += part[g * C + c], sgx += part[(G + g) * C + c];
  }
  const int slot = ty * kFinalLanesC + tx;
  sh[0][slot] = sg, sh[1][slot] = sgx;
  __syncthreads();
  for (int half = kFinalLanesR / 2; half > 0; half /= 2) {
    if (ty < half) {
      sh[0][slot] += sh[0][slot + half * kFinalLanesC];
      sh[1][slot] += sh[1][slot + half * kFinalLanesC];
    }
    __syncthreads();
  }
  if (ty == 0 && c < C) {
    sum_g[c] = kAccumulate ? sum_g[c] + sh[0][slot] : sh[0][slot];
    sum_gxhat[c] = kAccumulate ? sum_gxhat[c] + sh[1][slot] : sh[1][slot];
  }
}

// Launches the reduce phase over all rows of v; sum_g and sum_gxhat receive (or, with
// accumulate, add) the per-channel totals.
template <typename scalar_t, typename acc>
void launch_bn_backward_reduce(const at::Tensor& grad_z, const at::Tensor& x,
                               const at::Tensor& grad_x, const BnBackwardViews& v, BnParams<acc> p,
                               bool add_scaled_grad, bool accumulate, acc* sum_g, acc* sum_gxhat,
                               cudaStream_t stream) {
  const int64_t M = v.x.rows, C = v.x.cols;
  const scalar_t* gp = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = add_scaled_grad ? grad_x.data_ptr<scalar_t>() : nullptr;
  const int vec =
      add_scaled_grad
          ? vector_width(sizeof(scalar_t), C, {{gp, v.grad_z.ld}, {xp, v.x.ld}, {dp, v.grad_x.ld}})
          : vector_width(sizeof(scalar_t), C, {{gp, v.grad_z.ld}, {xp, v.x.ld}});
  const Tiling t = reduction_tiling(M, C, vec, sm_count());
  at::Tensor part = at::empty({2, t.row_blocks, C}, x.options().dtype(acc_dtype(x.scalar_type())));
  VEC_SWITCH(t.vec, V, [&] {
    BOOL_SWITCH(add_scaled_grad, kAddScaledGrad, [&] {
      bn_backward_reduce_kernel<scalar_t, acc, V, kAddScaledGrad>
          <<<grid_of(t), block_of(t), 0, stream>>>(gp, v.grad_z.ld, xp, v.x.ld, dp, v.grad_x.ld, M,
                                                   C, t, p, part.data_ptr<acc>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  BOOL_SWITCH(accumulate, kAccumulate, [&] {
    bn_backward_finalize_kernel<acc, kAccumulate>
        <<<final_blocks(C), dim3(kFinalLanesC, kFinalLanesR), 0, stream>>>(
            part.data_ptr<acc>(), t.row_blocks, C, sum_g, sum_gxhat);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc, int V, bool kBatchStats, bool kAccumulate>
DENSE_EXT_KERNEL bn_grad_input_kernel(const scalar_t* __restrict__ grad_z, int64_t ldg,
                                      const scalar_t* __restrict__ x, int64_t ldx,
                                      scalar_t* __restrict__ grad_x, int64_t ldd, int64_t M,
                                      int64_t C, Tiling t, BnParams<acc> p,
                                      const acc* __restrict__ sum_g,
                                      const acc* __restrict__ sum_gxhat, acc inv_count) {
  const int64_t c = thread_channel(t, blockIdx.x, threadIdx.x);
  if (c >= C) return;
  const ChannelConsts<acc, V> k = channel_consts<acc, V>(p, c);
  acc mean_g[V], mean_gxhat[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    mean_g[v] = sum_g[c + v] * inv_count;
    mean_gxhat[v] = sum_gxhat[c + v] * inv_count;
  }
  const RowRange range = elementwise_rows(t, blockIdx.y, threadIdx.y, M);
  const int64_t sx = range.step * ldx, sg = range.step * ldg, sd = range.step * ldd;
  for_rows(range, [&](int64_t r, auto batch) {
    constexpr int N = decltype(batch)::value;
    const scalar_t* xr = x + r * ldx + c;
    const scalar_t* gr = grad_z + r * ldg + c;
    scalar_t* dr = grad_x + r * ldd + c;
    Vec<scalar_t, V> xv[N], gv[N], dv[N];
#pragma unroll
    for (int u = 0; u < N; ++u) {
      xv[u] = load_vec<V>(xr + u * sx);
      gv[u] = load_vec<V>(gr + u * sg);
      if constexpr (kAccumulate) dv[u] = load_vec<V>(dr + u * sd);
    }
#pragma unroll
    for (int u = 0; u < N; ++u) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const acc xval = static_cast<acc>(xv[u].v[v]);
        const acc g =
            relu_grad(static_cast<acc>(gv[u].v[v]), bn_pre(xval, k.mean[v], k.scale[v], k.beta[v]));
        const acc xhat = (xval - k.mean[v]) * k.invstd[v];
        acc dx = bn_grad_input(g, xhat, k.scale[v], mean_g[v], mean_gxhat[v], kBatchStats);
        if constexpr (kAccumulate) dx += static_cast<acc>(dv[u].v[v]);
        dv[u].v[v] = static_cast<scalar_t>(dx);
      }
      store_vec<V>(dr + u * sd, dv[u]);
    }
  });
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
  DENSE_EXT_DISPATCH(x.scalar_type(), "bn_relu_backward", [&] {
    using acc = acc_t<scalar_t>;
    const auto p = bn_params<acc>(mean, var, gamma, beta, eps);
    acc* sum_g = grad_beta.data_ptr<acc>();
    acc* sum_gxhat = grad_gamma.data_ptr<acc>();
    launch_bn_backward_reduce<scalar_t, acc>(grad_z, x, grad_x, v, p, false, false, sum_g,
                                             sum_gxhat, stream);
    const scalar_t* gp = grad_z.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = grad_x.data_ptr<scalar_t>();
    const int vec =
        vector_width(sizeof(scalar_t), C, {{gp, v.grad_z.ld}, {xp, v.x.ld}, {dp, v.grad_x.ld}});
    const Tiling t = elementwise_tiling(M, C, vec, sm_count());
    VEC_SWITCH(t.vec, V, [&] {
      BOOL_SWITCH(batch_stats, kBatchStats, [&] {
        BOOL_SWITCH(accumulate, kAccumulate, [&] {
          bn_grad_input_kernel<scalar_t, acc, V, kBatchStats, kAccumulate>
              <<<grid_of(t), block_of(t), 0, stream>>>(gp, v.grad_z.ld, xp, v.x.ld, dp, v.grad_x.ld,
                                                       M, C, t, p, sum_g, sum_gxhat,
                                                       acc(1) / acc(M));
        });
      });
    });
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
  DENSE_EXT_DISPATCH(x.scalar_type(), "bn_relu_backward_reduce", [&] {
    using acc = acc_t<scalar_t>;
    acc* sp = sums.data_ptr<acc>();
    launch_bn_backward_reduce<scalar_t, acc>(grad_z, x, grad_x, v,
                                             bn_params<acc>(mean, var, gamma, beta, eps), true,
                                             true, sp, sp + v.x.cols, stream);
  });
}

template <typename scalar_t, typename acc, int V>
DENSE_EXT_KERNEL bn_backward_apply_kernel(const scalar_t* __restrict__ x, int64_t ldx,
                                          scalar_t* __restrict__ grad_x, int64_t ldd, int64_t M,
                                          int64_t C, Tiling t, BnParams<acc> p,
                                          const acc* __restrict__ sums, acc inv_count) {
  const int64_t c = thread_channel(t, blockIdx.x, threadIdx.x);
  if (c >= C) return;
  const ChannelConsts<acc, V> k = channel_consts<acc, V>(p, c);
  acc mean_g[V], mean_gxhat[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    mean_g[v] = sums[c + v] * inv_count;
    mean_gxhat[v] = sums[C + c + v] * inv_count;
  }
  const RowRange range = elementwise_rows(t, blockIdx.y, threadIdx.y, M);
  const int64_t sx = range.step * ldx, sd = range.step * ldd;
  for_rows(range, [&](int64_t r, auto batch) {
    constexpr int N = decltype(batch)::value;
    const scalar_t* xr = x + r * ldx + c;
    scalar_t* dr = grad_x + r * ldd + c;
    Vec<scalar_t, V> xv[N], dv[N];
#pragma unroll
    for (int u = 0; u < N; ++u) {
      xv[u] = load_vec<V>(xr + u * sx);
      dv[u] = load_vec<V>(dr + u * sd);
    }
#pragma unroll
    for (int u = 0; u < N; ++u) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const acc xhat = (static_cast<acc>(xv[u].v[v]) - k.mean[v]) * k.invstd[v];
        const acc terms = bn_grad_batch_terms(xhat, k.scale[v], mean_g[v], mean_gxhat[v]);
        dv[u].v[v] = static_cast<scalar_t>(static_cast<acc>(dv[u].v[v]) + terms);
      }
      store_vec<V>(dr + u * sd, dv[u]);
    }
  });
}

void bn_relu_backward_apply_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                 const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                 const at::Tensor& sums, int64_t count, const at::Tensor& grad_x) {
  const BnBackwardViews v =
      check_bn_relu_backward_apply(x, mean, var, gamma, beta, sums, count, grad_x);
  if (v.empty()) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  DENSE_EXT_DISPATCH(x.scalar_type(), "bn_relu_backward_apply", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = grad_x.data_ptr<scalar_t>();
    const int vec = vector_width(sizeof(scalar_t), v.x.cols, {{xp, v.x.ld}, {dp, v.grad_x.ld}});
    const Tiling t = elementwise_tiling(v.x.rows, v.x.cols, vec, sm_count());
    VEC_SWITCH(t.vec, V, [&] {
      bn_backward_apply_kernel<scalar_t, acc, V>
          <<<grid_of(t), block_of(t), 0, stream>>>(xp, v.x.ld, dp, v.grad_x.ld, v.x.rows, v.x.cols,
                                                   t, bn_params<acc>(mean, var, gamma, beta, eps),
                                                   sums.const_data_ptr<acc>(), acc(1) / acc(count));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// dropout_store

template <typename scalar_t, typename acc, int V, bool kDrop>
DENSE_EXT_KERNEL dropout_store_kernel(const scalar_t* __restrict__ src, int64_t lds,
                                      scalar_t* __restrict__ dst, int64_t ldd, int64_t M, int64_t C,
                                      Tiling t, const int64_t* __restrict__ seed_ptr, int64_t key,
                                      uint64_t threshold, acc scale) {
  const int64_t c = thread_channel(t, blockIdx.x, threadIdx.x);
  if (c >= C) return;
  // Read from device memory, not passed by value: a CUDA graph replays this launch with the
  // seed its own torch.randint just redrew.
  const uint64_t seed = kDrop ? static_cast<uint64_t>(*seed_ptr) : 0;
  const RowRange range = elementwise_rows(t, blockIdx.y, threadIdx.y, M);
  const int64_t ss = range.step * lds, sd = range.step * ldd;
  for_rows(range, [&](int64_t r, auto batch) {
    constexpr int N = decltype(batch)::value;
    const scalar_t* sr = src + r * lds + c;
    scalar_t* dr = dst + r * ldd + c;
    Vec<scalar_t, V> sv[N];
#pragma unroll
    for (int u = 0; u < N; ++u) sv[u] = load_vec<V>(sr + u * ss);
#pragma unroll
    for (int u = 0; u < N; ++u) {
      if constexpr (kDrop) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          // The element index row * C + channel is the CPU kernel's: both devices draw the
          // same mask.
          const int64_t index = (r + u * range.step) * C + c + v;
          const bool keep = dropout_keep(seed, key, index, threshold);
          sv[u].v[v] =
              static_cast<scalar_t>(static_cast<acc>(sv[u].v[v]) * dropout_factor(keep, scale));
        }
      }
      store_vec<V>(dr + u * sd, sv[u]);
    }
  });
}

void dropout_store_cuda(const at::Tensor& src, double p, const at::Tensor& seed, int64_t key,
                        const at::Tensor& dst) {
  const DropoutViews v = check_dropout_store(src, p, seed, dst);
  if (v.src.empty()) return;
  c10::cuda::CUDAGuard guard(src.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  DENSE_EXT_DISPATCH(src.scalar_type(), "dropout_store", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    scalar_t* dp = dst.data_ptr<scalar_t>();
    const int vec = vector_width(sizeof(scalar_t), v.src.cols, {{sp, v.src.ld}, {dp, v.dst.ld}});
    const Tiling t = elementwise_tiling(v.src.rows, v.src.cols, vec, sm_count());
    VEC_SWITCH(t.vec, V, [&] {
      BOOL_SWITCH(p > 0, kDrop, [&] {
        dropout_store_kernel<scalar_t, acc, V, kDrop><<<grid_of(t), block_of(t), 0, stream>>>(
            sp, v.src.ld, dp, v.dst.ld, v.src.rows, v.src.cols, t, seed.const_data_ptr<int64_t>(),
            key, dropout_threshold(p), static_cast<acc>(1.0 / (1.0 - p)));
      });
    });
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
