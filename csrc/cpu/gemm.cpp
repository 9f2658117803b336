#include "gemm.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#ifndef _WIN32
#include <dlfcn.h>
#endif

#include <atomic>
#include <cstring>

namespace dense_ext {
namespace cpu {
namespace {

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha): result = beta * result + alpha *
// mat1 @ mat2 through oneDNN's matmul primitive. libtorch_cpu exports it but ships no header, so
// it is looked up by its mangled name at run time: a torch without it leaves the pointer null
// (MKL then) instead of failing to load this library. On x86 it takes float32 only on CPUs with
// AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT and raises otherwise, and it honours
// torch.backends.mkldnn's float32 precision setting as at::mm does.
using MkldnnMatmul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float,
                              float);
constexpr const char* kMkldnnMatmul = "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff";

MkldnnMatmul lookup() {
#ifdef _WIN32
  return nullptr;  // MSVC mangles differently; MKL there
#else
  void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
  void* sym = lib != nullptr ? dlsym(lib, kMkldnnMatmul) : nullptr;
  if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, kMkldnnMatmul);
  return reinterpret_cast<MkldnnMatmul>(sym);
#endif
}

// The function if it is there and, on a small product and an accumulation, agrees with at::mm
// (the CPU check above, or a changed signature, fails here once instead of in a block).
MkldnnMatmul working_onednn() {
  static const MkldnnMatmul fn = []() -> MkldnnMatmul {
    const MkldnnMatmul f = lookup();
    if (f == nullptr) return nullptr;
    try {
      const at::Tensor a = at::arange(12, at::kFloat).view({3, 4}) - 5;
      const at::Tensor b = at::arange(8, at::kFloat).view({4, 2}).div(4);
      at::Tensor out = at::full({3, 2}, 7.0f, at::kFloat);
      f(a, b, out, 0.0f, 1.0f);
      f(a, b, out, 1.0f, 1.0f);
      return at::equal(out, at::mm(a, b).mul(2)) ? f : nullptr;
    } catch (const std::exception&) {
      return nullptr;
    }
  }();
  return fn;
}

// Products smaller than this (multiply-adds) stay on MKL: oneDNN's matmul costs about 12 us a
// call beyond the arithmetic here (a primitive-cache lookup and tensor wrapping), so MKL was as
// fast or faster up to about 3M multiply-adds on this project's CPU and oneDNN 10-40 % faster
// beyond (a 1x1 product of a DenseNet-121 chunk is 30-90M, of DenseNet-BC-100 2-20M).
constexpr int64_t kOnednnMinWork = int64_t(1) << 22;

// 1: oneDNN, 0: MKL; -1 until first asked (oneDNN when it works).
std::atomic<int> choice{-1};

bool onednn_chosen() {
  int c = choice.load(std::memory_order_relaxed);
  if (c < 0) {
    c = working_onednn() != nullptr ? 1 : 0;
    choice.store(c, std::memory_order_relaxed);
  }
  return c == 1;
}

}  // namespace

const char* gemm_name() { return onednn_chosen() ? "onednn" : "mkl"; }

bool set_gemm(const char* name) {
  if (std::strcmp(name, "mkl") == 0) {
    choice.store(0, std::memory_order_relaxed);
    return true;
  }
  if (std::strcmp(name, "onednn") == 0 && working_onednn() != nullptr) {
    choice.store(1, std::memory_order_relaxed);
    return true;
  }
  return false;
}

bool gemm_uses_onednn(const at::Tensor& out) {
  return out.is_cpu() && out.scalar_type() == at::kFloat && onednn_chosen();
}

void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor out, bool accumulate) {
  const int64_t work = a.size(0) * a.size(1) * b.size(1);
  if (gemm_uses_onednn(out) && work >= kOnednnMinWork) {
    // No ATen op: named for torch.profiler (bench.gemm_share counts it as GEMM time).
    RECORD_FUNCTION("dense_ext::onednn_matmul", std::vector<c10::IValue>({a, b}));
    working_onednn()(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

}  // namespace cpu
}  // namespace dense_ext
