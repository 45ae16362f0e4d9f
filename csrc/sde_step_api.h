// Host-side entry points of sde_step, called by sde_step_bindings.cpp. Pointers are raw device or
// host addresses handed over from Python (torch's data_ptr()); nullptr means "absent". Python
// passes each field by its name here (diffrl/ops/_native_backend.py, and the cupy backend's
// launchers take the same names): a field renamed here must be renamed there.
#pragma once
#include <cstdint>

namespace diffrl {
namespace sde {

struct ForwardArgs {
  int dtype;         // diffrl::DType of every [B, D] tensor
  long long B, D;    // samples, elements per sample
  const void* x;             // sample
  const void* v;             // model output (the conditional one under guidance)
  const void* v_uncond;      // unconditional output, or null: no guidance
  float w;                   // guidance scale
  const void* noise;         // sampling mode: eps
  const void* prev_in;       // scoring mode: the stored x'
  const void* v_ref;         // reference model output, or null: no KL
  const void* v_ref_uncond;  // its unconditional output (with guidance)
  const float* a;            // [B] coefficients, float32
  const float* c;
  const float* s;
  void* prev_out;   // sampling mode: x' (input dtype)
  void* mean_out;   // mu, or null
  float* log_prob;  // [B]
  float* kl;        // [B] or null
  float* workspace; // CUDA: 2 * B * num_chunks(D) floats; CPU: unused
  int reduce_sum;   // 1: sum over elements, 0: mean
  std::uintptr_t stream;  // CUDA stream
};

struct BackwardArgs {
  int dtype;
  long long B, D;
  const void* x;
  const void* v;
  const void* v_uncond;
  float w;
  const void* prev;          // scoring mode: the given x' (unused in sampling mode)
  const void* v_ref;
  const void* v_ref_uncond;
  const float* a;
  const float* c;
  const float* s;
  const float* g_log_prob;   // [B] or null
  const float* g_kl;         // [B] or null
  const void* g_prev;        // [B, D] or null (sampling mode output x')
  const void* g_mean;        // [B, D] or null
  int sampling;
  int reduce_sum;
  void* g_x;                 // outputs, each null when not wanted
  void* g_v;
  void* g_v_uncond;
  void* g_prev_in;
  void* g_v_ref;
  void* g_v_ref_uncond;
  std::uintptr_t stream;
};

void forward_cpu(const ForwardArgs& p);
void backward_cpu(const BackwardArgs& p);
#ifdef DIFFRL_WITH_CUDA
void forward_cuda(const ForwardArgs& p);
void backward_cuda(const BackwardArgs& p);
#endif

}  // namespace sde
}  // namespace diffrl
