// Which library runs the CPU 1x1-convolution products of a bottleneck layer (csrc/block.cpp).
// float32: oneDNN's matmul where libtorch has it (the same library as the naive model's 1x1
// convolutions), else MKL's sgemm through at::mm; other dtypes always at::mm.
#pragma once

#include <ATen/core/Tensor.h>

namespace dense_ext {
namespace cpu {

// "onednn" or "mkl": what float32 products use now.
const char* gemm_name();

// Uses "onednn" (false if libtorch lacks it or refused a probe) or "mkl" from now on; false and
// no change for another name. Tests run both this way.
bool set_gemm(const char* name);

// Whether out's products may go through oneDNN now (float32 CPU, oneDNN chosen and working).
bool gemm_uses_onednn(const at::Tensor& out);

// out = a @ b, or out += a @ b with `accumulate`; a, b and out 2-D, out contiguous. On oneDNN
// where gemm_uses_onednn(out) and the product has at least 2^22 multiply-adds, else at::mm.
void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor out, bool accumulate);

}  // namespace cpu
}  // namespace dense_ext
