// CPU kernels of the per-channel ops, parallelised over rows with at::parallel_for. Argument
// checks are in common/checks.h, the arithmetic in common/math.cuh (shared with the CUDA
// kernels); this file only walks the rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"
#include "../common/math.cuh"
#include "../ops.h"

namespace dense_ext {
namespace {

// Rows per reduction tile: small enough that tiles feed both cores, large enough that the
// per-tile partials are few. Tiles are merged in tile order, so results are deterministic.
constexpr int64_t kTileRows = 256;

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
  std::vector<acc> mean(tiles * C), m2(tiles * C), shift(C);
  // Welford runs on x - shift, shift = the channel's first value ("Shifted statistics" in
  // common/math.cuh).
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc>(xp[c]);
  const acc* sh = shift.data();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      acc* mt = mean.data() + t * C;
      acc* qt = m2.data() + t * C;
      for (int64_t c = 0; c < C; ++c) mt[c] = qt[c] = acc(0);
      const int64_t r0 = t * kTileRows, r1 = std::min(M, r0 + kTileRows);
      for (int64_t r = r0; r < r1; ++r) {
        const acc inv_n = acc(1) / acc(r - r0 + 1);
        const scalar_t* row = xp + r * ld;
        for (int64_t c = 0; c < C; ++c) {
          welford_add(mt[c], qt[c], static_cast<acc>(row[c]) - sh[c], inv_n);
        }
      }
    }
  });
  acc* sp = stats.data_ptr<acc>();
  const int64_t s1 = stats.stride(0);
  for (int64_t c = 0; c < C; ++c) {
    MeanM2<acc> total = meanm2_empty<acc>();
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n = std::min(M, (t + 1) * kTileRows) - t * kTileRows;
      chan_merge(total, MeanM2<acc>{acc(n), mean[t * C + c], m2[t * C + c]});
    }
    sp[lo + c] = sh[c] + total.mean;
    sp[s1 + lo + c] = meanm2_var(total);
  }
}

void channel_stats_cpu(const at::Tensor& x, const at::Tensor& stats, int64_t lo) {
  const RowsView v = check_channel_stats(x, stats, lo);
  if (v.empty()) return;
  DENSE_EXT_DISPATCH(x.scalar_type(), "channel_stats",
                     [&] { channel_stats_impl<scalar_t>(x, v, stats, lo); });
}

// ---------------------------------------------------------------------------------------------
// Per-channel constants of a BN: mean, scale = gamma * invstd, beta, invstd; computed once per
// call, not per element.
template <typename acc>
struct BnConsts {
  std::vector<acc> mean, scale, beta, invstd;
  BnConsts(const at::Tensor& m, const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& b,
           double eps) {
    const int64_t C = m.numel();
    mean.resize(C), scale.resize(C), beta.resize(C), invstd.resize(C);
    const acc *mp = m.const_data_ptr<acc>(), *vp = var.const_data_ptr<acc>();
    const acc *gp = gamma.const_data_ptr<acc>(), *bp = b.const_data_ptr<acc>();
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = mp[c];
      invstd[c] = bn_invstd(vp[c], eps);
      scale[c] = gp[c] * invstd[c];
      beta[c] = bp[c];
    }
  }
};

// ---------------------------------------------------------------------------------------------
// bn_relu

template <typename scalar_t>
void bn_relu_impl(const at::Tensor& x, const at::Tensor& out, const BnReluViews& v,
                  const BnConsts<acc_t<scalar_t>>& k) {
  using acc = acc_t<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t C = v.x.cols;
  const acc *mean = k.mean.data(), *scale = k.scale.data(), *beta = k.beta.data();
  at::parallel_for(0, v.x.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = xp + r * v.x.ld;
      scalar_t* orow = op + r * v.out.ld;
      for (int64_t c = 0; c < C; ++c) {
        orow[c] = static_cast<scalar_t>(
            relu(bn_pre(static_cast<acc>(xr[c]), mean[c], scale[c], beta[c])));
      }
    }
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
// rows (per-tile partials merged in tile order); with kAddScaledGrad it also adds scale * g to
// grad_x on the way (bn_relu_backward_reduce: the fixed-statistics part of dx, before the sums
// are complete). The apply phase adds the batch-mean terms once the sums are known.

template <typename scalar_t, bool kAddScaledGrad>
void bn_backward_reduce(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& grad_x,
                        const BnBackwardViews& v, const BnConsts<acc_t<scalar_t>>& k,
                        acc_t<scalar_t>* sum_g, acc_t<scalar_t>* sum_gxhat) {
  using acc = acc_t<scalar_t>;
  const scalar_t* gp = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = kAddScaledGrad ? grad_x.data_ptr<scalar_t>() : nullptr;
  const int64_t C = v.x.cols, M = v.x.rows;
  const acc *mean = k.mean.data(), *scale = k.scale.data(), *beta = k.beta.data();
  const acc* invstd = k.invstd.data();
  const int64_t tiles = num_tiles(M);
  std::vector<acc> sg(tiles * C), sgx(tiles * C);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      acc* a = sg.data() + t * C;
      acc* b = sgx.data() + t * C;
      for (int64_t c = 0; c < C; ++c) a[c] = b[c] = acc(0);
      const int64_t r1 = std::min(M, (t + 1) * kTileRows);
      for (int64_t r = t * kTileRows; r < r1; ++r) {
        const scalar_t* xr = xp + r * v.x.ld;
        const scalar_t* gr = gp + r * v.grad_z.ld;
        for (int64_t c = 0; c < C; ++c) {
          const acc xv = static_cast<acc>(xr[c]);
          const acc g = relu_grad(static_cast<acc>(gr[c]), bn_pre(xv, mean[c], scale[c], beta[c]));
          a[c] += g;
          b[c] += g * ((xv - mean[c]) * invstd[c]);
          if constexpr (kAddScaledGrad) {
            scalar_t* d = dp + r * v.grad_x.ld + c;
            const acc dx = bn_grad_input(g, acc(0), scale[c], acc(0), acc(0), false);
            *d = static_cast<scalar_t>(static_cast<acc>(*d) + dx);
          }
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    acc a = 0, b = 0;
    for (int64_t t = 0; t < tiles; ++t) a += sg[t * C + c], b += sgx[t * C + c];
    sum_g[c] = a;
    sum_gxhat[c] = b;
  }
}

// dx of every element from the complete means of g and g*xhat: written, or accumulated.
template <typename scalar_t>
void bn_backward_input(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& grad_x,
                       const BnBackwardViews& v, const BnConsts<acc_t<scalar_t>>& k,
                       const acc_t<scalar_t>* mean_g, const acc_t<scalar_t>* mean_gxhat,
                       bool batch_stats, bool accumulate) {
  using acc = acc_t<scalar_t>;
  const scalar_t* gp = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = grad_x.data_ptr<scalar_t>();
  const int64_t C = v.x.cols;
  const acc *mean = k.mean.data(), *scale = k.scale.data(), *beta = k.beta.data();
  const acc* invstd = k.invstd.data();
  at::parallel_for(0, v.x.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = xp + r * v.x.ld;
      const scalar_t* gr = gp + r * v.grad_z.ld;
      scalar_t* dr = dp + r * v.grad_x.ld;
      for (int64_t c = 0; c < C; ++c) {
        const acc xv = static_cast<acc>(xr[c]);
        const acc g = relu_grad(static_cast<acc>(gr[c]), bn_pre(xv, mean[c], scale[c], beta[c]));
        const acc xhat = (xv - mean[c]) * invstd[c];
        acc dx = bn_grad_input(g, xhat, scale[c], mean_g[c], mean_gxhat[c], batch_stats);
        if (accumulate) dx += static_cast<acc>(dr[c]);
        dr[c] = static_cast<scalar_t>(dx);
      }
    }
  });
}

void bn_relu_backward_cpu(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& mean,
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
  DENSE_EXT_DISPATCH(x.scalar_type(), "bn_relu_backward", [&] {
    using acc = acc_t<scalar_t>;
    BnConsts<acc> k(mean, var, gamma, beta, eps);
    acc* dbeta = grad_beta.data_ptr<acc>();
    acc* dgamma = grad_gamma.data_ptr<acc>();
    bn_backward_reduce<scalar_t, false>(grad_z, x, grad_x, v, k, dbeta, dgamma);
    const int64_t C = v.x.cols;
    const acc m = acc(v.x.rows);
    std::vector<acc> mean_g(C), mean_gxhat(C);
    for (int64_t c = 0; c < C; ++c) mean_g[c] = dbeta[c] / m, mean_gxhat[c] = dgamma[c] / m;
    bn_backward_input<scalar_t>(grad_z, x, grad_x, v, k, mean_g.data(), mean_gxhat.data(),
                                batch_stats, accumulate);
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
    std::vector<acc> sum_g(C), sum_gxhat(C);
    bn_backward_reduce<scalar_t, true>(grad_z, x, grad_x, v, k, sum_g.data(), sum_gxhat.data());
    acc* sp = sums.data_ptr<acc>();
    for (int64_t c = 0; c < C; ++c) sp[c] += sum_g[c], sp[C + c] += sum_gxhat[c];
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
    std::vector<acc> mg(C), mgx(C);
    for (int64_t c = 0; c < C; ++c) mg[c] = sp[c] / acc(count), mgx[c] = sp[C + c] / acc(count);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, v.x.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * v.x.ld;
        scalar_t* dr = dp + r * v.grad_x.ld;
        for (int64_t c = 0; c < C; ++c) {
          const acc xhat = (static_cast<acc>(xr[c]) - k.mean[c]) * k.invstd[c];
          const acc terms = bn_grad_batch_terms(xhat, k.scale[c], mg[c], mgx[c]);
          dr[c] = static_cast<scalar_t>(static_cast<acc>(dr[c]) + terms);
        }
      }
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
  const bool drop = p > 0;
  at::parallel_for(0, v.src.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* sr = sp + r * v.src.ld;
      scalar_t* dr = dp + r * v.dst.ld;
      if (!drop) {
        for (int64_t c = 0; c < C; ++c) dr[c] = sr[c];
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        const bool keep = dropout_keep(seed, key, r * C + c, threshold);
        dr[c] = static_cast<scalar_t>(static_cast<acc>(sr[c]) * dropout_factor(keep, scale));
      }
    }
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

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CPU, m) {
  m.impl("channel_stats", static_cast<ChannelStatsFn*>(&channel_stats_cpu));
  m.impl("bn_relu", static_cast<BnReluFn*>(&bn_relu_cpu));
  m.impl("bn_relu_backward", static_cast<BnReluBackwardFn*>(&bn_relu_backward_cpu));
  m.impl("bn_relu_backward_reduce",
         static_cast<BnReluBackwardReduceFn*>(&bn_relu_backward_reduce_cpu));
  m.impl("bn_relu_backward_apply",
         static_cast<BnReluBackwardApplyFn*>(&bn_relu_backward_apply_cpu));
  m.impl("dropout_store", static_cast<DropoutStoreFn*>(&dropout_store_cpu));
}

}  // namespace dense_ext
