// Python bindings of diffusion_dpo_loss (registered into diffrl._C by bindings.cpp). Keyword
// arguments only, one per field of the argument struct (dpo_loss_api.h), by the field's name.
#include <pybind11/pybind11.h>

#include "dpo_loss_api.h"
#include "kwargs.h"

namespace py = pybind11;
using diffrl::KwargsReader;
using diffrl::dpo::DpoArgs;
using diffrl::dpo::DpoBackwardArgs;

namespace {

// GPU entry points also take the stream (and the forward a workspace); the CPU ones leave them 0.
template <bool GPU>
void read_forward(KwargsReader& r, DpoArgs& p) {
  r("dtype", p.dtype)("B", p.B)("D", p.D)("policy_w", p.policy_w)("policy_l", p.policy_l)("ref_w", p.ref_w)
   ("ref_l", p.ref_l)("target_w", p.target_w)("target_l", p.target_l)("weights", p.weights)("beta", p.beta)
   ("loss", p.loss)("stats", p.stats)("coef", p.coef);
  if (GPU) r("workspace", p.workspace)("stream", p.stream);
}

template <bool GPU>
void read_backward(KwargsReader& r, DpoBackwardArgs& p) {
  r("dtype", p.dtype)("B", p.B)("D", p.D)("policy_w", p.policy_w)("policy_l", p.policy_l)("target_w", p.target_w)
   ("target_l", p.target_l)("coef", p.coef)("g_loss", p.g_loss)("g_policy_w", p.g_policy_w)
   ("g_policy_l", p.g_policy_l);
  if (GPU) r("stream", p.stream);
}

}  // namespace

namespace diffrl {

void bind_dpo_loss(py::module_& m) {
  def_kwargs<DpoArgs, read_forward<false>, dpo::dpo_loss_forward_cpu, true>(
      m, "dpo_loss_forward_cpu",
      "diffusion_dpo_loss forward on CPU memory; keyword arguments: the fields of dpo::DpoArgs");
  def_kwargs<DpoBackwardArgs, read_backward<false>, dpo::dpo_loss_backward_cpu, true>(
      m, "dpo_loss_backward_cpu",
      "diffusion_dpo_loss backward on CPU memory; keyword arguments: the fields of dpo::DpoBackwardArgs");
#ifdef DIFFRL_WITH_CUDA
  def_kwargs<DpoArgs, read_forward<true>, dpo::dpo_loss_forward_cuda, false>(
      m, "dpo_loss_forward_cuda",
      "diffusion_dpo_loss forward on the given stream; keyword arguments: the fields of dpo::DpoArgs");
  def_kwargs<DpoBackwardArgs, read_backward<true>, dpo::dpo_loss_backward_cuda, false>(
      m, "dpo_loss_backward_cuda",
      "diffusion_dpo_loss backward on the given stream; keyword arguments: the fields of dpo::DpoBackwardArgs");
#endif
}

}  // namespace diffrl
