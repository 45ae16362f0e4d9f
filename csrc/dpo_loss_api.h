// Host-side entry points of diffusion_dpo_loss, called by dpo_loss_bindings.cpp. Pointers are raw
// device or host addresses handed over from Python (torch's data_ptr()); nullptr means "absent".
// Python validates every argument first and passes each field by its name here
// (diffrl/ops/_native_backend.py, and the cupy backend's launchers take the same names).
#pragma once
#include <cstdint>

namespace diffrl {
namespace dpo {

struct DpoArgs {
  int dtype;                   // diffrl::DType of the six inputs
  long long B, D;              // pairs; elements per sample
  const void* policy_w;        // [B, D] each, contiguous
  const void* policy_l;
  const void* ref_w;
  const void* ref_l;
  const void* target_w;
  const void* target_l;
  const float* weights;        // [B] or null (all 1)
  double beta;
  float* loss;                 // [1]
  float* stats;                // [kDpoNumStats]
  float* coef;                 // [B] the backward's per-sample factor (dpo_loss.h)
  double* workspace;           // CUDA: kDpoParts * B * num_dpo_chunks(D) doubles; CPU: unused
  std::uintptr_t stream;       // CUDA stream
};

struct DpoBackwardArgs {
  int dtype;
  long long B, D;
  const void* policy_w;
  const void* policy_l;
  const void* target_w;
  const void* target_l;
  const float* coef;           // [B] from the forward
  const float* g_loss;         // [1] upstream gradient of the loss
  void* g_policy_w;            // [B, D] in the input dtype, or null (not wanted)
  void* g_policy_l;
  std::uintptr_t stream;
};

void dpo_loss_forward_cpu(const DpoArgs& p);
void dpo_loss_backward_cpu(const DpoBackwardArgs& p);
#ifdef DIFFRL_WITH_CUDA
void dpo_loss_forward_cuda(const DpoArgs& p);
void dpo_loss_backward_cuda(const DpoBackwardArgs& p);
#endif

}  // namespace dpo
}  // namespace diffrl
