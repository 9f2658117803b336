// The ImageNet stem pool's arithmetic per output and per input element (ReLU, then a 3x3 max
// pool with stride 2 and padding 1; cpu/stem_pool.cpp has the design), shared by the CUDA
// kernels (cuda/stem_pool.cu) and by the CPU ops relu_max_pool_reference and
// relu_max_pool_backward_reference, which run these functions once per element as the kernels'
// threads do, so the CPU tests check the arithmetic the GPU runs against ATen's ops.
#pragma once

#include <cstdint>
#include <limits>

#include "math.cuh"

namespace dense_ext {

// The offset of a window whose ReLU output at the maximum is <= 0: it passes no gradient.
constexpr uint8_t kStemInactive = 255;

// Output rows (or columns) of an input of n rows: floor((n + 2 - 3) / 2) + 1.
DENSE_EXT_HOST_DEVICE int64_t stem_pool_extent(int64_t n) { return (n - 1) / 2 + 1; }

// Branch-free (bitwise | of comparisons, NaN found as a != a), so the CPU op's row loops
// vectorise.
template <typename T>
DENSE_EXT_HOST_DEVICE acc_t<T> stem_relu(T v) {
  const acc_t<T> a = static_cast<acc_t<T>>(v);
  return ((a > acc_t<T>(0)) | (a != a)) ? a : acc_t<T>(0);  // NaN passes, as torch.relu's
}

// Output (oh, ow) of one plane ([h, w], row-major): the maximum of the ReLU over the window's
// positions inside the plane, scanned row by row, a value replacing the maximum when greater or
// NaN (ATen's rule), into `best`; returns the window offset (row * 3 + column) of the maximum,
// or kStemInactive where best <= 0.
template <typename T>
DENSE_EXT_HOST_DEVICE uint8_t stem_pool_window(const T* plane, int64_t h, int64_t w, int64_t oh,
                                               int64_t ow, acc_t<T>& best) {
  best = -std::numeric_limits<acc_t<T>>::infinity();
  uint8_t arg = 0;
  for (int r = 0; r < 3; ++r) {
    const int64_t ih = 2 * oh - 1 + r;
    if (ih < 0 || ih >= h) continue;
    for (int c = 0; c < 3; ++c) {
      const int64_t iw = 2 * ow - 1 + c;
      if (iw < 0 || iw >= w) continue;
      const acc_t<T> v = stem_relu(plane[ih * w + iw]);
      if (v > best || v != v) {
        best = v;
        arg = static_cast<uint8_t>(r * 3 + c);
      }
    }
  }
  return best <= acc_t<T>(0) ? kStemInactive : arg;
}

// The input gradient at (ih, iw) of one plane: the output gradients (g, strides gs_h, gs_w) of
// the windows whose maximum sits there, added in output order (the order in which ATen's CPU
// kernel scatters them, and its CUDA kernel gathers them), in the accumulation type.
template <typename T>
DENSE_EXT_HOST_DEVICE acc_t<T> stem_pool_input_grad(const T* g, int64_t gs_h, int64_t gs_w,
                                                    const uint8_t* offsets, int64_t ho, int64_t wo,
                                                    int64_t ih, int64_t iw) {
  // Windows covering ih: 2*oh - 1 <= ih <= 2*oh + 1.
  const int64_t oh1 = (ih + 1) / 2 < ho - 1 ? (ih + 1) / 2 : ho - 1;
  const int64_t ow1 = (iw + 1) / 2 < wo - 1 ? (iw + 1) / 2 : wo - 1;
  acc_t<T> sum = 0;
  for (int64_t oh = ih / 2; oh <= oh1; ++oh) {
    for (int64_t ow = iw / 2; ow <= ow1; ++ow) {
      const uint8_t offset = offsets[oh * wo + ow];
      if (offset == kStemInactive) continue;
      if (2 * oh - 1 + offset / 3 == ih && 2 * ow - 1 + offset % 3 == iw) {
        sum += static_cast<acc_t<T>>(g[oh * gs_h + ow * gs_w]);
      }
    }
  }
  return sum;
}

}  // namespace dense_ext
