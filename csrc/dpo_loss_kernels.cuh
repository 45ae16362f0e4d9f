// diffusion_dpo_loss CUDA kernels. Device code only and no host headers, so that nvcc (setup.py) and
// CUDA's runtime compiler (the cupy backend) both compile this file.
//
// The per-sample reduction runs over rows of D elements (D = C H W, up to ~1M) with B small, so a row
// is split over many blocks: one block per (sample, chunk of kDpoChunk elements) writes five float64
// partial sums (thread-strided in order, then a warp butterfly, then the warps in order), and one
// finalize block adds each sample's chunks in order and finishes the loss. No atomics: bitwise
// reproducible run to run, and a sample's result never depends on the rest of the batch.
#pragma once
#include "dpo_loss.h"

namespace diffrl {
namespace dpo {

// Launch geometry, shared by the nvcc host launchers (dpo_loss.cu) and the cupy backend, which reads
// these constants from this file.
constexpr int kDpoThreads = 256;          // per (sample, chunk) block and for the finalize block
constexpr int kDpoBackwardThreads = 256;  // backward: one element per thread, B * ceil(D / 256) blocks
static_assert(kDpoChunk % kDpoThreads == 0, "a chunk must be a whole number of block strides");

// The block's sum of v in a fixed order, returned to every thread; smem holds NT / 32 doubles.
template <int NT>
__device__ __forceinline__ double dpo_block_sum(double v, double* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double r = smem[0];
  for (int i = 1; i < NT / 32; ++i) r += smem[i];
  return r;
}

template <int DT>
__global__ void __launch_bounds__(kDpoThreads) dpo_partial_kernel(
    const typename Storage<DT>::type* __restrict__ pw, const typename Storage<DT>::type* __restrict__ pl,
    const typename Storage<DT>::type* __restrict__ rw, const typename Storage<DT>::type* __restrict__ rl,
    const typename Storage<DT>::type* __restrict__ tw, const typename Storage<DT>::type* __restrict__ tl,
    long long D, long long nch, double* __restrict__ part) {
  __shared__ double s_d[kDpoThreads / 32];
  const long long task = blockIdx.x;
  const long long b = task / nch, ch = task % nch;
  const long long beg = ch * kDpoChunk, end = (beg + kDpoChunk < D) ? beg + kDpoChunk : D;
  double s[kDpoParts] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (long long i = beg + threadIdx.x; i < end; i += kDpoThreads) {
    const long long j = b * D + i;
    const DpoTerms t = dpo_terms(load_f<DT>(pw, j), load_f<DT>(pl, j), load_f<DT>(rw, j), load_f<DT>(rl, j),
                                 load_f<DT>(tw, j), load_f<DT>(tl, j));
    s[0] += t.gap;
    s[1] += t.epw;
    s[2] += t.epl;
    s[3] += t.erw;
    s[4] += t.erl;
  }
  for (int k = 0; k < kDpoParts; ++k) s[k] = dpo_block_sum<kDpoThreads>(s[k], s_d);
  if (threadIdx.x == 0)
    for (int k = 0; k < kDpoParts; ++k) part[kDpoParts * task + k] = s[k];
}

// One block: per sample, its chunk partials in a fixed order, then the loss, stats and coefficients.
__global__ void __launch_bounds__(kDpoThreads) dpo_finalize_kernel(const double* __restrict__ part,
                                                                   const float* __restrict__ weights, long long B,
                                                                   long long D, long long nch, double beta,
                                                                   float* __restrict__ loss,
                                                                   float* __restrict__ stats,
                                                                   float* __restrict__ coef) {
  __shared__ double s_d[kDpoThreads / 32];
  double acc[7] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};  // meaningful in thread 0
  for (long long b = 0; b < B; ++b) {
    double tot[kDpoParts] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (long long ch = threadIdx.x; ch < nch; ch += kDpoThreads)
      for (int k = 0; k < kDpoParts; ++k) tot[k] += part[kDpoParts * (b * nch + ch) + k];
    for (int k = 0; k < kDpoParts; ++k) tot[k] = dpo_block_sum<kDpoThreads>(tot[k], s_d);
    if (threadIdx.x == 0) dpo_sample_finish(tot, B, D, beta, weights ? weights[b] : 1.f, acc, coef + b);
  }
  if (threadIdx.x == 0) dpo_finish(acc, B, loss, stats);
}

template <int DT>
__global__ void __launch_bounds__(kDpoBackwardThreads) dpo_backward_kernel(
    const typename Storage<DT>::type* __restrict__ pw, const typename Storage<DT>::type* __restrict__ pl,
    const typename Storage<DT>::type* __restrict__ tw, const typename Storage<DT>::type* __restrict__ tl,
    const float* __restrict__ coef, const float* __restrict__ g_loss, long long D, long long nblk,
    typename Storage<DT>::type* __restrict__ gw, typename Storage<DT>::type* __restrict__ gl) {
  // one block per (sample, kDpoBackwardThreads elements of its row): the sample's factor is uniform
  const long long b = blockIdx.x / nblk;
  const long long i = (blockIdx.x % nblk) * kDpoBackwardThreads + threadIdx.x;
  if (i >= D) return;
  const long long j = b * D + i;
  const float c = g_loss[0] * coef[b];
  if (gw) gw[j] = to_storage<DT>(c * (load_f<DT>(pw, j) - load_f<DT>(tw, j)));
  if (gl) gl[j] = to_storage<DT>(-c * (load_f<DT>(pl, j) - load_f<DT>(tl, j)));
}

}  // namespace dpo
}  // namespace diffrl
