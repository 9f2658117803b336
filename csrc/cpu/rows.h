// The inner loops of the CPU kernels: each walks a range [r0, r1) of rows of [M, C] matrices
// (rows `ld` elements apart, channels contiguous) and applies one formula of common/math.cuh.
//
// kernels.cpp includes this file once per instruction set, each time inside its own namespace
// and, for AVX2 and AVX-512, inside a `#pragma GCC target` region, so the compiler vectorises
// the same loops for each instruction set; the kernels pick one at run time (isa.h). Every
// function takes that namespace's `IsaTag` first, so an unqualified call with the tag resolves
// (by argument-dependent lookup) to the copy for the chosen instruction set. No include guard:
// it is meant to be included several times. It includes nothing; common/math.cuh comes first.
//
// The loops are written for the vectoriser: the channel loop is innermost, reads and writes
// contiguous elements, and per-channel constants are arrays indexed by the channel. Every
// channel loop is marked DENSE_EXT_IVDEP: its iterations are independent (each reads and writes
// its own channel), also where a gradient is read and written in place, since every element is
// read before it is written, by the same iteration. Without it GCC versions the loops for
// aliasing and, on the AVX2 target, ran the scalar copy.

// out = relu(bn(x)).
template <typename T, typename A>
void bn_relu_rows(IsaTag, const T* x, int64_t ldx, T* out, int64_t ldo, int64_t r0, int64_t r1,
                  int64_t C, const A* __restrict mean, const A* __restrict scale,
                  const A* __restrict beta) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * ldx;
    T* __restrict o = out + r * ldo;
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      o[c] = static_cast<T>(relu(bn_pre(static_cast<A>(xr[c]), mean[c], scale[c], beta[c])));
    }
  }
}

// Welford over the rows [r0, r1) (r1 > r0) of one short tile: (mean, m2) of x - shift per channel,
// starting from the first row's values; chan_merge_rows then merges them into the wide statistics.
template <typename T, typename A>
void welford_rows(IsaTag, const T* x, int64_t ld, int64_t r0, int64_t r1, int64_t C,
                  const A* __restrict shift, A* __restrict mean, A* __restrict m2) {
  const T* __restrict x0 = x + r0 * ld;
  DENSE_EXT_IVDEP
  for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<A>(x0[c]) - shift[c], m2[c] = A(0);
  for (int64_t r = r0 + 1; r < r1; ++r) {
    const A inv_n = A(1) / A(r - r0 + 1);
    const T* __restrict xr = x + r * ld;
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      welford_add(mean[c], m2[c], static_cast<A>(xr[c]) - shift[c], inv_n);
    }
  }
}

// Merges the statistics (mean_b, m2_b) of n_b rows into the wide (mean, m2) of the n_a rows before
// them, per channel (Chan et al., common/math.cuh).
template <typename A, typename S>
void chan_merge_rows(IsaTag, int64_t n_a, int64_t n_b, const A* __restrict mean_b,
                     const A* __restrict m2_b, S* __restrict mean, S* __restrict m2, int64_t C) {
  if (n_a == 0) {
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<S>(mean_b[c]), m2[c] = m2_b[c];
    return;
  }
  const S frac = S(n_b) / S(n_a + n_b), na = S(n_a);
  DENSE_EXT_IVDEP
  for (int64_t c = 0; c < C; ++c) {
    chan_merge_counts(mean[c], m2[c], static_cast<S>(mean_b[c]), static_cast<S>(m2_b[c]), na, frac);
  }
}

// wide[c] += narrow[c], narrow[c] = 0: a short tile's partial sums moved into the wide sums.
template <typename A, typename S>
void widen_add_rows(IsaTag, A* __restrict narrow, S* __restrict wide, int64_t C) {
  DENSE_EXT_IVDEP
  for (int64_t c = 0; c < C; ++c) wide[c] += static_cast<S>(narrow[c]), narrow[c] = A(0);
}

// The BN-ReLU backward sums of one short tile, sum_g += g and sum_gxc += g * (x - mean) per
// channel (g = relu_grad(grad_z, pre)); the caller moves them into the wide sums
// (widen_add_rows) and multiplies the sum of g * (x - mean) by invstd once. With kAddScaled also
// grad_x += scale * g on the way (the fixed-statistics part of dx). grad_z and grad_x are
// different tensors.
template <bool kAddScaled, typename T, typename A>
void bn_grad_sums_rows(IsaTag, const T* gz, int64_t ldg, const T* x, int64_t ldx, T* dx,
                       int64_t ldd, int64_t r0, int64_t r1, int64_t C, const A* __restrict mean,
                       const A* __restrict scale, const A* __restrict beta, A* __restrict sum_g,
                       A* __restrict sum_gxc) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * ldx;
    const T* __restrict gr = gz + r * ldg;
    T* __restrict dr = kAddScaled ? dx + r * ldd : nullptr;
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      const A xv = static_cast<A>(xr[c]);
      const A g = relu_grad(static_cast<A>(gr[c]), bn_pre(xv, mean[c], scale[c], beta[c]));
      sum_g[c] += g;
      sum_gxc[c] += g * (xv - mean[c]);
      if constexpr (kAddScaled) {
        const A d = bn_grad_input(g, A(0), scale[c], A(0), A(0), false);
        dr[c] = static_cast<T>(static_cast<A>(dr[c]) + d);
      }
    }
  }
}

// dx of every element from the complete means of g and g*xhat: grad_x = dx, or grad_x += dx
// (kAccumulate). grad_z may be grad_x itself (in place, without kAccumulate). xhat * mean(g*xhat)
// is evaluated as (x - mean) * coef_xc, coef_xc = invstd * mean(g*xhat) computed once per channel
// in double: x - mean is exact for x near the mean, so the element carries two roundings fewer
// than (x - mean) * invstd * mean(g*xhat), which matters where dx cancels (few rows per channel).
template <bool kBatchStats, bool kAccumulate, typename T, typename A>
void bn_grad_input_rows(IsaTag, const T* gz, int64_t ldg, const T* x, int64_t ldx, T* dx,
                        int64_t ldd, int64_t r0, int64_t r1, int64_t C, const A* __restrict mean,
                        const A* __restrict scale, const A* __restrict beta,
                        const A* __restrict mean_g, const A* __restrict coef_xc) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * ldx;
    const T* gr = gz + r * ldg;
    T* dr = dx + r * ldd;
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      const A xv = static_cast<A>(xr[c]);
      const A g = relu_grad(static_cast<A>(gr[c]), bn_pre(xv, mean[c], scale[c], beta[c]));
      A d = bn_grad_input(g, xv - mean[c], scale[c], mean_g[c], coef_xc[c], kBatchStats);
      if constexpr (kAccumulate) d += static_cast<A>(dr[c]);
      dr[c] = static_cast<T>(d);
    }
  }
}

// grad_x += bn_grad_batch_terms(...): the batch-mean terms of one BN, once its sums are complete
// (xhat * mean(g*xhat) as (x - mean) * coef_xc, as in bn_grad_input_rows).
template <typename T, typename A>
void bn_grad_apply_rows(IsaTag, const T* x, int64_t ldx, T* dx, int64_t ldd, int64_t r0, int64_t r1,
                        int64_t C, const A* __restrict mean, const A* __restrict scale,
                        const A* __restrict mean_g, const A* __restrict coef_xc) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * ldx;
    T* __restrict dr = dx + r * ldd;
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      const A xc = static_cast<A>(xr[c]) - mean[c];
      const A t = bn_grad_batch_terms(xc, scale[c], mean_g[c], coef_xc[c]);
      dr[c] = static_cast<T>(static_cast<A>(dr[c]) + t);
    }
  }
}

// grad_x += bn_grad_fold_terms(x, mean, coef0, coef1): batch-mean terms folded into two
// coefficients per channel (common/math.cuh).
template <typename T, typename A>
void bn_grad_terms_rows(IsaTag, const T* x, int64_t ldx, T* dx, int64_t ldd, int64_t r0, int64_t r1,
                        int64_t C, const A* __restrict mean, const A* __restrict coef0,
                        const A* __restrict coef1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * ldx;
    T* __restrict dr = dx + r * ldd;
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      const A t = bn_grad_fold_terms(static_cast<A>(xr[c]), mean[c], coef0[c], coef1[c]);
      dr[c] = static_cast<T>(static_cast<A>(dr[c]) + t);
    }
  }
}

// dst = src, or src * mask / (1 - p) with the counter-based mask of (seed, key, element).
template <typename T, typename A>
void dropout_rows(IsaTag, const T* src, int64_t lds, T* dst, int64_t ldd, int64_t r0, int64_t r1,
                  int64_t C, bool drop, uint64_t seed, int64_t key, uint64_t threshold, A scale) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict sr = src + r * lds;
    T* __restrict dr = dst + r * ldd;
    if (!drop) {
      DENSE_EXT_IVDEP
      for (int64_t c = 0; c < C; ++c) dr[c] = sr[c];
      continue;
    }
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      const bool keep = dropout_keep(seed, key, r * C + c, threshold);
      dr[c] = static_cast<T>(static_cast<A>(sr[c]) * dropout_factor(keep, scale));
    }
  }
}
