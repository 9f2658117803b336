// CPU kernels of the CLDC ops, parallelised over rows with at::parallel_for. The arithmetic is
// in common/cldc_math.cuh, shared with the CUDA kernels.
//
// Every kernel walks the rows of the slot buffer: row r holds the k slots of one pixel side by
// side (k*C contiguous values), so each pass reads each slot once, sequentially, and the inner
// loops run over channels, contiguous in memory. These passes are bound by memory traffic and
// vector width: each row kernel below is compiled for AVX-512, AVX2 and the baseline x86-64, and
// the loader picks the widest the CPU has (function multiversioning, GCC and Clang on x86-64
// Linux); the rest of the extension stays baseline, as a portable build must.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../deluge_ops.h"
#include "../common/cldc_math.cuh"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define CLDC_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLDC_CPU_CLONES
#endif

namespace dense_ext {
namespace {

// Rows per reduction tile: partial sums are per tile and merged in tile order (deterministic).
constexpr int64_t kTileRows = 128;

// Rows per short tile: grad_rows sums kSubRows rows in acc_t at full vector width, then the short
// tile's partials move into the tile's partials in sum_t = double, which are merged in double and
// rounded once to the tables' type, as the dense block's BN sums ("Accumulation precision" in
// cpu/kernels.cpp).
constexpr int64_t kSubRows = 16;
using sum_t = double;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// The [k, C] tables and shape of one CLDC, as raw pointers for the row kernels.
template <typename acc>
struct Tables {
  int64_t k, c;
  const acc* mean;
  const acc* a;  // scale (forward) or alpha (backward)
  const acc* b;  // shift [C] (forward) or beta (correction)
  const acc* g;  // gamma (correction)
};

// ---------------------------------------------------------------------------------------------
// Row kernels: rows [r0, r1) of x (row stride ldx).

// out = shift + sum_i scale_i * (x_i - mean_i); y: C accumulators.
template <typename scalar_t, typename acc>
CLDC_CPU_CLONES void forward_rows(const scalar_t* x, int64_t ldx, scalar_t* out, int64_t ldo,
                                  int64_t r0, int64_t r1, Tables<acc> t, acc* y) {
  const int64_t C = t.c;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * ldx;
    for (int64_t c = 0; c < C; ++c) y[c] = t.b[c];
    for (int64_t i = 0; i < t.k; ++i) {
      const scalar_t* xi = xr + i * C;
      const acc *mi = t.mean + i * C, *si = t.a + i * C;
      for (int64_t c = 0; c < C; ++c) y[c] += cldc_term(static_cast<acc>(xi[c]), mi[c], si[c]);
    }
    scalar_t* orow = out + r * ldo;
    for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(y[c]);
  }
}

// part[i] += sum_rows g * (x_i - mean_i) (i < k), part[k] += sum_rows g; with alpha (step),
// also grad_i += alpha_i * g; with next (kn > 0), next_out = the next CLDC's forward.
template <typename scalar_t, typename acc>
CLDC_CPU_CLONES void grad_rows(const scalar_t* g, int64_t ldg, const scalar_t* x, int64_t ldx,
                               scalar_t* grad, int64_t ldd, int64_t r0, int64_t r1, Tables<acc> t,
                               const acc* alpha, Tables<acc> next, scalar_t* next_out,
                               int64_t ld_next, acc* part, acc* gv, acc* y) {
  const int64_t C = t.c;
  acc* pg = part + t.k * C;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* gr = g + r * ldg;
    const scalar_t* xr = x + r * ldx;
    for (int64_t c = 0; c < C; ++c) {
      gv[c] = static_cast<acc>(gr[c]);
      pg[c] += gv[c];
    }
    if (next.k > 0) {
      for (int64_t c = 0; c < C; ++c) y[c] = next.b[c];
    }
    for (int64_t i = 0; i < t.k; ++i) {
      const int64_t o = i * C;
      const scalar_t* xi = xr + o;
      const acc* mi = t.mean + o;
      acc* pi = part + o;
      for (int64_t c = 0; c < C; ++c) pi[c] += gv[c] * (static_cast<acc>(xi[c]) - mi[c]);
      if (alpha != nullptr) {
        scalar_t* di = grad + r * ldd + o;
        const acc* ai = alpha + o;
        for (int64_t c = 0; c < C; ++c) {
          di[c] = static_cast<scalar_t>(static_cast<acc>(di[c]) + ai[c] * gv[c]);
        }
      }
      if (i < next.k) {  // the previous layer's CLDC reads the same values of this row
        const acc *nm = next.mean + o, *ns = next.a + o;
        for (int64_t c = 0; c < C; ++c) y[c] += cldc_term(static_cast<acc>(xi[c]), nm[c], ns[c]);
      }
    }
    if (next.k > 0) {
      scalar_t* orow = next_out + r * ld_next;
      for (int64_t c = 0; c < C; ++c) orow[c] = static_cast<scalar_t>(y[c]);
    }
  }
}

// wide[j] += narrow[j], narrow[j] = 0: a short tile's partial sums moved into the wide sums.
template <typename acc>
CLDC_CPU_CLONES void widen_add(acc* narrow, sum_t* wide, int64_t n) {
  for (int64_t j = 0; j < n; ++j) wide[j] += static_cast<sum_t>(narrow[j]), narrow[j] = acc(0);
}

// grad_i += alpha_i * g - beta_i - gamma_i * (x_i - mean_i); g null: the correction alone.
template <typename scalar_t, typename acc>
CLDC_CPU_CLONES void apply_rows(const scalar_t* g, int64_t ldg, const scalar_t* x, int64_t ldx,
                                scalar_t* grad, int64_t ldd, int64_t r0, int64_t r1,
                                Tables<acc> t) {
  const int64_t C = t.c;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * ldx;
    scalar_t* dr = grad + r * ldd;
    for (int64_t i = 0; i < t.k; ++i) {
      const int64_t o = i * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc xc = static_cast<acc>(xr[o + c]) - t.mean[o + c];
        const acc dx = g != nullptr ? cldc_grad_input(static_cast<acc>(g[r * ldg + c]), xc,
                                                      t.a[o + c], t.b[o + c], t.g[o + c])
                                    : cldc_grad_correction(xc, t.b[o + c], t.g[o + c]);
        dr[o + c] = static_cast<scalar_t>(static_cast<acc>(dr[o + c]) + dx);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers of the row kernels.

template <typename scalar_t, typename acc>
void forward(const scalar_t* x, int64_t ldx, scalar_t* out, int64_t ldo, int64_t rows,
             Tables<acc> t) {
  at::parallel_for(0, rows, row_grain(t.k * t.c), [&](int64_t r0, int64_t r1) {
    std::vector<acc> y(t.c);
    forward_rows(x, ldx, out, ldo, r0, r1, t, y.data());
  });
}

// The sums (sums[k + 1, C], merged over row tiles in tile order) of a gradient pass.
template <typename scalar_t, typename acc>
void grad_pass(const scalar_t* g, int64_t ldg, const scalar_t* x, int64_t ldx, scalar_t* grad,
               int64_t ldd, int64_t rows, Tables<acc> t, const acc* alpha, Tables<acc> next,
               scalar_t* next_out, int64_t ld_next, acc* sums) {
  const int64_t width = (t.k + 1) * t.c;
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  std::vector<sum_t> part(tiles * width, sum_t(0));
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc> gv(t.c), y(t.c), sub(width, acc(0));
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t r0 = tile * kTileRows, r1 = std::min(rows, r0 + kTileRows);
      for (int64_t s0 = r0; s0 < r1; s0 += kSubRows) {
        const int64_t s1 = std::min(r1, s0 + kSubRows);
        grad_rows(g, ldg, x, ldx, grad, ldd, s0, s1, t, alpha, next, next_out, ld_next, sub.data(),
                  gv.data(), y.data());
        widen_add(sub.data(), part.data() + tile * width, width);
      }
    }
  });
  for (int64_t j = 0; j < width; ++j) {
    sum_t total = 0;
    for (int64_t tile = 0; tile < tiles; ++tile) total += part[tile * width + j];
    sums[j] = static_cast<acc>(total);
  }
}

template <typename scalar_t, typename acc>
void apply(const scalar_t* g, int64_t ldg, const scalar_t* x, int64_t ldx, scalar_t* grad,
           int64_t ldd, int64_t rows, Tables<acc> t) {
  at::parallel_for(0, rows, row_grain(t.k * t.c), [&](int64_t r0, int64_t r1) {
    apply_rows(g, ldg, x, ldx, grad, ldd, r0, r1, t);
  });
}

template <typename acc>
Tables<acc> tables(const CldcShape& s, const at::Tensor& mean, const at::Tensor* a,
                   const at::Tensor* b, const at::Tensor* g) {
  return {s.k,
          s.c,
          mean.const_data_ptr<acc>(),
          a ? a->const_data_ptr<acc>() : nullptr,
          b ? b->const_data_ptr<acc>() : nullptr,
          g ? g->const_data_ptr<acc>() : nullptr};
}

// ---------------------------------------------------------------------------------------------
// The ops.

void cldc_forward_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                      const at::Tensor& shift, const at::Tensor& out) {
  const CldcShape s = check_cldc_forward(x, mean, scale, shift, out);
  const RowsView vo = rows_view(out, "out");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_forward", [&] {
    using acc = acc_t<scalar_t>;
    forward(x.const_data_ptr<scalar_t>(), s.x.ld, out.data_ptr<scalar_t>(), vo.ld, s.x.rows,
            tables<acc>(s, mean, &scale, &shift, nullptr));
  });
}

void cldc_grad_sums_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                        const at::Tensor& sums) {
  const CldcShape s = check_cldc_grad_sums(grad_y, x, mean, sums);
  const RowsView vg = rows_view(grad_y, "grad_y");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_grad_sums", [&] {
    using acc = acc_t<scalar_t>;
    grad_pass<scalar_t, acc>(
        grad_y.const_data_ptr<scalar_t>(), vg.ld, x.const_data_ptr<scalar_t>(), s.x.ld, nullptr, 0,
        s.x.rows, tables<acc>(s, mean, nullptr, nullptr, nullptr), nullptr,
        Tables<acc>{0, s.c, nullptr, nullptr, nullptr, nullptr}, nullptr, 0, sums.data_ptr<acc>());
  });
}

void cldc_grad_apply_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                         const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& gamma,
                         const at::Tensor& grad_x) {
  const CldcShape s = check_cldc_grad_apply(grad_y, x, mean, alpha, beta, gamma, grad_x);
  const RowsView vg = rows_view(grad_y, "grad_y"), vd = rows_view(grad_x, "grad_x");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_grad_apply", [&] {
        using acc = acc_t<scalar_t>;
        apply(grad_y.const_data_ptr<scalar_t>(), vg.ld, x.const_data_ptr<scalar_t>(), s.x.ld,
              grad_x.data_ptr<scalar_t>(), vd.ld, s.x.rows,
              tables<acc>(s, mean, &alpha, &beta, &gamma));
      });
}

void cldc_grad_step_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                        const at::Tensor& alpha, const at::Tensor& grad_x, const at::Tensor& sums,
                        const std::optional<at::Tensor>& next_mean,
                        const std::optional<at::Tensor>& next_scale,
                        const std::optional<at::Tensor>& next_shift,
                        const std::optional<at::Tensor>& next_out) {
  const CldcShape s = check_cldc_grad_step(grad_y, x, mean, alpha, grad_x, sums);
  const int64_t kn = check_cldc_next(x, s, next_mean, next_scale, next_shift, next_out);
  const RowsView vg = rows_view(grad_y, "grad_y"), vd = rows_view(grad_x, "grad_x");
  const int64_t ld_next = kn > 0 ? rows_view(*next_out, "next_out").ld : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_grad_step", [&] {
    using acc = acc_t<scalar_t>;
    Tables<acc> next{0, s.c, nullptr, nullptr, nullptr, nullptr};
    scalar_t* out = nullptr;
    if (kn > 0) {
      next = {kn,
              s.c,
              next_mean->const_data_ptr<acc>(),
              next_scale->const_data_ptr<acc>(),
              next_shift->const_data_ptr<acc>(),
              nullptr};
      out = next_out->data_ptr<scalar_t>();
    }
    grad_pass<scalar_t, acc>(grad_y.const_data_ptr<scalar_t>(), vg.ld, x.const_data_ptr<scalar_t>(),
                             s.x.ld, grad_x.data_ptr<scalar_t>(), vd.ld, s.x.rows,
                             tables<acc>(s, mean, nullptr, nullptr, nullptr),
                             alpha.const_data_ptr<acc>(), next, out, ld_next, sums.data_ptr<acc>());
  });
}

void cldc_grad_correct_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& beta,
                           const at::Tensor& gamma, const at::Tensor& grad_x) {
  const CldcShape s = check_cldc_grad_correct(x, mean, beta, gamma, grad_x);
  const RowsView vd = rows_view(grad_x, "grad_x");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "cldc_grad_correct", [&] {
        using acc = acc_t<scalar_t>;
        apply<scalar_t, acc>(nullptr, 0, x.const_data_ptr<scalar_t>(), s.x.ld,
                             grad_x.data_ptr<scalar_t>(), vd.ld, s.x.rows,
                             tables<acc>(s, mean, nullptr, &beta, &gamma));
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CPU, m) {
  m.impl("cldc_forward", static_cast<CldcForwardFn*>(&cldc_forward_cpu));
  m.impl("cldc_grad_sums", static_cast<CldcGradSumsFn*>(&cldc_grad_sums_cpu));
  m.impl("cldc_grad_apply", static_cast<CldcGradApplyFn*>(&cldc_grad_apply_cpu));
  m.impl("cldc_grad_step", static_cast<CldcGradStepFn*>(&cldc_grad_step_cpu));
  m.impl("cldc_grad_correct", static_cast<CldcGradCorrectFn*>(&cldc_grad_correct_cpu));
}

}  // namespace dense_ext
