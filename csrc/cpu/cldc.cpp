// CPU kernels of the CLDC ops, parallelised over rows with at::parallel_for. The arithmetic is
// in kernels/cldc_math.cuh, shared with the CUDA kernels.
//
// Every kernel walks the rows of the slot buffer: row r holds the k slots of one pixel side by
// side (k*C contiguous values), so each pass reads each slot once, sequentially, and the inner
// loop over channels vectorises.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../deluge_ops.h"
#include "../kernels/cldc_math.cuh"

namespace dense_ext {
namespace {

// Rows per reduction tile: partial sums are per tile and merged in tile order (deterministic).
constexpr int64_t kTileRows = 128;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

template <typename scalar_t>
void cldc_forward_impl(const at::Tensor& x, const CldcShape& s, const at::Tensor& mean,
                       const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out,
                       const RowsView& vo) {
  using acc = acc_t<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const acc* mp = mean.const_data_ptr<acc>();
  const acc* sp = scale.const_data_ptr<acc>();
  const acc* hp = shift.const_data_ptr<acc>();
  const int64_t C = s.c, k = s.k;
  at::parallel_for(0, s.x.rows, row_grain(k * C), [&](int64_t r0, int64_t r1) {
    std::vector<acc> y(C);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = xp + r * s.x.ld;
      for (int64_t c = 0; c < C; ++c) y[c] = hp[c];
      for (int64_t i = 0; i < k; ++i) {
        const scalar_t* xi = xr + i * C;
        const acc* mi = mp + i * C;
        const acc* si = sp + i * C;
        for (int64_t c = 0; c < C; ++c) y[c] += cldc_term(static_cast<acc>(xi[c]), mi[c], si[c]);
      }
      scalar_t* orow = op + r * vo.ld;
      for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(y[c]);
    }
  });
}

void cldc_forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                      const at::Tensor& shift, const at::Tensor& out) {
  const CldcShape s = check_cldc_forward(x, mean, scale, shift, out);
  const RowsView vo = rows_view(out, "out");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_forward", [&] {
    cldc_forward_impl<scalar_t>(x, s, mean, scale, shift, out, vo);
  });
}

template <typename scalar_t>
void cldc_grad_sums_impl(const at::Tensor& grad_y, const RowsView& vg, const at::Tensor& x,
                         const CldcShape& s, const at::Tensor& mean, const at::Tensor& sums) {
  using acc = acc_t<scalar_t>;
  const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc* mp = mean.const_data_ptr<acc>();
  const int64_t C = s.c, k = s.k, M = s.x.rows, width = (k + 1) * C;
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  std::vector<acc> part(tiles * width);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      acc* pt = part.data() + t * width;
      std::fill(pt, pt + width, acc(0));
      const int64_t r1 = std::min(M, (t + 1) * kTileRows);
      for (int64_t r = t * kTileRows; r < r1; ++r) {
        const scalar_t* gr = gp + r * vg.ld;
        const scalar_t* xr = xp + r * s.x.ld;
        acc* pg = pt + k * C;
        for (int64_t c = 0; c < C; ++c) pg[c] += static_cast<acc>(gr[c]);
        for (int64_t i = 0; i < k; ++i) {
          const scalar_t* xi = xr + i * C;
          const acc* mi = mp + i * C;
          acc* pi = pt + i * C;
          for (int64_t c = 0; c < C; ++c) {
            pi[c] += static_cast<acc>(gr[c]) * (static_cast<acc>(xi[c]) - mi[c]);
          }
        }
      }
    }
  });
  acc* out = sums.data_ptr<acc>();
  for (int64_t j = 0; j < width; ++j) {
    acc total = 0;
    for (int64_t t = 0; t < tiles; ++t) total += part[t * width + j];
    out[j] = total;
  }
}

void cldc_grad_sums_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                        const at::Tensor& sums) {
  const CldcShape s = check_cldc_grad_sums(grad_y, x, mean, sums);
  const RowsView vg = rows_view(grad_y, "grad_y");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_grad_sums", [&] {
    cldc_grad_sums_impl<scalar_t>(grad_y, vg, x, s, mean, sums);
  });
}

template <typename scalar_t>
void cldc_grad_apply_impl(const at::Tensor& grad_y, const RowsView& vg, const at::Tensor& x,
                          const CldcShape& s, const at::Tensor& mean, const at::Tensor& alpha,
                          const at::Tensor& beta, const at::Tensor& gamma, const at::Tensor& grad_x,
                          const RowsView& vd) {
  using acc = acc_t<scalar_t>;
  const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* dp = grad_x.data_ptr<scalar_t>();
  const acc* mp = mean.const_data_ptr<acc>();
  const acc* ap = alpha.const_data_ptr<acc>();
  const acc* bp = beta.const_data_ptr<acc>();
  const acc* cp = gamma.const_data_ptr<acc>();
  const int64_t C = s.c, k = s.k;
  at::parallel_for(0, s.x.rows, row_grain(k * C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* gr = gp + r * vg.ld;
      const scalar_t* xr = xp + r * s.x.ld;
      scalar_t* dr = dp + r * vd.ld;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t o = i * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc xc = static_cast<acc>(xr[o + c]) - mp[o + c];
          const acc dx =
              cldc_grad_input(static_cast<acc>(gr[c]), xc, ap[o + c], bp[o + c], cp[o + c]);
          dr[o + c] = static_cast<scalar_t>(static_cast<acc>(dr[o + c]) + dx);
        }
      }
    }
  });
}

void cldc_grad_apply_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& gamma,
                         const at::Tensor& grad_x) {
  const CldcShape s = check_cldc_grad_apply(grad_y, x, mean, alpha, beta, gamma, grad_x);
  const RowsView vg = rows_view(grad_y, "grad_y"), vd = rows_view(grad_x, "grad_x");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_grad_apply", [&] {
        cldc_grad_apply_impl<scalar_t>(grad_y, vg, x, s, mean, alpha, beta, gamma, grad_x, vd);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CPU, m) {
  m.impl("cldc_forward", static_cast<CldcForwardFn*>(&cldc_forward_cpu));
  m.impl("cldc_grad_sums", static_cast<CldcGradSumsFn*>(&cldc_grad_sums_cpu));
  m.impl("cldc_grad_apply", static_cast<CldcGradApplyFn*>(&cldc_grad_apply_cpu));
}

}  // namespace dense_ext
