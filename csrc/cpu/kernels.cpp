// CPU kernels of the per-channel ops, parallelised over rows with at::parallel_for. The math is
// in kernels/math.cuh, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../kernels/math.cuh"
#include "../layout.h"
#include "../ops.h"

namespace dense_ext {
namespace {

// Rows per statistics tile: small enough that tiles feed both cores, large enough that the
// per-tile partials are few.
constexpr int64_t kTileRows = 256;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

template <typename scalar_t>
void channel_stats_impl(const at::Tensor& x, const RowsView& v, const at::Tensor& stats,
                        int64_t lo) {
  using acc = acc_t<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t C = v.cols, ld = v.ld, M = v.rows;
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  std::vector<acc> mean(tiles * C), m2(tiles * C), shift(C);
  // Welford runs on x - shift, shift = the channel's first value (see stats_shift in math.cuh).
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
  RowsView v = check_channel_stats(x, stats, lo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats",
                                  [&] { channel_stats_impl<scalar_t>(x, v, stats, lo); });
}

// Per-channel constants of a BN: mean, scale = gamma * invstd, beta, invstd.
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

template <typename scalar_t>
void bn_relu_impl(const at::Tensor& x, const RowsView& vx, const BnConsts<acc_t<scalar_t>>& k,
                  const at::Tensor& out, const RowsView& vo) {
  using acc = acc_t<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t C = vx.cols;
  const acc *mean = k.mean.data(), *scale = k.scale.data(), *beta = k.beta.data();
  at::parallel_for(0, vx.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = xp + r * vx.ld;
      scalar_t* orow = op + r * vo.ld;
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
  check_floating(x, "x");
  RowsView vx = rows_view(x, "x");
  RowsView vo = rows_view(out, "out");
  check_same(out, "out", x, "x");
  check_bn_params(x, mean, var, gamma, beta, vx.cols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu", [&] {
    BnConsts<acc_t<scalar_t>> k(mean, var, gamma, beta, eps);
    bn_relu_impl<scalar_t>(x, vx, k, out, vo);
  });
}

template <typename scalar_t>
void bn_relu_backward_impl(const at::Tensor& grad_z, const RowsView& vg, const at::Tensor& x,
                           const RowsView& vx, const BnConsts<acc_t<scalar_t>>& k, bool batch_stats,
                           bool accumulate, const at::Tensor& grad_x, const RowsView& vd,
                           const at::Tensor& grad_gamma, const at::Tensor& grad_beta) {
  using acc = acc_t<scalar_t>;
  const scalar_t* gp = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = grad_x.data_ptr<scalar_t>();
  const int64_t C = vx.cols, M = vx.rows;
  const acc *mean = k.mean.data(), *scale = k.scale.data(), *beta = k.beta.data();
  const acc* invstd = k.invstd.data();

  // Pass 1: per-tile sums of g and g*xhat, merged in tile order (deterministic).
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  std::vector<acc> sg(tiles * C), sgx(tiles * C);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      acc* a = sg.data() + t * C;
      acc* b = sgx.data() + t * C;
      for (int64_t c = 0; c < C; ++c) a[c] = b[c] = acc(0);
      const int64_t r1 = std::min(M, (t + 1) * kTileRows);
      for (int64_t r = t * kTileRows; r < r1; ++r) {
        const scalar_t* xr = xp + r * vx.ld;
        const scalar_t* gr = gp + r * vg.ld;
        for (int64_t c = 0; c < C; ++c) {
          const acc xv = static_cast<acc>(xr[c]);
          const acc g = relu_grad(static_cast<acc>(gr[c]), bn_pre(xv, mean[c], scale[c], beta[c]));
          a[c] += g;
          b[c] += g * ((xv - mean[c]) * invstd[c]);
        }
      }
    }
  });
  acc* dgamma = grad_gamma.data_ptr<acc>();
  acc* dbeta = grad_beta.data_ptr<acc>();
  std::vector<acc> mean_g(C), mean_gx(C);
  for (int64_t c = 0; c < C; ++c) {
    acc a = 0, b = 0;
    for (int64_t t = 0; t < tiles; ++t) a += sg[t * C + c], b += sgx[t * C + c];
    dbeta[c] = a;
    dgamma[c] = b;
    mean_g[c] = a / acc(M);
    mean_gx[c] = b / acc(M);
  }

  // Pass 2: dx, written or accumulated.
  const acc *mg = mean_g.data(), *mgx = mean_gx.data();
  at::parallel_for(0, M, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = xp + r * vx.ld;
      const scalar_t* gr = gp + r * vg.ld;
      scalar_t* dr = dp + r * vd.ld;
      for (int64_t c = 0; c < C; ++c) {
        const acc xv = static_cast<acc>(xr[c]);
        const acc g = relu_grad(static_cast<acc>(gr[c]), bn_pre(xv, mean[c], scale[c], beta[c]));
        const acc xhat = (xv - mean[c]) * invstd[c];
        acc dx = bn_grad_input(g, xhat, scale[c], mg[c], mgx[c], batch_stats);
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
  check_floating(x, "x");
  RowsView vx = rows_view(x, "x");
  RowsView vg = rows_view(grad_z, "grad_z");
  RowsView vd = rows_view(grad_x, "grad_x");
  check_same(grad_z, "grad_z", x, "x");
  check_same(grad_x, "grad_x", x, "x");
  check_bn_params(x, mean, var, gamma, beta, vx.cols);
  auto acc = acc_dtype(x.scalar_type());
  check_vector(grad_gamma, "grad_gamma", vx.cols, acc, x);
  check_vector(grad_beta, "grad_beta", vx.cols, acc, x);
  TORCH_CHECK(vx.rows > 0, "dense_ext: x has no rows (N*H*W == 0)");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_backward", [&] {
        BnConsts<acc_t<scalar_t>> k(mean, var, gamma, beta, eps);
        bn_relu_backward_impl<scalar_t>(grad_z, vg, x, vx, k, batch_stats, accumulate, grad_x, vd,
                                        grad_gamma, grad_beta);
      });
}

template <typename scalar_t>
void bn_relu_grad_acc_impl(const at::Tensor& grad_z, const at::Tensor& x,
                           const BnConsts<acc_t<scalar_t>>& k, const at::Tensor& grad_x,
                           const at::Tensor& sums) {
  using acc = acc_t<scalar_t>;
  const RowsView vg = rows_view(grad_z, "grad_z"), vx = rows_view(x, "x");
  const RowsView vd = rows_view(grad_x, "grad_x");
  const scalar_t* gp = grad_z.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = grad_x.data_ptr<scalar_t>();
  const int64_t C = vx.cols, M = vx.rows;
  const acc *mean = k.mean.data(), *scale = k.scale.data(), *beta = k.beta.data();
  const acc* invstd = k.invstd.data();
  // One pass: per-tile sums of g and g*xhat, and grad_x += scale * g.
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  std::vector<acc> sg(tiles * C), sgx(tiles * C);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      acc* a = sg.data() + t * C;
      acc* b = sgx.data() + t * C;
      for (int64_t c = 0; c < C; ++c) a[c] = b[c] = acc(0);
      const int64_t r1 = std::min(M, (t + 1) * kTileRows);
      for (int64_t r = t * kTileRows; r < r1; ++r) {
        const scalar_t* xr = xp + r * vx.ld;
        const scalar_t* gr = gp + r * vg.ld;
        scalar_t* dr = dp + r * vd.ld;
        for (int64_t c = 0; c < C; ++c) {
          const acc xv = static_cast<acc>(xr[c]);
          const acc g = relu_grad(static_cast<acc>(gr[c]), bn_pre(xv, mean[c], scale[c], beta[c]));
          a[c] += g;
          b[c] += g * ((xv - mean[c]) * invstd[c]);
          const acc dx = bn_grad_input(g, acc(0), scale[c], acc(0), acc(0), false);
          dr[c] = static_cast<scalar_t>(static_cast<acc>(dr[c]) + dx);
        }
      }
    }
  });
  acc* sp = sums.data_ptr<acc>();
  for (int64_t c = 0; c < C; ++c) {
    acc a = 0, b = 0;
    for (int64_t t = 0; t < tiles; ++t) a += sg[t * C + c], b += sgx[t * C + c];
    sp[c] += a;
    sp[C + c] += b;
  }
}

void bn_relu_grad_acc_cpu(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& var, const at::Tensor& gamma, const at::Tensor& beta,
                          double eps, const at::Tensor& grad_x, const at::Tensor& sums) {
  check_bn_grad_chunk(grad_z, x, mean, var, gamma, beta, grad_x, sums);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_grad_acc",
                                  [&] {
                                    BnConsts<acc_t<scalar_t>> k(mean, var, gamma, beta, eps);
                                    bn_relu_grad_acc_impl<scalar_t>(grad_z, x, k, grad_x, sums);
                                  });
}

void bn_grad_correct_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                         const at::Tensor& gamma, const at::Tensor& beta, double eps,
                         const at::Tensor& sums, int64_t count, const at::Tensor& grad_x) {
  check_bn_grad_chunk(at::Tensor(), x, mean, var, gamma, beta, grad_x, sums);
  TORCH_CHECK(count > 0, "dense_ext: count must be positive, got ", count);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_grad_correct", [&] {
        using acc = acc_t<scalar_t>;
        BnConsts<acc> k(mean, var, gamma, beta, eps);
        const RowsView vx = rows_view(x, "x"), vd = rows_view(grad_x, "grad_x");
        const int64_t C = vx.cols;
        const acc* sp = sums.const_data_ptr<acc>();
        std::vector<acc> mg(C), mgx(C);
        for (int64_t c = 0; c < C; ++c) mg[c] = sp[c] / acc(count), mgx[c] = sp[C + c] / acc(count);
        const scalar_t* xp = x.const_data_ptr<scalar_t>();
        scalar_t* dp = grad_x.data_ptr<scalar_t>();
        at::parallel_for(0, vx.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* xr = xp + r * vx.ld;
            scalar_t* dr = dp + r * vd.ld;
            for (int64_t c = 0; c < C; ++c) {
              const acc xhat = (static_cast<acc>(xr[c]) - k.mean[c]) * k.invstd[c];
              const acc corr = bn_grad_correction(xhat, k.scale[c], mg[c], mgx[c]);
              dr[c] = static_cast<scalar_t>(static_cast<acc>(dr[c]) + corr);
            }
          }
        });
      });
}

template <typename scalar_t>
void dropout_store_impl(const at::Tensor& src, const RowsView& vs, double p, uint64_t seed,
                        int64_t key, const at::Tensor& dst, const RowsView& vd) {
  using acc = acc_t<scalar_t>;
  const scalar_t* sp = src.const_data_ptr<scalar_t>();
  scalar_t* dp = dst.data_ptr<scalar_t>();
  const int64_t C = vs.cols;
  const uint64_t threshold = dropout_threshold(p);
  const acc scale = static_cast<acc>(1.0 / (1.0 - p));
  const bool drop = p > 0;
  at::parallel_for(0, vs.rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* sr = sp + r * vs.ld;
      scalar_t* dr = dp + r * vd.ld;
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

void dropout_store_cpu(const at::Tensor& src, double p, int64_t seed, int64_t key,
                       const at::Tensor& dst) {
  check_floating(src, "src");
  TORCH_CHECK(p >= 0 && p < 1, "dense_ext: dropout probability must be in [0, 1), got ", p);
  RowsView vs = rows_view(src, "src");
  RowsView vd = rows_view(dst, "dst");
  check_same(dst, "dst", src, "src");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, src.scalar_type(), "dropout_store",
      [&] { dropout_store_impl<scalar_t>(src, vs, p, static_cast<uint64_t>(seed), key, dst, vd); });
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CPU, m) {
  m.impl("channel_stats", static_cast<ChannelStatsFn*>(&channel_stats_cpu));
  m.impl("bn_relu", static_cast<BnReluFn*>(&bn_relu_cpu));
  m.impl("bn_relu_backward", static_cast<BnReluBackwardFn*>(&bn_relu_backward_cpu));
  m.impl("bn_relu_grad_acc", static_cast<BnReluGradAccFn*>(&bn_relu_grad_acc_cpu));
  m.impl("bn_grad_correct", static_cast<BnGradCorrectFn*>(&bn_grad_correct_cpu));
  m.impl("dropout_store", static_cast<DropoutStoreFn*>(&dropout_store_cpu));
}

}  // namespace dense_ext
