// Op schemas of the DelugeNet ops, a fragment of the dense_ext library (ops.cpp declares the
// dense block's). CPU kernels register in cpu/cldc.cpp and deluge.cpp, CUDA kernels in
// cuda/cldc.cu and cuda/deluge.cpp; fake kernels in dense_ext/deluge/backends/cpp.py.
//
// A CLDC reads k slots of C channels: x is [N, k*C, H, W] channels_last (a channel slice of a
// stage's slot buffer). Per-(slot, channel) tables are [k, C], in the accumulation dtype.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dense_ext, m) {
  // out[c] = shift[c] + sum_i scale[i, c] * (x_i[c] - mean[i, c]).
  m.def("cldc_forward(Tensor x, Tensor mean, Tensor scale, Tensor shift, Tensor(a!) out) -> ()");
  // sums[i, c] = sum over rows of grad_y[c] * (x_i[c] - mean[i, c]) for i < k; sums[k, c] = sum
  // of grad_y[c]. Overwrites sums ([k + 1, C]).
  m.def("cldc_grad_sums(Tensor grad_y, Tensor x, Tensor mean, Tensor(a!) sums) -> ()");
  // grad_x_i[c] += alpha[i, c] * grad_y[c] - beta[i, c] - gamma[i, c] * (x_i[c] - mean[i, c]).
  m.def(
      "cldc_grad_apply(Tensor grad_y, Tensor x, Tensor mean, Tensor alpha, Tensor beta, "
      "Tensor gamma, Tensor(a!) grad_x) -> ()");
  // One pass of the stage backward over the k slots a CLDC read: the sums of cldc_grad_sums
  // and grad_x_i += alpha[i, c] * grad_y (the batch-mean terms are left to cldc_grad_correct,
  // once per slot); with next_out, also the previous layer's CLDC forward over the first
  // next_mean.size(0) slots into next_out (its recomputation, sharing this pass's reads).
  m.def(
      "cldc_grad_step(Tensor grad_y, Tensor x, Tensor mean, Tensor alpha, Tensor(a!) grad_x, "
      "Tensor(b!) sums, Tensor? next_mean, Tensor? next_scale, Tensor? next_shift, "
      "Tensor(c!)? next_out) -> ()");
  // grad_x_i[c] -= beta[i, c] + gamma[i, c] * (x_i[c] - mean[i, c]).
  m.def(
      "cldc_grad_correct(Tensor x, Tensor mean, Tensor beta, Tensor gamma, Tensor(a!) grad_x) "
      "-> ()");
  // The whole stage forward: x0 is slot 0; returns (buf, slot_stats, layer_stats, kept). Per
  // normalisation (4 per layer: cldc, norm, norm1, norm2; the cldc entry of layer 1 unused):
  // eps and batch_stats; running holds (mean, var) of each normalisation without batch
  // statistics, in that order (a CLDC's as [C, k]).
  m.def(
      "deluge_stage_forward(Tensor x0, Tensor[] params, Tensor[] running, float[] eps, "
      "bool[] batch_stats, int num_slots, bool keep_bottleneck, bool save) "
      "-> (Tensor, Tensor, Tensor, Tensor[])");
  // The whole stage backward: accumulates into grad_buf (on return grad_buf[:, :C] is the input
  // gradient) and returns the parameter gradients as two flat tensors in parameter order: BN and
  // CLDC affine gradients (accumulation dtype), convolution weight gradients (buffer dtype).
  m.def(
      "deluge_stage_backward(Tensor(a!) grad_buf, Tensor buf, Tensor slot_stats, "
      "Tensor layer_stats, Tensor[] kept, Tensor[] params, Tensor[] running, float[] eps, "
      "bool[] batch_stats) -> (Tensor, Tensor)");
}
