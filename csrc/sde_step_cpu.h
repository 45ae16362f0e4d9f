// sde_step on the CPU: OpenMP over (sample, chunk) tasks, a fixed lane order inside each chunk.
//
// Included by sde_step.cpp (baseline x86-64 / any CPU) and sde_step_avx2.cpp (compiled with -mavx2):
// the same source, so both produce the same bits (no FMA contraction, the same lane order); the
// entry points get a suffix per instruction set (DIFFRL_CPU_ENTRY) and sde_step.cpp picks one.
#pragma once
#include <algorithm>
#include <stdexcept>
#include <vector>

#include "sde_step.h"
#include "sde_step_api.h"

#ifndef DIFFRL_CPU_ENTRY
#error "define DIFFRL_CPU_ENTRY(name) before including sde_step_cpu.h"
#endif

namespace diffrl {
namespace sde {
namespace {

constexpr int kLanes = 16;  // independent accumulators: lets the compiler vectorise a fixed-order sum
// Below this many elements one thread does the work: waking the OpenMP pool costs microseconds (far
// more when other processes hold the cores). Tasks are independent, so results do not depend on it.
constexpr long long kParallelMinElements = 1 << 15;

template <int DT, bool GUID, bool SAMPLE, bool KL, bool MEAN>
void forward_impl(const ForwardArgs& p) {
  typedef typename Storage<DT>::type T;
  const T* x = static_cast<const T*>(p.x);
  const T* vc = static_cast<const T*>(p.v);
  const T* vu = static_cast<const T*>(p.v_uncond);
  const T* eps = static_cast<const T*>(p.noise);
  const T* xin = static_cast<const T*>(p.prev_in);
  const T* vr = static_cast<const T*>(p.v_ref);
  const T* vru = static_cast<const T*>(p.v_ref_uncond);
  T* xout = static_cast<T*>(p.prev_out);
  T* mout = static_cast<T*>(p.mean_out);
  const long long B = p.B, D = p.D, nch = num_chunks(D);
  const float w = p.w;
  std::vector<float> part_sq(B * nch), part_kl(KL ? B * nch : 0);

#pragma omp parallel for schedule(static) if (B * D >= kParallelMinElements)
  for (long long task = 0; task < B * nch; ++task) {
    const long long b = task / nch, ch = task % nch;
    const long long lo = b * D + ch * kChunk;
    const long long hi = b * D + std::min(D, (ch + 1) * kChunk);
    const float a = p.a[b], c = p.c[b], s = p.s[b];
    float acc_sq[kLanes] = {0.f}, acc_kl[kLanes] = {0.f};
    // element j goes to lane (j - lo) % kLanes, always in the same order: the sum is fixed-order
    auto element = [&](long long j, int l) {
      float v = load_f<DT>(vc, j);
      if (GUID) v = guided(v, load_f<DT>(vu, j), w);
      const float mu = affine_mean(a, load_f<DT>(x, j), c, v);
      float xp;
      if (SAMPLE) {
        const T stored = to_storage<DT>(mu + s * load_f<DT>(eps, j));
        xout[j] = stored;
        xp = load_f<DT>(&stored, 0);  // score what was stored (rounded), as scoring mode will
      } else {
        xp = load_f<DT>(xin, j);
      }
      if (MEAN) mout[j] = to_storage<DT>(mu);
      const float d = xp - mu;
      acc_sq[l] += d * d;
      if (KL) {
        float vref = load_f<DT>(vr, j);
        if (GUID) vref = guided(vref, load_f<DT>(vru, j), w);
        const float dk = c * (v - vref);
        acc_kl[l] += dk * dk;
      }
    };
    long long j0 = lo;
    // full groups with a compile-time trip count, so that the lane loop becomes vector code
    for (; j0 + kLanes <= hi; j0 += kLanes)
      for (int l = 0; l < kLanes; ++l) element(j0 + l, l);
    for (int l = 0; j0 + l < hi; ++l) element(j0 + l, l);
    // fixed pairwise tree over the lanes
    for (int width = kLanes / 2; width > 0; width /= 2)
      for (int l = 0; l < width; ++l) {
        acc_sq[l] += acc_sq[l + width];
        if (KL) acc_kl[l] += acc_kl[l + width];
      }
    part_sq[task] = acc_sq[0];
    if (KL) part_kl[task] = acc_kl[0];
  }

  for (long long b = 0; b < B; ++b) {
    double sq = 0.0, dk = 0.0;
    for (long long ch = 0; ch < nch; ++ch) {
      sq += part_sq[b * nch + ch];
      if (KL) dk += part_kl[b * nch + ch];
    }
    finalize(sq, dk, p.s[b], D, p.reduce_sum, p.log_prob + b, KL ? p.kl + b : nullptr);
  }
}

// Element-wise, in two stages per chunk: the gradient of the mean (g_mu) and of the reference mean
// (g_mur) into small buffers, then one plain loop per wanted output, so that every loop vectorises
// whichever gradients are asked for.
template <int DT>
void store_scaled(typename Storage<DT>::type* out, const float* g, float k, long long n) {
  if (!out) return;
  for (long long i = 0; i < n; ++i) out[i] = to_storage<DT>(g[i] * k);
}

template <int DT, bool GUID, bool SAMPLE, bool KL>
void backward_impl(const BackwardArgs& p) {
  typedef typename Storage<DT>::type T;
  const T* x = static_cast<const T*>(p.x);
  const T* vc = static_cast<const T*>(p.v);
  const T* vu = static_cast<const T*>(p.v_uncond);
  const T* xp_in = static_cast<const T*>(p.prev);
  const T* vr = static_cast<const T*>(p.v_ref);
  const T* vru = static_cast<const T*>(p.v_ref_uncond);
  const T* g_prev = static_cast<const T*>(p.g_prev);
  const T* g_mean = static_cast<const T*>(p.g_mean);
  const long long B = p.B, D = p.D, nch = num_chunks(D);
  const float w = p.w;
  const float wc = GUID ? w : 1.f, wu = 1.f - w;
  // the log-prob term needs the residual only when scoring (in sampling mode it cancels)
  const bool need_r = !SAMPLE && p.g_log_prob != nullptr;
  const bool need_q = KL && p.g_kl != nullptr;

#pragma omp parallel for schedule(static) if (B * D >= kParallelMinElements)
  for (long long task = 0; task < B * nch; ++task) {
    const long long b = task / nch, ch = task % nch;
    const long long lo = b * D + ch * kChunk;
    const long long n = std::min(D, (ch + 1) * kChunk) - ch * kChunk;
    const float a = p.a[b], c = p.c[b], s = p.s[b];
    const float inv_s2 = 1.f / (s * s);
    const float f = p.reduce_sum ? 1.f : 1.f / static_cast<float>(D);
    const float gl = p.g_log_prob ? p.g_log_prob[b] * f : 0.f;
    const float gk = need_q ? p.g_kl[b] * f : 0.f;
    float g_mu[kChunk], g_mur[kChunk], g_r[kChunk];

    for (long long i = 0; i < n; ++i) g_mu[i] = g_mean ? load_f<DT>(g_mean + lo, i) : 0.f;
    if (SAMPLE && g_prev)
      for (long long i = 0; i < n; ++i) g_mu[i] += load_f<DT>(g_prev + lo, i);
    if (need_r) {
      for (long long i = 0; i < n; ++i) {
        float v = load_f<DT>(vc + lo, i);
        if (GUID) v = guided(v, load_f<DT>(vu + lo, i), w);
        const float mu = affine_mean(a, load_f<DT>(x + lo, i), c, v);
        const float gr = gl * ((load_f<DT>(xp_in + lo, i) - mu) * inv_s2);
        g_r[i] = gr;
        g_mu[i] += gr;
      }
    }
    if (need_q) {
      for (long long i = 0; i < n; ++i) {
        float v = load_f<DT>(vc + lo, i), vref = load_f<DT>(vr + lo, i);
        if (GUID) {
          v = guided(v, load_f<DT>(vu + lo, i), w);
          vref = guided(vref, load_f<DT>(vru + lo, i), w);
        }
        const float gq = gk * (c * (v - vref) * inv_s2);
        g_mu[i] += gq;
        g_mur[i] = -gq;
      }
    } else {
      for (long long i = 0; i < n; ++i) g_mur[i] = 0.f;
    }
    if (p.g_x) {
      T* gx = static_cast<T*>(p.g_x) + lo;
      for (long long i = 0; i < n; ++i) gx[i] = to_storage<DT>(a * (g_mu[i] + g_mur[i]));
    }
    store_scaled<DT>(static_cast<T*>(p.g_v) ? static_cast<T*>(p.g_v) + lo : nullptr, g_mu, c * wc, n);
    if (GUID) store_scaled<DT>(p.g_v_uncond ? static_cast<T*>(p.g_v_uncond) + lo : nullptr, g_mu, c * wu, n);
    if (!SAMPLE && p.g_prev_in) {
      T* gxp = static_cast<T*>(p.g_prev_in) + lo;
      for (long long i = 0; i < n; ++i) gxp[i] = to_storage<DT>(need_r ? -g_r[i] : 0.f);
    }
    if (KL) {
      store_scaled<DT>(p.g_v_ref ? static_cast<T*>(p.g_v_ref) + lo : nullptr, g_mur, c * wc, n);
      if (GUID) store_scaled<DT>(p.g_v_ref_uncond ? static_cast<T*>(p.g_v_ref_uncond) + lo : nullptr, g_mur, c * wu, n);
    }
  }
}

// Runtime flags become template arguments, so that the inner loops carry no branches.
template <int DT>
void forward_dtype(const ForwardArgs& p) {
  const bool g = p.v_uncond != nullptr, smp = p.noise != nullptr, kl = p.v_ref != nullptr, m = p.mean_out != nullptr;
  auto call = [&](auto G, auto S, auto K, auto M) { forward_impl<DT, G.value, S.value, K.value, M.value>(p); };
  auto l4 = [&](auto G, auto S, auto K) {
    m ? call(G, S, K, std::true_type{}) : call(G, S, K, std::false_type{});
  };
  auto l3 = [&](auto G, auto S) { kl ? l4(G, S, std::true_type{}) : l4(G, S, std::false_type{}); };
  auto l2 = [&](auto G) { smp ? l3(G, std::true_type{}) : l3(G, std::false_type{}); };
  g ? l2(std::true_type{}) : l2(std::false_type{});
}

template <int DT>
void backward_dtype(const BackwardArgs& p) {
  const bool g = p.v_uncond != nullptr, kl = p.v_ref != nullptr;
  auto call = [&](auto G, auto S, auto K) { backward_impl<DT, G.value, S.value, K.value>(p); };
  auto l3 = [&](auto G, auto S) { kl ? call(G, S, std::true_type{}) : call(G, S, std::false_type{}); };
  auto l2 = [&](auto G) { p.sampling ? l3(G, std::true_type{}) : l3(G, std::false_type{}); };
  g ? l2(std::true_type{}) : l2(std::false_type{});
}

}  // namespace

void DIFFRL_CPU_ENTRY(forward_cpu)(const ForwardArgs& p) {
  DIFFRL_DISPATCH_DTYPE(p.dtype, "sde_step", forward_dtype<DT>(p));
}

void DIFFRL_CPU_ENTRY(backward_cpu)(const BackwardArgs& p) {
  DIFFRL_DISPATCH_DTYPE(p.dtype, "sde_step", backward_dtype<DT>(p));
}

}  // namespace sde
}  // namespace diffrl
