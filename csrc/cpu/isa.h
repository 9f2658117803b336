// Which instruction set the CPU kernels use. The float32 loops are compiled three times
// (portable, AVX2, AVX-512; see cpu/rows.h). The CPU and torch bound the choice (torch's CPU
// capability: ATEN_CPU_CAPABILITY lowers it, as for torch's own kernels); by default the kernels
// use AVX2 when it is allowed (AVX-512 measured no faster on these memory-bound loops). Tests and
// benchmarks select each in turn through dense_ext._C.set_cpu_isa.
#pragma once

namespace dense_ext {
namespace cpu {

enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// "portable", "avx2", "avx512".
const char* isa_name(Isa isa);

// The widest instruction set compiled in that the CPU supports and torch's CPU capability allows.
Isa supported_isa();

// The instruction set the kernels use now: AVX2 if supported, else the portable loops, unless
// set_active_isa chose another.
Isa active_isa();

// Uses `name` from now on; false (and no change) if it is unknown or wider than supported_isa().
bool set_active_isa(const char* name);

}  // namespace cpu
}  // namespace dense_ext
