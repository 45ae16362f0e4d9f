// sde_step on the CPU: the baseline kernels, and the dispatch to the AVX2 build of the same source.
#define DIFFRL_CPU_ENTRY(name) name##_baseline
#include "sde_step_cpu.h"

#include "cpu_isa.h"

namespace diffrl {
namespace sde {

#if DIFFRL_HAS_AVX2_BUILD
void forward_cpu_avx2(const ForwardArgs& p);
void backward_cpu_avx2(const BackwardArgs& p);
#endif

void forward_cpu(const ForwardArgs& p) {
#if DIFFRL_HAS_AVX2_BUILD
  if (cpu_isa() == CpuIsa::kAvx2) return forward_cpu_avx2(p);
#endif
  forward_cpu_baseline(p);
}

void backward_cpu(const BackwardArgs& p) {
#if DIFFRL_HAS_AVX2_BUILD
  if (cpu_isa() == CpuIsa::kAvx2) return backward_cpu_avx2(p);
#endif
  backward_cpu_baseline(p);
}

}  // namespace sde
}  // namespace diffrl
