// Element types shared by the C++ (CPU) and CUDA kernels.
//
// Storage is plain: float, or the 16 raw bits of a float16/bfloat16 value. Arithmetic is always
// float32. Conversions round to nearest even, like torch's. Under NVRTC the file includes no header
// at all (not even cuda_fp16.h), so that CUDA's runtime compiler (the cupy backend) reads it with no
// toolkit installed: libnvrtc alone is enough. The host-only part at the end (the dtype dispatch
// of the entry points) is left out there.
#pragma once

// Helpers have internal linkage (static): the CPU kernels are compiled once per instruction set
// (baseline and AVX2, see setup.py), and a shared inline copy chosen by the linker could otherwise
// put AVX2 code on the baseline path.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DIFFRL_HD static __host__ __device__ __forceinline__
#define DIFFRL_DEVICE_CODE 1
#else
#define DIFFRL_HD static inline
#endif
#if !defined(__CUDACC_RTC__)
#include <cstring>
#endif

namespace diffrl {

// dtype codes shared with Python (diffrl/ops/_native.py)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <int DT> struct Storage;
template <> struct Storage<kFloat32> { typedef float type; };
template <> struct Storage<kFloat16> { typedef unsigned short type; };
template <> struct Storage<kBFloat16> { typedef unsigned short type; };

DIFFRL_HD unsigned int float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

DIFFRL_HD float bits_float(unsigned int u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// ---- bfloat16: the top half of a float32 ----
DIFFRL_HD float bf16_to_float(unsigned short h) { return bits_float(static_cast<unsigned int>(h) << 16); }

DIFFRL_HD unsigned short float_to_bf16(float f) {
  const unsigned int u = float_bits(f);
  const unsigned int rounded = u + 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  const unsigned int nan = (u >> 16) | 0x0040u;                   // quiet NaN
  // a select rather than a branch, so that CPU loops over it vectorise
  return static_cast<unsigned short>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded >> 16);
}

// ---- float16 ----
// On the host both conversions compute every case and select with bit masks (no branches, which
// GCC would keep for a chain of ?:), so that CPU loops over them vectorise. Bits: IEEE
// round-to-nearest-even; float_to_half makes NaN canonical, half_to_float keeps its payload.
DIFFRL_HD unsigned int select_bits(bool take_a, unsigned int a, unsigned int b) {
  const unsigned int m = 0u - static_cast<unsigned int>(take_a);
  return (a & m) | (b & ~m);
}

DIFFRL_HD float half_to_float(unsigned short h) {
#if defined(__CUDA_ARCH__)
  // the instruction cuda_fp16.hpp's __half2float emits, without needing that header
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  const unsigned int sign = static_cast<unsigned int>(h & 0x8000u) << 16;
  const unsigned int exp = (h >> 10) & 0x1fu;
  const unsigned int mant = h & 0x3ffu;
  const unsigned int normal = sign | ((exp + 112u) << 23) | (mant << 13);
  // zero or subnormal: mant * 2^-24 is exact in float32
  const unsigned int subnormal = sign | float_bits(static_cast<float>(mant) * 5.9604644775390625e-8f);
  const unsigned int inf_nan = sign | 0x7f800000u | (mant << 13);
  return bits_float(select_bits(exp == 0, subnormal, select_bits(exp == 31, inf_nan, normal)));
#endif
}

DIFFRL_HD unsigned short float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  // cuda_fp16.hpp's __float2half_rn, likewise
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  const unsigned int u = float_bits(f);
  const unsigned int sign = (u >> 16) & 0x8000u;
  const unsigned int a = u & 0x7fffffffu;
  // subnormal half (or zero): adding 0.5f puts the float ulp at 2^-24, so the hardware add does
  // the round-to-nearest-even; the low bits are then the half's mantissa.
  const unsigned int subnormal = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  // normal: rebias the exponent (127 -> 15) and round to nearest even
  const unsigned int normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  const unsigned int magnitude = select_bits(a > 0x7f800000u, 0x7e00u,                // nan
                                             select_bits(a >= 0x477ff000u, 0x7c00u,   // rounds to inf (>= 65520)
                                                         select_bits(a < 0x38800000u, subnormal, normal)));
  return static_cast<unsigned short>(sign | magnitude);
#endif
}

template <int DT> DIFFRL_HD float load_f(const typename Storage<DT>::type* p, long long i) {
  if constexpr (DT == kFloat32) return p[i];
  else if constexpr (DT == kFloat16) return half_to_float(p[i]);
  else return bf16_to_float(p[i]);
}

template <int DT> DIFFRL_HD typename Storage<DT>::type to_storage(float f) {
  if constexpr (DT == kFloat32) return f;
  else if constexpr (DT == kFloat16) return float_to_half(f);
  else return float_to_bf16(f);
}

}  // namespace diffrl

#if !defined(__CUDACC_RTC__)
// Dtype dispatch for host code (the entry points): runs the statements that follow with DT bound,
// as a compile-time constant, to the dtype code `code`, and throws std::invalid_argument
// ("<what>: unsupported dtype code N") for any other code. One switch for every entry point:
//   DIFFRL_DISPATCH_DTYPE(p.dtype, "sde_step", forward_dtype<DT>(p));
#include <stdexcept>
#include <string>
#define DIFFRL_DTYPE_CASE(code_value, ...)              \
  case code_value: {                                     \
    constexpr int DT = code_value;                       \
    __VA_ARGS__;                                         \
    break;                                               \
  }
#define DIFFRL_DISPATCH_DTYPE(code, what, ...)                                                              \
  do {                                                                                                      \
    switch (code) {                                                                                         \
      DIFFRL_DTYPE_CASE(::diffrl::kFloat32, __VA_ARGS__)                                                    \
      DIFFRL_DTYPE_CASE(::diffrl::kFloat16, __VA_ARGS__)                                                    \
      DIFFRL_DTYPE_CASE(::diffrl::kBFloat16, __VA_ARGS__)                                                   \
      default:                                                                                              \
        throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(code)); \
    }                                                                                                       \
  } while (0)

// The same for the float32/float64 value kernels (group_advantages, win_rate): V is float or double.
#define DIFFRL_DISPATCH_FLOAT_DOUBLE(is_double, ...) \
  do {                                               \
    if (is_double) {                                 \
      typedef double V;                              \
      __VA_ARGS__;                                   \
    } else {                                         \
      typedef float V;                               \
      __VA_ARGS__;                                   \
    }                                                \
  } while (0)
#endif
