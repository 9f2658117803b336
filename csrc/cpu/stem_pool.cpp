// The ImageNet stem's ReLU and 3x3 / stride-2 / padding-1 max pool as one CPU op, reading the
// NCHW output of the stem's BN and writing the pooled map in channels_last (the layout the dense
// blocks work in), plus its backward (docs/decisions.md, "The ImageNet stem").
//
// torchvision's stem computes pool(relu(bn(conv(x)))) in NCHW. On the CPU, ATen's NCHW max pool
// is scalar, and the channels_last pool the efficient models used instead needed a transposing
// copy of the 112x112 map (about as slow as the NCHW pool), the ReLU's own pass, its saved output
// and int64 indices. Here one pass per plane writes the pooled map and a one-byte window offset
// per output, which also records whether the ReLU passed the gradient (kStemInactive): backward
// needs neither the ReLU output nor the indices.
//
// Exactness: the window maximum, its position and the gradient's accumulation follow ATen's
// kernels (cpu/MaxPoolKernel.cpp): positions scanned row by row, a value replaces the maximum when
// it is greater or NaN, and backward adds the output gradients into the input plane in output
// order. The gradient passes where the ReLU output at the maximum is not <= 0, as
// threshold_backward decides. So output and input gradient equal torchvision's NCHW stem bit for
// bit (tests/test_stem.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/stem_pool.cuh"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dense_ext {
namespace {

// The stem pool's shape, checked once: kernel 3, stride 2, padding 1, floor mode (the only pool a
// DenseNet stem has; other pools keep ATen's ops).
struct PoolShape {
  int64_t n, c, h, w, ho, wo;
};

PoolShape pool_shape(int64_t n, int64_t c, int64_t h, int64_t w) {
  TORCH_CHECK(h >= 1 && w >= 1, "dense_ext: relu_max_pool needs H, W >= 1, got ", h, "x", w);
  return {n, c, h, w, stem_pool_extent(h), stem_pool_extent(w)};
}

// The loops below are written for the vectoriser: no branches (stem_relu; the maximum's
// comparisons below with bitwise |), one element width per loop: the first version, with
// branches and std::isnan, took 26 ms per DenseNet-121 batch-4 call.
// One input row, ReLU applied, split into the three horizontal taps of every output column:
// left[j] = row[2j - 1], mid[j] = row[2j], right[j] = row[2j + 1]; a position outside the row is
// -inf, which never replaces a maximum (the first tap inside always does: it is >= 0 or NaN).
template <typename T>
void split_row(const T* __restrict row, int64_t w, int64_t wo, T* __restrict left,
               T* __restrict mid, T* __restrict right) {
  const T none = -std::numeric_limits<T>::infinity();
  const int64_t pairs = w / 2;  // columns j with both 2j and 2j + 1 inside the row
#pragma GCC ivdep
  for (int64_t j = 0; j < pairs; ++j) {
    mid[j] = stem_relu(row[2 * j]);
    right[j] = stem_relu(row[2 * j + 1]);
  }
  if (pairs < wo) {  // odd width: the last column's window ends at the row's end
    mid[pairs] = stem_relu(row[2 * pairs]);
    right[pairs] = none;
  }
  left[0] = none;
  std::copy(right, right + wo - 1, left + 1);
}

// Pools the planes [p0, p1) of z (plane = image * C + channel) into out (channels_last) and
// offsets ([N, C, Ho, Wo] contiguous).
template <typename T>
void pool_planes(const T* z, T* out, uint8_t* offsets, const PoolShape& s, int64_t p0, int64_t p1) {
  // taps[row][tap][column]: each input row split once, read by up to two output rows
  std::vector<T> taps(static_cast<size_t>(s.h * 3 * s.wo));
  std::vector<T> best(s.wo);
  std::vector<int32_t> arg(s.wo);  // the float's width, so one loop vectorises both
  for (int64_t p = p0; p < p1; ++p) {
    const T* plane = z + p * s.h * s.w;
    for (int64_t ih = 0; ih < s.h; ++ih) {
      T* t = taps.data() + ih * 3 * s.wo;
      split_row(plane + ih * s.w, s.w, s.wo, t, t + s.wo, t + 2 * s.wo);
    }
    const int64_t image = p / s.c, channel = p % s.c;
    for (int64_t oh = 0; oh < s.ho; ++oh) {
      T* __restrict m = best.data();
      int32_t* __restrict a = arg.data();
      std::fill(m, m + s.wo, -std::numeric_limits<T>::infinity());
      std::fill(a, a + s.wo, 0);
      for (int64_t r = 0; r < 3; ++r) {
        const int64_t ih = 2 * oh - 1 + r;
        if (ih < 0 || ih >= s.h) continue;
        for (int64_t tap = 0; tap < 3; ++tap) {
          const T* __restrict v = taps.data() + (ih * 3 + tap) * s.wo;
          const int32_t offset = static_cast<int32_t>(r * 3 + tap);
#pragma GCC ivdep
          for (int64_t j = 0; j < s.wo; ++j) {
            const bool replace = (v[j] > m[j]) | (v[j] != v[j]);  // ATen's rule
            m[j] = replace ? v[j] : m[j];
            a[j] = replace ? offset : a[j];
          }
        }
      }
      T* o = out + ((image * s.ho + oh) * s.wo) * s.c + channel;
      uint8_t* off = offsets + (p * s.ho + oh) * s.wo;
      for (int64_t j = 0; j < s.wo; ++j) {
        o[j * s.c] = m[j];
        off[j] = m[j] <= T(0) ? kStemInactive : static_cast<uint8_t>(a[j]);
      }
    }
  }
}

// Grain of the parallel loops: planes in blocks of 16 channels of one image, so no two threads
// write the same cache line of the channels_last output.
constexpr int64_t kPlaneBlock = 16;

std::tuple<at::Tensor, at::Tensor> relu_max_pool_cpu(const at::Tensor& z) {
  TORCH_CHECK(z.dim() == 4, "dense_ext: relu_max_pool input must be [N, C, H, W], got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "dense_ext: relu_max_pool takes float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(z.is_contiguous(), "dense_ext: relu_max_pool input must be NCHW-contiguous");
  const PoolShape s = pool_shape(z.size(0), z.size(1), z.size(2), z.size(3));
  at::Tensor out =
      at::empty({s.n, s.c, s.ho, s.wo}, z.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor offsets = at::empty({s.n, s.c, s.ho, s.wo}, z.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "relu_max_pool", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* ap = offsets.mutable_data_ptr<uint8_t>();
    const int64_t blocks_per_image = (s.c + kPlaneBlock - 1) / kPlaneBlock;
    at::parallel_for(0, s.n * blocks_per_image, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t image = b / blocks_per_image, c0 = b % blocks_per_image * kPlaneBlock;
        const int64_t p0 = image * s.c + c0;
        pool_planes(zp, op, ap, s, p0, p0 + std::min(kPlaneBlock, s.c - c0));
      }
    });
  });
  return {out, offsets};
}

at::Tensor relu_max_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& offsets,
                                      int64_t h, int64_t w) {
  TORCH_CHECK(grad_out.dim() == 4 && offsets.dim() == 4 && grad_out.sizes() == offsets.sizes(),
              "dense_ext: relu_max_pool_backward: grad_out ", grad_out.sizes(), " and offsets ",
              offsets.sizes(), " must be the same [N, C, Ho, Wo]");
  TORCH_CHECK(offsets.scalar_type() == at::kByte && offsets.is_contiguous(),
              "dense_ext: relu_max_pool_backward: offsets must be relu_max_pool's (contiguous "
              "uint8)");
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat || grad_out.scalar_type() == at::kDouble,
              "dense_ext: relu_max_pool_backward takes float32 or float64, got ",
              grad_out.scalar_type());
  const PoolShape s = pool_shape(grad_out.size(0), grad_out.size(1), h, w);
  TORCH_CHECK(s.ho == grad_out.size(2) && s.wo == grad_out.size(3),
              "dense_ext: relu_max_pool_backward: an input of ", h, "x", w, " pools to ", s.ho, "x",
              s.wo, ", not ", grad_out.size(2), "x", grad_out.size(3));
  // Each plane is zeroed by the thread that then scatters into it (one pass, cache-hot).
  at::Tensor grad_z = at::empty({s.n, s.c, h, w}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "relu_max_pool_backward", [&] {
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const uint8_t* ap = offsets.const_data_ptr<uint8_t>();
    scalar_t* gz = grad_z.mutable_data_ptr<scalar_t>();
    const auto st = grad_out.strides();
    at::parallel_for(0, s.n * s.c, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t image = p / s.c, channel = p % s.c;
        const scalar_t* gp = g + image * st[0] + channel * st[1];
        const uint8_t* a = ap + p * s.ho * s.wo;
        scalar_t* plane = gz + p * h * w;
        std::fill(plane, plane + h * w, scalar_t(0));
        for (int64_t oh = 0; oh < s.ho; ++oh) {
          for (int64_t ow = 0; ow < s.wo; ++ow) {
            const uint8_t offset = a[oh * s.wo + ow];
            if (offset == kStemInactive) continue;
            const int64_t ih = 2 * oh - 1 + offset / 3, iw = 2 * ow - 1 + offset % 3;
            plane[ih * w + iw] += gp[oh * st[2] + ow * st[3]];
          }
        }
      }
    });
  });
  return grad_z;
}

// The CUDA kernels' thread bodies (common/stem_pool.cuh) run once per element on the host, for
// every floating dtype: the tests compare them with ATen's ops and with the ops above.
std::tuple<at::Tensor, at::Tensor> relu_max_pool_reference_cpu(const at::Tensor& z_in) {
  TORCH_CHECK(z_in.dim() == 4, "dense_ext: relu_max_pool input must be [N, C, H, W]");
  const at::Tensor z = z_in.contiguous();
  const PoolShape s = pool_shape(z.size(0), z.size(1), z.size(2), z.size(3));
  at::Tensor out = at::empty({s.n, s.c, s.ho, s.wo}, z.options());
  at::Tensor offsets = at::empty({s.n, s.c, s.ho, s.wo}, z.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "reference", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* ap = offsets.mutable_data_ptr<uint8_t>();
    for (int64_t p = 0; p < s.n * s.c; ++p) {
      for (int64_t oh = 0; oh < s.ho; ++oh) {
        for (int64_t ow = 0; ow < s.wo; ++ow) {
          acc_t<scalar_t> best;
          const int64_t i = (p * s.ho + oh) * s.wo + ow;
          ap[i] = stem_pool_window(zp + p * s.h * s.w, s.h, s.w, oh, ow, best);
          op[i] = static_cast<scalar_t>(best);
        }
      }
    }
  });
  return {out.contiguous(at::MemoryFormat::ChannelsLast), offsets};
}

at::Tensor relu_max_pool_backward_reference_cpu(const at::Tensor& grad_out,
                                                const at::Tensor& offsets, int64_t h, int64_t w) {
  const PoolShape s = pool_shape(grad_out.size(0), grad_out.size(1), h, w);
  TORCH_CHECK(offsets.is_contiguous() && offsets.sizes() == grad_out.sizes() &&
                  s.ho == grad_out.size(2) && s.wo == grad_out.size(3),
              "dense_ext: relu_max_pool_backward_reference: mismatched shapes");
  at::Tensor grad_z = at::empty({s.n, s.c, h, w}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "ref", [&] {
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const auto st = grad_out.strides();
    scalar_t* gz = grad_z.mutable_data_ptr<scalar_t>();
    for (int64_t p = 0; p < s.n * s.c; ++p) {
      const scalar_t* gp = g + (p / s.c) * st[0] + (p % s.c) * st[1];
      const uint8_t* a = offsets.const_data_ptr<uint8_t>() + p * s.ho * s.wo;
      for (int64_t ih = 0; ih < h; ++ih) {
        for (int64_t iw = 0; iw < w; ++iw) {
          gz[(p * h + ih) * w + iw] =
              static_cast<scalar_t>(stem_pool_input_grad(gp, st[2], st[3], a, s.ho, s.wo, ih, iw));
        }
      }
    }
  });
  return grad_z;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dense_ext, m) {
  // (out, offsets) = the 3x3 / stride-2 / padding-1 max pool of relu(z): z NCHW-contiguous
  // float32/float64, out channels_last, offsets uint8 [N, C, Ho, Wo]: the position of each
  // window's maximum (row * 3 + column in the window), 255 where the ReLU output there is <= 0.
  m.def("relu_max_pool(Tensor z) -> (Tensor, Tensor)");
  // The gradient of relu_max_pool at its input (NCHW, [N, C, h, w]) from its output gradient
  // (any strides) and offsets.
  m.def("relu_max_pool_backward(Tensor grad_out, Tensor offsets, int h, int w) -> Tensor");
  // The same two ops computed by the CUDA kernels' per-element functions on the host
  // (common/stem_pool.cuh), any floating dtype: for tests.
  m.def("relu_max_pool_reference(Tensor z) -> (Tensor, Tensor)");
  m.def(
      "relu_max_pool_backward_reference(Tensor grad_out, Tensor offsets, int h, int w) -> Tensor");
}

TORCH_LIBRARY_IMPL(dense_ext, CPU, m) {
  m.impl("relu_max_pool", TORCH_FN(relu_max_pool_cpu));
  m.impl("relu_max_pool_backward", TORCH_FN(relu_max_pool_backward_cpu));
  m.impl("relu_max_pool_reference", TORCH_FN(relu_max_pool_reference_cpu));
  m.impl("relu_max_pool_backward_reference", TORCH_FN(relu_max_pool_backward_reference_cpu));
}

}  // namespace dense_ext
