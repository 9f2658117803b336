// Host emulation of the CUDA kernels' grid (csrc/cuda/tiling.cuh), built with the host compiler
// and run by tests/test_cuda_static.py::test_host_emulation_of_the_cuda_grid; no GPU needed.
//
// For a sweep of odd shapes, row strides, base offsets, element sizes and SM counts it runs the
// launch configuration and per-thread index functions the kernels run, over every block and
// thread of the grid, and checks:
//   - elementwise kernels: every element (row, channel) is visited exactly once, in bounds, with
//     vector accesses aligned to their width;
//   - reductions: the same, each element by the row block that owns its row; at most
//     kMaxPartials row blocks, none empty; grid limits;
//   - channel_stats arithmetic: stats_thread (the kernel's per-thread loop) and the kernels'
//     fixed-order trees give the mean and variance of float64 two-pass truth, on data whose mean
//     is 1e4 standard deviations, for float, double and half (two channels per load).
// Prints "ok: ..." and exits 0, or prints the first failure and exits 1.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../csrc/cuda/tiling.cuh"

using namespace dense_ext;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                \
  do {                                                   \
    if (!(cond)) {                                       \
      if (failures++ < 5) {                              \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                        \
        std::printf("\n");                               \
      }                                                  \
    }                                                    \
  } while (0)

struct Shape {
  int64_t M, C, ld, offset;  // rows, channels, row stride, first element of the slice
  int elem;                  // bytes per element
  int sms;
};

// Fake addresses: a 256-byte aligned allocation, the slice starting `offset` elements in.
constexpr uintptr_t kBase = 1 << 20;

const void* slice_ptr(const Shape& s) {
  return reinterpret_cast<const void*>(kBase + s.offset * s.elem);
}

// Visits every (block, thread) of the grid like the kernels: threads whose channel is past C
// return; the others walk their rows with for_rows. `rows_of` is reduction_rows or
// elementwise_rows.
template <typename RowsOf>
void check_coverage(const Shape& s, const Tiling& t, RowsOf rows_of, const char* kind) {
  EXPECT(t.lanes_c * t.lanes_r == kThreads && t.lanes_c <= 32, "%s: block %dx%d", kind, t.lanes_c,
         t.lanes_r);
  EXPECT(t.row_blocks >= 1 && t.row_blocks <= kMaxGridY, "%s: row_blocks %lld", kind,
         (long long)t.row_blocks);
  std::vector<uint8_t> seen(s.M * s.C, 0);
  for (int64_t bx = 0; bx < t.channel_blocks; ++bx) {
    for (int64_t by = 0; by < t.row_blocks; ++by) {
      int64_t block_rows = 0;
      for (int ty = 0; ty < t.lanes_r; ++ty) {
        for (int tx = 0; tx < t.lanes_c; ++tx) {
          const int64_t c = thread_channel(t, bx, tx);
          if (c >= s.C) continue;
          const RowRange range = rows_of(t, by, ty, s.M);
          for_rows(range, [&](int64_t r, auto batch) {
            constexpr int N = decltype(batch)::value;
            for (int u = 0; u < N; ++u) {
              const int64_t row = r + u * range.step;
              EXPECT(row >= 0 && row < s.M, "%s: row %lld of %lld", kind, (long long)row,
                     (long long)s.M);
              if (row < 0 || row >= s.M) return;
              const uintptr_t addr = kBase + (s.offset + row * s.ld + c) * s.elem;
              EXPECT(addr % (t.vec * s.elem) == 0, "%s: misaligned vector of %d", kind, t.vec);
              for (int v = 0; v < t.vec; ++v) {
                EXPECT(c + v < s.C, "%s: channel %lld of %lld", kind, (long long)(c + v),
                       (long long)s.C);
                if (c + v < s.C) seen[row * s.C + c + v]++;
              }
              ++block_rows;
            }
          });
        }
      }
      EXPECT(block_rows > 0, "%s: row block %lld visits nothing", kind, (long long)by);
    }
  }
  int64_t wrong = 0;
  for (uint8_t n : seen) wrong += n != 1;
  EXPECT(wrong == 0, "%s: %lld of %lld elements not visited exactly once (M=%lld C=%lld ld=%lld)",
         kind, (long long)wrong, (long long)seen.size(), (long long)s.M, (long long)s.C,
         (long long)s.ld);
}

void check_shape(const Shape& s) {
  const int vec = vector_width(s.elem, s.C, {{slice_ptr(s), s.ld}});
  const bool pairs = s.elem == 2 && s.C % 2 == 0 && s.ld % 2 == 0 && s.offset % 2 == 0;
  EXPECT(vec == (pairs ? 2 : 1), "vector_width %d for elem %d C %lld ld %lld offset %lld", vec,
         s.elem, (long long)s.C, (long long)s.ld, (long long)s.offset);
  const Tiling red = reduction_tiling(s.M, s.C, vec, s.sms);
  EXPECT(red.row_blocks <= kMaxPartials, "reduction: %lld partials", (long long)red.row_blocks);
  check_coverage(s, red, reduction_rows, "reduction");
  check_coverage(s, elementwise_tiling(s.M, s.C, vec, s.sms), elementwise_rows, "elementwise");
}

// ---------------------------------------------------------------------------------------------
// channel_stats, emulated: partial kernel (stats_thread + tree over row lanes), then finalize
// (partials in lanes of 8, tree), as in cuda/kernels.cu.

template <typename scalar_t, typename acc, int V>
void stats_emulated(const scalar_t* x, int64_t M, int64_t C, int64_t ld, const Tiling& t,
                    std::vector<acc>& mean, std::vector<acc>& var) {
  const int64_t G = t.row_blocks;
  std::vector<MeanM2<acc>> part(G * C, meanm2_empty<acc>());
  for (int64_t bx = 0; bx < t.channel_blocks; ++bx) {
    for (int64_t by = 0; by < G; ++by) {
      std::vector<MeanM2<acc>> sh(kThreads * V, meanm2_empty<acc>());
      for (int ty = 0; ty < t.lanes_r; ++ty) {
        for (int tx = 0; tx < t.lanes_c; ++tx) {
          const int64_t c = thread_channel(t, bx, tx);
          MeanM2<acc> s[V];
          for (int v = 0; v < V; ++v) s[v] = meanm2_empty<acc>();
          if (c < C) {
            acc shift[V];
            for (int v = 0; v < V; ++v) shift[v] = static_cast<acc>(x[c + v]);
            stats_thread<scalar_t, acc, V>(x, ld, c, reduction_rows(t, by, ty, M), shift, s);
          }
          for (int v = 0; v < V; ++v) sh[(ty * t.lanes_c + tx) * V + v] = s[v];
        }
      }
      for (int half = t.lanes_r / 2; half > 0; half /= 2) {  // tree_over_row_lanes
        for (int ty = 0; ty < half; ++ty) {
          for (int i = 0; i < t.lanes_c * V; ++i) {
            chan_merge(sh[ty * t.lanes_c * V + i], sh[(ty + half) * t.lanes_c * V + i]);
          }
        }
      }
      for (int i = 0; i < t.lanes_c * V; ++i) {
        const int64_t c = bx * t.lanes_c * V + i;
        if (c < C) part[by * C + c] = sh[i];
      }
    }
  }
  constexpr int lanes = kThreads / 32;  // stats_finalize_kernel: 32 channels x 8 lanes
  for (int64_t c = 0; c < C; ++c) {
    MeanM2<acc> sh[lanes];
    for (int ty = 0; ty < lanes; ++ty) {
      sh[ty] = meanm2_empty<acc>();
      for (int64_t g = ty; g < G; g += lanes) chan_merge(sh[ty], part[g * C + c]);
    }
    for (int half = lanes / 2; half > 0; half /= 2)
      for (int ty = 0; ty < half; ++ty) chan_merge(sh[ty], sh[ty + half]);
    mean[c] = static_cast<acc>(x[c]) + sh[0].mean;
    var[c] = meanm2_var(sh[0]);
  }
}

template <typename scalar_t, typename acc, int V>
void check_stats(int64_t M, int64_t C, int64_t ld, int sms, double offset, double tol) {
  std::mt19937 rng(static_cast<unsigned>(M * 131 + C));
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<scalar_t> x(M * ld);
  for (int64_t i = 0; i < M * ld; ++i) {
    const int64_t c = i % ld;
    x[i] = static_cast<scalar_t>(offset * (1 + c % 3) + (1 + c % 5) * normal(rng));
  }
  const Tiling t = reduction_tiling(M, C, V, sms);
  EXPECT(t.vec == V, "stats: vec %d", t.vec);
  std::vector<acc> mean(C), var(C);
  stats_emulated<scalar_t, acc, V>(x.data(), M, C, ld, t, mean, var);
  double worst = 0;
  for (int64_t c = 0; c < C; ++c) {  // float64 two-pass truth of the (rounded) data
    double m = 0, q = 0;
    for (int64_t r = 0; r < M; ++r) m += static_cast<double>(x[r * ld + c]);
    m /= M;
    for (int64_t r = 0; r < M; ++r) {
      const double d = static_cast<double>(x[r * ld + c]) - m;
      q += d * d;
    }
    q /= M;
    const double scale = std::sqrt(q) + std::abs(m);
    worst = std::max(worst, std::abs(mean[c] - m) / scale);
    if (q > 0) worst = std::max(worst, std::abs(var[c] - q) / q);
  }
  EXPECT(worst <= tol, "stats (elem %d, M=%lld C=%lld, %d SMs): relative error %.3g > %.1g",
         int(sizeof(scalar_t)), (long long)M, (long long)C, sms, worst, tol);
}

}  // namespace

int main() {
  const int64_t rows[] = {1, 2, 3, 7, 31, 64, 255, 257, 1031, 4099, 40001};
  const int64_t channels[] = {1, 2, 3, 12, 31, 33, 64, 300};
  const int64_t pads[] = {0, 1, 4};
  const int elems[] = {2, 4, 8};
  const int sms[] = {1, 3, 132};
  int shapes = 0;
  for (int64_t M : rows) {
    for (int64_t C : channels) {
      if (M * C > 4000000) continue;
      for (int64_t pad : pads) {
        for (int elem : elems) {
          for (int sm : sms) {
            for (int64_t offset : {int64_t(0), int64_t(1), int64_t(2)}) {
              if (elem != 2 && offset == 2) continue;
              check_shape({M, C, C + pad, offset, elem, sm});
              ++shapes;
              if (failures) return 1;
            }
          }
        }
      }
    }
  }
  check_stats<float, float, 1>(100003, 7, 9, 132, 1e4, 1e-5);
  check_stats<float, float, 1>(4099, 33, 33, 3, 1e4, 1e-5);
  check_stats<double, double, 1>(20011, 5, 8, 132, 1e4, 1e-12);
  check_stats<c10::Half, float, 2>(30001, 12, 14, 132, 10.0, 1e-5);
  check_stats<c10::Half, float, 2>(7, 2, 2, 1, 10.0, 1e-5);
  if (failures) return 1;
  std::printf("ok: %d shapes, statistics of 5\n", shapes);
  return 0;
}
