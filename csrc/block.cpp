// The block drivers: the whole layer loop (docs/design.md) in C++, one call per block
// forward and one per backward. GEMMs run on matrix views of the channels_last buffers (no
// copies; float32 on the CPU through oneDNN's matmul, else at::mm: cpu/gemm.h), 3x3 convolutions go
// through ATen (oneDNN on CPU, cuDNN on GPU), and the per-channel work calls the dense_ext ops
// through the dispatcher, so the same driver runs on CPU and CUDA (cuda/block.cpp registers it for
// CUDA behind a device guard).
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/gemm.h"
#include "ops.h"

namespace dense_ext {
namespace {

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

struct Ops {
  c10::TypedOperatorHandle<ChannelStatsFn> channel_stats =
      op<ChannelStatsFn>("dense_ext::channel_stats");
  c10::TypedOperatorHandle<BnReluFn> bn_relu = op<BnReluFn>("dense_ext::bn_relu");
  c10::TypedOperatorHandle<BnReluBackwardFn> bn_relu_backward =
      op<BnReluBackwardFn>("dense_ext::bn_relu_backward");
  c10::TypedOperatorHandle<BnReluBackwardReduceFn> bn_relu_backward_reduce =
      op<BnReluBackwardReduceFn>("dense_ext::bn_relu_backward_reduce");
  c10::TypedOperatorHandle<BnReluBackwardApplyFn> bn_relu_backward_apply =
      op<BnReluBackwardApplyFn>("dense_ext::bn_relu_backward_apply");
  c10::TypedOperatorHandle<BnGradFoldFn> bn_grad_fold = op<BnGradFoldFn>("dense_ext::bn_grad_fold");
  c10::TypedOperatorHandle<BnGradFoldApplyFn> bn_grad_fold_apply =
      op<BnGradFoldApplyFn>("dense_ext::bn_grad_fold_apply");
  c10::TypedOperatorHandle<DropoutStoreFn> dropout_store =
      op<DropoutStoreFn>("dense_ext::dropout_store");
  c10::TypedOperatorHandle<Conv3x3WeightGradFn> conv3x3_weight_grad =
      op<Conv3x3WeightGradFn>("dense_ext::conv3x3_weight_grad");
};

const Ops& ops() {
  static const Ops instance;
  return instance;
}

// Per-call decisions of every BN (in parameter order) and layer: whether the BN normalises with
// batch statistics or with its running (mean, var), its eps, and each layer's dropout rate.
struct Norms {
  at::TensorList running;  // (mean, var) per BN; empty placeholders for batch-statistics BNs
  at::ArrayRef<double> eps;
  const c10::List<bool>& batch_stats;
  at::ArrayRef<double> drop_rates;

  bool batch(int64_t bn) const { return batch_stats.get(bn); }
  // Whether some BN of the given kind (0: first BN of a layer, 1: bottleneck BN) uses batch
  // statistics, i.e. whether the statistics cache of that kind must be computed.
  bool any_batch(int64_t kind, int64_t bns) const {
    for (size_t i = kind; i < batch_stats.size(); i += bns) {
      if (batch_stats.get(i)) return true;
    }
    return false;
  }
  bool any_dropout() const {
    for (double p : drop_rates) {
      if (p > 0) return true;
    }
    return false;
  }

  void check(int64_t layers, int64_t bns) const {
    const int64_t count = layers * bns;
    TORCH_CHECK(static_cast<int64_t>(eps.size()) == count, "dense_ext: eps must hold ", count,
                " values (one per BN), got ", eps.size());
    TORCH_CHECK(static_cast<int64_t>(batch_stats.size()) == count,
                "dense_ext: batch_stats must hold ", count, " flags (one per BN), got ",
                batch_stats.size());
    TORCH_CHECK(static_cast<int64_t>(running.size()) == 2 * count,
                "dense_ext: running must hold (mean, var) for each of the ", count,
                " BNs (empty tensors for BNs with batch statistics), got ", running.size(),
                " tensors");
    TORCH_CHECK(static_cast<int64_t>(drop_rates.size()) == layers,
                "dense_ext: drop_rates must hold one value per layer (", layers, "), got ",
                drop_rates.size());
    for (double p : drop_rates) {
      TORCH_CHECK(p >= 0 && p <= 1, "dense_ext: drop rates must be in [0, 1], got ", p);
    }
    for (int64_t b = 0; b < count; ++b) {
      if (batch(b)) continue;
      for (int64_t j = 0; j < 2; ++j) {
        TORCH_CHECK(running[2 * b + j].dim() == 1, "dense_ext: running[", 2 * b + j,
                    "] must be a vector: BN ", b, " normalises with running statistics");
      }
    }
  }
};

// The dropout seed stays a tensor on the buffer's device: dropout_store's kernels read it
// themselves, so the drivers never synchronise with the device for it and a CUDA-graph replay
// that redraws it draws new masks.
void check_seed(const at::Tensor& seed, const at::Tensor& like, const Norms& norms) {
  if (!norms.any_dropout()) return;
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "dense_ext: seed must be a one-element int64 tensor, got ", seed.sizes(), " ",
              seed.scalar_type());
  TORCH_CHECK(seed.device() == like.device(), "dense_ext: seed is on ", seed.device(),
              " but the block is on ", like.device());
}

// The block's static shape, derived from the inputs and checked once.
struct Shape {
  int64_t n, h, w, m;  // m = n*h*w rows
  int64_t c0, k, layers, mid, total, per_layer, bns;
  bool bottleneck;

  int64_t c_in(int64_t layer) const { return c0 + layer * k; }
};

Shape check_block(const at::Tensor& x, at::TensorList params, const Norms& norms, int64_t k,
                  int64_t bn_size) {
  TORCH_CHECK(x.dim() == 4, "dense_ext: block input x must be [N, C, H, W], got ", x.sizes());
  check_floating(x, "x");
  TORCH_CHECK(k > 0 && bn_size >= 0, "dense_ext: growth_rate must be > 0 and bn_size >= 0");
  Shape s;
  s.n = x.size(0), s.h = x.size(2), s.w = x.size(3), s.m = s.n * s.h * s.w;
  s.c0 = x.size(1), s.k = k, s.mid = bn_size * k, s.bottleneck = bn_size > 0;
  s.per_layer = s.bottleneck ? 6 : 3;
  s.bns = s.bottleneck ? 2 : 1;
  TORCH_CHECK(!params.empty() && params.size() % s.per_layer == 0, "dense_ext: params must hold ",
              s.per_layer, " tensors per layer, got ", params.size());
  s.layers = params.size() / s.per_layer;
  s.total = s.c0 + s.layers * k;
  TORCH_CHECK(s.m > 0, "dense_ext: block input x is empty: ", x.sizes());
  norms.check(s.layers, s.bns);
  for (int64_t l = 0; l < s.layers; ++l) {
    const int64_t c_in = s.c_in(l);
    std::vector<std::vector<int64_t>> shapes;
    if (s.bottleneck) {
      shapes = {{c_in}, {c_in}, {s.mid, c_in, 1, 1}, {s.mid}, {s.mid}, {k, s.mid, 3, 3}};
    } else {
      shapes = {{c_in}, {c_in}, {k, c_in, 3, 3}};
    }
    for (int64_t i = 0; i < s.per_layer; ++i) {
      const at::Tensor& p = params[l * s.per_layer + i];
      TORCH_CHECK(p.sizes() == at::IntArrayRef(shapes[i]), "dense_ext: params[",
                  l * s.per_layer + i, "] (layer ", l, ") must have shape ",
                  at::IntArrayRef(shapes[i]), ", got ", p.sizes());
      TORCH_CHECK(p.device() == x.device(), "dense_ext: params[", l * s.per_layer + i, "] is on ",
                  p.device(), " but x is on ", x.device());
      const bool is_weight = p.dim() == 4;
      TORCH_CHECK(!is_weight || p.scalar_type() == x.scalar_type(),
                  "dense_ext: conv weight params[", l * s.per_layer + i, "] has dtype ",
                  p.scalar_type(), " but x has ", x.scalar_type());
    }
  }
  return s;
}

at::Tensor channels_last(const at::Tensor& like, int64_t c, const Shape& s) {
  return at::empty({s.n, c, s.h, s.w},
                   like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// A compact channels_last [n, c, H, W] tensor on the first n*h*w*c elements of a flat scratch
// buffer that is reused by every layer.
at::Tensor compact(const at::Tensor& flat, int64_t n, int64_t c, const Shape& s) {
  return flat.narrow(0, 0, n * s.h * s.w * c).view({n, s.h, s.w, c}).permute({0, 3, 1, 2});
}

// Images per chunk of the bottleneck layers' BN1-ReLU-Conv1x1 work. The BN1 output Z1 (and its
// gradient) are C_in channels wide, the widest tensors of a layer; they are only ever needed a
// chunk of rows at a time, so the scratch is a chunk, not the batch: on the CPU ~2048 rows (it
// stays in cache between the BN kernel and the GEMM), on GPUs 64Ki rows (GEMMs stay large).
int64_t chunk_images(const Shape& s, const at::Tensor& like) {
  const int64_t rows = like.is_cuda() ? (int64_t(1) << 16) : 2048;
  return std::min(s.n, std::max<int64_t>(1, rows / std::max<int64_t>(1, s.h * s.w)));
}

// The BN vectors in the accumulation dtype: gamma and beta of every BN, and the running mean and
// var of those that normalise with them. Vectors of another dtype (float16/bfloat16 parameters)
// are converted together, once per driver call (one cat, one cast), not per layer and pass; on a
// GPU each conversion is a kernel launch. Vectors already in the accumulation dtype are used as
// they are.
struct AccVectors {
  std::vector<at::Tensor> params;   // by parameter index; undefined for conv weights
  std::vector<at::Tensor> running;  // by running index; undefined where unused
};

AccVectors acc_vectors(at::TensorList params, const Norms& norms, int64_t bns, at::ScalarType acc) {
  AccVectors out{std::vector<at::Tensor>(params.size()),
                 std::vector<at::Tensor>(norms.running.size())};
  std::vector<at::Tensor*> slots;
  std::vector<at::Tensor> pending;
  auto take = [&](const at::Tensor& t, at::Tensor& slot) {
    if (t.scalar_type() == acc && t.is_contiguous()) {
      slot = t;
    } else {
      slots.push_back(&slot);
      pending.push_back(t.reshape({-1}));
    }
  };
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].dim() == 1) take(params[i], out.params[i]);
  }
  for (int64_t b = 0; b < bns; ++b) {
    if (norms.batch(b)) continue;
    take(norms.running[2 * b], out.running[2 * b]);
    take(norms.running[2 * b + 1], out.running[2 * b + 1]);
  }
  if (pending.empty()) return out;
  const at::Tensor flat = at::cat(pending).to(acc);
  int64_t offset = 0;
  for (size_t i = 0; i < slots.size(); ++i) {
    *slots[i] = flat.narrow(0, offset, pending[i].numel());
    offset += pending[i].numel();
  }
  return out;
}

// Per-layer parameters and normalisation constants (gamma/beta/mean/var in the accumulation
// dtype, from AccVectors).
struct Layer {
  int64_t index, c_in;
  at::Tensor gamma1, beta1, mean1, var1, w1;
  at::Tensor gamma2, beta2, mean2, var2, w2;
  double eps1 = 0, eps2 = 0;
  bool batch1 = true, batch2 = true;  // normalise with batch statistics
  double drop_rate = 0;
};

Layer layer_view(int64_t l, const Shape& s, at::TensorList params, const AccVectors& vectors,
                 const Norms& norms, const at::Tensor& stats1, const at::Tensor& stats2) {
  const std::vector<at::Tensor>& running = vectors.running;
  Layer layer;
  layer.index = l;
  layer.c_in = s.c_in(l);
  const int64_t p0 = l * s.per_layer, b0 = l * s.bns;
  layer.gamma1 = vectors.params[p0];
  layer.beta1 = vectors.params[p0 + 1];
  layer.w1 = params[p0 + 2];
  layer.eps1 = norms.eps[b0];
  layer.batch1 = norms.batch(b0);
  layer.drop_rate = norms.drop_rates[l];
  if (layer.batch1) {
    layer.mean1 = stats1[0].narrow(0, 0, layer.c_in);
    layer.var1 = stats1[1].narrow(0, 0, layer.c_in);
  } else {
    layer.mean1 = running[2 * b0];
    layer.var1 = running[2 * b0 + 1];
  }
  if (s.bottleneck) {
    layer.gamma2 = vectors.params[p0 + 3];
    layer.beta2 = vectors.params[p0 + 4];
    layer.w2 = params[p0 + 5];
    layer.eps2 = norms.eps[b0 + 1];
    layer.batch2 = norms.batch(b0 + 1);
    if (layer.batch2) {
      layer.mean2 = stats2[l][0];
      layer.var2 = stats2[l][1];
    } else {
      layer.mean2 = running[2 * b0 + 2];
      layer.var2 = running[2 * b0 + 3];
    }
  }
  return layer;
}

at::Tensor conv3x3(const at::Tensor& input, const at::Tensor& weight) {
  return at::convolution(input, weight, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1);
}

// The 3x3 convolution's backward: returns the input gradient and writes the weight gradient
// into grad_weight. On the CPU the weight gradient comes from dense_ext's own loops
// (conv3x3_weight_grad: oneDNN's backward-weights primitive took 1.1-2.2x the time of its
// forward convolution, docs/decisions.md) and ATen computes only the input gradient; on CUDA cuDNN
// computes both.
at::Tensor conv3x3_backward(const Ops& o, const at::Tensor& grad_out, const at::Tensor& input,
                            const at::Tensor& weight, const at::Tensor& grad_weight) {
  const bool own_weight_grad = input.is_cpu();
  auto r = at::convolution_backward(grad_out, input, weight, std::nullopt, {1, 1}, {1, 1}, {1, 1},
                                    false, {0, 0}, 1, {true, !own_weight_grad, false});
  if (own_weight_grad) {
    o.conv3x3_weight_grad.call(grad_out, input, grad_weight);
  } else {
    grad_weight.copy_(std::get<1>(r));
  }
  return std::get<0>(r);
}

at::Tensor as_cl(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// y1 = Conv1x1(relu(bn1(prefix))) chunk by chunk, with z1_flat as the chunk's Z1 scratch.
void conv1_forward(const Ops& o, const at::Tensor& feat, const Layer& layer, const Shape& s,
                   int64_t chunk, const at::Tensor& z1_flat, const at::Tensor& y1) {
  const at::Tensor w1t = layer.w1.reshape({s.mid, layer.c_in}).t();
  for (int64_t n0 = 0; n0 < s.n; n0 += chunk) {
    const int64_t nc = std::min(chunk, s.n - n0);
    at::Tensor z1 = compact(z1_flat, nc, layer.c_in, s);
    o.bn_relu.call(feat.narrow(0, n0, nc).narrow(1, 0, layer.c_in), layer.mean1, layer.var1,
                   layer.gamma1, layer.beta1, layer.eps1, z1);
    at::Tensor y1_rows = as_matrix(y1.narrow(0, n0, nc), "y1");
    cpu::matmul(as_matrix(z1, "z1"), w1t, y1_rows, /*accumulate=*/false);
  }
}

// dW1 (+)= dY1_c^T Z1_c for one chunk (= for the first). With `transposed`, `acc` is dW1^T
// ([c_in, mid]) and receives Z1_c^T dY1_c instead.
void accumulate_grad_w1(at::Tensor acc, bool transposed, bool first, const at::Tensor& dy1_rows,
                        const at::Tensor& z1_mat) {
  const at::Tensor a = transposed ? z1_mat.t() : dy1_rows.t();
  const at::Tensor b = transposed ? dy1_rows : z1_mat;
  cpu::matmul(a, b, acc, /*accumulate=*/!first);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> block_forward(
    const at::Tensor& x, at::TensorList params, at::TensorList running, at::ArrayRef<double> eps,
    const c10::List<bool>& batch_stats, at::ArrayRef<double> drop_rates, const at::Tensor& seed,
    int64_t growth_rate, int64_t bn_size, bool keep_bottleneck, bool save) {
  const Norms norms{running, eps, batch_stats, drop_rates};
  const Shape s = check_block(x, params, norms, growth_rate, bn_size);
  check_seed(seed, x, norms);
  const Ops& o = ops();
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const AccVectors vectors =
      acc_vectors(params, norms, s.layers * s.bns, acc_dtype(x.scalar_type()));
  at::Tensor feat = channels_last(x, s.total, s);
  feat.narrow(1, 0, s.c0).copy_(x);
  // Statistics caches only where some BN normalises with batch statistics (ForwardState).
  const bool stats1_needed = norms.any_batch(0, s.bns);
  const bool stats2_needed = s.bottleneck && norms.any_batch(1, s.bns);
  at::Tensor stats1 = stats1_needed ? at::empty({2, s.total}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor stats2 =
      stats2_needed ? at::empty({s.layers, 2, s.mid}, acc_opts) : at::empty({0}, acc_opts);
  if (stats1_needed) o.channel_stats.call(feat.narrow(1, 0, s.c0), stats1, 0);

  const bool keep = keep_bottleneck && save && s.bottleneck;
  std::vector<at::Tensor> bottlenecks;
  // Scratch, allocated once per call and reused by every layer: the BN1 output (up to C_in
  // channels; a chunk of images for bottleneck layers), and for bottleneck layers the conv1
  // output (unless kept) and the BN2 output.
  const int64_t chunk = s.bottleneck ? chunk_images(s, x) : s.n;
  at::Tensor z1_flat = at::empty({chunk * s.h * s.w * s.c_in(s.layers - 1)}, x.options());
  at::Tensor y1_scratch, z2;
  if (s.bottleneck) {
    z2 = channels_last(x, s.mid, s);
    if (!keep) y1_scratch = channels_last(x, s.mid, s);
  }
  for (int64_t l = 0; l < s.layers; ++l) {
    const Layer layer = layer_view(l, s, params, vectors, norms, stats1, stats2);
    at::Tensor out;
    if (s.bottleneck) {
      at::Tensor y1 = keep ? channels_last(x, s.mid, s) : y1_scratch;
      conv1_forward(o, feat, layer, s, chunk, z1_flat, y1);
      if (layer.batch2) o.channel_stats.call(y1, stats2[l], 0);
      if (keep) bottlenecks.push_back(y1);
      o.bn_relu.call(y1, layer.mean2, layer.var2, layer.gamma2, layer.beta2, layer.eps2, z2);
      out = conv3x3(z2, layer.w2);
    } else {
      at::Tensor z1 = compact(z1_flat, s.n, layer.c_in, s);
      o.bn_relu.call(feat.narrow(1, 0, layer.c_in), layer.mean1, layer.var1, layer.gamma1,
                     layer.beta1, layer.eps1, z1);
      out = conv3x3(z1, layer.w1);
    }
    at::Tensor fresh = feat.narrow(1, layer.c_in, s.k);
    if (layer.drop_rate >= 1) {
      fresh.zero_();  // F.dropout with p = 1: zeros, no mask drawn
    } else {
      o.dropout_store.call(as_cl(out), layer.drop_rate, seed, l, fresh);
    }
    if (stats1_needed) o.channel_stats.call(fresh, stats1, layer.c_in);
  }
  return {feat, stats1, stats2, bottlenecks};
}

std::tuple<at::Tensor, at::Tensor> block_backward(
    const at::Tensor& grad_feat, const at::Tensor& feat, const at::Tensor& stats1,
    const at::Tensor& stats2, at::TensorList bottlenecks, at::TensorList params,
    at::TensorList running, at::ArrayRef<double> eps, const c10::List<bool>& batch_stats,
    at::ArrayRef<double> drop_rates, const at::Tensor& seed, int64_t growth_rate, int64_t bn_size) {
  const Norms norms{running, eps, batch_stats, drop_rates};
  TORCH_CHECK(feat.dim() == 4, "dense_ext: feat must be [N, C, H, W], got ", feat.sizes());
  const int64_t per_layer = bn_size > 0 ? 6 : 3;
  const int64_t c0 = feat.size(1) - static_cast<int64_t>(params.size()) / per_layer * growth_rate;
  TORCH_CHECK(growth_rate > 0 && c0 > 0 && params.size() % per_layer == 0, "dense_ext: feat has ",
              feat.size(1), " channels, which does not fit ", params.size(),
              " params with growth_rate ", growth_rate, " and bn_size ", bn_size);
  // The block input's shape, for the checks shared with forward.
  at::Tensor x_like = feat.narrow(1, 0, c0);
  const Shape s = check_block(x_like, params, norms, growth_rate, bn_size);
  check_seed(seed, feat, norms);
  rows_view(feat, "feat");
  rows_view(grad_feat, "grad_feat");
  check_same(grad_feat, "grad_feat", feat, "feat");
  const auto acc = acc_dtype(feat.scalar_type());
  const bool stats1_needed = norms.any_batch(0, s.bns);
  const bool stats2_needed = s.bottleneck && norms.any_batch(1, s.bns);
  TORCH_CHECK(
      !stats1_needed || (stats1.dim() == 2 && stats1.size(0) == 2 && stats1.size(1) == s.total),
      "dense_ext: stats1 must be [2, ", s.total, "], got ", stats1.sizes());
  TORCH_CHECK(stats1.scalar_type() == acc, "dense_ext: stats1 must be ", acc, ", got ",
              stats1.scalar_type());
  TORCH_CHECK(!stats2_needed ||
                  (stats2.dim() == 3 && stats2.size(0) == s.layers && stats2.size(2) == s.mid),
              "dense_ext: stats2 must be [", s.layers, ", 2, ", s.mid, "], got ", stats2.sizes());
  const bool keep = s.bottleneck && !bottlenecks.empty();
  TORCH_CHECK(!keep || static_cast<int64_t>(bottlenecks.size()) == s.layers,
              "dense_ext: bottlenecks must be empty or hold one tensor per layer (", s.layers,
              "), got ", bottlenecks.size());
  const Ops& o = ops();
  const auto acc_opts = feat.options().dtype(acc);
  const AccVectors vectors = acc_vectors(params, norms, s.layers * s.bns, acc);

  // Parameter gradients are written straight into two flat buffers, in parameter order: BN
  // gamma/beta gradients (accumulation dtype) and conv weight gradients (buffer dtype).
  std::vector<at::Tensor> grads(params.size());
  int64_t bn_numel = 0, w_numel = 0;
  for (const auto& p : params) (p.dim() == 1 ? bn_numel : w_numel) += p.numel();
  at::Tensor bn_grads = at::empty({bn_numel}, acc_opts);
  at::Tensor w_grads = at::empty({w_numel}, feat.options());
  {
    int64_t bn_off = 0, w_off = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& p = params[i];
      int64_t& off = p.dim() == 1 ? bn_off : w_off;
      grads[i] = (p.dim() == 1 ? bn_grads : w_grads).narrow(0, off, p.numel()).view(p.sizes());
      off += p.numel();
    }
  }
  const int64_t chunk = s.bottleneck ? chunk_images(s, feat) : s.n;
  at::Tensor z1_flat = at::empty({chunk * s.h * s.w * s.c_in(s.layers - 1)}, feat.options());
  at::Tensor y1_scratch, z2;
  if (s.bottleneck) {
    z2 = channels_last(feat, s.mid, s);
    if (!keep) y1_scratch = channels_last(feat, s.mid, s);
  }
  at::Tensor grad_new_scratch;
  if (norms.any_dropout()) grad_new_scratch = channels_last(feat, s.k, s);
  // Where MKL's sgemm computes them on the CPU, dW1 is summed over the chunks transposed,
  // [c_in, mid], then transposed into place once per layer: MKL ran these products 10-25 %
  // faster with that output (the narrow mid dimension as the rows of its column-major result;
  // docs/decisions.md). oneDNN's matmul (float32) writes [mid, c_in] as fast or faster
  // (bench.cpu_gemm_layout --onednn); CUDA keeps cuBLAS's direct call (not measured on a GPU).
  const bool grad_w1_transposed = s.bottleneck && feat.is_cpu() && !cpu::gemm_uses_onednn(feat);
  at::Tensor grad_w1t_flat;
  if (grad_w1_transposed) grad_w1t_flat = at::empty({s.c_in(s.layers - 1) * s.mid}, feat.options());
  // The batch-mean terms of the first BNs' backward, folded per channel (bn_grad_fold): every
  // layer with batch statistics adds its terms for its prefix here, and they reach grad_feat
  // in one pass per channel, when the channel's gradient is complete, instead of a pass over
  // the prefix per layer. All these BNs normalise a channel with the same batch mean (stats1).
  // Until some layer has folded its terms the coefficients are zero and nothing is added: 0 *
  // (x - mean) would still turn a non-finite feature into NaN where the naive block adds nothing.
  at::Tensor coef;
  if (stats1_needed) coef = at::zeros({2, s.total}, acc_opts);
  bool folded = false;
  auto add_folded_terms = [&](int64_t lo, int64_t count) {
    if (!folded) return;
    o.bn_grad_fold_apply.call(feat.narrow(1, lo, count), stats1[0].narrow(0, lo, count),
                              coef.narrow(1, lo, count), grad_feat.narrow(1, lo, count));
  };

  for (int64_t l = s.layers - 1; l >= 0; --l) {
    const Layer layer = layer_view(l, s, params, vectors, norms, stats1, stats2);
    const int64_t p0 = l * s.per_layer;
    // Gradient of this layer's new features; complete now that all later layers have added
    // their input gradients (and their folded batch-mean terms). The dropout mask is replayed
    // from (seed, layer).
    add_folded_terms(layer.c_in, s.k);
    at::Tensor grad_new = grad_feat.narrow(1, layer.c_in, s.k);
    if (layer.drop_rate >= 1) {
      grad_new = grad_new_scratch.zero_();
    } else if (layer.drop_rate > 0) {
      o.dropout_store.call(grad_new, layer.drop_rate, seed, l, grad_new_scratch);
      grad_new = grad_new_scratch;
    } else {
      grad_new = as_cl(grad_new);
    }
    at::Tensor prefix = feat.narrow(1, 0, layer.c_in);
    at::Tensor grad_prefix = grad_feat.narrow(1, 0, layer.c_in);
    at::Tensor sums = at::zeros({2, layer.c_in}, acc_opts);  // of g and g*xhat over the batch
    // BN1's backward once its sums are in: fold its batch-mean terms, and its parameter grads.
    auto finish_bn1 = [&] {
      if (layer.batch1) {
        o.bn_grad_fold.call(layer.var1, layer.gamma1, layer.eps1, sums, s.m,
                            coef.narrow(1, 0, layer.c_in));
        folded = true;
      }
      grads[p0].copy_(sums[1]);
      grads[p0 + 1].copy_(sums[0]);
    };
    if (!s.bottleneck) {
      at::Tensor z1 = compact(z1_flat, s.n, layer.c_in, s);
      o.bn_relu.call(prefix, layer.mean1, layer.var1, layer.gamma1, layer.beta1, layer.eps1, z1);
      at::Tensor gz1 = conv3x3_backward(o, grad_new, z1, layer.w1, grads[p0 + 2]);
      o.bn_relu_backward_reduce.call(as_cl(gz1), prefix, layer.mean1, layer.var1, layer.gamma1,
                                     layer.beta1, layer.eps1, grad_prefix, sums);
      finish_bn1();
      continue;
    }
    // Bottleneck layer: conv2 and BN2 over the whole batch (bn_size*k channels) ...
    at::Tensor y1 = keep ? bottlenecks[l] : y1_scratch;
    if (!keep) conv1_forward(o, feat, layer, s, chunk, z1_flat, y1);
    o.bn_relu.call(y1, layer.mean2, layer.var2, layer.gamma2, layer.beta2, layer.eps2, z2);
    at::Tensor grad_z2 = conv3x3_backward(o, grad_new, z2, layer.w2, grads[p0 + 5]);
    at::Tensor dy1 = z2;  // dY1 over Z2: the conv2 backward was Z2's last use
    o.bn_relu_backward.call(as_cl(grad_z2), y1, layer.mean2, layer.var2, layer.gamma2, layer.beta2,
                            layer.eps2, layer.batch2, false, dy1, grads[p0 + 3], grads[p0 + 4]);
    // ... then conv1 and BN1 (C_in channels) chunk by chunk: Z1 recomputed, dW1 += dY1^T Z1,
    // dZ1 = dY1 W1 over Z1's scratch, grad_feat += gamma*invstd*g with the sums of g and g*xhat
    // collected; the batch-mean terms of the BN backward are folded once all sums are in.
    // The chunks run last to first: without kept bottlenecks, conv1_forward above has just
    // left the last chunk's Z1 in the scratch (nothing since wrote there), so that chunk's
    // BN1-ReLU is not computed again (for a block whose batch is one chunk, none is).
    const at::Tensor w1 = layer.w1.reshape({s.mid, layer.c_in});
    at::Tensor grad_w1 = grads[p0 + 2].view({s.mid, layer.c_in});
    at::Tensor grad_w1_acc =
        grad_w1_transposed
            ? grad_w1t_flat.narrow(0, 0, layer.c_in * s.mid).view({layer.c_in, s.mid})
            : grad_w1;
    const int64_t last = (s.n - 1) / chunk * chunk;  // the first image of the last chunk
    for (int64_t n0 = last; n0 >= 0; n0 -= chunk) {
      const int64_t nc = std::min(chunk, s.n - n0);
      at::Tensor prefix_c = prefix.narrow(0, n0, nc);
      at::Tensor z1 = compact(z1_flat, nc, layer.c_in, s);
      if (keep || n0 != last) {
        o.bn_relu.call(prefix_c, layer.mean1, layer.var1, layer.gamma1, layer.beta1, layer.eps1,
                       z1);
      }
      at::Tensor z1_mat = as_matrix(z1, "z1");
      at::Tensor dy1_rows = as_matrix(dy1.narrow(0, n0, nc), "dy1");
      accumulate_grad_w1(grad_w1_acc, grad_w1_transposed, n0 == last, dy1_rows, z1_mat);
      cpu::matmul(dy1_rows, w1, z1_mat, false);  // dZ1 over Z1: dW1 was Z1's last use
      o.bn_relu_backward_reduce.call(z1, prefix_c, layer.mean1, layer.var1, layer.gamma1,
                                     layer.beta1, layer.eps1, grad_prefix.narrow(0, n0, nc), sums);
    }
    if (grad_w1_transposed) grad_w1.copy_(grad_w1_acc.t());
    finish_bn1();
  }
  add_folded_terms(0, s.c0);  // the block input's channels
  return {bn_grads, w_grads};
}

#ifdef DENSE_EXT_WITH_CUDA
namespace {

// The fold ops written with ATen ops, for devices without their own kernels (CUDA, until
// cuda/kernels.cu has them): the same formulas as common/math.cuh's bn_grad_fold_add and
// bn_grad_fold_terms, a few elementwise launches each.
void bn_grad_fold_aten(const at::Tensor& var, const at::Tensor& gamma, double eps,
                       const at::Tensor& sums, int64_t count, const at::Tensor& coef) {
  check_bn_grad_fold(var, gamma, sums, count, coef);
  const at::Tensor invstd = (var + eps).rsqrt();
  const at::Tensor scale = gamma * invstd;
  coef[0].sub_(scale * (sums[0] / static_cast<double>(count)));
  coef[1].sub_(scale * invstd * (sums[1] / static_cast<double>(count)));
}

void bn_grad_fold_apply_aten(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& coef,
                             const at::Tensor& grad_x) {
  const BnBackwardViews v = check_bn_grad_fold_apply(x, mean, coef, grad_x);
  if (v.empty()) return;
  auto channel = [](const at::Tensor& t) { return t.view({1, -1, 1, 1}); };
  grad_x.add_(channel(coef[0]) + channel(coef[1]) * (x.to(mean.scalar_type()) - channel(mean)));
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CUDA, m) {
  m.impl("bn_grad_fold", TORCH_FN(bn_grad_fold_aten));
  m.impl("bn_grad_fold_apply", TORCH_FN(bn_grad_fold_apply_aten));
}
#endif

TORCH_LIBRARY_IMPL(dense_ext, CPU, m) {
  m.impl("block_forward", TORCH_FN(block_forward));
  m.impl("block_backward", TORCH_FN(block_backward));
}

}  // namespace dense_ext
