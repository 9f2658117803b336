// The argument checks of every op, shared by the CPU and CUDA implementations: each op calls
// its check_<op> first and gets back the matrix views its kernels index with, so the device
// files hold only arithmetic and every check is written once.
//
// Every buffer the ops touch is a [N, C, H, W] tensor laid out channels_last, possibly a channel
// slice of a wider buffer: physically a row-major [M = N*H*W, C] matrix whose rows are `ld`
// elements apart (ld = C_total for a slice of the block buffer). The ops work on that matrix.
#pragma once

#include <ATen/ATen.h>

namespace dense_ext {

struct RowsView {
  int64_t rows;  // M = N * H * W
  int64_t cols;  // C
  int64_t ld;    // elements between consecutive rows

  // Nothing to compute: the kernels return before any launch or division by a zero extent.
  bool empty() const { return rows == 0 || cols == 0; }
};

// Checks that `t` is a channels_last [N, C, H, W] tensor (or channel slice of one) and returns
// its matrix view. `name` names the tensor in error messages.
inline RowsView rows_view(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "dense_ext: ", name, " must be 4-D [N, C, H, W], got shape ",
              t.sizes());
  const int64_t n = t.size(0), c = t.size(1), h = t.size(2), w = t.size(3);
  // The row stride, read from the first spatial/batch dimension that has more than one entry
  // (strides of size-1 dimensions carry no information).
  const int64_t ld = w > 1 ? t.stride(3) : h > 1 ? t.stride(2) : n > 1 ? t.stride(0) : c;
  bool ok = (c <= 1 || t.stride(1) == 1) && ld >= c;
  ok = ok && (w <= 1 || t.stride(3) == ld) && (h <= 1 || t.stride(2) == w * ld) &&
       (n <= 1 || t.stride(0) == h * w * ld);
  TORCH_CHECK(ok, "dense_ext: ", name, " must be channels_last (a channel slice of a ",
              "channels_last buffer is fine), got shape ", t.sizes(), " and strides ", t.strides());
  return {n * h * w, c, ld};
}

// The [M, C] matrix (leading dimension ld) of a tensor accepted by rows_view: a view, no copy.
inline at::Tensor as_matrix(const at::Tensor& t, const char* name) {
  RowsView v = rows_view(t, name);
  return t.as_strided({v.rows, v.cols}, {v.ld, 1}, t.storage_offset());
}

inline void check_vector(const at::Tensor& t, const char* name, int64_t size, at::ScalarType dtype,
                         const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "dense_ext: ", name, " must have shape [", size,
              "], got ", t.sizes());
  TORCH_CHECK(t.stride(0) == 1 || size <= 1, "dense_ext: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "dense_ext: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "dense_ext: ", name, " is on ", t.device(),
              " but the buffer is on ", like.device());
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& like,
                       const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "dense_ext: ", name, " has dtype ",
              t.scalar_type(), " but ", like_name, " has ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "dense_ext: ", name, " is on ", t.device(), " but ",
              like_name, " is on ", like.device());
  TORCH_CHECK(t.size(0) == like.size(0) && t.size(1) == like.size(1) && t.size(2) == like.size(2) &&
                  t.size(3) == like.size(3),
              "dense_ext: ", name, " has shape ", t.sizes(), " but ", like_name, " has ",
              like.sizes());
}

// Accumulation dtype of a buffer dtype: double for double, float otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "dense_ext: ", name, " must be float64/float32/float16/bfloat16, got ", s);
}

// ---------------------------------------------------------------------------------------------
// One check function per op.

// channel_stats: statistics of no rows are undefined, so M = 0 is an error; C = 0 is empty.
inline RowsView check_channel_stats(const at::Tensor& x, const at::Tensor& stats, int64_t lo) {
  check_floating(x, "x");
  RowsView v = rows_view(x, "x");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.stride(1) == 1,
              "dense_ext: stats must be a [2, C] tensor with contiguous rows, got shape ",
              stats.sizes(), " strides ", stats.strides());
  TORCH_CHECK(lo >= 0 && lo + v.cols <= stats.size(1), "dense_ext: stats columns [", lo, ", ",
              lo + v.cols, ") out of range for stats of shape ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == acc_dtype(x.scalar_type()), "dense_ext: stats must be ",
              acc_dtype(x.scalar_type()), " for a ", x.scalar_type(), " x, got ",
              stats.scalar_type());
  TORCH_CHECK(stats.device() == x.device(), "dense_ext: stats is on ", stats.device(),
              " but x is on ", x.device());
  TORCH_CHECK(v.rows > 0, "dense_ext: x has no rows (N*H*W == 0)");
  return v;
}

inline void check_bn_params(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                            const at::Tensor& gamma, const at::Tensor& beta, int64_t c) {
  auto acc = acc_dtype(x.scalar_type());
  check_vector(mean, "mean", c, acc, x);
  check_vector(var, "var", c, acc, x);
  check_vector(gamma, "gamma", c, acc, x);
  check_vector(beta, "beta", c, acc, x);
}

inline void check_sums(const at::Tensor& sums, const at::Tensor& x, int64_t c) {
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == 2 && sums.size(1) == c && sums.is_contiguous(),
              "dense_ext: sums must be a contiguous [2, ", c, "] tensor, got ", sums.sizes());
  TORCH_CHECK(sums.scalar_type() == acc_dtype(x.scalar_type()), "dense_ext: sums must be ",
              acc_dtype(x.scalar_type()), ", got ", sums.scalar_type());
  TORCH_CHECK(sums.device() == x.device(), "dense_ext: sums is on ", sums.device(), " but x is on ",
              x.device());
}

struct BnReluViews {
  RowsView x, out;
};

inline BnReluViews check_bn_relu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                 const at::Tensor& gamma, const at::Tensor& beta,
                                 const at::Tensor& out) {
  check_floating(x, "x");
  BnReluViews v{rows_view(x, "x"), rows_view(out, "out")};
  check_same(out, "out", x, "x");
  check_bn_params(x, mean, var, gamma, beta, v.x.cols);
  return v;
}

// The views of the three BN-backward ops; grad_z is absent (all zero) for bn_relu_backward_apply.
struct BnBackwardViews {
  RowsView grad_z, x, grad_x;

  bool empty() const { return x.empty(); }
};

inline BnBackwardViews check_bn_backward_common(const at::Tensor& grad_z, const at::Tensor& x,
                                                const at::Tensor& mean, const at::Tensor& var,
                                                const at::Tensor& gamma, const at::Tensor& beta,
                                                const at::Tensor& grad_x) {
  check_floating(x, "x");
  BnBackwardViews v{{0, 0, 0}, rows_view(x, "x"), rows_view(grad_x, "grad_x")};
  check_same(grad_x, "grad_x", x, "x");
  if (grad_z.defined()) {
    v.grad_z = rows_view(grad_z, "grad_z");
    check_same(grad_z, "grad_z", x, "x");
  }
  check_bn_params(x, mean, var, gamma, beta, v.x.cols);
  return v;
}

// bn_relu_backward: M = 0 is fine (the sums of nothing are 0, dx has no elements).
inline BnBackwardViews check_bn_relu_backward(const at::Tensor& grad_z, const at::Tensor& x,
                                              const at::Tensor& mean, const at::Tensor& var,
                                              const at::Tensor& gamma, const at::Tensor& beta,
                                              const at::Tensor& grad_x,
                                              const at::Tensor& grad_gamma,
                                              const at::Tensor& grad_beta) {
  BnBackwardViews v = check_bn_backward_common(grad_z, x, mean, var, gamma, beta, grad_x);
  const auto acc = acc_dtype(x.scalar_type());
  check_vector(grad_gamma, "grad_gamma", v.x.cols, acc, x);
  check_vector(grad_beta, "grad_beta", v.x.cols, acc, x);
  return v;
}

inline BnBackwardViews check_bn_relu_backward_reduce(const at::Tensor& grad_z, const at::Tensor& x,
                                                     const at::Tensor& mean, const at::Tensor& var,
                                                     const at::Tensor& gamma,
                                                     const at::Tensor& beta,
                                                     const at::Tensor& grad_x,
                                                     const at::Tensor& sums) {
  BnBackwardViews v = check_bn_backward_common(grad_z, x, mean, var, gamma, beta, grad_x);
  check_sums(sums, x, v.x.cols);
  return v;
}

inline BnBackwardViews check_bn_relu_backward_apply(const at::Tensor& x, const at::Tensor& mean,
                                                    const at::Tensor& var, const at::Tensor& gamma,
                                                    const at::Tensor& beta, const at::Tensor& sums,
                                                    int64_t count, const at::Tensor& grad_x) {
  BnBackwardViews v = check_bn_backward_common(at::Tensor(), x, mean, var, gamma, beta, grad_x);
  check_sums(sums, x, v.x.cols);
  TORCH_CHECK(count > 0, "dense_ext: count must be positive, got ", count);
  return v;
}

struct DropoutViews {
  RowsView src, dst;
};

inline DropoutViews check_dropout_store(const at::Tensor& src, double p, const at::Tensor& seed,
                                        const at::Tensor& dst) {
  check_floating(src, "src");
  TORCH_CHECK(p >= 0 && p < 1, "dense_ext: dropout probability must be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "dense_ext: seed must be a one-element int64 tensor, got ", seed.scalar_type(),
              " of shape ", seed.sizes());
  TORCH_CHECK(seed.device() == src.device(), "dense_ext: seed is on ", seed.device(),
              " but src is on ", src.device());
  DropoutViews v{rows_view(src, "src"), rows_view(dst, "dst")};
  check_same(dst, "dst", src, "src");
  return v;
}

// bn_grad_fold: var, gamma [C]; sums [2, C] contiguous; coef [2, C] with contiguous rows (a
// channel range of the block's [2, C_total] coefficients), all in the accumulation dtype.
inline int64_t check_bn_grad_fold(const at::Tensor& var, const at::Tensor& gamma,
                                  const at::Tensor& sums, int64_t count, const at::Tensor& coef) {
  TORCH_CHECK(var.dim() == 1, "dense_ext: var must be a vector, got shape ", var.sizes());
  const int64_t c = var.size(0);
  const auto acc = var.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble,
              "dense_ext: var must be float32/float64, got ", acc);
  check_vector(var, "var", c, acc, coef);
  check_vector(gamma, "gamma", c, acc, coef);
  check_sums(sums, var, c);
  TORCH_CHECK(
      coef.dim() == 2 && coef.size(0) == 2 && coef.size(1) == c && (c <= 1 || coef.stride(1) == 1),
      "dense_ext: coef must be a [2, ", c, "] tensor with contiguous rows, got shape ",
      coef.sizes(), " strides ", coef.strides());
  TORCH_CHECK(coef.scalar_type() == acc, "dense_ext: coef must be ", acc, ", got ",
              coef.scalar_type());
  TORCH_CHECK(count > 0, "dense_ext: count must be positive, got ", count);
  return c;
}

// bn_grad_fold_apply: x and grad_x as for the BN ops, mean [C] and coef [2, C] (contiguous
// rows) in the accumulation dtype.
inline BnBackwardViews check_bn_grad_fold_apply(const at::Tensor& x, const at::Tensor& mean,
                                                const at::Tensor& coef, const at::Tensor& grad_x) {
  check_floating(x, "x");
  BnBackwardViews v{{0, 0, 0}, rows_view(x, "x"), rows_view(grad_x, "grad_x")};
  check_same(grad_x, "grad_x", x, "x");
  const auto acc = acc_dtype(x.scalar_type());
  check_vector(mean, "mean", v.x.cols, acc, x);
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == 2 && coef.size(1) == v.x.cols &&
                  (v.x.cols <= 1 || coef.stride(1) == 1),
              "dense_ext: coef must be a [2, ", v.x.cols,
              "] tensor with contiguous rows, got shape ", coef.sizes(), " strides ",
              coef.strides());
  TORCH_CHECK(coef.scalar_type() == acc, "dense_ext: coef must be ", acc, ", got ",
              coef.scalar_type());
  TORCH_CHECK(coef.device() == x.device(), "dense_ext: coef is on ", coef.device(), " but x is on ",
              x.device());
  return v;
}

}  // namespace dense_ext
