// The DelugeNet stage drivers (deluge.cpp) registered for CUDA tensors: the driver is
// device-generic (ATen GEMMs/convolutions and dense_ext ops through the dispatcher); here it
// runs under a guard for the tensors' device, so every allocation and launch goes to that device.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../deluge_ops.h"

namespace dense_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> deluge_stage_forward_cuda(
    const at::Tensor& x0, at::TensorList params, at::TensorList running, at::ArrayRef<double> eps,
    c10::List<bool> batch_stats, int64_t num_slots, bool keep_bottleneck, bool save) {
  c10::cuda::CUDAGuard guard(x0.device());
  return deluge_stage_forward(x0, params, running, eps, std::move(batch_stats), num_slots,
                              keep_bottleneck, save);
}

std::tuple<at::Tensor, at::Tensor> deluge_stage_backward_cuda(
    const at::Tensor& grad_buf, const at::Tensor& buf, const at::Tensor& slot_stats,
    const at::Tensor& layer_stats, at::TensorList kept, at::TensorList params,
    at::TensorList running, at::ArrayRef<double> eps, c10::List<bool> batch_stats) {
  c10::cuda::CUDAGuard guard(buf.device());
  return deluge_stage_backward(grad_buf, buf, slot_stats, layer_stats, kept, params, running, eps,
                               std::move(batch_stats));
}

}  // namespace

TORCH_LIBRARY_IMPL(dense_ext, CUDA, m) {
  m.impl("deluge_stage_forward", TORCH_FN(deluge_stage_forward_cuda));
  m.impl("deluge_stage_backward", TORCH_FN(deluge_stage_backward_cuda));
}

}  // namespace dense_ext
