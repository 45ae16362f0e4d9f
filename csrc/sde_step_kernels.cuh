// sde_step CUDA kernels. Device code only and no host headers, so that nvcc (setup.py) and CUDA's
// runtime compiler (the cupy backend) both compile this file.
//
// One block per (sample, chunk of kChunk elements); each thread owns kItems elements strided by the
// block size (coalesced). The forward reduction is fixed-order: per thread in element order, then a
// butterfly over the warp, then the warps in order; the chunk partials are summed in order by
// sde_step_finalize. No atomics, so the log-prob of a sample is bitwise reproducible.
#pragma once
#include "sde_step.h"

namespace diffrl {
namespace sde {

// Launch geometry, shared by the nvcc host launchers (sde_step.cu) and the cupy backend, which
// reads these constants from this file.
constexpr int kThreads = 256;         // forward/backward: one block per (sample, chunk)
constexpr int kFinalizeThreads = 128;  // finalize: one thread per sample
constexpr int kItems = static_cast<int>(kChunk / kThreads);
static_assert(kItems * kThreads == kChunk, "chunk must be a multiple of the block size");

__device__ __forceinline__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
    for (int i = 0; i < kThreads / 32; ++i) total += smem[i];
  __syncthreads();
  return total;  // valid in thread 0
}

template <int DT, bool GUID, bool SAMPLE, bool KL, bool MEAN>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const typename Storage<DT>::type* __restrict__ x, const typename Storage<DT>::type* __restrict__ vc,
    const typename Storage<DT>::type* __restrict__ vu, float w,
    const typename Storage<DT>::type* __restrict__ eps, const typename Storage<DT>::type* __restrict__ xin,
    const typename Storage<DT>::type* __restrict__ vr, const typename Storage<DT>::type* __restrict__ vru,
    const float* __restrict__ ca, const float* __restrict__ cc, const float* __restrict__ cs,
    typename Storage<DT>::type* __restrict__ xout, typename Storage<DT>::type* __restrict__ mout,
    float* __restrict__ part_sq, float* __restrict__ part_kl, long long D, long long nch) {
  typedef typename Storage<DT>::type T;
  __shared__ float smem[kThreads / 32];
  const long long task = blockIdx.x;
  const long long b = task / nch, ch = task - b * nch;
  const long long lo = ch * kChunk, hi = (D < lo + kChunk) ? D : lo + kChunk;
  const long long base = b * D;
  const float a = ca[b], c = cc[b], s = cs[b];
  float acc_sq = 0.f, acc_kl = 0.f;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const long long e = lo + k * kThreads + threadIdx.x;
    if (e < hi) {
      const long long j = base + e;
      float v = load_f<DT>(vc, j);
      if (GUID) v = guided(v, load_f<DT>(vu, j), w);
      const float mu = affine_mean(a, load_f<DT>(x, j), c, v);
      float xp;
      if (SAMPLE) {
        const T stored = to_storage<DT>(mu + s * load_f<DT>(eps, j));
        xout[j] = stored;
        xp = load_f<DT>(&stored, 0);
      } else {
        xp = load_f<DT>(xin, j);
      }
      if (MEAN) mout[j] = to_storage<DT>(mu);
      const float d = xp - mu;
      acc_sq += d * d;
      if (KL) {
        float vref = load_f<DT>(vr, j);
        if (GUID) vref = guided(vref, load_f<DT>(vru, j), w);
        const float dk = c * (v - vref);
        acc_kl += dk * dk;
      }
    }
  }
  const float sq = block_sum(acc_sq, smem);
  float kl = 0.f;
  if (KL) kl = block_sum(acc_kl, smem);
  if (threadIdx.x == 0) {
    part_sq[task] = sq;
    if (KL) part_kl[task] = kl;
  }
}

// One thread per sample: the chunk partials in order, then the log-prob and KL.
__global__ void finalize_kernel(const float* __restrict__ part_sq, const float* __restrict__ part_kl,
                                const float* __restrict__ cs, float* __restrict__ logp, float* __restrict__ kl,
                                long long B, long long D, long long nch, int reduce_sum) {
  const long long b = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  double sq = 0.0, dk = 0.0;
  for (long long i = 0; i < nch; ++i) {
    sq += part_sq[b * nch + i];
    if (kl) dk += part_kl[b * nch + i];
  }
  finalize(sq, dk, cs[b], D, reduce_sum, logp + b, kl ? kl + b : nullptr);
}

template <int DT, bool GUID, bool SAMPLE, bool KL>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const typename Storage<DT>::type* __restrict__ x, const typename Storage<DT>::type* __restrict__ vc,
    const typename Storage<DT>::type* __restrict__ vu, float w,
    const typename Storage<DT>::type* __restrict__ xp_in,
    const typename Storage<DT>::type* __restrict__ vr, const typename Storage<DT>::type* __restrict__ vru,
    const float* __restrict__ ca, const float* __restrict__ cc, const float* __restrict__ cs,
    const float* __restrict__ g_logp, const float* __restrict__ g_kl,
    const typename Storage<DT>::type* __restrict__ g_prev, const typename Storage<DT>::type* __restrict__ g_mean,
    typename Storage<DT>::type* __restrict__ gx, typename Storage<DT>::type* __restrict__ gv,
    typename Storage<DT>::type* __restrict__ gvu, typename Storage<DT>::type* __restrict__ gxp,
    typename Storage<DT>::type* __restrict__ gvr, typename Storage<DT>::type* __restrict__ gvru,
    long long D, long long nch, int reduce_sum) {
  const long long task = blockIdx.x;
  const long long b = task / nch, ch = task - b * nch;
  const long long lo = ch * kChunk, hi = (D < lo + kChunk) ? D : lo + kChunk;
  const long long base = b * D;
  const float a = ca[b], c = cc[b], s = cs[b];
  const float inv_s2 = 1.f / (s * s);
  const float f = reduce_sum ? 1.f : 1.f / static_cast<float>(D);
  const float gl = g_logp ? g_logp[b] * f : 0.f;
  const float gk = (KL && g_kl) ? g_kl[b] * f : 0.f;
  const bool need_r = !SAMPLE && g_logp != nullptr;
  const float wc = GUID ? w : 1.f, wu = 1.f - w;
#pragma unroll 4
  for (int k = 0; k < kItems; ++k) {
    const long long e = lo + k * kThreads + threadIdx.x;
    if (e < hi) {
      const long long j = base + e;
      float v = load_f<DT>(vc, j);
      if (GUID) v = guided(v, load_f<DT>(vu, j), w);
      float g_mu = g_mean ? load_f<DT>(g_mean, j) : 0.f;
      if (SAMPLE && g_prev) g_mu += load_f<DT>(g_prev, j);
      float r = 0.f;
      if (need_r) {
        const float mu = affine_mean(a, load_f<DT>(x, j), c, v);
        r = (load_f<DT>(xp_in, j) - mu) * inv_s2;
        g_mu += gl * r;
      }
      float g_mur = 0.f;
      if (KL) {
        float vref = load_f<DT>(vr, j);
        if (GUID) vref = guided(vref, load_f<DT>(vru, j), w);
        const float q = c * (v - vref) * inv_s2;
        g_mu += gk * q;
        g_mur = -gk * q;
      }
      if (gx) gx[j] = to_storage<DT>(a * (g_mu + g_mur));
      if (gv) gv[j] = to_storage<DT>(c * g_mu * wc);
      if (GUID && gvu) gvu[j] = to_storage<DT>(c * g_mu * wu);
      if (!SAMPLE && gxp) gxp[j] = to_storage<DT>(-gl * r);
      if (KL && gvr) gvr[j] = to_storage<DT>(c * g_mur * wc);
      if (KL && GUID && gvru) gvru[j] = to_storage<DT>(c * g_mur * wu);
    }
  }
}

}  // namespace sde
}  // namespace diffrl
