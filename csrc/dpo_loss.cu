// Host launchers of the diffusion_dpo_loss CUDA kernels (dpo_loss_kernels.cuh) on the caller's
// stream. No host synchronisation.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "dpo_loss_api.h"
#include "dpo_loss_kernels.cuh"

namespace diffrl {
namespace dpo {
namespace {

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("diffrl ") + what + ": " + cudaGetErrorString(err));
}

template <int DT>
void forward_launch(const DpoArgs& p) {
  using S = typename Storage<DT>::type;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  const long long nch = num_dpo_chunks(p.D);
  dpo_partial_kernel<DT><<<static_cast<unsigned>(p.B * nch), kDpoThreads, 0, stream>>>(
      static_cast<const S*>(p.policy_w), static_cast<const S*>(p.policy_l), static_cast<const S*>(p.ref_w),
      static_cast<const S*>(p.ref_l), static_cast<const S*>(p.target_w), static_cast<const S*>(p.target_l), p.D, nch,
      p.workspace);
  check_launch("diffusion_dpo_loss forward");
  dpo_finalize_kernel<<<1, kDpoThreads, 0, stream>>>(p.workspace, p.weights, p.B, p.D, nch, p.beta, p.loss, p.stats,
                                                     p.coef);
  check_launch("diffusion_dpo_loss finalize");
}

template <int DT>
void backward_launch(const DpoBackwardArgs& p) {
  using S = typename Storage<DT>::type;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(p.stream);
  const long long nblk = (p.D + kDpoBackwardThreads - 1) / kDpoBackwardThreads;
  dpo_backward_kernel<DT><<<static_cast<unsigned>(p.B * nblk), kDpoBackwardThreads, 0, stream>>>(
      static_cast<const S*>(p.policy_w), static_cast<const S*>(p.policy_l), static_cast<const S*>(p.target_w),
      static_cast<const S*>(p.target_l), p.coef, p.g_loss, p.D, nblk, static_cast<S*>(p.g_policy_w),
      static_cast<S*>(p.g_policy_l));
  check_launch("diffusion_dpo_loss backward");
}

}  // namespace

void dpo_loss_forward_cuda(const DpoArgs& p) {
  if (p.B == 0 || p.D == 0) return;
  if (p.B * num_dpo_chunks(p.D) > 0x7fffffffLL) throw std::invalid_argument("diffusion_dpo_loss: too many chunks");
  DIFFRL_DISPATCH_DTYPE(p.dtype, "diffusion_dpo_loss", forward_launch<DT>(p));
}

void dpo_loss_backward_cuda(const DpoBackwardArgs& p) {
  if (p.B == 0 || p.D == 0) return;
  if (p.B * ((p.D + kDpoBackwardThreads - 1) / kDpoBackwardThreads) > 0x7fffffffLL)
    throw std::invalid_argument("diffusion_dpo_loss backward: too many blocks");
  DIFFRL_DISPATCH_DTYPE(p.dtype, "diffusion_dpo_loss backward", backward_launch<DT>(p));
}

}  // namespace dpo
}  // namespace diffrl
