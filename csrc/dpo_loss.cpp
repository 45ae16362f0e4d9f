// diffusion_dpo_loss on the CPU (OpenMP).
//
// Forward: one task per (sample, chunk of kDpoChunk elements) sums the chunk in float64, in
// parallel; the chunks of each sample are then added in order and the loss finished sequentially
// (B is small). The result does not depend on the number of threads.
#include "dpo_loss_api.h"

#include <algorithm>
#include <vector>

#include "dpo_loss.h"

namespace diffrl {
namespace dpo {
namespace {

constexpr long long kParallelMinWork = 1 << 15;  // elements below which a parallel region costs more than it saves
constexpr int kLanes = 8;                        // accumulators per partial sum (kDpoChunk is a multiple)

template <int DT>
void forward_impl(const DpoArgs& p) {
  using S = typename Storage<DT>::type;
  const S* pw = static_cast<const S*>(p.policy_w);
  const S* pl = static_cast<const S*>(p.policy_l);
  const S* rw = static_cast<const S*>(p.ref_w);
  const S* rl = static_cast<const S*>(p.ref_l);
  const S* tw = static_cast<const S*>(p.target_w);
  const S* tl = static_cast<const S*>(p.target_l);
  const long long B = p.B, D = p.D, nch = num_dpo_chunks(D), tasks = B * nch;
  std::vector<double> part(static_cast<size_t>(kDpoParts * tasks));
#pragma omp parallel for schedule(static) if (B * D >= kParallelMinWork)
  for (long long task = 0; task < tasks; ++task) {
    const long long b = task / nch, ch = task % nch;
    const long long lo = b * D + ch * kDpoChunk, hi = b * D + std::min(D, (ch + 1) * kDpoChunk);
    // kLanes interleaved accumulators per sum (element j goes to lane (j - lo) % kLanes), added in lane
    // order at the end: independent chains the compiler can vectorise, in an order fixed by the chunk
    double acc[kDpoParts][kLanes] = {};
    long long j = lo;
    for (; j + kLanes <= hi; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const DpoTerms t = dpo_terms(load_f<DT>(pw, j + l), load_f<DT>(pl, j + l), load_f<DT>(rw, j + l),
                                     load_f<DT>(rl, j + l), load_f<DT>(tw, j + l), load_f<DT>(tl, j + l));
        acc[0][l] += t.gap;
        acc[1][l] += t.epw;
        acc[2][l] += t.epl;
        acc[3][l] += t.erw;
        acc[4][l] += t.erl;
      }
    }
    for (int l = 0; j < hi; ++j, ++l) {
      const DpoTerms t = dpo_terms(load_f<DT>(pw, j), load_f<DT>(pl, j), load_f<DT>(rw, j), load_f<DT>(rl, j),
                                   load_f<DT>(tw, j), load_f<DT>(tl, j));
      acc[0][l] += t.gap;
      acc[1][l] += t.epw;
      acc[2][l] += t.epl;
      acc[3][l] += t.erw;
      acc[4][l] += t.erl;
    }
    double s[kDpoParts] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int k = 0; k < kDpoParts; ++k)
      for (int l = 0; l < kLanes; ++l) s[k] += acc[k][l];
    std::copy(s, s + kDpoParts, part.data() + kDpoParts * task);
  }
  double acc[7] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (long long b = 0; b < B; ++b) {
    double tot[kDpoParts] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (long long ch = 0; ch < nch; ++ch)
      for (int k = 0; k < kDpoParts; ++k) tot[k] += part[kDpoParts * (b * nch + ch) + k];
    dpo_sample_finish(tot, B, D, p.beta, p.weights ? p.weights[b] : 1.f, acc, p.coef + b);
  }
  dpo_finish(acc, B, p.loss, p.stats);
}

template <int DT>
void backward_impl(const DpoBackwardArgs& p) {
  using S = typename Storage<DT>::type;
  const S* pw = static_cast<const S*>(p.policy_w);
  const S* pl = static_cast<const S*>(p.policy_l);
  const S* tw = static_cast<const S*>(p.target_w);
  const S* tl = static_cast<const S*>(p.target_l);
  S* gw = static_cast<S*>(p.g_policy_w);
  S* gl = static_cast<S*>(p.g_policy_l);
  const long long B = p.B, D = p.D, nch = num_dpo_chunks(D), tasks = B * nch;
  const float g = p.g_loss[0];
#pragma omp parallel for schedule(static) if (B * D >= kParallelMinWork)
  for (long long task = 0; task < tasks; ++task) {
    const long long b = task / nch, ch = task % nch;
    const long long lo = b * D + ch * kDpoChunk, hi = b * D + std::min(D, (ch + 1) * kDpoChunk);
    const float c = g * p.coef[b];
    if (gw)
      for (long long j = lo; j < hi; ++j) gw[j] = to_storage<DT>(c * (load_f<DT>(pw, j) - load_f<DT>(tw, j)));
    if (gl)
      for (long long j = lo; j < hi; ++j) gl[j] = to_storage<DT>(-c * (load_f<DT>(pl, j) - load_f<DT>(tl, j)));
  }
}

}  // namespace

void dpo_loss_forward_cpu(const DpoArgs& p) {
  if (p.B == 0 || p.D == 0) return;
  DIFFRL_DISPATCH_DTYPE(p.dtype, "diffusion_dpo_loss", forward_impl<DT>(p));
}

void dpo_loss_backward_cpu(const DpoBackwardArgs& p) {
  if (p.B == 0 || p.D == 0) return;
  DIFFRL_DISPATCH_DTYPE(p.dtype, "diffusion_dpo_loss backward", backward_impl<DT>(p));
}

}  // namespace dpo
}  // namespace diffrl
