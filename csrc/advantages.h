// group_advantages, win_rate and grpo_loss: the maths shared by the CPU (advantages.cpp) and CUDA
// (advantages_kernels.cuh) kernels. See diffrl/ops/reference.py for the spec in PyTorch.
//
// group_advantages works on rows sorted by group id (a stable sort done by the caller): a segment
// is a run of equal ids in that order, reduced by one worker (a CPU thread, a CUDA block) in a
// fixed order. Statistics are float64:
//   mean  = sum(x) / n
//   denom = sqrt(sum((x - mean)^2) / n) + eps      (std "group", population std)
//         = global_std + eps                       (std "global", computed by the caller)
//         = 1                                      (std "none")
//   A     = (x - mean) / denom, or exactly 0 when the segment's values are all equal (min == max,
//           a group of one included) or denom is not > 0 (eps = 0 and std = 0)
// The file includes no standard header under NVRTC (the cupy backend).
#pragma once
#include "dtypes.h"
#if !defined(__CUDACC_RTC__)
#include <cmath>
#endif

namespace diffrl {
namespace adv {

enum StdMode : int { kStdNone = 0, kStdGroup = 1, kStdGlobal = 2 };
// kSingle: one statistic column per row (the reward, or sum_k w_k r_k over K heads)
// kEach:   K columns normalised separately, then sum_k w_k A_k ("normalize_each")
// kDense:  K = T columns (dense per-step rewards), each normalised and written to its own step
enum Mode : int { kSingle = 0, kEach = 1, kDense = 2 };

// The statistic column c of row `row`; rewards are [B, K] row-major.
template <int MODE, typename V>
DIFFRL_HD double column_value(const V* vals, long long K, const double* w, long long row, long long c) {
  if (MODE == kSingle) {
    if (w == nullptr) return static_cast<double>(vals[row]);  // K == 1
    double acc = 0.0;
    for (long long k = 0; k < K; ++k) acc = acc + static_cast<double>(vals[row * K + k]) * w[k];
    return acc;
  }
  return static_cast<double>(vals[row * K + c]);
}

// The denominator of a segment's column; 0 means "every advantage of this column is 0".
DIFFRL_HD double denominator(int std_mode, double sq, double n, double gstd, double eps, bool all_equal) {
  double d = 1.0;
  if (std_mode == kStdGroup) d = sqrt(sq / n) + eps;
  else if (std_mode == kStdGlobal) d = gstd + eps;
  return (all_equal || !(d > 0.0)) ? 0.0 : d;
}

DIFFRL_HD double normalized(double x, double mean, double denom) { return denom > 0.0 ? (x - mean) / denom : 0.0; }

DIFFRL_HD double clamp_abs(double a, double clip) { return a < -clip ? -clip : (a > clip ? clip : a); }

// ---- the finish of a segment, shared by the CPU and CUDA kernels: once a column's mean and
// denominator are known, every row of the segment is written by these (so both round alike) ----

// Mode kDense: row `row`'s advantage at step c (its own statistic column), clipped and weighted.
template <typename V>
DIFFRL_HD void write_dense_step(const V* vals, long long K, long long row, long long c, double mean, double denom,
                                const double* sw, long long T, int has_clip, double clip, float* out) {
  double a = normalized(column_value<kDense>(vals, K, nullptr, row, c), mean, denom);
  if (has_clip) a = clamp_abs(a, clip);
  out[row * T + c] = static_cast<float>(sw ? a * sw[c] : a);
}

// Modes kSingle and kEach: row `row`'s advantage, clipped, broadcast to its T steps (weighted).
// kSingle uses (mean0, denom0); kEach sums w_k times each column's advantage, with the columns'
// (mean, denom) pairs in each_stats[2 c], each_stats[2 c + 1].
template <int MODE, typename V>
DIFFRL_HD void write_row(const V* vals, long long K, const double* w, long long row, double mean0, double denom0,
                         const double* each_stats, const double* sw, long long T, int has_clip, double clip,
                         float* out) {
  double a;
  if (MODE == kEach) {
    a = 0.0;
    for (long long c = 0; c < K; ++c)
      a = a + normalized(column_value<MODE>(vals, K, w, row, c), each_stats[2 * c], each_stats[2 * c + 1]) * w[c];
  } else {
    a = normalized(column_value<MODE>(vals, K, w, row, 0), mean0, denom0);
  }
  if (has_clip) a = clamp_abs(a, clip);
  for (long long t = 0; t < T; ++t) out[row * T + t] = static_cast<float>(sw ? a * sw[t] : a);
}

// Pref-GRPO's win rate of the sample at sorted position j. Rows are sorted by (group id, value):
// the group is [lo, hi) and its values ascend, so binary searches count the members below and
// equal to x. Result: (below + (equal - 1) / 2) / (n - 1), or 0.5 alone; exact counts, one rounding.
template <typename V>
DIFFRL_HD float win_rate_at(const V* vals, const long long* order, const long long* sid, long long B, long long j) {
  const long long id = sid[j];
  long long a = 0, b = j;
  while (a < b) {
    const long long m = a + (b - a) / 2;
    if (sid[m] < id) a = m + 1; else b = m;
  }
  const long long lo = a;
  a = j + 1;
  b = B;
  while (a < b) {
    const long long m = a + (b - a) / 2;
    if (sid[m] <= id) a = m + 1; else b = m;
  }
  const long long hi = a;
  const long long n = hi - lo;
  if (n <= 1) return 0.5f;
  const V x = vals[order[j]];
  a = lo;
  b = j;
  while (a < b) {
    const long long m = a + (b - a) / 2;
    if (vals[order[m]] < x) a = m + 1; else b = m;
  }
  const long long below = a - lo;
  a = j + 1;
  b = hi;
  while (a < b) {
    const long long m = a + (b - a) / 2;
    if (x < vals[order[m]]) b = m; else a = m + 1;
  }
  const long long equal = a - lo - below;  // itself included
  return static_cast<float>(static_cast<double>(2 * below + equal - 1) / (2.0 * static_cast<double>(n - 1)));
}

// ---- the clipped PPO/GRPO surrogate, float32 per element ----
DIFFRL_HD float exp_f(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

DIFFRL_HD float f32_inf() { return bits_float(0x7f800000u); }

struct LossTerms {
  float diff, ratio, term;
  bool clipped;
};

// lo, hi: the ratio bounds 1 - eps_low and 1 + eps_high (rounded to float32 by the caller)
DIFFRL_HD LossTerms loss_terms(float logp, float old, float a, float lo, float hi) {
  LossTerms t;
  t.diff = logp - old;
  t.ratio = exp_f(t.diff);
  const float rc = t.ratio < lo ? lo : (t.ratio > hi ? hi : t.ratio);
  const float u = -a * t.ratio, c = -a * rc;
  t.term = u < c ? c : u;
  t.clipped = (t.ratio < lo) || (t.ratio > hi);
  return t;
}

// d loss / d logp for one element, gs = upstream gradient / number of elements. The clipped branch
// is flat exactly where it is strictly the larger term: ratio beyond the bound on the side of A.
DIFFRL_HD float loss_grad(float logp, float old, float a, float lo, float hi, float gs) {
  const float r = exp_f(logp - old);
  const bool flat = (a > 0.f && r > hi) || (a < 0.f && r < lo);
  return flat ? 0.f : (-a * r) * gs;
}

// stats slots (Python: diffrl/ops/loss.py)
enum LossStat : int { kPolicy = 0, kKl, kClipFrac, kApproxKl, kRatioMean, kRatioMin, kRatioMax, kNumStats };
// partial sums per chunk: term, clipped, diff^2, ratio, kl, then ratio min and max
constexpr int kLossParts = 7;
constexpr long long kLossChunk = 4096;  // elements per partial sum (CPU and CUDA alike)
DIFFRL_HD long long num_loss_chunks(long long N) { return (N + kLossChunk - 1) / kLossChunk; }

// The loss and its stats from the totals over all N elements (tot: term, clipped, diff^2, ratio,
// kl, in the order of the partial sums) and the ratio's min and max; CPU and CUDA alike.
DIFFRL_HD void loss_finish(const double* tot, double ratio_min, double ratio_max, long long N, float kl_coef,
                           float* loss, float* stats) {
  const double n = static_cast<double>(N);
  const double policy = tot[0] / n, kl = tot[4] / n;
  loss[0] = static_cast<float>(policy + static_cast<double>(kl_coef) * kl);
  stats[kPolicy] = static_cast<float>(policy);
  stats[kKl] = static_cast<float>(kl);
  stats[kClipFrac] = static_cast<float>(tot[1] / n);
  stats[kApproxKl] = static_cast<float>(0.5 * tot[2] / n);
  stats[kRatioMean] = static_cast<float>(tot[3] / n);
  stats[kRatioMin] = static_cast<float>(ratio_min);
  stats[kRatioMax] = static_cast<float>(ratio_max);
}

}  // namespace adv
}  // namespace diffrl
