// The CPU sde_step kernels compiled for AVX2 (setup.py adds -mavx2 to *_avx2.cpp on x86-64).
#if defined(__x86_64__) || defined(_M_X64)
#define DIFFRL_CPU_ENTRY(name) name##_avx2
#include "sde_step_cpu.h"
#endif
