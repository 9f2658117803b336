// The inner loops of the CPU weight gradient of a 3x3 convolution (stride 1, padding 1) over
// channels_last rows: dW[o, c, kh, kw] = sum over (n, h, w) of g[n, h, w, o] * x[n, h + kh - 1,
// w + kw - 1, c], the terms whose input position lies inside the image.
//
// Why our own loops: oneDNN's backward-weights primitive took 1.1-2.2x the time of its forward
// convolution of the same FLOPs (bench/results/cpu-conv3x3-wgrad-2026-11-27.txt), and the 3x3
// weight gradients were the largest single cost of a DenseNet backward on the CPU. Per tap (kh, kw)
// the gradient is a product [co x rows] x [rows x ci] whose rows are the image rows shifted by the
// tap; these loops keep an MR x (NV vectors) tile of it in registers while they walk the rows,
// so each loaded input vector feeds MR fused multiply-adds.
//
// kernels.cpp includes this file once per instruction set, inside that instruction set's
// namespace (which defines IsaTag and kVecBytes, the vector width) and `#pragma GCC target`
// region, as it does cpu/rows.h. It uses GCC/Clang vector extensions; kernels.cpp includes it
// only where those exist, after defining Conv3x3Chunk (one type for every copy). No include
// guard; it includes nothing.

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int kLanes = kVecBytes / sizeof(T);
};

template <typename T>
inline typename Vec<T>::type vec_load(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// acc[i][j] += g[r, i] * x[r, j-th vector] over `rows` rows.
template <typename T, int MR, int NV>
__attribute__((always_inline)) inline void conv3x3_tile_rows(const T* __restrict g, int64_t ldg,
                                                             const T* __restrict x, int64_t ldx,
                                                             int64_t rows,
                                                             typename Vec<T>::type (&acc)[MR][NV]) {
  constexpr int L = Vec<T>::kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    typename Vec<T>::type xv[NV];
    for (int j = 0; j < NV; ++j) xv[j] = vec_load(x + r * ldx + j * L);
    for (int i = 0; i < MR; ++i) {
      const T gi = g[r * ldg + i];
      for (int j = 0; j < NV; ++j) acc[i][j] += xv[j] * gi;
    }
  }
}

// The rows [ha, hb) x [wa, wb) of output positions whose input (h + dh, w + dw) is in the image.
struct TapRange {
  int64_t ha, hb, wa, wb;
};

inline TapRange tap_range(const Conv3x3Chunk& s, int dh, int dw) {
  return {std::max<int64_t>(s.h0, -dh), std::min<int64_t>(s.h1, s.H - dh),
          std::max<int64_t>(0, -dw), std::min<int64_t>(s.W, s.W - dw)};
}

// out[o0 + i, c0 + j] += the tap's MR x NV*L tile, out being [co, ci] with leading dimension ci.
template <typename T, int MR, int NV>
void conv3x3_tap_tile(const Conv3x3Chunk& s, int dh, int dw, int64_t o0, int64_t c0, T* out) {
  constexpr int L = Vec<T>::kLanes;
  const T* g = static_cast<const T*>(s.g);
  const T* x = static_cast<const T*>(s.x);
  const TapRange t = tap_range(s, dh, dw);
  typename Vec<T>::type acc[MR][NV];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NV; ++j) acc[i][j] = typename Vec<T>::type{};
  }
  for (int64_t h = t.ha; h < t.hb; ++h) {
    const T* gp = g + ((s.n * s.H + h) * s.W + t.wa) * s.ldg + o0;
    const T* xp = x + ((s.n * s.H + h + dh) * s.W + t.wa + dw) * s.ldx + c0;
    conv3x3_tile_rows<T, MR, NV>(gp, s.ldg, xp, s.ldx, t.wb - t.wa, acc);
  }
  for (int i = 0; i < MR; ++i) {
    T* o = out + (o0 + i) * s.ci + c0;
    for (int j = 0; j < NV; ++j) {
      const typename Vec<T>::type v = vec_load(o + j * L) + acc[i][j];
      __builtin_memcpy(o + j * L, &v, sizeof v);
    }
  }
}

// The input channels [c0, ci) that fill no vector, one scalar sum each, for rows [o0, o1).
template <typename T>
void conv3x3_tap_scalar(const Conv3x3Chunk& s, int dh, int dw, int64_t o0, int64_t o1, int64_t c0,
                        T* out) {
  const T* g = static_cast<const T*>(s.g);
  const T* x = static_cast<const T*>(s.x);
  const TapRange t = tap_range(s, dh, dw);
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t c = c0; c < s.ci; ++c) {
      T sum = 0;
      for (int64_t h = t.ha; h < t.hb; ++h) {
        // Both rows from their first position in range: a pointer to input column -1 would
        // point outside the buffer for the first row.
        const T* gp = g + ((s.n * s.H + h) * s.W + t.wa) * s.ldg + o;
        const T* xp = x + ((s.n * s.H + h + dh) * s.W + t.wa + dw) * s.ldx + c;
        for (int64_t w = 0; w < t.wb - t.wa; ++w) sum += gp[w * s.ldg] * xp[w * s.ldx];
      }
      out[o * s.ci + c] += sum;
    }
  }
}

// MR output channels from o0, every input channel: two-vector tiles, then one-vector tiles,
// then scalars.
template <typename T, int MR>
void conv3x3_tap_rows_of(const Conv3x3Chunk& s, int dh, int dw, int64_t o0, T* out) {
  constexpr int L = Vec<T>::kLanes;
  int64_t c0 = 0;
  for (; c0 + 2 * L <= s.ci; c0 += 2 * L) conv3x3_tap_tile<T, MR, 2>(s, dh, dw, o0, c0, out);
  for (; c0 + L <= s.ci; c0 += L) conv3x3_tap_tile<T, MR, 1>(s, dh, dw, o0, c0, out);
  if (c0 < s.ci) conv3x3_tap_scalar<T>(s, dh, dw, o0, o0 + MR, c0, out);
}

// out[t, o, c] += the chunk's terms of every tap t = 3 * kh + kw; out is [9, co, ci].
// Six output channels per tile: 12 vector accumulators, two input vectors and a broadcast fit
// the 16 vector registers of AVX2 (and of SSE2 for the portable copy).
template <typename T>
void conv3x3_wgrad_chunk(IsaTag, const Conv3x3Chunk& s, T* out) {
  constexpr int kMR = 6;
  for (int tap = 0; tap < 9; ++tap) {
    const int dh = tap / 3 - 1, dw = tap % 3 - 1;
    T* o = out + tap * s.co * s.ci;
    int64_t o0 = 0;
    for (; o0 + kMR <= s.co; o0 += kMR) conv3x3_tap_rows_of<T, kMR>(s, dh, dw, o0, o);
    switch (s.co - o0) {
      case 5:
        conv3x3_tap_rows_of<T, 5>(s, dh, dw, o0, o);
        break;
      case 4:
        conv3x3_tap_rows_of<T, 4>(s, dh, dw, o0, o);
        break;
      case 3:
        conv3x3_tap_rows_of<T, 3>(s, dh, dw, o0, o);
        break;
      case 2:
        conv3x3_tap_rows_of<T, 2>(s, dh, dw, o0, o);
        break;
      case 1:
        conv3x3_tap_rows_of<T, 1>(s, dh, dw, o0, o);
        break;
      default:
        break;
    }
  }
}
