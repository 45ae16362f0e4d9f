// sde_step: the element-wise maths shared by the CPU (sde_step.cpp) and CUDA (sde_step_kernels.cuh)
// kernels. See diffrl/ops/reference.py for the spec in PyTorch.
//
//   v    = vu + w (vc - vu)                 (classifier-free guidance, when vu is given)
//   mu   = a x + c v                        (the step's mean)
//   x'   = mu + s eps                       (sampling) or given (scoring)
//   sq   = sum_j (x'_j - mu_j)^2            (x' rounded to the storage dtype first, so that
//                                            scoring a stored x' reproduces the sampled log-prob)
//   dk   = sum_j (c (v_j - vref_j))^2       (= sum (mu - mu_ref)^2, without the cancellation)
//   logp = -sq / (2 s^2) * f - (log s + log sqrt(2 pi)) * (f D)      f = 1/D (mean) or 1 (sum)
//   kl   =  dk / (2 s^2) * f
//
// Both files are compiled without floating-point contraction (-ffp-contract=off, --fmad=false):
// every product and sum is rounded as written, so the two modes (and the CPU and CUDA kernels)
// compute identical element values.
#pragma once
#include "dtypes.h"
#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

namespace diffrl {
namespace sde {

// Elements per reduction chunk. A sample's sums are accumulated per chunk in a fixed order and the
// chunk partials summed in order, so results never depend on the batch, threads or launch shape.
constexpr long long kChunk = 4096;

DIFFRL_HD long long num_chunks(long long D) { return (D + kChunk - 1) / kChunk; }

DIFFRL_HD float guided(float vc, float vu, float w) { return vu + w * (vc - vu); }

DIFFRL_HD float affine_mean(float a, float x, float c, float v) { return a * x + c * v; }

// Per-sample log-prob and KL from the chunk partial sums (summed in chunk order, in double).
DIFFRL_HD void finalize(double sq, double dk, float s, long long D, int reduce_sum, float* logp, float* kl) {
  const double s2 = static_cast<double>(s) * static_cast<double>(s);
  const double f = reduce_sum ? 1.0 : 1.0 / static_cast<double>(D);
  const double norm = log(static_cast<double>(s)) + 0.91893853320467274178;  // log s + log sqrt(2 pi)
  *logp = static_cast<float>(-sq / (2.0 * s2) * f - norm * (reduce_sum ? static_cast<double>(D) : 1.0));
  if (kl) *kl = static_cast<float>(dk / (2.0 * s2) * f);
}

}  // namespace sde
}  // namespace diffrl
