// The DelugeNet stage drivers: a whole stage's layer loop in C++, one call per forward and one
// per backward. 1x1 convolutions are at::mm on matrix views of the channels_last slot buffer
// (the last one writes its output straight into the new slot), 3x3 convolutions go through ATen
// (oneDNN on CPU, cuDNN on GPU), and the per-channel work calls the dense_ext ops through the
// dispatcher, so the same driver runs on CPU and CUDA (cuda/deluge.cpp registers it for CUDA).
//
// Layout and parameters as in dense_ext/deluge/spec.py: slot i is channels [i*C, (i+1)*C) of
// buf; composite layer k (1 <= k < S) reads slots 0..k-1 and writes slot k. Each layer has up to
// four normalisations (cldc, norm, norm1, norm2), each with its own batch_stats flag and eps.
#include <torch/library.h>

#include "deluge_ops.h"
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
  c10::TypedOperatorHandle<CldcForwardFn> cldc_forward =
      op<CldcForwardFn>("dense_ext::cldc_forward");
  c10::TypedOperatorHandle<CldcGradStepFn> cldc_grad_step =
      op<CldcGradStepFn>("dense_ext::cldc_grad_step");
  c10::TypedOperatorHandle<CldcGradCorrectFn> cldc_grad_correct =
      op<CldcGradCorrectFn>("dense_ext::cldc_grad_correct");
};

const Ops& ops() {
  static const Ops instance;
  return instance;
}

constexpr int kNorms = 4;  // per layer: cldc, norm, norm1, norm2
enum Norm { kCldc = 0, kNorm = 1, kNorm1 = 2, kNorm2 = 3 };

struct StageShape {
  int64_t n, h, w, m;  // m = n*h*w rows
  int64_t c, mid, slots;
  int64_t layers() const { return slots - 1; }
  int64_t total() const { return slots * c; }
};

int64_t params_per_layer(int64_t k) { return k >= 2 ? 11 : 9; }

// Per-layer parameters and the (mean, var) every normalisation uses, in the accumulation dtype.
struct Layer {
  int64_t k = 0;
  at::Tensor cldc_weight, cldc_bias;              // [C, k], undefined for k == 1
  at::Tensor gamma[3], beta[3], mean[3], var[3];  // norm, norm1, norm2
  at::Tensor w1, w2, w3;
  bool batch[kNorms] = {};
  double eps[kNorms] = {};
  int64_t first = 0;  // index of the layer's first parameter
  // The CLDC's [k, C] tables (k >= 2).
  at::Tensor cldc_mean, cldc_invstd, cldc_scale, cldc_shift;
};

// Checks the inputs of both drivers and returns the shape; `running_used` counts the running
// tensors the flags ask for.
StageShape check_stage(const at::Tensor& x0, at::TensorList params, at::TensorList running,
                       at::ArrayRef<double> eps, const c10::List<bool>& batch_stats,
                       int64_t num_slots) {
  TORCH_CHECK(x0.dim() == 4, "dense_ext: stage input must be [N, C, H, W], got ", x0.sizes());
  check_floating(x0, "x0");
  StageShape s{x0.size(0), x0.size(2),     x0.size(3), x0.size(0) * x0.size(2) * x0.size(3),
               x0.size(1), x0.size(1) / 2, num_slots};
  TORCH_CHECK(s.c >= 2 && s.c % 2 == 0, "dense_ext: stage channels must be even, got ", s.c);
  TORCH_CHECK(num_slots >= 2, "dense_ext: a stage driver needs at least 2 slots, got ", num_slots);
  int64_t expected = 0;
  for (int64_t k = 1; k < num_slots; ++k) expected += params_per_layer(k);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == expected, "dense_ext: params must hold ",
              expected, " tensors for ", num_slots, " slots, got ", params.size());
  const int64_t norms = kNorms * s.layers();
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == norms &&
                  static_cast<int64_t>(batch_stats.size()) == norms,
              "dense_ext: eps and batch_stats must hold ", norms, " values (4 per layer), got ",
              eps.size(), " and ", batch_stats.size());
  int64_t running_needed = 0;
  bool any_batch = false;
  for (int64_t k = 1; k < num_slots; ++k) {
    for (int j = k >= 2 ? 0 : 1; j < kNorms; ++j) {  // layer 1 has no CLDC (entry 0 unused)
      const bool batch = batch_stats.get(kNorms * (k - 1) + j);
      any_batch = any_batch || batch;
      if (!batch) running_needed += 2;
    }
  }
  TORCH_CHECK(s.m > 1 || !any_batch,
              "dense_ext: batch statistics need more than 1 value per channel, input ", x0.sizes());
  TORCH_CHECK(static_cast<int64_t>(running.size()) == running_needed, "dense_ext: running must ",
              "hold (mean, var) of each of the ", running_needed / 2,
              " normalisations without batch statistics, got ", running.size(), " tensors");
  int64_t p = 0;
  const int64_t c = s.c, mid = s.mid;
  for (int64_t k = 1; k < num_slots; ++k) {
    std::vector<std::vector<int64_t>> shapes;
    if (k >= 2) shapes = {{c, k}, {c, k}};
    const std::vector<std::vector<int64_t>> tail = {
        {c}, {c}, {mid, c, 1, 1}, {mid}, {mid}, {mid, mid, 3, 3}, {mid}, {mid}, {c, mid, 1, 1}};
    shapes.insert(shapes.end(), tail.begin(), tail.end());
    for (const auto& shape : shapes) {
      const at::Tensor& t = params[p];
      TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "dense_ext: params[", p, "] (layer ", k,
                  ") must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
      TORCH_CHECK(t.device() == x0.device(), "dense_ext: params[", p, "] is on ", t.device(),
                  " but the input is on ", x0.device());
      TORCH_CHECK(t.dim() != 4 || t.scalar_type() == x0.scalar_type(), "dense_ext: conv weight ",
                  "params[", p, "] has dtype ", t.scalar_type(), " but the input has ",
                  x0.scalar_type());
      ++p;
    }
  }
  return s;
}

bool slot_needs_stats(int64_t slot, const StageShape& s, const c10::List<bool>& batch_stats) {
  if (slot == 0 && batch_stats.get(kNorm)) return true;
  for (int64_t k = std::max<int64_t>(slot + 1, 2); k < s.slots; ++k) {
    if (batch_stats.get(kNorms * (k - 1) + kCldc)) return true;
  }
  return false;
}

// Layer k's view of parameters and statistics. `running_at` is the index in `running` of the
// layer's first running tensor; it is advanced past the layer's.
Layer layer_view(int64_t k, const StageShape& s, at::TensorList params, at::TensorList running,
                 int64_t& running_at, at::ArrayRef<double> eps, const c10::List<bool>& batch_stats,
                 const at::Tensor& slot_stats, const at::Tensor& layer_stats) {
  const auto acc = slot_stats.scalar_type();
  Layer L;
  L.k = k;
  for (int64_t j = 1; j < k; ++j) L.first += params_per_layer(j);
  int64_t p = L.first;
  for (int j = 0; j < kNorms; ++j) {
    L.batch[j] = batch_stats.get(kNorms * (k - 1) + j);
    L.eps[j] = eps[kNorms * (k - 1) + j];
  }
  auto running_pair = [&](at::Tensor& mean, at::Tensor& var) {
    mean = running[running_at].to(acc).contiguous();
    var = running[running_at + 1].to(acc).contiguous();
    running_at += 2;
  };
  if (k >= 2) {
    L.cldc_weight = params[p++].to(acc);
    L.cldc_bias = params[p++].to(acc);
    at::Tensor mean, var;
    if (L.batch[kCldc]) {
      at::Tensor st = slot_stats.narrow(1, 0, k * s.c).view({2, k, s.c});
      mean = st[0], var = st[1];
    } else {
      running_pair(mean, var);
      mean = mean.t(), var = var.t();
    }
    L.cldc_mean = mean.contiguous();
    L.cldc_invstd = (var + L.eps[kCldc]).rsqrt().contiguous();
    L.cldc_scale = (L.cldc_weight.t() * L.cldc_invstd).contiguous();
    L.cldc_shift = L.cldc_bias.sum(1).contiguous();
  }
  const int64_t lo[3] = {0, s.c, s.c + s.mid}, width[3] = {s.c, s.mid, s.mid};
  at::Tensor* weights[3] = {&L.w1, &L.w2, &L.w3};
  for (int j = 0; j < 3; ++j) {
    L.gamma[j] = params[p++].to(acc);
    L.beta[j] = params[p++].to(acc);
    *weights[j] = params[p++];
    if (L.batch[j + 1]) {
      L.mean[j] = layer_stats[k - 1][0].narrow(0, lo[j], width[j]);
      L.var[j] = layer_stats[k - 1][1].narrow(0, lo[j], width[j]);
    } else {
      running_pair(L.mean[j], L.var[j]);
    }
  }
  return L;
}

at::Tensor channels_last(const at::Tensor& like, int64_t c, const StageShape& s) {
  return at::empty({s.n, c, s.h, s.w},
                   like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor as_cl(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

at::Tensor conv3x3(const at::Tensor& input, const at::Tensor& weight) {
  return as_cl(
      at::convolution(input, weight, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1));
}

at::Tensor slot(const at::Tensor& buf, int64_t i, int64_t c) { return buf.narrow(1, i * c, c); }

// Scratch tensors of one stage call, allocated once and reused by every layer.
struct Scratch {
  at::Tensor y, z0, t1, z1, z2;
  Scratch(const at::Tensor& like, const StageShape& s) {
    y = channels_last(like, s.c, s);
    z0 = channels_last(like, s.c, s);
    t1 = channels_last(like, s.mid, s);
    z1 = channels_last(like, s.mid, s);
    z2 = channels_last(like, s.mid, s);
  }
};

// out = a @ b for matrix views (at::mm_out takes its output by reference).
void matmul(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// Layer k up to z2 = relu(bn2(t2)), in forward or recomputed in backward; returns (y, t2), y the
// input of `norm` (the CLDC output in scratch, or slot 0 for k = 1), t2 the 3x3 output (`kept`
// if defined, else computed). With `stats` defined (forward), the batch statistics of the
// layer's normalisations are written into it as they become available. `y_ready`: the CLDC
// output is already in the scratch y (computed by the later layer's backward pass).
std::pair<at::Tensor, at::Tensor> layer_up_to_z2(const Ops& o, const at::Tensor& buf,
                                                 const Layer& L, const StageShape& s,
                                                 const Scratch& sc, const at::Tensor& kept,
                                                 const at::Tensor& stats, bool y_ready = false) {
  const bool forward = stats.defined();
  at::Tensor y = sc.y;
  if (L.k >= 2) {
    if (!y_ready) {
      o.cldc_forward.call(buf.narrow(1, 0, L.k * s.c), L.cldc_mean, L.cldc_scale, L.cldc_shift, y);
    }
    if (forward && L.batch[kNorm]) o.channel_stats.call(y, stats, 0);
  } else {
    y = slot(buf, 0, s.c);
  }
  o.bn_relu.call(y, L.mean[0], L.var[0], L.gamma[0], L.beta[0], L.eps[kNorm], sc.z0);
  matmul(as_matrix(sc.t1, "t1"), as_matrix(sc.z0, "z0"), L.w1.view({s.mid, s.c}).t());
  if (forward && L.batch[kNorm1]) o.channel_stats.call(sc.t1, stats, s.c);
  o.bn_relu.call(sc.t1, L.mean[1], L.var[1], L.gamma[1], L.beta[1], L.eps[kNorm1], sc.z1);
  at::Tensor t2 = kept.defined() ? kept : conv3x3(sc.z1, L.w2);
  if (forward && L.batch[kNorm2]) o.channel_stats.call(t2, stats, s.c + s.mid);
  o.bn_relu.call(t2, L.mean[2], L.var[2], L.gamma[2], L.beta[2], L.eps[kNorm2], sc.z2);
  return {y, t2};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> deluge_stage_forward(
    const at::Tensor& x0, at::TensorList params, at::TensorList running, at::ArrayRef<double> eps,
    c10::List<bool> batch_stats, int64_t num_slots, bool keep_bottleneck, bool save) {
  const StageShape s = check_stage(x0, params, running, eps, batch_stats, num_slots);
  const Ops& o = ops();
  const auto acc_opts = x0.options().dtype(acc_dtype(x0.scalar_type()));
  at::Tensor buf = channels_last(x0, s.total(), s);
  slot(buf, 0, s.c).copy_(x0);
  // Statistics nobody reads stay zero (StageState in dense_ext/deluge/backends/base.py).
  at::Tensor slot_stats = at::zeros({2, s.total()}, acc_opts);
  at::Tensor layer_stats = at::zeros({s.layers(), 2, 2 * s.c}, acc_opts);
  if (slot_needs_stats(0, s, batch_stats)) o.channel_stats.call(slot(buf, 0, s.c), slot_stats, 0);
  const Scratch sc(x0, s);
  std::vector<at::Tensor> kept;
  int64_t running_at = 0;
  for (int64_t k = 1; k < s.slots; ++k) {
    const Layer L =
        layer_view(k, s, params, running, running_at, eps, batch_stats, slot_stats, layer_stats);
    at::Tensor stats = layer_stats[k - 1];
    if (k == 1 && L.batch[kNorm]) stats.narrow(1, 0, s.c).copy_(slot_stats.narrow(1, 0, s.c));
    auto [y, t2] = layer_up_to_z2(o, buf, L, s, sc, at::Tensor(), stats);
    if (keep_bottleneck && save) kept.push_back(t2);
    at::Tensor fresh = slot(buf, k, s.c);
    matmul(as_matrix(fresh, "slot"), as_matrix(sc.z2, "z2"), L.w3.view({s.c, s.mid}).t());
    if (slot_needs_stats(k, s, batch_stats)) o.channel_stats.call(fresh, slot_stats, k * s.c);
  }
  return {buf, slot_stats, layer_stats, kept};
}

std::tuple<at::Tensor, at::Tensor> deluge_stage_backward(
    const at::Tensor& grad_buf, const at::Tensor& buf, const at::Tensor& slot_stats,
    const at::Tensor& layer_stats, at::TensorList kept, at::TensorList params,
    at::TensorList running, at::ArrayRef<double> eps, c10::List<bool> batch_stats) {
  TORCH_CHECK(buf.dim() == 4, "dense_ext: buf must be [N, C, H, W], got ", buf.sizes());
  TORCH_CHECK(!params.empty() && params.size() >= 9 && params[0].dim() == 1,
              "dense_ext: params do not start with layer 1's norm.weight");
  const int64_t c = params[0].size(0);
  TORCH_CHECK(c > 0 && buf.size(1) % c == 0, "dense_ext: buf has ", buf.size(1),
              " channels, not a multiple of the slot channels ", c);
  const int64_t num_slots = buf.size(1) / c;
  const StageShape s = check_stage(slot(buf, 0, c), params, running, eps, batch_stats, num_slots);
  rows_view(buf, "buf");
  rows_view(grad_buf, "grad_buf");
  check_same(grad_buf, "grad_buf", buf, "buf");
  const auto acc = acc_dtype(buf.scalar_type());
  TORCH_CHECK(slot_stats.dim() == 2 && slot_stats.size(0) == 2 && slot_stats.size(1) == s.total() &&
                  slot_stats.scalar_type() == acc,
              "dense_ext: slot_stats must be ", acc, " [2, ", s.total(), "], got ",
              slot_stats.scalar_type(), " ", slot_stats.sizes());
  TORCH_CHECK(layer_stats.dim() == 3 && layer_stats.size(0) == s.layers() &&
                  layer_stats.size(2) == 2 * c && layer_stats.scalar_type() == acc,
              "dense_ext: layer_stats must be ", acc, " [", s.layers(), ", 2, ", 2 * c, "], got ",
              layer_stats.scalar_type(), " ", layer_stats.sizes());
  TORCH_CHECK(kept.empty() || static_cast<int64_t>(kept.size()) == s.layers(),
              "dense_ext: kept must be empty or hold one tensor per layer (", s.layers(), "), got ",
              kept.size());
  const Ops& o = ops();
  const auto acc_opts = buf.options().dtype(acc);

  // Parameter gradients go straight into two flat buffers, in parameter order: affine (BN and
  // CLDC; accumulation dtype) and convolution weights (buffer dtype).
  std::vector<at::Tensor> grads(params.size());
  int64_t affine_numel = 0, weight_numel = 0;
  for (const auto& p : params) (p.dim() == 4 ? weight_numel : affine_numel) += p.numel();
  at::Tensor affine_grads = at::empty({affine_numel}, acc_opts);
  at::Tensor weight_grads = at::empty({weight_numel}, buf.options());
  {
    int64_t a = 0, w = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& p = params[i];
      int64_t& off = p.dim() == 4 ? w : a;
      grads[i] = (p.dim() == 4 ? weight_grads : affine_grads).narrow(0, off, p.numel());
      grads[i] = grads[i].view(p.sizes());
      off += p.numel();
    }
  }
  const Scratch sc(buf, s);
  // Layer views are built first to last (running tensors are consumed in that order).
  std::vector<Layer> layers;
  int64_t running_at = 0;
  for (int64_t k = 1; k < s.slots; ++k) {
    layers.push_back(
        layer_view(k, s, params, running, running_at, eps, batch_stats, slot_stats, layer_stats));
  }
  // The batch-mean terms of the CLDC backwards, deferred: for each slot, the sum over its
  // batch-statistics readers of beta and gamma (common/cldc_math.cuh), subtracted once when
  // the slot's gradient is next needed. Each CLDC backward is then one pass over its slots,
  // which also recomputes the next layer's CLDC output (y_ready).
  at::Tensor corr_beta = at::zeros({s.slots, s.c}, acc_opts);
  at::Tensor corr_gamma = at::zeros({s.slots, s.c}, acc_opts);
  std::vector<bool> pending(s.slots, false);
  auto correct = [&](int64_t i) {
    if (!pending[i]) return;
    at::Tensor mean = slot_stats[0].narrow(0, i * s.c, s.c).view({1, s.c});
    o.cldc_grad_correct.call(slot(buf, i, s.c), mean, corr_beta[i].view({1, s.c}),
                             corr_gamma[i].view({1, s.c}), slot(grad_buf, i, s.c));
  };
  bool y_ready = false;
  for (int64_t k = s.slots - 1; k >= 1; --k) {
    const Layer& L = layers[k - 1];
    const int64_t p = L.first + (k >= 2 ? 2 : 0);  // the layer's norm.weight
    auto [y, t2] = layer_up_to_z2(o, buf, L, s, sc, kept.empty() ? at::Tensor() : kept[k - 1],
                                  at::Tensor(), y_ready);
    // The new slot's gradient is complete: every later reader has added to it.
    correct(k);
    const at::Tensor g = as_matrix(slot(grad_buf, k, s.c), "grad_slot");
    const at::Tensor z2 = as_matrix(sc.z2, "z2");
    matmul(grads[p + 8].view({s.c, s.mid}), g.t(), z2);
    // Each activation's gradient goes over the activation once its weight gradient has used it
    // (dZ2 over Z2, dZ0 over Z0), and BN-ReLU backwards write their input gradient over their
    // output gradient (elementwise): no gradient scratch of the layer's own.
    const at::Tensor dz2 = sc.z2;
    matmul(z2, g, L.w3.view({s.c, s.mid}));
    o.bn_relu_backward.call(dz2, t2, L.mean[2], L.var[2], L.gamma[2], L.beta[2], L.eps[kNorm2],
                            L.batch[kNorm2], false, dz2, grads[p + 6], grads[p + 7]);
    auto gz1 = at::convolution_backward(dz2, sc.z1, L.w2, std::nullopt, {1, 1}, {1, 1}, {1, 1},
                                        false, {0, 0}, 1, {true, true, false});
    grads[p + 5].copy_(std::get<1>(gz1));
    at::Tensor dz1 = as_cl(std::get<0>(gz1));
    o.bn_relu_backward.call(dz1, sc.t1, L.mean[1], L.var[1], L.gamma[1], L.beta[1], L.eps[kNorm1],
                            L.batch[kNorm1], false, dz1, grads[p + 3], grads[p + 4]);
    const at::Tensor dt1 = as_matrix(dz1, "dt1");
    const at::Tensor z0 = as_matrix(sc.z0, "z0");
    matmul(grads[p + 2].view({s.mid, s.c}), dt1.t(), z0);
    const at::Tensor dz0 = sc.z0;
    matmul(z0, dt1, L.w1.view({s.mid, s.c}));
    o.bn_relu_backward.call(dz0, y, L.mean[0], L.var[0], L.gamma[0], L.beta[0], L.eps[kNorm],
                            L.batch[kNorm], false, dz0, grads[p], grads[p + 1]);
    if (k == 1) {
      slot(grad_buf, 0, s.c).add_(dz0);
      continue;
    }
    // The CLDC backward in one pass: sums, alpha * g into every slot read, and the next layer's
    // CLDC output (the scratch y is free: this layer's BN backward was its last use).
    at::Tensor x = buf.narrow(1, 0, k * s.c);
    at::Tensor sums = at::empty({k + 1, s.c}, acc_opts);
    y_ready = k - 1 >= 2;
    std::optional<at::Tensor> next_mean, next_scale, next_shift, next_out;
    if (y_ready) {
      const Layer& N = layers[k - 2];
      next_mean = N.cldc_mean, next_scale = N.cldc_scale, next_shift = N.cldc_shift;
      next_out = sc.y;
    }
    o.cldc_grad_step.call(dz0, x, L.cldc_mean, L.cldc_scale, grad_buf.narrow(1, 0, k * s.c), sums,
                          next_mean, next_scale, next_shift, next_out);
    const at::Tensor sum_x = sums.narrow(0, 0, k), sum_g = sums[k];
    if (L.batch[kCldc]) {
      const double inv_m = 1.0 / static_cast<double>(s.m);
      corr_beta.narrow(0, 0, k).add_(L.cldc_scale * (sum_g * inv_m));
      corr_gamma.narrow(0, 0, k).add_(L.cldc_scale * L.cldc_invstd * L.cldc_invstd * sum_x * inv_m);
      std::fill(pending.begin(), pending.begin() + k, true);
    }
    grads[L.first].copy_((L.cldc_invstd * sum_x).t());
    grads[L.first + 1].copy_(sum_g.unsqueeze(1).expand({s.c, k}));
  }
  correct(0);
  return {affine_grads, weight_grads};
}

TORCH_LIBRARY_IMPL(dense_ext, CPU, m) {
  m.impl("deluge_stage_forward", TORCH_FN(deluge_stage_forward));
  m.impl("deluge_stage_backward", TORCH_FN(deluge_stage_backward));
}

}  // namespace dense_ext
