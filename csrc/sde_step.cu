// Host launchers of the sde_step CUDA kernels (sde_step_kernels.cuh) on the caller's stream.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "sde_step_api.h"
#include "sde_step_kernels.cuh"

namespace diffrl {
namespace sde {
namespace {

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("diffrl sde_step ") + what + ": " + cudaGetErrorString(err));
}

template <int DT>
void forward_dtype(const ForwardArgs& p) {
  typedef typename Storage<DT>::type T;
  const long long nch = num_chunks(p.D);
  const long long tasks = p.B * nch;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  float* part_sq = p.workspace;
  float* part_kl = p.workspace + tasks;
  auto launch = [&](auto G, auto S, auto K, auto M) {
    forward_kernel<DT, G.value, S.value, K.value, M.value><<<static_cast<unsigned>(tasks), kThreads, 0, stream>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.v), static_cast<const T*>(p.v_uncond), p.w,
        static_cast<const T*>(p.noise), static_cast<const T*>(p.prev_in), static_cast<const T*>(p.v_ref),
        static_cast<const T*>(p.v_ref_uncond), p.a, p.c, p.s, static_cast<T*>(p.prev_out),
        static_cast<T*>(p.mean_out), part_sq, part_kl, p.D, nch);
  };
  const bool g = p.v_uncond != nullptr, smp = p.noise != nullptr, kl = p.v_ref != nullptr, m = p.mean_out != nullptr;
  auto l4 = [&](auto G, auto S, auto K) { m ? launch(G, S, K, std::true_type{}) : launch(G, S, K, std::false_type{}); };
  auto l3 = [&](auto G, auto S) { kl ? l4(G, S, std::true_type{}) : l4(G, S, std::false_type{}); };
  auto l2 = [&](auto G) { smp ? l3(G, std::true_type{}) : l3(G, std::false_type{}); };
  g ? l2(std::true_type{}) : l2(std::false_type{});
  check_launch("forward");
  finalize_kernel<<<static_cast<unsigned>((p.B + kFinalizeThreads - 1) / kFinalizeThreads), kFinalizeThreads, 0,
                    stream>>>(
      part_sq, kl ? part_kl : nullptr, p.s, p.log_prob, p.kl, p.B, p.D, nch, p.reduce_sum);
  check_launch("finalize");
}

template <int DT>
void backward_dtype(const BackwardArgs& p) {
  typedef typename Storage<DT>::type T;
  const long long nch = num_chunks(p.D);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  auto launch = [&](auto G, auto S, auto K) {
    backward_kernel<DT, G.value, S.value, K.value><<<static_cast<unsigned>(p.B * nch), kThreads, 0, stream>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.v), static_cast<const T*>(p.v_uncond), p.w,
        static_cast<const T*>(p.prev), static_cast<const T*>(p.v_ref), static_cast<const T*>(p.v_ref_uncond), p.a,
        p.c, p.s, p.g_log_prob, p.g_kl, static_cast<const T*>(p.g_prev), static_cast<const T*>(p.g_mean),
        static_cast<T*>(p.g_x), static_cast<T*>(p.g_v), static_cast<T*>(p.g_v_uncond), static_cast<T*>(p.g_prev_in),
        static_cast<T*>(p.g_v_ref), static_cast<T*>(p.g_v_ref_uncond), p.D, nch, p.reduce_sum);
  };
  const bool g = p.v_uncond != nullptr, kl = p.v_ref != nullptr;
  auto l3 = [&](auto G, auto S) { kl ? launch(G, S, std::true_type{}) : launch(G, S, std::false_type{}); };
  auto l2 = [&](auto G) { p.sampling ? l3(G, std::true_type{}) : l3(G, std::false_type{}); };
  g ? l2(std::true_type{}) : l2(std::false_type{});
  check_launch("backward");
}

}  // namespace

void forward_cuda(const ForwardArgs& p) {
  if (p.B == 0 || p.D == 0) return;
  DIFFRL_DISPATCH_DTYPE(p.dtype, "sde_step", forward_dtype<DT>(p));
}

void backward_cuda(const BackwardArgs& p) {
  if (p.B == 0 || p.D == 0) return;
  DIFFRL_DISPATCH_DTYPE(p.dtype, "sde_step", backward_dtype<DT>(p));
}

}  // namespace sde
}  // namespace diffrl
