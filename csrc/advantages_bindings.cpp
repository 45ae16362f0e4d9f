// Python bindings of group_advantages, win_rate and grpo_loss (registered into diffrl._C by
// bindings.cpp). Every entry point takes keyword arguments only, one per field of its argument
// struct (advantages_api.h), by the field's name.
#include <pybind11/pybind11.h>

#include "advantages_api.h"
#include "kwargs.h"

namespace py = pybind11;
using diffrl::KwargsReader;
using diffrl::adv::GroupArgs;
using diffrl::adv::LossArgs;
using diffrl::adv::LossBackwardArgs;
using diffrl::adv::WinRateArgs;

namespace {

// GPU entry points also take the stream (and the loss forward a workspace); the CPU ones leave them 0.
template <bool GPU>
void read_group(KwargsReader& r, GroupArgs& p) {
  r("vals_double", p.vals_double)("B", p.B)("K", p.K)("vals", p.vals)("weights", p.weights)("order", p.order)
   ("sorted_ids", p.sorted_ids)("global_std", p.global_std)("step_weights", p.step_weights)("T", p.T)("mode", p.mode)
   ("std_mode", p.std_mode)("eps", p.eps)("clip", p.clip)("has_clip", p.has_clip)("out", p.out);
  if (GPU) r("stream", p.stream);
}

template <bool GPU>
void read_win_rate(KwargsReader& r, WinRateArgs& p) {
  r("vals_double", p.vals_double)("B", p.B)("vals", p.vals)("order", p.order)("sorted_ids", p.sorted_ids)
   ("out", p.out);
  if (GPU) r("stream", p.stream);
}

template <bool GPU>
void read_loss(KwargsReader& r, LossArgs& p) {
  r("N", p.N)("adv_div", p.adv_div)("log_prob", p.log_prob)("old_log_prob", p.old_log_prob)("adv", p.adv)
   ("kl", p.kl)("lo", p.lo)("hi", p.hi)("kl_coef", p.kl_coef)("loss", p.loss)("stats", p.stats);
  if (GPU) r("workspace", p.workspace)("stream", p.stream);
}

template <bool GPU>
void read_loss_backward(KwargsReader& r, LossBackwardArgs& p) {
  r("N", p.N)("adv_div", p.adv_div)("log_prob", p.log_prob)("old_log_prob", p.old_log_prob)("adv", p.adv)
   ("lo", p.lo)("hi", p.hi)("g_loss", p.g_loss)("g_log_prob", p.g_log_prob);
  if (GPU) r("stream", p.stream);
}

}  // namespace

namespace diffrl {

void bind_advantages(py::module_& m) {
  // CPU kernels: the GIL is released while they run; CUDA launches are asynchronous
  def_kwargs<GroupArgs, read_group<false>, adv::group_advantages_cpu, true>(
      m, "group_advantages_cpu", "group_advantages on CPU memory; keyword arguments: the fields of adv::GroupArgs");
  def_kwargs<WinRateArgs, read_win_rate<false>, adv::win_rate_cpu, true>(
      m, "win_rate_cpu", "win_rate on CPU memory; keyword arguments: the fields of adv::WinRateArgs");
  def_kwargs<LossArgs, read_loss<false>, adv::loss_forward_cpu, true>(
      m, "grpo_loss_forward_cpu", "grpo_loss forward on CPU memory; keyword arguments: the fields of adv::LossArgs");
  def_kwargs<LossBackwardArgs, read_loss_backward<false>, adv::loss_backward_cpu, true>(
      m, "grpo_loss_backward_cpu",
      "grpo_loss backward on CPU memory; keyword arguments: the fields of adv::LossBackwardArgs");
#ifdef DIFFRL_WITH_CUDA
  def_kwargs<GroupArgs, read_group<true>, adv::group_advantages_cuda, false>(
      m, "group_advantages_cuda",
      "group_advantages on the given stream; keyword arguments: the fields of adv::GroupArgs");
  def_kwargs<WinRateArgs, read_win_rate<true>, adv::win_rate_cuda, false>(
      m, "win_rate_cuda", "win_rate on the given stream; keyword arguments: the fields of adv::WinRateArgs");
  def_kwargs<LossArgs, read_loss<true>, adv::loss_forward_cuda, false>(
      m, "grpo_loss_forward_cuda",
      "grpo_loss forward on the given stream; keyword arguments: the fields of adv::LossArgs");
  def_kwargs<LossBackwardArgs, read_loss_backward<true>, adv::loss_backward_cuda, false>(
      m, "grpo_loss_backward_cuda",
      "grpo_loss backward on the given stream; keyword arguments: the fields of adv::LossBackwardArgs");
#endif
}

}  // namespace diffrl
