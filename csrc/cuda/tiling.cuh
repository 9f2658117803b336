// Launch geometry of the CUDA kernels over a row-major [M, C] matrix with row stride ld (a
// channels_last tensor or a channel slice of one), and the per-thread loops over it.
//
// Pure index arithmetic with no CUDA API, so it compiles for the host too: the host emulation in
// tests/cuda_emulation.cpp runs exactly these functions over every block and thread of odd
// shapes and strides and checks that each element is visited once, in bounds, with aligned
// vector accesses (tests/test_cuda_static.py builds and runs it).
//
// A block is lanes_c x lanes_r threads (threadIdx.x along channels, threadIdx.y along rows).
// Each thread owns `vec` consecutive channels, read with one vector load per row, and the same
// channels for its whole life, so per-channel constants are loaded and computed once per thread,
// and no thread ever divides an element index. A thread visits its rows kUnroll at a time, all
// loads first: kUnroll rows' loads are in flight before the first value is used.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../common/math.cuh"

namespace dense_ext {

constexpr int kThreads = 256;      // threads per block, every kernel
constexpr int kUnroll = 4;         // rows per thread per loop iteration
constexpr int kMaxPartials = 256;  // row blocks of a reduction = partial results per channel
constexpr int64_t kMaxGridY = 65535;

struct Tiling {
  int vec;                 // channels per thread: 2 (16-bit types, aligned) or 1
  int lanes_c;             // threads along channels: a power of two <= 32
  int lanes_r;             // threads along rows: kThreads / lanes_c
  int64_t channel_blocks;  // gridDim.x
  int64_t row_blocks;      // gridDim.y
  int64_t rows_per_block;  // reductions: the contiguous rows of one block; elementwise: 0
};

// ---------------------------------------------------------------------------------------------
// Host: the launch configuration.

// Threads along channels: enough lanes for the channel groups of a row, at most a warp.
inline int channel_lanes(int64_t groups) {
  int lanes = 1;
  while (lanes < 32 && lanes < groups) lanes *= 2;
  return lanes;
}

inline Tiling base_tiling(int64_t C, int vec) {
  Tiling t{};
  t.vec = vec;
  const int64_t groups = (C + vec - 1) / vec;
  t.lanes_c = channel_lanes(groups);
  t.lanes_r = kThreads / t.lanes_c;
  t.channel_blocks = (groups + t.lanes_c - 1) / t.lanes_c;
  return t;
}

// Reductions: about 4 blocks per SM in total, at most kMaxPartials row blocks, each at least
// one full unrolled iteration of every row lane; the rows split evenly and no block is empty.
// Requires M >= 1 and C >= 1 (ops return before launching on empty problems).
inline Tiling reduction_tiling(int64_t M, int64_t C, int vec, int sms) {
  Tiling t = base_tiling(C, vec);
  const int64_t min_rows = int64_t(t.lanes_r) * kUnroll;
  int64_t g = (4 * int64_t(sms) + t.channel_blocks - 1) / t.channel_blocks;
  g = std::min<int64_t>(g, kMaxPartials);
  g = std::max<int64_t>(1, std::min<int64_t>(g, M / min_rows));
  t.rows_per_block = (M + g - 1) / g;
  t.row_blocks = (M + t.rows_per_block - 1) / t.rows_per_block;
  return t;
}

// Elementwise kernels: a grid-stride loop over rows; about 8 blocks per SM in total (full
// occupancy at 256 threads), no more row blocks than the rows fill.
inline Tiling elementwise_tiling(int64_t M, int64_t C, int vec, int sms) {
  Tiling t = base_tiling(C, vec);
  const int64_t rows_per_pass = int64_t(t.lanes_r) * kUnroll;
  int64_t g = (8 * int64_t(sms) + t.channel_blocks - 1) / t.channel_blocks;
  g = std::min<int64_t>(g, (M + rows_per_pass - 1) / rows_per_pass);
  t.row_blocks = std::max<int64_t>(1, std::min<int64_t>(g, kMaxGridY));
  t.rows_per_block = 0;
  return t;
}

// Two channels per thread (one 32-bit load of a pair of 16-bit values) when every operand allows
// it: C even, every row stride even and every base address 4-byte aligned; else one.
struct Operand {
  const void* ptr;
  int64_t ld;
};

inline int vector_width(int elem_size, int64_t C, std::initializer_list<Operand> operands) {
  if (elem_size != 2 || C % 2 != 0) return 1;
  for (const Operand& o : operands) {
    if (o.ld % 2 != 0 || reinterpret_cast<uintptr_t>(o.ptr) % 4 != 0) return 1;
  }
  return 2;
}

// ---------------------------------------------------------------------------------------------
// Device (and host emulation): which channels and rows a thread visits.

DENSE_EXT_HOST_DEVICE int64_t thread_channel(const Tiling& t, int64_t block_x, int tx) {
  return (block_x * t.lanes_c + tx) * t.vec;
}

// Rows begin, begin + step, ... below end.
struct RowRange {
  int64_t begin, end, step;
};

// Reductions: block y owns the rows [y * rows_per_block, (y + 1) * rows_per_block), which its
// row lanes interleave.
DENSE_EXT_HOST_DEVICE RowRange reduction_rows(const Tiling& t, int64_t block_y, int ty, int64_t M) {
  const int64_t first = block_y * t.rows_per_block;
  const int64_t last = first + t.rows_per_block;
  return {first + ty, last < M ? last : M, t.lanes_r};
}

// Elementwise: every row lane of every row block, grid-stride.
DENSE_EXT_HOST_DEVICE RowRange elementwise_rows(const Tiling& t, int64_t block_y, int ty,
                                                int64_t M) {
  return {block_y * t.lanes_r + ty, M, t.row_blocks * t.lanes_r};
}

// A batch of N rows r, r + step, ..., r + (N - 1) * step, as a type: kernels and the emulation
// write their row loop body once, as a generic lambda over the batch size.
template <int N>
using Batch = std::integral_constant<int, N>;

// Calls body(r, Batch<kUnroll>{}) for full batches of the rows of `range`, then body(r,
// Batch<1>{}) for each of the (at most kUnroll - 1) remaining rows. A full batch has no bounds
// checks, so the kernel issues all of its kUnroll loads before it uses the first. Neither loop
// lets the compiler unroll by a trip count, which it would compute with a 64-bit division.
template <typename Body>
DENSE_EXT_HOST_DEVICE void for_rows(const RowRange& range, Body&& body) {
  int64_t r = range.begin;
  const int64_t span = (kUnroll - 1) * range.step;
  DENSE_EXT_NO_UNROLL
  for (; r + span < range.end; r += kUnroll * range.step) body(r, Batch<kUnroll>{});
  DENSE_EXT_UNROLL
  for (int u = 0; u < kUnroll - 1; ++u, r += range.step) {
    if (r < range.end) body(r, Batch<1>{});
  }
}

// ---------------------------------------------------------------------------------------------
// Vector access of `V` consecutive elements.

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
DENSE_EXT_HOST_DEVICE Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <int V, typename T>
DENSE_EXT_HOST_DEVICE void store_vec(T* p, const Vec<T, V>& value) {
  *reinterpret_cast<Vec<T, V>*>(p) = value;
}

// ---------------------------------------------------------------------------------------------
// One thread's part of channel_stats: shifted Welford statistics of its `V` channels over its
// rows, one batch of rows at a time (welford_add_batch: one division per batch).
template <typename scalar_t, typename acc, int V>
DENSE_EXT_HOST_DEVICE void stats_thread(const scalar_t* x, int64_t ld, int64_t c,
                                        const RowRange& range, const acc (&shift)[V],
                                        MeanM2<acc> (&s)[V]) {
  const int64_t step = range.step * ld;
  for_rows(range, [&](int64_t r, auto batch) {
    constexpr int N = decltype(batch)::value;
    const scalar_t* xr = x + r * ld + c;
    Vec<scalar_t, V> xv[N];
    DENSE_EXT_UNROLL
    for (int u = 0; u < N; ++u) xv[u] = load_vec<V>(xr + u * step);
    DENSE_EXT_UNROLL
    for (int v = 0; v < V; ++v) {
      acc vals[N];
      DENSE_EXT_UNROLL
      for (int u = 0; u < N; ++u) vals[u] = static_cast<acc>(xv[u].v[v]) - shift[v];
      welford_add_batch(s[v], vals);
    }
  });
}

}  // namespace dense_ext
