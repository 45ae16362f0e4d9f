// group_advantages, win_rate and grpo_loss CUDA kernels. Device code only and no host headers, so
// that nvcc (setup.py) and CUDA's runtime compiler (the cupy backend) both compile this file.
//
// Every reduction has a fixed order: each thread accumulates its strided elements in order, then a
// butterfly inside the warp, then the warp partials in order. No atomics, so results are bitwise
// reproducible run to run.
#pragma once
#include "advantages.h"

namespace diffrl {
namespace adv {

// Launch geometry, shared by the nvcc host launchers (advantages.cu) and the cupy backend, which
// reads these constants from this file.
constexpr int kGroupThreads = 128;  // one block per segment start
constexpr int kWinThreads = 256;    // one thread per row
constexpr int kLossThreads = 256;   // one block per kLossChunk elements
static_assert(kLossChunk % kLossThreads == 0, "a loss chunk must be a whole number of block strides");

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? b : a; }
};

// Reduces v over the block in a fixed order and returns the result to every thread. smem holds
// NT / 32 values; the leading barrier makes it safe to call again right away.
template <int NT, typename T, typename Op>
__device__ __forceinline__ T block_all_reduce(T v, T* smem, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
  for (int i = 1; i < NT / 32; ++i) r = op(r, smem[i]);
  return r;
}

// Block s handles the segment that starts at sorted row s (and leaves at once when row s does not
// start one). The block finds the segment's end by scanning, reduces each statistic column in
// two passes (sum/min/max, then squared deviations) and writes the rows. Work per segment is
// O(n C); all blocks together O(B C).
template <int MODE, typename V>
__global__ void __launch_bounds__(kGroupThreads) group_kernel(
    const V* __restrict__ vals, long long K, const double* __restrict__ w, const long long* __restrict__ order,
    const long long* __restrict__ sid, long long B, const double* __restrict__ gstd,
    const double* __restrict__ sw, long long T, int std_mode, double eps, double clip, int has_clip,
    float* __restrict__ out) {
  extern __shared__ double s_stats[];  // mode kEach: (mean, denom) of each column
  __shared__ double s_d[kGroupThreads / 32];
  __shared__ long long s_l[kGroupThreads / 32];
  const long long s = blockIdx.x;
  const long long id = sid[s];
  if (s > 0 && sid[s - 1] == id) return;  // uniform over the block

  long long e = B;
  for (long long base = s + 1; base < e; base += kGroupThreads) {
    const long long j = base + threadIdx.x;
    const long long cand = (j < B && sid[j] != id) ? j : B;
    const long long m = block_all_reduce<kGroupThreads>(cand, s_l, MinOp());
    e = m < e ? m : e;
  }
  const double n = static_cast<double>(e - s);
  const long long C = (MODE == kSingle) ? 1 : K;
  double mean0 = 0.0, denom0 = 0.0;
  for (long long c = 0; c < C; ++c) {
    double sum = 0.0;
    double mn = column_value<MODE>(vals, K, w, order[s], c), mx = mn;
    for (long long j = s + threadIdx.x; j < e; j += kGroupThreads) {
      const double x = column_value<MODE>(vals, K, w, order[j], c);
      sum += x;
      mn = x < mn ? x : mn;
      mx = x > mx ? x : mx;
    }
    sum = block_all_reduce<kGroupThreads>(sum, s_d, SumOp());
    mn = block_all_reduce<kGroupThreads>(mn, s_d, MinOp());
    mx = block_all_reduce<kGroupThreads>(mx, s_d, MaxOp());
    const double mean = sum / n;
    double sq = 0.0;
    if (std_mode == kStdGroup) {
      for (long long j = s + threadIdx.x; j < e; j += kGroupThreads) {
        const double d = column_value<MODE>(vals, K, w, order[j], c) - mean;
        sq += d * d;
      }
      sq = block_all_reduce<kGroupThreads>(sq, s_d, SumOp());
    }
    const double denom = denominator(std_mode, sq, n, gstd ? gstd[c] : 0.0, eps, mn == mx);
    if (MODE == kDense) {
      for (long long j = s + threadIdx.x; j < e; j += kGroupThreads)
        write_dense_step(vals, K, order[j], c, mean, denom, sw, T, has_clip, clip, out);
    } else if (MODE == kEach) {
      if (threadIdx.x == 0) {
        s_stats[2 * c] = mean;
        s_stats[2 * c + 1] = denom;
      }
    } else {
      mean0 = mean;
      denom0 = denom;
    }
  }
  if (MODE != kDense) {
    if (MODE == kEach) __syncthreads();  // s_stats written by thread 0
    for (long long j = s + threadIdx.x; j < e; j += kGroupThreads)
      write_row<MODE>(vals, K, w, order[j], mean0, denom0, s_stats, sw, T, has_clip, clip, out);
  }
}

template <typename V>
__global__ void __launch_bounds__(kWinThreads) win_rate_kernel(const V* __restrict__ vals,
                                                               const long long* __restrict__ order,
                                                               const long long* __restrict__ sid, long long B,
                                                               float* __restrict__ out) {
  const long long j = static_cast<long long>(blockIdx.x) * kWinThreads + threadIdx.x;
  if (j < B) out[order[j]] = win_rate_at(vals, order, sid, B, j);
}

// One block per kLossChunk elements: the chunk's partial sums (float64) and ratio min/max.
__global__ void __launch_bounds__(kLossThreads) loss_partial_kernel(
    const float* __restrict__ logp, const float* __restrict__ old, const float* __restrict__ adv, long long adv_div,
    const float* __restrict__ kl, long long N, float lo, float hi, double* __restrict__ part) {
  __shared__ double s_d[kLossThreads / 32];
  __shared__ float s_f[kLossThreads / 32];
  const long long ch = blockIdx.x;
  const long long beg = ch * kLossChunk, end = (beg + kLossChunk < N) ? beg + kLossChunk : N;
  double st = 0.0, sc = 0.0, sd = 0.0, sr = 0.0, sk = 0.0;
  float mn = f32_inf(), mx = -f32_inf();
  for (long long i = beg + threadIdx.x; i < end; i += kLossThreads) {
    const LossTerms t = loss_terms(logp[i], old[i], adv[i / adv_div], lo, hi);
    st += t.term;
    sc += t.clipped ? 1.0 : 0.0;
    sd += static_cast<double>(t.diff) * t.diff;
    sr += t.ratio;
    if (kl) sk += kl[i];
    mn = t.ratio < mn ? t.ratio : mn;
    mx = t.ratio > mx ? t.ratio : mx;
  }
  st = block_all_reduce<kLossThreads>(st, s_d, SumOp());
  sc = block_all_reduce<kLossThreads>(sc, s_d, SumOp());
  sd = block_all_reduce<kLossThreads>(sd, s_d, SumOp());
  sr = block_all_reduce<kLossThreads>(sr, s_d, SumOp());
  sk = block_all_reduce<kLossThreads>(sk, s_d, SumOp());
  mn = block_all_reduce<kLossThreads>(mn, s_f, MinOp());
  mx = block_all_reduce<kLossThreads>(mx, s_f, MaxOp());
  if (threadIdx.x == 0) {
    double* q = part + kLossParts * ch;
    q[0] = st; q[1] = sc; q[2] = sd; q[3] = sr; q[4] = sk; q[5] = mn; q[6] = mx;
  }
}

// One block: the chunk partials in a fixed order, then the loss and the stats.
__global__ void __launch_bounds__(kLossThreads) loss_finalize_kernel(const double* __restrict__ part, long long nch,
                                                                     long long N, float kl_coef,
                                                                     float* __restrict__ loss,
                                                                     float* __restrict__ stats) {
  __shared__ double s_d[kLossThreads / 32];
  double tot[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  double mn = part[5], mx = part[6];
  for (long long ch = threadIdx.x; ch < nch; ch += kLossThreads) {
    const double* q = part + kLossParts * ch;
    for (int k = 0; k < 5; ++k) tot[k] += q[k];
    mn = q[5] < mn ? q[5] : mn;
    mx = q[6] > mx ? q[6] : mx;
  }
  for (int k = 0; k < 5; ++k) tot[k] = block_all_reduce<kLossThreads>(tot[k], s_d, SumOp());
  mn = block_all_reduce<kLossThreads>(mn, s_d, MinOp());
  mx = block_all_reduce<kLossThreads>(mx, s_d, MaxOp());
  if (threadIdx.x == 0) loss_finish(tot, mn, mx, N, kl_coef, loss, stats);
}

__global__ void __launch_bounds__(kLossThreads) loss_backward_kernel(
    const float* __restrict__ logp, const float* __restrict__ old, const float* __restrict__ adv, long long adv_div,
    long long N, float lo, float hi, const float* __restrict__ g_loss, float* __restrict__ g_logp) {
  const long long i = static_cast<long long>(blockIdx.x) * kLossThreads + threadIdx.x;
  if (i >= N) return;
  const float gs = g_loss[0] / static_cast<float>(N);
  g_logp[i] = loss_grad(logp[i], old[i], adv[i / adv_div], lo, hi, gs);
}

}  // namespace adv
}  // namespace diffrl
