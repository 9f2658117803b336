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

// Welford over the rows of one tile: (mean, m2) of x - shift per channel, starting from empty.
template <typename T, typename A>
void welford_rows(IsaTag, const T* x, int64_t ld, int64_t r0, int64_t r1, int64_t C,
                  const A* __restrict shift, A* __restrict mean, A* __restrict m2) {
  DENSE_EXT_IVDEP
  for (int64_t c = 0; c < C; ++c) mean[c] = m2[c] = A(0);
  for (int64_t r = r0; r < r1; ++r) {
    const A inv_n = A(1) / A(r - r0 + 1);
    const T* __restrict xr = x + r * ld;
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      welford_add(mean[c], m2[c], static_cast<A>(xr[c]) - shift[c], inv_n);
    }
  }
}

// The BN-ReLU backward sums of one tile, sum_g += g and sum_gxhat += g * xhat per channel
// (g = relu_grad(grad_z, pre)); with kAddScaled also grad_x += scale * g on the way (the
// fixed-statistics part of dx). grad_z and grad_x are different tensors.
template <bool kAddScaled, typename T, typename A>
void bn_grad_sums_rows(IsaTag, const T* gz, int64_t ldg, const T* x, int64_t ldx, T* dx,
                       int64_t ldd, int64_t r0, int64_t r1, int64_t C, const A* __restrict mean,
                       const A* __restrict scale, const A* __restrict beta,
                       const A* __restrict invstd, A* __restrict sum_g, A* __restrict sum_gxhat) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * ldx;
    const T* __restrict gr = gz + r * ldg;
    T* __restrict dr = kAddScaled ? dx + r * ldd : nullptr;
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      const A xv = static_cast<A>(xr[c]);
      const A g = relu_grad(static_cast<A>(gr[c]), bn_pre(xv, mean[c], scale[c], beta[c]));
      sum_g[c] += g;
      sum_gxhat[c] += g * ((xv - mean[c]) * invstd[c]);
      if constexpr (kAddScaled) {
        const A d = bn_grad_input(g, A(0), scale[c], A(0), A(0), false);
        dr[c] = static_cast<T>(static_cast<A>(dr[c]) + d);
      }
    }
  }
}

// dx of every element from the complete means of g and g*xhat: grad_x = dx, or grad_x += dx
// (kAccumulate). grad_z may be grad_x itself (in place, without kAccumulate).
template <bool kBatchStats, bool kAccumulate, typename T, typename A>
void bn_grad_input_rows(IsaTag, const T* gz, int64_t ldg, const T* x, int64_t ldx, T* dx,
                        int64_t ldd, int64_t r0, int64_t r1, int64_t C, const A* __restrict mean,
                        const A* __restrict scale, const A* __restrict beta,
                        const A* __restrict invstd, const A* __restrict mean_g,
                        const A* __restrict mean_gxhat) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * ldx;
    const T* gr = gz + r * ldg;
    T* dr = dx + r * ldd;
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      const A xv = static_cast<A>(xr[c]);
      const A g = relu_grad(static_cast<A>(gr[c]), bn_pre(xv, mean[c], scale[c], beta[c]));
      const A xhat = (xv - mean[c]) * invstd[c];
      A d = bn_grad_input(g, xhat, scale[c], mean_g[c], mean_gxhat[c], kBatchStats);
      if constexpr (kAccumulate) d += static_cast<A>(dr[c]);
      dr[c] = static_cast<T>(d);
    }
  }
}

// grad_x += bn_grad_batch_terms(...): the batch-mean terms of one BN, once its sums are complete.
template <typename T, typename A>
void bn_grad_apply_rows(IsaTag, const T* x, int64_t ldx, T* dx, int64_t ldd, int64_t r0, int64_t r1,
                        int64_t C, const A* __restrict mean, const A* __restrict scale,
                        const A* __restrict invstd, const A* __restrict mean_g,
                        const A* __restrict mean_gxhat) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * ldx;
    T* __restrict dr = dx + r * ldd;
    DENSE_EXT_IVDEP
    for (int64_t c = 0; c < C; ++c) {
      const A xhat = (static_cast<A>(xr[c]) - mean[c]) * invstd[c];
      const A t = bn_grad_batch_terms(xhat, scale[c], mean_g[c], mean_gxhat[c]);
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
