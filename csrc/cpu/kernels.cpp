// CPU kernels of the per-channel ops, parallelised over rows with at::parallel_for. Argument
// checks are in common/checks.h, the arithmetic in common/math.cuh (shared with the CUDA
// kernels), the loops over rows in cpu/rows.h (vectorised per instruction set, cpu/isa.h); this
// file splits the rows between threads and merges the per-tile partial sums.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/math.cuh"
#include "../ops.h"
#include "isa.h"

// Loops that may run in place: no dependence between iterations (see cpu/rows.h).
#if defined(__clang__)
#define DENSE_EXT_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define DENSE_EXT_IVDEP _Pragma("GCC ivdep")
#else
#define DENSE_EXT_IVDEP
#endif

// AVX2 and AVX-512 copies of the loops on x86-64 with GCC (selected per function with
// `#pragma GCC target`); elsewhere, Clang included, only the portable copy, which the compiler
// still vectorises for the baseline instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DENSE_EXT_X86_ISAS 1
#endif

// The 3x3 weight-gradient loops (cpu/conv3x3.h) are written with GCC/Clang vector extensions;
// elsewhere conv3x3_weight_grad computes through ATen.
#if defined(__GNUC__)
#define DENSE_EXT_CONV3X3_LOOPS 1
#endif

namespace dense_ext {
namespace cpu {

#ifdef DENSE_EXT_CONV3X3_LOOPS
// One chunk of a 3x3 weight gradient (cpu/conv3x3.h): g rows are [N*H*W, co] with leading
// dimension ldg, x rows [N*H*W, ci] with ldx; the chunk is image n, output rows [h0, h1).
struct Conv3x3Chunk {
  const void* g;
  const void* x;
  int64_t ldg, ldx, co, ci, H, W, n, h0, h1;
};
#endif

// GCC's unroll-and-jam (-O3) fuses pairs of rows of these loops into one scalar loop over the
// channels, which then does not vectorise (channel_stats ran 5x slower on AVX2); every copy of
// the loops is compiled without it.
#if defined(__GNUC__) && !defined(__clang__)
#define DENSE_EXT_GCC_OPTIONS 1
#pragma GCC push_options
#pragma GCC optimize("no-loop-unroll-and-jam")
#endif
namespace portable {
struct IsaTag {};
#include "rows.h"
#ifdef DENSE_EXT_CONV3X3_LOOPS
constexpr int kVecBytes = 16;
#include "conv3x3.h"
#endif
}  // namespace portable

#ifdef DENSE_EXT_X86_ISAS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct IsaTag {};
#include "rows.h"
#ifdef DENSE_EXT_CONV3X3_LOOPS
constexpr int kVecBytes = 32;
#include "conv3x3.h"
#endif
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")
namespace avx512 {
struct IsaTag {};
#include "rows.h"
#ifdef DENSE_EXT_CONV3X3_LOOPS
constexpr int kVecBytes = 64;
#include "conv3x3.h"
#endif
}  // namespace avx512
#pragma GCC pop_options
#endif  // DENSE_EXT_X86_ISAS

#ifdef DENSE_EXT_GCC_OPTIONS
#pragma GCC pop_options
#endif

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

Isa supported_isa() {
#ifdef DENSE_EXT_X86_ISAS
  // torch's choice for its own kernels: what the CPU and OS support, lowered by
  // ATEN_CPU_CAPABILITY ("DEFAULT", "AVX2" or "AVX512" on x86-64).
  static const Isa isa = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Isa::kAvx512;
    if (capability == "AVX2") return Isa::kAvx2;
    return Isa::kPortable;
  }();
  return isa;
#else
  return Isa::kPortable;
#endif
}

namespace {
std::atomic<int> active{-1};  // -1: not chosen yet
}  // namespace

Isa active_isa() {
  int a = active.load(std::memory_order_relaxed);
  if (a < 0) {
    // AVX2 where AVX-512 is supported too: the loops are bound by memory traffic, and on the
    // development machine (AMD EPYC, AVX-512 on 256-bit units) the AVX-512 copies ran 5-15 %
    // slower than the AVX2 ones (longer scalar tails at channel counts like 204).
    a = std::min(static_cast<int>(supported_isa()), static_cast<int>(Isa::kAvx2));
    active.store(a, std::memory_order_relaxed);
  }
  return static_cast<Isa>(a);
}

bool set_active_isa(const char* name) {
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      if (static_cast<int>(isa) > static_cast<int>(supported_isa())) return false;
      active.store(static_cast<int>(isa), std::memory_order_relaxed);
      return true;
    }
  }
  return false;
}

}  // namespace cpu

namespace {
// The row functions are found by argument-dependent lookup on the ISA tag. Before C++20 (P0846)
// a call with explicit template arguments reaches that lookup only when some template of the
// name is visible here; these are declared for that alone, never defined or chosen (torch 2.11
// builds extensions with -std=c++17).
struct NoIsaTag;
template <bool>
void bn_grad_sums_rows(NoIsaTag);
template <bool, bool>
void bn_grad_input_rows(NoIsaTag);

// Calls fn with the instruction-set tag of the loops to use: the active one for float32 (the
// training dtype), the portable loops for the other dtypes.
template <typename scalar_t, typename Fn>
void with_isa(Fn&& fn) {
#ifdef DENSE_EXT_X86_ISAS
  if constexpr (std::is_same_v<scalar_t, float>) {
    switch (cpu::active_isa()) {
      case cpu::Isa::kAvx512:
        return fn(cpu::avx512::IsaTag{});
      case cpu::Isa::kAvx2:
        return fn(cpu::avx2::IsaTag{});
      default:
        break;
    }
  }
#endif
  fn(cpu::portable::IsaTag{});
}

// Rows per reduction tile: small enough that tiles feed both cores, large enough that the
// per-tile partials are few. Tiles are merged in tile order, so results are deterministic and
// independent of the thread count.
constexpr int64_t kTileRows = 256;

// Accumulation precision. The reductions over rows (channel statistics, the BN backward sums of
// g and g * (x - mean)) run their vector loops in acc_t (float for float32 buffers, at full
// vector width) over short tiles of kSubRows rows, and move each short tile's partials into the
// tile's partials in sum_t = double (a Chan merge for the statistics, an addition for the sums);
// tiles merge in double, and the per-channel constants derived from the results (mean, variance,
// invstd, gamma * invstd, the means of the sums) are computed in double and rounded once to the
// acc_t of the tables the ops exchange. Summing whole 256-row tiles in float left the BN
// statistics and parameter gradients up to 3-7x further from the exact result than PyTorch's CPU
// batch norm, which sums in double (the tolerance rule, docs/decisions.md); summing every
// element in double made the loops mix widths and bn_relu_backward ran 10x slower. 16 rows: the
// op-level errors are about half PyTorch's (medians over random cases, docs/decisions.md), and a
// DenseNet-BC-100 training step takes the same time (bench/cpu_reductions.py). The elementwise
// work (pre-activation, ReLU mask, dx) stays in acc_t, so the masks are the forward's. The CUDA
// kernels keep float sums (docs/design.md).
constexpr int64_t kSubRows = 16;
using sum_t = double;

int64_t num_tiles(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

// Rows per parallel_for grain of the elementwise passes: about 32K elements.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

#define DENSE_EXT_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// channel_stats

template <typename scalar_t>
void channel_stats_impl(const at::Tensor& x, const RowsView& v, const at::Tensor& stats,
                        int64_t lo) {
  using acc = acc_t<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t C = v.cols, ld = v.ld, M = v.rows;
  const int64_t tiles = num_tiles(M);
  std::vector<sum_t> mean(tiles * C), m2(tiles * C);
  // Welford runs on x - shift, shift = the channel's first value ("Shifted statistics" in
  // common/math.cuh).
  std::vector<acc> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc>(xp[c]);
  with_isa<scalar_t>([&](auto isa) {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc> sub_mean(C), sub_m2(C);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * kTileRows, r1 = std::min(M, r0 + kTileRows);
        for (int64_t s0 = r0; s0 < r1; s0 += kSubRows) {
          const int64_t s1 = std::min(r1, s0 + kSubRows);
          welford_rows(isa, xp, ld, s0, s1, C, shift.data(), sub_mean.data(), sub_m2.data());
          chan_merge_rows(isa, s0 - r0, s1 - s0, sub_mean.data(), sub_m2.data(),
                          mean.data() + t * C, m2.data() + t * C, C);
        }
      }
    });
  });
  acc* sp = stats.data_ptr<acc>();
  const int64_t s1 = stats.stride(0);
  for (int64_t c = 0; c < C; ++c) {
    MeanM2<sum_t> total = meanm2_empty<sum_t>();
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n = std::min(M, (t + 1) * kTileRows) - t * kTileRows;
      chan_merge(total, MeanM2<sum_t>{sum_t(n), mean[t * C + c], m2[t * C + c]});
    }
    sp[lo + c] = static_cast<acc>(static_cast<sum_t>(shift[c]) + total.mean);
    sp[s1 + lo + c] = static_cast<acc>(meanm2_var(total));
  }
}

void channel_stats_cpu(const at::Tensor& x, const at::Tensor& stats, int64_t lo) {
  const RowsView v = check_channel_stats(x, stats, lo);
  if (v.empty()) return;
  DENSE_EXT_DISPATCH(x.scalar_type(), "channel_stats",
                     [&] { channel_stats_impl<scalar_t>(x, v, stats, lo); });
}

// ---------------------------------------------------------------------------------------------
// Per-channel constants of a BN: mean, scale = gamma * invstd, beta; computed once per call, not
// per element, in double and rounded once to acc (the elementwise loops' type); invstd also in
// sum_t for the reductions.
template <typename acc>
struct BnConsts {
  std::vector<acc> mean, scale, beta;
  std::vector<sum_t> invstd_s;
  BnConsts(const at::Tensor& m, const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& b,
           double eps) {
    const int64_t C = m.numel();
    mean.resize(C), scale.resize(C), beta.resize(C), invstd_s.resize(C);
    const acc *mp = m.const_data_ptr<acc>(), *vp = var.const_data_ptr<acc>();
    const acc *gp = gamma.const_data_ptr<acc>(), *bp = b.const_data_ptr<acc>();
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = mp[c];
      invstd_s[c] = bn_invstd(static_cast<sum_t>(vp[c]), eps);
      scale[c] = static_cast<acc>(static_cast<sum_t>(gp[c]) * invstd_s[c]);
      beta[c] = bp[c];
    }
  }
};

// ---------------------------------------------------------------------------------------------
// bn_relu

template <typename scalar_t>
void bn_relu_impl(const at::Tensor& x, const at::Tensor& out, const BnReluViews& v,
                  const BnConsts<acc_t<scalar_t>>& k) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t C = v.x.cols;
  with_isa<scalar_t>([&](auto isa) {
    at::parallel_for(0, v.x.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
      bn_relu_rows(isa, xp, v.x.ld, op, v.out.ld, r0, r1, C, k.mean.data(), k.scale.data(),
                   k.beta.data());
    });
  });
}

void bn_relu_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                 const at::Tensor& gamma, const at::Tensor& beta, double eps,
                 const at::Tensor& out) {
  const BnReluViews v = check_bn_relu(x, mean, var, gamma, beta, out);
  if (v.x.empty()) return;
  DENSE_EXT_DISPATCH(x.scalar_type(), "bn_relu", [&] {
    BnConsts<acc_t<scalar_t>> k(mean, var, gamma, beta, eps);
    bn_relu_impl<scalar_t>(x, out, v, k);
  });
}

// ---------------------------------------------------------------------------------------------
// BN backward. The reduce phase sums g = relu_grad(grad_z) and g * xhat per channel over all
// rows, in sum_t (per-tile partials merged in tile order); with kAddScaledGrad it also adds
// scale * g to grad_x on the way (bn_relu_backward_reduce: the fixed-statistics part of dx,
// before the sums are complete). The apply phase adds the batch-mean terms once the sums are
// known.

template <typename scalar_t, bool kAddScaledGrad>
void bn_backward_reduce(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& grad_x,
                        const BnBackwardViews& v, const BnConsts<acc_t<scalar_t>>& k, sum_t* sum_g,
                        sum_t* sum_gxhat) {
  using acc = acc_t<scalar_t>;
  const scalar_t* gp = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = kAddScaledGrad ? grad_x.data_ptr<scalar_t>() : nullptr;
  const int64_t C = v.x.cols, M = v.x.rows;
  const int64_t tiles = num_tiles(M);
  std::vector<sum_t> sg(tiles * C, sum_t(0)), sgx(tiles * C, sum_t(0));
  with_isa<scalar_t>([&](auto isa) {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc> sub_g(C, acc(0)), sub_gx(C, acc(0));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * kTileRows, r1 = std::min(M, r0 + kTileRows);
        for (int64_t s0 = r0; s0 < r1; s0 += kSubRows) {
          const int64_t s1 = std::min(r1, s0 + kSubRows);
          bn_grad_sums_rows<kAddScaledGrad>(isa, gp, v.grad_z.ld, xp, v.x.ld, dp, v.grad_x.ld, s0,
                                            s1, C, k.mean.data(), k.scale.data(), k.beta.data(),
                                            sub_g.data(), sub_gx.data());
          widen_add_rows(isa, sub_g.data(), sg.data() + t * C, C);
          widen_add_rows(isa, sub_gx.data(), sgx.data() + t * C, C);
        }
      }
    });
  });
  for (int64_t c = 0; c < C; ++c) {
    sum_t a = 0, b = 0;
    for (int64_t t = 0; t < tiles; ++t) a += sg[t * C + c], b += sgx[t * C + c];
    sum_g[c] = a;
    sum_gxhat[c] = b * k.invstd_s[c];  // sum of g * (x - mean), times invstd
  }
}

// dx of every element from the complete means of g and g*xhat: written, or accumulated.
template <typename scalar_t, bool kBatchStats, bool kAccumulate>
void bn_backward_input(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& grad_x,
                       const BnBackwardViews& v, const BnConsts<acc_t<scalar_t>>& k,
                       const acc_t<scalar_t>* mean_g, const acc_t<scalar_t>* coef_xc) {
  const scalar_t* gp = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = grad_x.data_ptr<scalar_t>();
  const int64_t C = v.x.cols;
  with_isa<scalar_t>([&](auto isa) {
    at::parallel_for(0, v.x.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
      bn_grad_input_rows<kBatchStats, kAccumulate>(isa, gp, v.grad_z.ld, xp, v.x.ld, dp,
                                                   v.grad_x.ld, r0, r1, C, k.mean.data(),
                                                   k.scale.data(), k.beta.data(), mean_g, coef_xc);
    });
  });
}

void bn_relu_backward_cpu(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta,
                          double eps, bool batch_stats, bool accumulate, const at::Tensor& grad_x,
                          const at::Tensor& grad_gamma, const at::Tensor& grad_beta) {
  const BnBackwardViews v =
      check_bn_relu_backward(grad_z, x, mean, var, gamma, beta, grad_x, grad_gamma, grad_beta);
  // grad_z may be grad_x itself (each element is read before it is written), but not a
  // different view of the same memory.
  at::assert_no_partial_overlap(grad_z, grad_x);
  TORCH_CHECK(!accumulate || grad_z.numel() == 0 || grad_z.data_ptr() != grad_x.data_ptr(),
              "dense_ext: bn_relu_backward in place (grad_z is grad_x) cannot accumulate");
  if (v.empty()) {  // sums over no rows are zero; dx has no elements
    grad_gamma.zero_();
    grad_beta.zero_();
    return;
  }
  DENSE_EXT_DISPATCH(x.scalar_type(), "bn_relu_backward", [&] {
    using acc = acc_t<scalar_t>;
    BnConsts<acc> k(mean, var, gamma, beta, eps);
    const int64_t C = v.x.cols;
    std::vector<sum_t> sum_g(C), sum_gxhat(C);
    bn_backward_reduce<scalar_t, false>(grad_z, x, grad_x, v, k, sum_g.data(), sum_gxhat.data());
    acc* dbeta = grad_beta.data_ptr<acc>();
    acc* dgamma = grad_gamma.data_ptr<acc>();
    const sum_t m = sum_t(v.x.rows);
    std::vector<acc> mean_g(C), coef_xc(C);  // coef_xc: bn_grad_input_rows in cpu/rows.h
    for (int64_t c = 0; c < C; ++c) {
      dbeta[c] = static_cast<acc>(sum_g[c]);
      dgamma[c] = static_cast<acc>(sum_gxhat[c]);
      mean_g[c] = static_cast<acc>(sum_g[c] / m);
      coef_xc[c] = static_cast<acc>(sum_gxhat[c] / m * k.invstd_s[c]);
    }
    const acc *mg = mean_g.data(), *mgx = coef_xc.data();
    if (batch_stats && accumulate) {
      bn_backward_input<scalar_t, true, true>(grad_z, x, grad_x, v, k, mg, mgx);
    } else if (batch_stats) {
      bn_backward_input<scalar_t, true, false>(grad_z, x, grad_x, v, k, mg, mgx);
    } else if (accumulate) {
      bn_backward_input<scalar_t, false, true>(grad_z, x, grad_x, v, k, mg, mgx);
    } else {
      bn_backward_input<scalar_t, false, false>(grad_z, x, grad_x, v, k, mg, mgx);
    }
  });
}

void bn_relu_backward_reduce_cpu(const at::Tensor& grad_z, const at::Tensor& x,
                                 const at::Tensor& mean, const at::Tensor& var,
                                 const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                 const at::Tensor& grad_x, const at::Tensor& sums) {
  const BnBackwardViews v =
      check_bn_relu_backward_reduce(grad_z, x, mean, var, gamma, beta, grad_x, sums);
  if (v.empty()) return;
  DENSE_EXT_DISPATCH(x.scalar_type(), "bn_relu_backward_reduce", [&] {
    using acc = acc_t<scalar_t>;
    BnConsts<acc> k(mean, var, gamma, beta, eps);
    const int64_t C = v.x.cols;
    std::vector<sum_t> sum_g(C), sum_gxhat(C);
    bn_backward_reduce<scalar_t, true>(grad_z, x, grad_x, v, k, sum_g.data(), sum_gxhat.data());
    acc* sp = sums.data_ptr<acc>();
    for (int64_t c = 0; c < C; ++c) {
      sp[c] = static_cast<acc>(static_cast<sum_t>(sp[c]) + sum_g[c]);
      sp[C + c] = static_cast<acc>(static_cast<sum_t>(sp[C + c]) + sum_gxhat[c]);
    }
  });
}

void bn_relu_backward_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                const at::Tensor& sums, int64_t count, const at::Tensor& grad_x) {
  const BnBackwardViews v =
      check_bn_relu_backward_apply(x, mean, var, gamma, beta, sums, count, grad_x);
  if (v.empty()) return;
  DENSE_EXT_DISPATCH(x.scalar_type(), "bn_relu_backward_apply", [&] {
    using acc = acc_t<scalar_t>;
    BnConsts<acc> k(mean, var, gamma, beta, eps);
    const int64_t C = v.x.cols;
    const acc* sp = sums.const_data_ptr<acc>();
    std::vector<acc> mg(C), coef_xc(C);  // coef_xc: bn_grad_input_rows in cpu/rows.h
    for (int64_t c = 0; c < C; ++c) {
      mg[c] = static_cast<acc>(static_cast<sum_t>(sp[c]) / sum_t(count));
      coef_xc[c] = static_cast<acc>(static_cast<sum_t>(sp[C + c]) / sum_t(count) * k.invstd_s[c]);
    }
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = grad_x.data_ptr<scalar_t>();
    with_isa<scalar_t>([&](auto isa) {
      at::parallel_for(0, v.x.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
        bn_grad_apply_rows(isa, xp, v.x.ld, dp, v.grad_x.ld, r0, r1, C, k.mean.data(),
                           k.scale.data(), mg.data(), coef_xc.data());
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Folded batch-mean terms (common/math.cuh, bn_grad_fold_add)

void bn_grad_fold_cpu(const at::Tensor& var, const at::Tensor& gamma, double eps,
                      const at::Tensor& sums, int64_t count, const at::Tensor& coef) {
  const int64_t C = check_bn_grad_fold(var, gamma, sums, count, coef);
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "bn_grad_fold", [&] {
    using acc = scalar_t;
    const acc *vp = var.const_data_ptr<acc>(), *gp = gamma.const_data_ptr<acc>();
    const acc* sp = sums.const_data_ptr<acc>();
    acc* c0 = coef.data_ptr<acc>();
    acc* c1 = c0 + coef.stride(0);
    for (int64_t c = 0; c < C; ++c) {  // in sum_t, rounded once per coefficient
      const sum_t invstd = bn_invstd(static_cast<sum_t>(vp[c]), eps);
      sum_t coef0 = c0[c], coef1 = c1[c];
      bn_grad_fold_add(coef0, coef1, static_cast<sum_t>(gp[c]) * invstd, invstd,
                       static_cast<sum_t>(sp[c]) / sum_t(count),
                       static_cast<sum_t>(sp[C + c]) / sum_t(count));
      c0[c] = static_cast<acc>(coef0), c1[c] = static_cast<acc>(coef1);
    }
  });
}

void bn_grad_fold_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& coef,
                            const at::Tensor& grad_x) {
  const BnBackwardViews v = check_bn_grad_fold_apply(x, mean, coef, grad_x);
  if (v.empty()) return;
  DENSE_EXT_DISPATCH(x.scalar_type(), "bn_grad_fold_apply", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = grad_x.data_ptr<scalar_t>();
    const acc* mp = mean.const_data_ptr<acc>();
    const acc* c0 = coef.const_data_ptr<acc>();
    const acc* c1 = c0 + coef.stride(0);
    const int64_t C = v.x.cols;
    with_isa<scalar_t>([&](auto isa) {
      at::parallel_for(0, v.x.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
        bn_grad_terms_rows(isa, xp, v.x.ld, dp, v.grad_x.ld, r0, r1, C, mp, c0, c1);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// dropout_store

template <typename scalar_t>
void dropout_store_impl(const at::Tensor& src, const at::Tensor& dst, const DropoutViews& v,
                        double p, uint64_t seed, int64_t key) {
  using acc = acc_t<scalar_t>;
  const scalar_t* sp = src.const_data_ptr<scalar_t>();
  scalar_t* dp = dst.data_ptr<scalar_t>();
  const int64_t C = v.src.cols;
  const uint64_t threshold = dropout_threshold(p);
  const acc scale = static_cast<acc>(1.0 / (1.0 - p));
  with_isa<scalar_t>([&](auto isa) {
    at::parallel_for(0, v.src.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
      dropout_rows(isa, sp, v.src.ld, dp, v.dst.ld, r0, r1, C, p > 0, seed, key, threshold, scale);
    });
  });
}

void dropout_store_cpu(const at::Tensor& src, double p, const at::Tensor& seed, int64_t key,
                       const at::Tensor& dst) {
  const DropoutViews v = check_dropout_store(src, p, seed, dst);
  if (v.src.empty()) return;
  const uint64_t seed_value = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  DENSE_EXT_DISPATCH(src.scalar_type(), "dropout_store",
                     [&] { dropout_store_impl<scalar_t>(src, dst, v, p, seed_value, key); });
}

// ---------------------------------------------------------------------------------------------
// conv3x3_weight_grad

// Image rows per chunk: whole rows, about 256 of them (128-2048 tried on DenseNet shapes; 256-512
// ran fastest), so that the chunk's input rows stay in the core's L2 cache while the nine taps
// and every register tile walk them. The chunks are summed into kConvGroups partial gradients,
// each over a fixed range of chunks, then added in group order: the result does not depend on
// the thread count, and no sum runs over more than one chunk's rows in one accumulator.
constexpr int64_t kConvChunkRows = 256;
constexpr int64_t kConvGroups = 16;

struct Conv3x3Views {
  RowsView g, x;
};

Conv3x3Views check_conv3x3_weight_grad(const at::Tensor& grad_out, const at::Tensor& input,
                                       const at::Tensor& grad_weight) {
  check_floating(input, "input");
  Conv3x3Views v{rows_view(grad_out, "grad_out"), rows_view(input, "input")};
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "dense_ext: grad_out has dtype ",
              grad_out.scalar_type(), " but input has ", input.scalar_type());
  TORCH_CHECK(grad_out.size(0) == input.size(0) && grad_out.size(2) == input.size(2) &&
                  grad_out.size(3) == input.size(3),
              "dense_ext: grad_out ", grad_out.sizes(), " and input ", input.sizes(),
              " must have the same batch and image size (a 3x3 convolution of stride 1, "
              "padding 1)");
  const std::vector<int64_t> shape = {grad_out.size(1), input.size(1), 3, 3};
  TORCH_CHECK(grad_weight.sizes() == at::IntArrayRef(shape),
              "dense_ext: grad_weight must have shape ", at::IntArrayRef(shape), ", got ",
              grad_weight.sizes());
  TORCH_CHECK(grad_weight.is_contiguous(), "dense_ext: grad_weight must be contiguous");
  TORCH_CHECK(grad_weight.scalar_type() == input.scalar_type(), "dense_ext: grad_weight has dtype ",
              grad_weight.scalar_type(), " but input has ", input.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device() && grad_weight.device() == input.device(),
              "dense_ext: grad_out, input and grad_weight must be on one device");
  return v;
}

#ifdef DENSE_EXT_CONV3X3_LOOPS
// The padded convolution's weight gradient also sums g * 0 over the output positions whose input
// lies in the zero padding. The loops skip those terms: they are zero unless g is infinite or NaN
// there, and then they make the sum NaN, as in ATen's im2col-based gradient (the naive model's in
// float64). Such (output channel, tap) rows of `out` ([co, ci, 3, 3]) are set to NaN here, from
// one scan of g's border rows and columns.
template <typename T>
void conv3x3_padding_nans(const T* g, int64_t ldg, int64_t N, int64_t H, int64_t W, int64_t co,
                          int64_t ci, T* out) {
  // bad[side * co + o]: g[., o] is not finite somewhere on that border (side 0: the first row,
  // 1: the last row, 2: the first column, 3: the last column of every image).
  std::vector<char> bad(4 * co, 0);
  auto scan = [&](int side, int64_t h0, int64_t h1, int64_t w0, int64_t w1) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t h = h0; h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
          const T* row = g + ((n * H + h) * W + w) * ldg;
          for (int64_t o = 0; o < co; ++o) bad[side * co + o] |= !std::isfinite(row[o]);
        }
      }
    }
  };
  scan(0, 0, 1, 0, W);
  scan(1, H - 1, H, 0, W);
  scan(2, 0, H, 0, 1);
  scan(3, 0, H, W - 1, W);
  for (int tap = 0; tap < 9; ++tap) {
    const int dh = tap / 3 - 1, dw = tap % 3 - 1;  // the input row/column offset of the tap
    for (int64_t o = 0; o < co; ++o) {
      const bool nan = (dh < 0 && bad[o]) || (dh > 0 && bad[co + o]) ||
                       (dw < 0 && bad[2 * co + o]) || (dw > 0 && bad[3 * co + o]);
      if (!nan) continue;
      for (int64_t c = 0; c < ci; ++c)
        out[(o * ci + c) * 9 + tap] = std::numeric_limits<T>::quiet_NaN();
    }
  }
}

template <typename T>
void conv3x3_weight_grad_impl(const at::Tensor& grad_out, const at::Tensor& input,
                              const Conv3x3Views& v, const at::Tensor& grad_weight) {
  const int64_t N = input.size(0), H = input.size(2), W = input.size(3);
  const int64_t co = v.g.cols, ci = v.x.cols, taps = 9 * co * ci;
  const int64_t band = std::clamp<int64_t>(kConvChunkRows / W, 1, H);  // image rows per chunk
  const int64_t per_image = (H + band - 1) / band;
  const int64_t chunks = N * per_image;
  const int64_t groups = std::min(kConvGroups, chunks);
  std::vector<T> partial(groups * taps, T(0));  // [group, tap, co, ci]
  const T* gp = grad_out.const_data_ptr<T>();
  const T* xp = input.const_data_ptr<T>();
  with_isa<T>([&](auto isa) {
    at::parallel_for(0, groups, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t c = chunks * k / groups; c < chunks * (k + 1) / groups; ++c) {
          const int64_t n = c / per_image, h0 = c % per_image * band;
          const cpu::Conv3x3Chunk chunk{
              gp, xp, v.g.ld, v.x.ld, co, ci, H, W, n, h0, std::min(H, h0 + band)};
          conv3x3_wgrad_chunk(isa, chunk, partial.data() + k * taps);
        }
      }
    });
  });
  // The groups' partials added in group order into the first, then laid out as [co, ci, 3, 3].
  T* total = partial.data();
  at::parallel_for(0, taps, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t k = 1; k < groups; ++k) {
      const T* part = partial.data() + k * taps;
      for (int64_t i = i0; i < i1; ++i) total[i] += part[i];
    }
  });
  T* out = grad_weight.data_ptr<T>();
  // A few thousand copies per output channel: split only when there is enough to split (at
  // grain 1 every call of a small layer paid a fork and join).
  at::parallel_for(0, co, row_grain(ci * 9), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t c = 0; c < ci; ++c) {
        for (int64_t tap = 0; tap < 9; ++tap)
          out[(o * ci + c) * 9 + tap] = total[(tap * co + o) * ci + c];
      }
    }
  });
  conv3x3_padding_nans(gp, v.g.ld, N, H, W, co, ci, out);
}
#endif

void conv3x3_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                             const at::Tensor& grad_weight) {
  const Conv3x3Views v = check_conv3x3_weight_grad(grad_out, input, grad_weight);
  if (v.g.empty() || v.x.empty()) {
    grad_weight.zero_();
    return;
  }
#ifdef DENSE_EXT_CONV3X3_LOOPS
  if (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv3x3_weight_grad", [&] {
      conv3x3_weight_grad_impl<scalar_t>(grad_out, input, v, grad_weight);
    });
    return;
  }
#endif
  // float16/bfloat16 (and compilers without vector extensions): ATen's convolution backward.
  const auto grads =
      at::convolution_backward(grad_out, input, grad_weight, std::nullopt, {1, 1}, {1, 1}, {1, 1},
                               false, {0, 0}, 1, {false, true, false});
  grad_weight.copy_(std::get<1>(grads));
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CPU, m) {
  m.impl("channel_stats", static_cast<ChannelStatsFn*>(&channel_stats_cpu));
  m.impl("bn_relu", static_cast<BnReluFn*>(&bn_relu_cpu));
  m.impl("bn_relu_backward", static_cast<BnReluBackwardFn*>(&bn_relu_backward_cpu));
  m.impl("bn_relu_backward_reduce",
         static_cast<BnReluBackwardReduceFn*>(&bn_relu_backward_reduce_cpu));
  m.impl("bn_relu_backward_apply",
         static_cast<BnReluBackwardApplyFn*>(&bn_relu_backward_apply_cpu));
  m.impl("bn_grad_fold", static_cast<BnGradFoldFn*>(&bn_grad_fold_cpu));
  m.impl("bn_grad_fold_apply", static_cast<BnGradFoldApplyFn*>(&bn_grad_fold_apply_cpu));
  m.impl("dropout_store", static_cast<DropoutStoreFn*>(&dropout_store_cpu));
  m.impl("conv3x3_weight_grad", static_cast<Conv3x3WeightGradFn*>(&conv3x3_weight_grad_cpu));
}

}  // namespace dense_ext
