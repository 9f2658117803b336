// Kernel arithmetic shared by the CPU (cpu/kernels.cpp) and CUDA (cuda/kernels.cu) kernels.
//
// Every per-element and per-channel formula lives here once, as __host__ __device__ inline
// functions, so the CPU tests exercise exactly the arithmetic the GPU runs. Accumulation type:
// float for float/half/bfloat16 buffers, double for double buffers (acc_t<scalar_t>).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__CUDACC__)
#define DENSE_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#define DENSE_EXT_UNROLL _Pragma("unroll")
#define DENSE_EXT_NO_UNROLL _Pragma("unroll 1")
#else
#define DENSE_EXT_HOST_DEVICE inline
#define DENSE_EXT_UNROLL
#define DENSE_EXT_NO_UNROLL
#endif

namespace dense_ext {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

// ---------------------------------------------------------------------------------------------
// Channel statistics: count, mean and M2 (sum of squared deviations) of one channel.
// Per-tile Welford updates, tiles merged with Chan et al.'s parallel formula; both are stable on
// data with large means, unlike sum / sum-of-squares.
template <typename acc>
struct MeanM2 {
  acc n;
  acc mean;
  acc m2;
};

template <typename acc>
DENSE_EXT_HOST_DEVICE MeanM2<acc> meanm2_empty() {
  return {acc(0), acc(0), acc(0)};
}

// Welford: add value x to a running (mean, m2) that already holds n - 1 values; inv_n = 1 / n is
// passed in because it is the same for every channel of a row.
template <typename acc>
DENSE_EXT_HOST_DEVICE void welford_add(acc& mean, acc& m2, acc x, acc inv_n) {
  acc delta = x - mean;
  mean += delta * inv_n;
  m2 += delta * (x - mean);
}

// Chan et al. with the counts given: (mean, m2) of n_a > 0 values absorbs (mean_b, m2_b) of n_b
// values, frac = n_b / (n_a + n_b). For merges whose counts are the same for every channel.
template <typename acc>
DENSE_EXT_HOST_DEVICE void chan_merge_counts(acc& mean, acc& m2, acc mean_b, acc m2_b, acc n_a,
                                             acc frac) {
  acc delta = mean_b - mean;
  mean += delta * frac;
  m2 += m2_b + delta * delta * n_a * frac;
}

// Chan et al.: merge statistics b into a.
template <typename acc>
DENSE_EXT_HOST_DEVICE void chan_merge(MeanM2<acc>& a, const MeanM2<acc>& b) {
  if (b.n == acc(0)) return;
  if (a.n == acc(0)) {
    a = b;
    return;
  }
  acc n = a.n + b.n;
  chan_merge_counts(a.mean, a.m2, b.mean, b.m2, a.n, b.n / n);
  a.n = n;
}

// Adds N values to the running statistics s, as one Chan merge of the batch's own mean and M2
// (two passes over the batch, in registers): one division per batch instead of one per value.
template <typename acc, int N>
DENSE_EXT_HOST_DEVICE void welford_add_batch(MeanM2<acc>& s, const acc (&vals)[N]) {
  acc sum = 0;
  DENSE_EXT_UNROLL
  for (int i = 0; i < N; ++i) sum += vals[i];
  const acc mean = sum * (acc(1) / acc(N));
  acc m2 = 0;
  DENSE_EXT_UNROLL
  for (int i = 0; i < N; ++i) m2 += (vals[i] - mean) * (vals[i] - mean);
  chan_merge(s, MeanM2<acc>{acc(N), mean, m2});
}

// Shifted statistics. Welford updates the mean in the data's precision; on data with a large mean
// (|mean| >> std) each update's rounding (one ulp of the mean) is then large against the deviations
// and pollutes M2. So statistics run on shifted values x - shift, shift = the channel's first
// value: the subtraction is exact for values close to the shift (Sterbenz), the shifted mean is
// small, and the mean is shift + shifted mean, rounded once. All tiles of a channel use the same
// shift.

// Biased variance (what BN normalises with) of merged statistics.
template <typename acc>
DENSE_EXT_HOST_DEVICE acc meanm2_var(const MeanM2<acc>& s) {
  return s.n > acc(0) ? s.m2 / s.n : acc(0);
}

// ---------------------------------------------------------------------------------------------
// BN + ReLU. Per channel: invstd = 1/sqrt(var + eps), scale = gamma * invstd.
template <typename acc>
DENSE_EXT_HOST_DEVICE acc bn_invstd(acc var, double eps) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<acc, double>::value) {
    return ::rsqrt(var + acc(eps));
  } else {
    return ::rsqrtf(var + acc(eps));
  }
#else
  return acc(1) / std::sqrt(var + acc(eps));
#endif
}

// Pre-activation (x - mean) * scale + beta; (x - mean) first so large means cancel exactly.
template <typename acc>
DENSE_EXT_HOST_DEVICE acc bn_pre(acc x, acc mean, acc scale, acc beta) {
  return (x - mean) * scale + beta;
}

// torch.relu: NaN stays NaN (and -0 stays -0). Written as a comparison that is false for NaN, so
// the compiler cannot turn it into a NaN-dropping max (FMNMX / max.f32 return the other operand
// when one is NaN; `y > 0 ? y : 0` compiles to exactly that).
template <typename acc>
DENSE_EXT_HOST_DEVICE acc relu(acc y) {
  return y < acc(0) ? acc(0) : y;
}

// Gradient through the ReLU as torch's threshold_backward computes it: zero where the
// pre-activation is <= 0, grad_z elsewhere, so a NaN pre-activation passes its gradient and a NaN
// gradient is dropped only where the ReLU was off.
template <typename acc>
DENSE_EXT_HOST_DEVICE acc relu_grad(acc grad_z, acc pre) {
  return pre <= acc(0) ? acc(0) : grad_z;
}

// BN backward for one element, from the per-channel means of g and g*xhat over the batch.
// With batch statistics dx = scale * (g - mean(g) - xhat * mean(g * xhat)); with fixed
// (running) statistics the mean and variance do not depend on x and dx = scale * g.
template <typename acc>
DENSE_EXT_HOST_DEVICE acc bn_grad_input(acc g, acc xhat, acc scale, acc mean_g, acc mean_gxhat,
                                        bool batch_stats) {
  return batch_stats ? scale * (g - mean_g - xhat * mean_gxhat) : scale * g;
}

// The same dx in two phases, for a backward that visits the rows in chunks before the batch
// sums are known. Reduce: per chunk, grad_x += scale * g (bn_grad_input with batch_stats false)
// while the sums of g and g*xhat are collected. Apply: once the sums are complete,
// grad_x += bn_grad_batch_terms(...) on every element.
template <typename acc>
DENSE_EXT_HOST_DEVICE acc bn_grad_batch_terms(acc xhat, acc scale, acc mean_g, acc mean_gxhat) {
  return -scale * (mean_g + xhat * mean_gxhat);
}

// The same terms folded into two coefficients per channel, as an affine function of x - mean:
// -scale * (mean_g + xhat * mean_gxhat) = coef0 + coef1 * (x - mean) with coef0 = -scale *
// mean_g and coef1 = -scale * invstd * mean_gxhat. The first BNs of all layers of a block that
// normalise a channel with batch statistics use the same mean, so their terms add up in the
// coefficients (bn_grad_fold_add) and reach the gradient in one pass (bn_grad_fold_terms) once
// every layer reading the channel is done, instead of one pass over the prefix per layer.
template <typename acc>
DENSE_EXT_HOST_DEVICE void bn_grad_fold_add(acc& coef0, acc& coef1, acc scale, acc invstd,
                                            acc mean_g, acc mean_gxhat) {
  coef0 -= scale * mean_g;
  coef1 -= scale * invstd * mean_gxhat;
}

template <typename acc>
DENSE_EXT_HOST_DEVICE acc bn_grad_fold_terms(acc x, acc mean, acc coef0, acc coef1) {
  return coef0 + coef1 * (x - mean);
}

// ---------------------------------------------------------------------------------------------
// Dropout with a counter-based mask: element `index` (row * C + channel of the layer's [M, C]
// output) of the layer numbered `key` keeps its value iff hash(seed, key, index) < threshold,
// threshold = (1 - p) * 2^32. The mask is a pure function of (seed, key, index), so backward
// replays it exactly on either device and nothing is stored. The hash is SplitMix64's finaliser
// over a unique 64-bit counter.
DENSE_EXT_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

DENSE_EXT_HOST_DEVICE bool dropout_keep(uint64_t seed, int64_t key, int64_t index,
                                        uint64_t threshold) {
  uint64_t stream = mix64(seed ^ (static_cast<uint64_t>(key) * 0x9e3779b97f4a7c15ULL));
  uint64_t r = mix64(stream + static_cast<uint64_t>(index) * 0x9e3779b97f4a7c15ULL);
  return (r >> 32) < threshold;
}

// The multiplier of a kept (1 / (1 - p)) or dropped (0) element. Dropout multiplies by it
// rather than selecting 0, as F.dropout does, so NaN and Inf stay NaN where an element is dropped.
template <typename acc>
DENSE_EXT_HOST_DEVICE acc dropout_factor(bool keep, acc scale) {
  return keep ? scale : acc(0);
}

// Threshold for keep probability 1 - p (p in [0, 1)).
inline uint64_t dropout_threshold(double p) {
  double t = (1.0 - p) * 4294967296.0;
  return t >= 4294967296.0 ? (uint64_t(1) << 32) : static_cast<uint64_t>(t);
}

}  // namespace dense_ext
