// Op schemas of dense_ext, declared once. CPU kernels register in cpu/*.cpp and block.cpp, CUDA
// kernels in cuda/*.cu; fake (meta) kernels for torch.compile in dense_ext/backends/cpp.py.
//
// Layout convention: every [N, C, H, W] tensor argument is channels_last, or a channel slice of a
// channels_last buffer (rows of a [N*H*W, C_total] matrix). Statistics, gamma and beta are in the
// accumulation dtype (float64 for float64 buffers, else float32).
#include <Python.h>
#include <torch/library.h>

#include "cpu/gemm.h"
#include "cpu/isa.h"

// The CUDA architectures the build embedded (setup.py passes them from TORCH_CUDA_ARCH_LIST):
// SASS for each of DENSE_EXT_CUDA_SASS, PTX for each of DENSE_EXT_CUDA_PTX, as "_"-separated
// compute capabilities times ten (80_90, one preprocessing number). Empty when unknown or built
// without CUDA.
#define DENSE_EXT_STRINGIFY(x) #x
#define DENSE_EXT_STRING(x) DENSE_EXT_STRINGIFY(x)
#ifndef DENSE_EXT_CUDA_SASS
#define DENSE_EXT_CUDA_SASS
#endif
#ifndef DENSE_EXT_CUDA_PTX
#define DENSE_EXT_CUDA_PTX
#endif

namespace {

// dense_ext._C.cpu_isa() -> str: the instruction set of the CPU kernels now (cpu/isa.h).
PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(dense_ext::cpu::isa_name(dense_ext::cpu::active_isa()));
}

// dense_ext._C.supported_cpu_isa() -> str: the widest one this CPU and torch allow.
PyObject* supported_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(dense_ext::cpu::isa_name(dense_ext::cpu::supported_isa()));
}

// dense_ext._C.set_cpu_isa(name) -> bool: use "portable", "avx2" or "avx512" from now on (tests
// run every copy of the CPU loops this way); False if unknown or not supported here.
PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  return PyBool_FromLong(dense_ext::cpu::set_active_isa(name));
}

// dense_ext._C.cpu_gemm() -> str: "onednn" or "mkl", what the float32 CPU 1x1-convolution
// products of a block use now (cpu/gemm.h).
PyObject* cpu_gemm(PyObject*, PyObject*) {
  return PyUnicode_FromString(dense_ext::cpu::gemm_name());
}

// dense_ext._C.set_cpu_gemm(name) -> bool: use "onednn" or "mkl" from now on (tests run both);
// False if unknown, or "onednn" and libtorch has no working oneDNN matmul here.
PyObject* set_cpu_gemm(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  return PyBool_FromLong(dense_ext::cpu::set_gemm(name));
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use."},
    {"supported_cpu_isa", supported_cpu_isa, METH_NOARGS,
     "The widest instruction set the CPU kernels may use here."},
    {"set_cpu_isa", set_cpu_isa, METH_O,
     "Use 'portable', 'avx2' or 'avx512' CPU kernels; False if not supported here."},
    {"cpu_gemm", cpu_gemm, METH_NOARGS,
     "'onednn' or 'mkl': what the float32 CPU 1x1-convolution products use."},
    {"set_cpu_gemm", set_cpu_gemm, METH_O,
     "Use 'onednn' or 'mkl' for them; False if unknown or not available here."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// `import dense_ext._C` loads this library, which runs the registrations below. The ops are
// reached through torch.ops.dense_ext; the module itself holds only facts about the build:
// `with_cuda` says whether the CUDA kernels were compiled in, `cuda_sass` and `cuda_ptx` for
// which GPUs, and the cpu_isa functions above which CPU loops run.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
#ifdef DENSE_EXT_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr &&
      (PyModule_AddIntConstant(module, "with_cuda", with_cuda) != 0 ||
       PyModule_AddStringConstant(module, "cuda_sass", DENSE_EXT_STRING(DENSE_EXT_CUDA_SASS)) !=
           0 ||
       PyModule_AddStringConstant(module, "cuda_ptx", DENSE_EXT_STRING(DENSE_EXT_CUDA_PTX)) != 0)) {
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
  // bn_relu_backward in two phases, for a backward that visits the rows in chunks. Reduce (per
  // chunk): grad_x += gamma*invstd*g and sums ([2, C]) += the chunk's sums of g and g*xhat.
  // Apply (once every chunk is in): grad_x -= gamma*invstd*(mean(g) + xhat*mean(g*xhat)) on
  // every row, means = sums / count.
  m.def(
      "bn_relu_backward_reduce(Tensor grad_z, Tensor x, Tensor mean, Tensor var, Tensor gamma, "
      "Tensor beta, float eps, Tensor(a!) grad_x, Tensor(b!) sums) -> ()");
  m.def(
      "bn_relu_backward_apply(Tensor x, Tensor mean, Tensor var, Tensor gamma, Tensor beta, "
      "float eps, Tensor sums, int count, Tensor(a!) grad_x) -> ()");
  // The batch-mean terms of bn_relu_backward_apply folded per channel, for BNs that normalise
  // a channel with the same mean (the first BNs of a block's layers): bn_grad_fold adds one BN's
  // terms, -gamma*invstd*(mean(g) + xhat*mean(g*xhat)) = coef[0] + coef[1]*(x - mean), to the
  // coefficients (means = sums / count); bn_grad_fold_apply adds coef[0] + coef[1]*(x - mean)
  // to grad_x, once for all of them.
  m.def(
      "bn_grad_fold(Tensor var, Tensor gamma, float eps, Tensor sums, int count, "
      "Tensor(a!) coef) -> ()");
  m.def("bn_grad_fold_apply(Tensor x, Tensor mean, Tensor coef, Tensor(a!) grad_x) -> ()");
  // dst = src * mask / (1 - p), mask a pure function of (seed, key, element index): the same
  // call on the output gradient replays the forward mask. seed is a one-element int64 tensor on
  // src's device that the kernel reads itself (no host sync), so a CUDA graph that redraws it
  // (torch.randint inside the graph) draws a new mask on every replay. p = 0 copies.
  m.def("dropout_store(Tensor src, float p, Tensor seed, int key, Tensor(a!) dst) -> ()");
  // grad_weight = the weight gradient of a 3x3 convolution (stride 1, padding 1, no groups) with
  // input `input` and output gradient `grad_out`, both channels_last (channel slices of
  // channels_last buffers too). CPU only: the block drivers' CPU backward (its own loops for
  // float32/float64, ATen's for the 16-bit types); CUDA keeps cuDNN's backward.
  m.def("conv3x3_weight_grad(Tensor grad_out, Tensor input, Tensor(a!) grad_weight) -> ()");
  // The whole block forward: returns (feat, stats1, stats2, bottlenecks). Per BN (parameter
  // order): eps, batch_stats (normalise with batch statistics, else with running (mean, var),
  // which are empty placeholders for batch-statistics BNs); per layer: drop_rates. seed: a
  // one-element int64 tensor on x's device, drawn per forward, from which every dropout mask
  // derives (read by the dropout kernels, never by the host).
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
