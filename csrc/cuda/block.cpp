// The block drivers (block.cpp) registered for CUDA tensors. The driver itself is
// device-generic (ATen GEMMs/convolutions and dense_ext ops through the dispatcher); here it
// runs under a guard for the tensors' device, so every allocation and launch it makes goes to
// that device and its current stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"

namespace dense_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> block_forward_cuda(
    const at::Tensor& x, at::TensorList params, at::TensorList running, at::ArrayRef<double> eps,
    const c10::List<bool>& batch_stats, at::ArrayRef<double> drop_rates, const at::Tensor& seed,
    int64_t growth_rate, int64_t bn_size, bool keep_bottleneck, bool save) {
  c10::cuda::CUDAGuard guard(x.device());
  return block_forward(x, params, running, eps, batch_stats, drop_rates, seed, growth_rate, bn_size,
                       keep_bottleneck, save);
}

std::tuple<at::Tensor, at::Tensor> block_backward_cuda(
    const at::Tensor& grad_feat, const at::Tensor& feat, const at::Tensor& stats1,
    const at::Tensor& stats2, at::TensorList bottlenecks, at::TensorList params,
    at::TensorList running, at::ArrayRef<double> eps, const c10::List<bool>& batch_stats,
    at::ArrayRef<double> drop_rates, const at::Tensor& seed, int64_t growth_rate, int64_t bn_size) {
  c10::cuda::CUDAGuard guard(feat.device());
  return block_backward(grad_feat, feat, stats1, stats2, bottlenecks, params, running, eps,
                        batch_stats, drop_rates, seed, growth_rate, bn_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CUDA, m) {
  m.impl("block_forward", TORCH_FN(block_forward_cuda));
  m.impl("block_backward", TORCH_FN(block_backward_cuda));
}

}  // namespace dense_ext
