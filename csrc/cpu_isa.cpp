#include "cpu_isa.h"

#include <atomic>

namespace diffrl {
namespace {
std::atomic<int> g_isa{-1};  // -1: not chosen yet
}

CpuIsa best_cpu_isa() {
#if DIFFRL_HAS_AVX2_BUILD
  if (__builtin_cpu_supports("avx2")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

CpuIsa cpu_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = static_cast<int>(best_cpu_isa());
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return static_cast<CpuIsa>(isa);
}

bool set_cpu_isa(CpuIsa isa) {
  if (isa == CpuIsa::kAvx2 && best_cpu_isa() != CpuIsa::kAvx2) return false;
  g_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const char* cpu_isa_name(CpuIsa isa) { return isa == CpuIsa::kAvx2 ? "avx2" : "baseline"; }

}  // namespace diffrl
