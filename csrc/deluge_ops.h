// C++ signatures of the DelugeNet ops (schemas in deluge_ops.cpp) and their argument checks,
// shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace dense_ext {

using CldcForwardFn = void(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& out);
using CldcGradSumsFn = void(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& sums);
using CldcGradApplyFn = void(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                             const at::Tensor& alpha, const at::Tensor& beta,
                             const at::Tensor& gamma, const at::Tensor& grad_x);

using CldcGradStepFn = void(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& alpha, const at::Tensor& grad_x,
                            const at::Tensor& sums, const std::optional<at::Tensor>& next_mean,
                            const std::optional<at::Tensor>& next_scale,
                            const std::optional<at::Tensor>& next_shift,
                            const std::optional<at::Tensor>& next_out);
using CldcGradCorrectFn = void(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& beta,
                               const at::Tensor& gamma, const at::Tensor& grad_x);

// Stage drivers (deluge.cpp): device-generic, registered for CPU there and for CUDA in
// cuda/deluge.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> deluge_stage_forward(
    const at::Tensor& x0, at::TensorList params, at::TensorList running, at::ArrayRef<double> eps,
    c10::List<bool> batch_stats, int64_t num_slots, bool keep_bottleneck, bool save);

std::tuple<at::Tensor, at::Tensor> deluge_stage_backward(
    const at::Tensor& grad_buf, const at::Tensor& buf, const at::Tensor& slot_stats,
    const at::Tensor& layer_stats, at::TensorList kept, at::TensorList params,
    at::TensorList running, at::ArrayRef<double> eps, c10::List<bool> batch_stats);

// The k slots of C channels a CLDC reads: x is [N, k*C, H, W] channels_last (a channel slice of
// a slot buffer is fine); mean (and the other per-(slot, channel) tables) are [k, C] contiguous
// in the accumulation dtype.
struct CldcShape {
  RowsView x;
  int64_t k, c;
};

using NamedTables = std::initializer_list<std::pair<const at::Tensor*, const char*>>;

// Checks x and the [k, C] tables (mean first, which fixes k and C); returns the shape.
inline CldcShape check_cldc_tables(const at::Tensor& x, const at::Tensor& mean, NamedTables more) {
  check_floating(x, "x");
  CldcShape s{rows_view(x, "x"), mean.dim() == 2 ? mean.size(0) : 0,
              mean.dim() == 2 ? mean.size(1) : 0};
  const auto acc = acc_dtype(x.scalar_type());
  TORCH_CHECK(mean.dim() == 2 && s.k > 0 && s.c > 0 && s.k * s.c == s.x.cols,
              "dense_ext: mean must be [k, C] with k*C = ", s.x.cols,
              " (the channels of x), got shape ", mean.sizes());
  // (k + 1) * C < 2^31: the kernels index a slot row's channels in 32 bits.
  TORCH_CHECK((s.k + 1) * s.c < (int64_t(1) << 31), "dense_ext: a CLDC over ", s.k, " slots of ",
              s.c, " channels is too wide (k*C must stay below 2^31)");
  auto check_table = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == s.k && t.size(1) == s.c && t.is_contiguous(),
                "dense_ext: ", name, " must be a contiguous [", s.k, ", ", s.c, "] tensor, got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == acc, "dense_ext: ", name, " must be ", acc, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "dense_ext: ", name, " is on ", t.device(),
                " but x is on ", x.device());
  };
  check_table(mean, "mean");
  for (const auto& [t, name] : more) check_table(*t, name);
  return s;
}

// A [N, C, H, W] channels_last operand (grad_y, out) of a CLDC over x.
inline RowsView check_cldc_slot(const at::Tensor& t, const char* name, const at::Tensor& x,
                                const CldcShape& s) {
  RowsView v = rows_view(t, name);
  TORCH_CHECK(t.size(0) == x.size(0) && t.size(1) == s.c && t.size(2) == x.size(2) &&
                  t.size(3) == x.size(3),
              "dense_ext: ", name, " must be [", x.size(0), ", ", s.c, ", ", x.size(2), ", ",
              x.size(3), "] (one slot of x), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "dense_ext: ", name, " has dtype ",
              t.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "dense_ext: ", name, " is on ", t.device(), " but x is on ",
              x.device());
  return v;
}

inline CldcShape check_cldc_forward(const at::Tensor& x, const at::Tensor& mean,
                                    const at::Tensor& scale, const at::Tensor& shift,
                                    const at::Tensor& out) {
  CldcShape s = check_cldc_tables(x, mean, {{&scale, "scale"}});
  check_vector(shift, "shift", s.c, acc_dtype(x.scalar_type()), x);
  check_cldc_slot(out, "out", x, s);
  return s;
}

inline CldcShape check_cldc_grad_sums(const at::Tensor& grad_y, const at::Tensor& x,
                                      const at::Tensor& mean, const at::Tensor& sums) {
  CldcShape s = check_cldc_tables(x, mean, {});
  check_cldc_slot(grad_y, "grad_y", x, s);
  TORCH_CHECK(
      sums.dim() == 2 && sums.size(0) == s.k + 1 && sums.size(1) == s.c && sums.is_contiguous(),
      "dense_ext: sums must be a contiguous [", s.k + 1, ", ", s.c, "] tensor, got ", sums.sizes());
  TORCH_CHECK(sums.scalar_type() == acc_dtype(x.scalar_type()), "dense_ext: sums must be ",
              acc_dtype(x.scalar_type()), ", got ", sums.scalar_type());
  TORCH_CHECK(sums.device() == x.device(), "dense_ext: sums is on ", sums.device(), " but x is on ",
              x.device());
  return s;
}

inline CldcShape check_cldc_grad_apply(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& mean, const at::Tensor& alpha,
                                       const at::Tensor& beta, const at::Tensor& gamma,
                                       const at::Tensor& grad_x) {
  CldcShape s = check_cldc_tables(x, mean, {{&alpha, "alpha"}, {&beta, "beta"}, {&gamma, "gamma"}});
  check_cldc_slot(grad_y, "grad_y", x, s);
  rows_view(grad_x, "grad_x");
  check_same(grad_x, "grad_x", x, "x");
  return s;
}

// The optional "next" CLDC of cldc_grad_step: all four given or none; k' <= k slots.
inline int64_t check_cldc_next(const at::Tensor& x, const CldcShape& s,
                               const std::optional<at::Tensor>& next_mean,
                               const std::optional<at::Tensor>& next_scale,
                               const std::optional<at::Tensor>& next_shift,
                               const std::optional<at::Tensor>& next_out) {
  const int given = next_mean.has_value() + next_scale.has_value() + next_shift.has_value() +
                    next_out.has_value();
  TORCH_CHECK(given == 0 || given == 4,
              "dense_ext: next_mean, next_scale, next_shift and next_out go together");
  if (given == 0) return 0;
  const int64_t kn = next_mean->dim() == 2 ? next_mean->size(0) : 0;
  TORCH_CHECK(kn >= 1 && kn <= s.k && next_mean->size(1) == s.c,
              "dense_ext: next_mean must be [k', ", s.c, "] with 1 <= k' <= ", s.k, ", got ",
              next_mean->sizes());
  check_cldc_tables(x.narrow(1, 0, kn * s.c), *next_mean, {{&next_scale.value(), "next_scale"}});
  check_vector(*next_shift, "next_shift", s.c, acc_dtype(x.scalar_type()), x);
  check_cldc_slot(*next_out, "next_out", x, s);
  return kn;
}

inline CldcShape check_cldc_grad_step(const at::Tensor& grad_y, const at::Tensor& x,
                                      const at::Tensor& mean, const at::Tensor& alpha,
                                      const at::Tensor& grad_x, const at::Tensor& sums) {
  CldcShape s = check_cldc_grad_sums(grad_y, x, mean, sums);
  check_cldc_tables(x, mean, {{&alpha, "alpha"}});
  rows_view(grad_x, "grad_x");
  check_same(grad_x, "grad_x", x, "x");
  return s;
}

inline CldcShape check_cldc_grad_correct(const at::Tensor& x, const at::Tensor& mean,
                                         const at::Tensor& beta, const at::Tensor& gamma,
                                         const at::Tensor& grad_x) {
  CldcShape s = check_cldc_tables(x, mean, {{&beta, "beta"}, {&gamma, "gamma"}});
  rows_view(grad_x, "grad_x");
  check_same(grad_x, "grad_x", x, "x");
  return s;
}

}  // namespace dense_ext
