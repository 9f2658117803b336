// Arithmetic of the cross-layer depthwise convolution (CLDC), shared by the CPU (cpu/cldc.cpp)
// and CUDA (cuda/cldc.cu) kernels.
//
// A CLDC over k slots of C channels normalises every slot i with its own batch norm (mean[i, c],
// invstd[i, c]) whose affine parameters are the CLDC's weight w[c, i] and bias b[c, i], and sums:
//   y[c] = sum_i scale[i, c] * (x_i[c] - mean[i, c]) + shift[c],
//   scale[i, c] = w[c, i] * invstd[i, c],  shift[c] = sum_i b[c, i].
// The mean is subtracted per element rather than folded into the shift: on data with a large mean
// the fold would cancel two large terms.
//
// Backward, with g = dL/dy and xc_i = x_i - mean_i: the per-(i, c) sums S_i = sum_rows g * xc_i
// and S_g = sum_rows g give dw[c, i] = invstd * S_i, db[c, i] = S_g and
//   dx_i = alpha * g - beta - gamma * xc_i,
// alpha = scale; with batch statistics beta = alpha * S_g / M, gamma = alpha * invstd^2 * S_i / M
// (the BN backward's two batch-mean terms), with running statistics beta = gamma = 0.
//
// The stage backward splits dx_i: one pass per CLDC adds alpha * g to every slot it read (and
// collects the sums), and the batch-mean terms of all readers of slot i, which are affine in
// xc_i, are summed into one (beta_i, gamma_i) per slot and subtracted once, when slot i's
// gradient is next needed (cldc_grad_correction).
#pragma once

#include "math.cuh"

namespace dense_ext {

template <typename acc>
DENSE_EXT_HOST_DEVICE acc cldc_term(acc x, acc mean, acc scale) {
  return scale * (x - mean);
}

template <typename acc>
DENSE_EXT_HOST_DEVICE acc cldc_grad_input(acc g, acc xc, acc alpha, acc beta, acc gamma) {
  return alpha * g - beta - gamma * xc;
}

template <typename acc>
DENSE_EXT_HOST_DEVICE acc cldc_grad_correction(acc xc, acc beta, acc gamma) {
  return -beta - gamma * xc;
}

}  // namespace dense_ext
