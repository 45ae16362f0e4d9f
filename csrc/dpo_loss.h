// diffusion_dpo_loss: the maths shared by the CPU (dpo_loss.cpp) and CUDA (dpo_loss_kernels.cuh)
// kernels. The spec in PyTorch: diffrl/ops/reference.py (diffusion_dpo_loss_reference).
//
// Inputs are six [B, D] tensors (policy / reference predictions and the targets, for the preferred
// w and the rejected l latents). Per element, in float32:
//   gap  = (p_w - r_w)(p_w + r_w - 2 t_w) - (p_l - r_l)(p_l + r_l - 2 t_l)
//        = [(p_w - t_w)^2 - (r_w - t_w)^2] - [(p_l - t_l)^2 - (r_l - t_l)^2], without the cancellation
// and the four squared errors (diagnostics). Each (sample, chunk of kDpoChunk elements) sums them in
// float64 (a partial); a per-sample pass adds the chunks in order and finishes:
//   z_i  = -beta / 2 * gap_i / D,  loss = sum_i w_i softplus(-z_i) / B
//   coef_i = w_i sigmoid(-z_i) beta / (B D)   (the backward: d loss / d p_w = g coef_i (p_w - t_w),
//                                              d loss / d p_l = -g coef_i (p_l - t_l))
// The file includes no standard header under NVRTC (the cupy backend).
#pragma once
#include "dtypes.h"
#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

namespace diffrl {
namespace dpo {

constexpr long long kDpoChunk = 4096;  // elements per partial sum (CPU, CUDA and Triton alike)
constexpr int kDpoParts = 5;           // gap, err(p_w), err(p_l), err(r_w), err(r_l)
// stats slots (Python: diffrl/ops/dpo.py STAT_NAMES)
enum DpoStat : int { kAccuracy = 0, kMargin, kPolicyErrW, kPolicyErrL, kRefErrW, kRefErrL, kDpoNumStats };

DIFFRL_HD long long num_dpo_chunks(long long D) { return (D + kDpoChunk - 1) / kDpoChunk; }

DIFFRL_HD float dpo_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

DIFFRL_HD float dpo_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

// -log sigmoid(z) = softplus(-z) = max(-z, 0) + log(1 + exp(-|z|)): no overflow for any z
DIFFRL_HD float neg_log_sigmoid(float z) {
  const float a = z < 0.f ? -z : z;
  return (z < 0.f ? -z : 0.f) + dpo_log(1.f + dpo_exp(-a));
}

// sigmoid(-z) = 1 / (1 + exp(z)): exp(z) = inf gives 0, never NaN
DIFFRL_HD float sigmoid_neg(float z) { return 1.f / (1.f + dpo_exp(z)); }

// One element's contribution to the five partial sums.
struct DpoTerms {
  float gap, epw, epl, erw, erl;
};

DIFFRL_HD DpoTerms dpo_terms(float pw, float pl, float rw, float rl, float tw, float tl) {
  DpoTerms t;
  const float gw = (pw - rw) * (pw + rw - 2.f * tw);
  const float gl = (pl - rl) * (pl + rl - 2.f * tl);
  t.gap = gw - gl;
  const float a = pw - tw, b = pl - tl, c = rw - tw, d = rl - tl;
  t.epw = a * a;
  t.epl = b * b;
  t.erw = c * c;
  t.erl = d * d;
  return t;
}

// Sample i from its five totals (tot, over its D elements): adds to the batch accumulators
// acc[0] = sum w softplus(-z), acc[1] = #(z > 0), acc[2] = sum z, acc[3..6] = the mean errors, and
// writes coef_i. CPU and CUDA alike.
DIFFRL_HD void dpo_sample_finish(const double* tot, long long B, long long D, double beta, float w, double* acc,
                                 float* coef_i) {
  const double n = static_cast<double>(D);
  const double z = -0.5 * beta * (tot[0] / n);
  const float zf = static_cast<float>(z);
  acc[0] += static_cast<double>(w) * static_cast<double>(neg_log_sigmoid(zf));
  acc[1] += z > 0.0 ? 1.0 : 0.0;
  acc[2] += z;
  for (int k = 1; k < kDpoParts; ++k) acc[2 + k] += tot[k] / n;
  coef_i[0] = static_cast<float>(static_cast<double>(w) * static_cast<double>(sigmoid_neg(zf)) * beta /
                                 (static_cast<double>(B) * n));
}

// The loss and the stats from the batch accumulators.
DIFFRL_HD void dpo_finish(const double* acc, long long B, float* loss, float* stats) {
  const double b = static_cast<double>(B);
  loss[0] = static_cast<float>(acc[0] / b);
  stats[kAccuracy] = static_cast<float>(acc[1] / b);
  stats[kMargin] = static_cast<float>(acc[2] / b);
  stats[kPolicyErrW] = static_cast<float>(acc[3] / b);
  stats[kPolicyErrL] = static_cast<float>(acc[4] / b);
  stats[kRefErrW] = static_cast<float>(acc[5] / b);
  stats[kRefErrL] = static_cast<float>(acc[6] / b);
}

}  // namespace dpo
}  // namespace diffrl
