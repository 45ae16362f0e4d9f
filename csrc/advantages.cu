// Host launchers of the group_advantages, win_rate and grpo_loss CUDA kernels
// (advantages_kernels.cuh) on the caller's stream. No host synchronisation.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "advantages_api.h"
#include "advantages_kernels.cuh"

namespace diffrl {
namespace adv {
namespace {

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("diffrl ") + what + ": " + cudaGetErrorString(err));
}

unsigned grid_for(long long n, int per_block) { return static_cast<unsigned>((n + per_block - 1) / per_block); }

template <int MODE, typename V>
void group_launch(const GroupArgs& p) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  const size_t smem = (MODE == kEach) ? static_cast<size_t>(2 * p.K) * sizeof(double) : 0;
  group_kernel<MODE, V><<<static_cast<unsigned>(p.B), kGroupThreads, smem, stream>>>(
      static_cast<const V*>(p.vals), p.K, p.weights, p.order, p.sorted_ids, p.B, p.global_std, p.step_weights, p.T,
      p.std_mode, p.eps, p.clip, p.has_clip, p.out);
  check_launch("group_advantages");
}

template <typename V>
void group_dtype(const GroupArgs& p) {
  switch (p.mode) {
    case kSingle: return group_launch<kSingle, V>(p);
    case kEach: return group_launch<kEach, V>(p);
    case kDense: return group_launch<kDense, V>(p);
  }
  throw std::invalid_argument("group_advantages: unknown mode");
}

}  // namespace

void group_advantages_cuda(const GroupArgs& p) {
  if (p.B == 0) return;
  if (p.B > 0x7fffffffLL) throw std::invalid_argument("group_advantages: more than 2^31 - 1 rows");
  if (p.mode == kEach && 2 * p.K * static_cast<long long>(sizeof(double)) > 48 * 1024)
    throw std::invalid_argument("group_advantages: too many reward heads for normalize_each");
  DIFFRL_DISPATCH_FLOAT_DOUBLE(p.vals_double, group_dtype<V>(p));
}

void win_rate_cuda(const WinRateArgs& p) {
  if (p.B == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  const unsigned grid = grid_for(p.B, kWinThreads);
  DIFFRL_DISPATCH_FLOAT_DOUBLE(p.vals_double, win_rate_kernel<V><<<grid, kWinThreads, 0, stream>>>(
                                                  static_cast<const V*>(p.vals), p.order, p.sorted_ids, p.B, p.out));
  check_launch("win_rate");
}

void loss_forward_cuda(const LossArgs& p) {
  if (p.N == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  const long long nch = num_loss_chunks(p.N);
  loss_partial_kernel<<<static_cast<unsigned>(nch), kLossThreads, 0, stream>>>(
      p.log_prob, p.old_log_prob, p.adv, p.adv_div, p.kl, p.N, p.lo, p.hi, p.workspace);
  check_launch("grpo_loss forward");
  loss_finalize_kernel<<<1, kLossThreads, 0, stream>>>(p.workspace, nch, p.N, p.kl_coef, p.loss, p.stats);
  check_launch("grpo_loss finalize");
}

void loss_backward_cuda(const LossBackwardArgs& p) {
  if (p.N == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  loss_backward_kernel<<<grid_for(p.N, kLossThreads), kLossThreads, 0, stream>>>(
      p.log_prob, p.old_log_prob, p.adv, p.adv_div, p.N, p.lo, p.hi, p.g_loss, p.g_log_prob);
  check_launch("grpo_loss backward");
}

}  // namespace adv
}  // namespace diffrl
