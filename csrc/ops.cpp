// Op schemas of dense_ext, declared once. CPU kernels register in cpu/*.cpp and block.cpp, CUDA
// kernels in cuda/*.cu; fake (meta) kernels for torch.compile in dense_ext/backends/cpp.py.
//
// Layout convention: every [N, C, H, W] tensor argument is channels_last, or a channel slice of a
// channels_last buffer (rows of a [N*H*W, C_total] matrix). Statistics, gamma and beta are in the
// accumulation dtype (float64 for float64 buffers, else float32).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import dense_ext._C` loads this library, which runs the registrations below. No Python
// functions are exported: the ops are reached through torch.ops.dense_ext. `with_cuda` says
// whether the CUDA kernels were compiled in.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
#ifdef DENSE_EXT_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(dense_ext, m) {
  // stats[0, lo:lo+C] = mean, stats[1, lo:lo+C] = biased variance of each channel of x.
  m.def("channel_stats(Tensor x, Tensor(a!) stats, int lo) -> ()");
  // out = relu((x - mean) / sqrt(var + eps) * gamma + beta), per channel.
  m.def(
      "bn_relu(Tensor x, Tensor mean, Tensor var, Tensor gamma, Tensor beta, float eps, "
      "Tensor(a!) out) -> ()");
  // Backward of bn_relu given its output gradient grad_z (the activation is recomputed from x):
  // grad_beta = sum g, grad_gamma = sum g*xhat (g = grad_z * (pre-activation > 0)), and
  // dx = gamma*invstd * (g - mean(g) - xhat*mean(g*xhat)) (batch_stats) or gamma*invstd*g;
  // grad_x += dx (accumulate) or grad_x = dx.
  m.def(
      "bn_relu_backward(Tensor grad_z, Tensor x, Tensor mean, Tensor var, Tensor gamma, "
      "Tensor beta, float eps, bool batch_stats, bool accumulate, Tensor(a!) grad_x, "
      "Tensor(b!) grad_gamma, Tensor(c!) grad_beta) -> ()");
  // The chunked form of bn_relu_backward, for a backward that visits the rows in chunks:
  // bn_relu_grad_acc adds gamma*invstd*g to grad_x and the chunk's sums of g and g*xhat to
  // sums ([2, C]); once every chunk is in, bn_grad_correct subtracts
  // gamma*invstd*(mean(g) + xhat*mean(g*xhat)) (means = sums / count) from every row.
  m.def(
      "bn_relu_grad_acc(Tensor grad_z, Tensor x, Tensor mean, Tensor var, Tensor gamma, "
      "Tensor beta, float eps, Tensor(a!) grad_x, Tensor(b!) sums) -> ()");
  m.def(
      "bn_grad_correct(Tensor x, Tensor mean, Tensor var, Tensor gamma, Tensor beta, "
      "float eps, Tensor sums, int count, Tensor(a!) grad_x) -> ()");
  // dst = src * mask / (1 - p), mask a pure function of (seed, key, element index): the same
  // call on the output gradient replays the forward mask. p = 0 copies.
  m.def("dropout_store(Tensor src, float p, int seed, int key, Tensor(a!) dst) -> ()");
  // The whole block forward: returns (feat, stats1, stats2, bottlenecks). Per BN (parameter
  // order): eps, batch_stats (normalise with batch statistics, else with running (mean, var),
  // which are empty placeholders for batch-statistics BNs); per layer: drop_rates. seed: a
  // one-element int64 tensor, drawn per forward, from which every dropout mask derives.
  m.def(
      "block_forward(Tensor x, Tensor[] params, Tensor[] running, float[] eps, "
      "bool[] batch_stats, float[] drop_rates, Tensor seed, int growth_rate, int bn_size, "
      "bool keep_bottleneck, bool save) -> (Tensor, Tensor, Tensor, Tensor[])");
  // The whole block backward: accumulates into grad_feat (on return grad_feat[:, :C0] is the
  // input gradient) and returns the parameter gradients as two flat tensors, in parameter
  // order: (gamma/beta gradients in the accumulation dtype, conv weight gradients in the buffer
  // dtype). Flat tensors rather than Tensor[]: functionalization (torch.compile) does not yet
  // support a Tensor[] return from an op that mutates an argument.
  m.def(
      "block_backward(Tensor(a!) grad_feat, Tensor feat, Tensor stats1, Tensor stats2, "
      "Tensor[] bottlenecks, Tensor[] params, Tensor[] running, float[] eps, bool[] batch_stats, "
      "float[] drop_rates, Tensor seed, int growth_rate, int bn_size) -> (Tensor, Tensor)");
}
