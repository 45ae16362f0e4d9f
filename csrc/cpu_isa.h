// Which build of the CPU kernels runs: the baseline one, or the AVX2 one where the CPU has AVX2.
// Both compute the same bits; the choice is only about speed (and can be forced, for tests).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define DIFFRL_HAS_AVX2_BUILD 1
#else
#define DIFFRL_HAS_AVX2_BUILD 0
#endif

namespace diffrl {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1 };

// The instruction set the CPU kernels use now: the best this CPU supports unless overridden.
CpuIsa cpu_isa();
// Force an instruction set (one this CPU and build support); returns false if it can't.
bool set_cpu_isa(CpuIsa isa);
// The best instruction set available on this CPU in this build.
CpuIsa best_cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace diffrl
