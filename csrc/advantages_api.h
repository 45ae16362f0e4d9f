// Host-side entry points of group_advantages, win_rate and grpo_loss, called by
// advantages_bindings.cpp. Pointers are raw device or host addresses handed over from Python
// (torch's data_ptr()); nullptr means "absent". Python validates every argument first, and passes
// each field by its name here (diffrl/ops/_native_backend.py, and the cupy backend's launchers
// take the same names): a field renamed here must be renamed there.
#pragma once
#include <cstdint>

namespace diffrl {
namespace adv {

struct GroupArgs {
  int vals_double;            // 1: vals are float64, 0: float32
  long long B, K;             // rows; columns of vals (1 for [B] rewards)
  const void* vals;           // [B, K] rewards, row-major
  const double* weights;      // [K] reward weights (mode kSingle with K heads, kEach), or null
  const long long* order;     // [B] rows sorted by group id (stable)
  const long long* sorted_ids;// [B] the ids in that order
  const double* global_std;   // [C] population std of each statistic column over the batch (std "global"), or null
  const double* step_weights; // [T] or null
  long long T;                // output columns (1 without num_steps; K in mode kDense)
  int mode;                   // adv::Mode
  int std_mode;               // adv::StdMode
  double eps;
  double clip;                // used when has_clip
  int has_clip;
  float* out;                 // [B, T]
  std::uintptr_t stream;      // CUDA stream
};

struct WinRateArgs {
  int vals_double;
  long long B;
  const void* vals;            // [B] scores
  const long long* order;      // [B] rows sorted by (group id, score)
  const long long* sorted_ids; // [B]
  float* out;                  // [B]
  std::uintptr_t stream;
};

struct LossArgs {
  long long N;                 // elements (B or B*T)
  long long adv_div;           // advantage index = i / adv_div (T when advantages are [B] and log-probs [B, T])
  const float* log_prob;
  const float* old_log_prob;
  const float* adv;
  const float* kl;             // [N] or null
  float lo, hi;                // ratio bounds 1 - eps_low, 1 + eps_high
  float kl_coef;
  float* loss;                 // [1]
  float* stats;                // [kNumStats]
  double* workspace;           // CUDA: kLossParts * num_loss_chunks(N) doubles (advantages.h); CPU: unused
  std::uintptr_t stream;
};

struct LossBackwardArgs {
  long long N, adv_div;
  const float* log_prob;
  const float* old_log_prob;
  const float* adv;
  float lo, hi;
  const float* g_loss;         // [1] upstream gradient of the loss
  float* g_log_prob;           // [N]
  std::uintptr_t stream;
};

void group_advantages_cpu(const GroupArgs& p);
void win_rate_cpu(const WinRateArgs& p);
void loss_forward_cpu(const LossArgs& p);
void loss_backward_cpu(const LossBackwardArgs& p);
#ifdef DIFFRL_WITH_CUDA
void group_advantages_cuda(const GroupArgs& p);
void win_rate_cuda(const WinRateArgs& p);
void loss_forward_cuda(const LossArgs& p);
void loss_backward_cuda(const LossBackwardArgs& p);
#endif

}  // namespace adv
}  // namespace diffrl
