// group_advantages, win_rate and grpo_loss on the CPU (OpenMP).
//
// group_advantages: one task per sorted row; a row that starts a segment (its id differs from the
// previous row's) scans to the segment's end and reduces it sequentially in sorted order, so every
// result depends only on the segment's values and order, never on threads or scheduling.
// Work O(B * C) plus the scans, O(B) in all.
#include "advantages_api.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "advantages.h"

namespace diffrl {
namespace adv {

// Below this much work a parallel region costs more than it saves (waking the pool takes
// microseconds, and far longer when other processes hold the cores); results do not depend on it.
constexpr long long kParallelMinWork = 1 << 15;
namespace {

template <int MODE, typename V>
void group_impl(const GroupArgs& p) {
  const V* vals = static_cast<const V*>(p.vals);
  const long long B = p.B, K = p.K, T = p.T;
  const long long C = (MODE == kSingle) ? 1 : K;
  const long long* order = p.order;
  const long long* sid = p.sorted_ids;
  const double* w = p.weights;
  const double* sw = p.step_weights;
  float* out = p.out;

#pragma omp parallel if (B * C >= kParallelMinWork)
  {
    std::vector<double> stats(MODE == kEach ? 2 * C : 0);
#pragma omp for schedule(dynamic, 64)
    for (long long s = 0; s < B; ++s) {
      const long long id = sid[s];
      if (s > 0 && sid[s - 1] == id) continue;  // not a segment start
      long long e = s + 1;
      while (e < B && sid[e] == id) ++e;
      const double n = static_cast<double>(e - s);
      double mean0 = 0.0, denom0 = 0.0;
      for (long long c = 0; c < C; ++c) {
        double sum = 0.0;
        double mn = column_value<MODE>(vals, K, w, order[s], c), mx = mn;
        for (long long j = s; j < e; ++j) {
          const double x = column_value<MODE>(vals, K, w, order[j], c);
          sum += x;
          mn = x < mn ? x : mn;
          mx = x > mx ? x : mx;
        }
        const double mean = sum / n;
        double sq = 0.0;
        if (p.std_mode == kStdGroup) {
          for (long long j = s; j < e; ++j) {
            const double d = column_value<MODE>(vals, K, w, order[j], c) - mean;
            sq += d * d;
          }
        }
        const double denom =
            denominator(p.std_mode, sq, n, p.global_std ? p.global_std[c] : 0.0, p.eps, mn == mx);
        if (MODE == kDense) {
          for (long long j = s; j < e; ++j)
            write_dense_step(vals, K, order[j], c, mean, denom, sw, T, p.has_clip, p.clip, out);
        } else if (MODE == kEach) {
          stats[2 * c] = mean;
          stats[2 * c + 1] = denom;
        } else {
          mean0 = mean;
          denom0 = denom;
        }
      }
      if (MODE != kDense) {
        for (long long j = s; j < e; ++j)
          write_row<MODE>(vals, K, w, order[j], mean0, denom0, stats.data(), sw, T, p.has_clip, p.clip, out);
      }
    }
  }
}

template <typename V>
void group_dtype(const GroupArgs& p) {
  switch (p.mode) {
    case kSingle: return group_impl<kSingle, V>(p);
    case kEach: return group_impl<kEach, V>(p);
    case kDense: return group_impl<kDense, V>(p);
  }
  throw std::invalid_argument("group_advantages: unknown mode");
}

template <typename V>
void win_rate_impl(const WinRateArgs& p) {
  const V* vals = static_cast<const V*>(p.vals);
#pragma omp parallel for schedule(static) if (p.B >= kParallelMinWork / 64)
  for (long long j = 0; j < p.B; ++j) p.out[p.order[j]] = win_rate_at(vals, p.order, p.sorted_ids, p.B, j);
}

}  // namespace

void group_advantages_cpu(const GroupArgs& p) {
  if (p.B == 0) return;
  DIFFRL_DISPATCH_FLOAT_DOUBLE(p.vals_double, group_dtype<V>(p));
}

void win_rate_cpu(const WinRateArgs& p) {
  if (p.B == 0) return;
  DIFFRL_DISPATCH_FLOAT_DOUBLE(p.vals_double, win_rate_impl<V>(p));
}

// grpo_loss: partial sums per kLossChunk elements (in parallel), then summed in chunk order.
void loss_forward_cpu(const LossArgs& p) {
  const long long N = p.N, nch = num_loss_chunks(N);
  std::vector<double> part(static_cast<size_t>(kLossParts * nch));
#pragma omp parallel for schedule(static) if (N >= kParallelMinWork)
  for (long long ch = 0; ch < nch; ++ch) {
    const long long lo = ch * kLossChunk, hi = std::min(N, lo + kLossChunk);
    double st = 0.0, sc = 0.0, sd = 0.0, sr = 0.0, sk = 0.0;
    float mn = f32_inf(), mx = -f32_inf();
    for (long long i = lo; i < hi; ++i) {
      const LossTerms t = loss_terms(p.log_prob[i], p.old_log_prob[i], p.adv[i / p.adv_div], p.lo, p.hi);
      st += t.term;
      sc += t.clipped ? 1.0 : 0.0;
      sd += static_cast<double>(t.diff) * t.diff;
      sr += t.ratio;
      if (p.kl) sk += p.kl[i];
      mn = t.ratio < mn ? t.ratio : mn;
      mx = t.ratio > mx ? t.ratio : mx;
    }
    double* q = part.data() + kLossParts * ch;
    q[0] = st; q[1] = sc; q[2] = sd; q[3] = sr; q[4] = sk; q[5] = mn; q[6] = mx;
  }
  double tot[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  double mn = part[5], mx = part[6];
  for (long long ch = 0; ch < nch; ++ch) {
    const double* q = part.data() + kLossParts * ch;
    for (int k = 0; k < 5; ++k) tot[k] += q[k];
    mn = q[5] < mn ? q[5] : mn;
    mx = q[6] > mx ? q[6] : mx;
  }
  loss_finish(tot, mn, mx, N, p.kl_coef, p.loss, p.stats);
}

void loss_backward_cpu(const LossBackwardArgs& p) {
  const float gs = p.g_loss[0] / static_cast<float>(p.N);
#pragma omp parallel for schedule(static) if (p.N >= kParallelMinWork)
  for (long long i = 0; i < p.N; ++i)
    p.g_log_prob[i] = loss_grad(p.log_prob[i], p.old_log_prob[i], p.adv[i / p.adv_div], p.lo, p.hi, gs);
}

}  // namespace adv
}  // namespace diffrl
