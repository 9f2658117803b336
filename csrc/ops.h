// C++ signatures of the dense_ext ops (schemas in ops.cpp). Every kernel registered for an op,
// CPU or CUDA, has exactly this signature, and the block drivers call the ops through the
// dispatcher with it, so one driver serves both devices.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>
#include <vector>

namespace dense_ext {

using ChannelStatsFn = void(const at::Tensor& x, const at::Tensor& stats, int64_t lo);
using BnReluFn = void(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                      const at::Tensor& gamma, const at::Tensor& beta, double eps,
                      const at::Tensor& out);
using BnReluBackwardFn = void(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& mean,
                              const at::Tensor& var, const at::Tensor& gamma,
                              const at::Tensor& beta, double eps, bool batch_stats, bool accumulate,
                              const at::Tensor& grad_x, const at::Tensor& grad_gamma,
                              const at::Tensor& grad_beta);
using BnReluBackwardReduceFn = void(const at::Tensor& grad_z, const at::Tensor& x,
                                    const at::Tensor& mean, const at::Tensor& var,
                                    const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                    const at::Tensor& grad_x, const at::Tensor& sums);
using BnReluBackwardApplyFn = void(const at::Tensor& x, const at::Tensor& mean,
                                   const at::Tensor& var, const at::Tensor& gamma,
                                   const at::Tensor& beta, double eps, const at::Tensor& sums,
                                   int64_t count, const at::Tensor& grad_x);
using BnGradFoldFn = void(const at::Tensor& var, const at::Tensor& gamma, double eps,
                          const at::Tensor& sums, int64_t count, const at::Tensor& coef);
using BnGradFoldApplyFn = void(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& coef,
                               const at::Tensor& grad_x);
using Conv3x3WeightGradFn = void(const at::Tensor& grad_out, const at::Tensor& input,
                                 const at::Tensor& grad_weight);
using DropoutStoreFn = void(const at::Tensor& src, double p, const at::Tensor& seed, int64_t key,
                            const at::Tensor& dst);

// Block drivers (block.cpp): device-generic, registered for CPU there and for CUDA in
// cuda/block.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> block_forward(
    const at::Tensor& x, at::TensorList params, at::TensorList running, at::ArrayRef<double> eps,
    const c10::List<bool>& batch_stats, at::ArrayRef<double> drop_rates, const at::Tensor& seed,
    int64_t growth_rate, int64_t bn_size, bool keep_bottleneck, bool save);

std::tuple<at::Tensor, at::Tensor> block_backward(
    const at::Tensor& grad_feat, const at::Tensor& feat, const at::Tensor& stats1,
    const at::Tensor& stats2, at::TensorList bottlenecks, at::TensorList params,
    at::TensorList running, at::ArrayRef<double> eps, const c10::List<bool>& batch_stats,
    at::ArrayRef<double> drop_rates, const at::Tensor& seed, int64_t growth_rate, int64_t bn_size);

}  // namespace dense_ext
