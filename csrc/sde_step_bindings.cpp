// Python bindings of sde_step (registered into diffrl._C by bindings.cpp). Every entry point takes
// keyword arguments only, one per field of its argument struct (sde_step_api.h), by the field's name.
#include <pybind11/pybind11.h>

#include "kwargs.h"
#include "sde_step_api.h"

namespace py = pybind11;
using diffrl::KwargsReader;
using diffrl::sde::BackwardArgs;
using diffrl::sde::ForwardArgs;

namespace {

// GPU entry points also take the workspace (forward) and the stream; the CPU ones leave them 0.
template <bool GPU>
void read_forward(KwargsReader& r, ForwardArgs& p) {
  r("dtype", p.dtype)("B", p.B)("D", p.D)("x", p.x)("v", p.v)("v_uncond", p.v_uncond)("w", p.w)("noise", p.noise)
   ("prev_in", p.prev_in)("v_ref", p.v_ref)("v_ref_uncond", p.v_ref_uncond)("a", p.a)("c", p.c)("s", p.s)
   ("prev_out", p.prev_out)("mean_out", p.mean_out)("log_prob", p.log_prob)("kl", p.kl)("reduce_sum", p.reduce_sum);
  if (GPU) r("workspace", p.workspace)("stream", p.stream);
}

template <bool GPU>
void read_backward(KwargsReader& r, BackwardArgs& p) {
  r("dtype", p.dtype)("B", p.B)("D", p.D)("x", p.x)("v", p.v)("v_uncond", p.v_uncond)("w", p.w)("prev", p.prev)
   ("v_ref", p.v_ref)("v_ref_uncond", p.v_ref_uncond)("a", p.a)("c", p.c)("s", p.s)("g_log_prob", p.g_log_prob)
   ("g_kl", p.g_kl)("g_prev", p.g_prev)("g_mean", p.g_mean)("sampling", p.sampling)("reduce_sum", p.reduce_sum)
   ("g_x", p.g_x)("g_v", p.g_v)("g_v_uncond", p.g_v_uncond)("g_prev_in", p.g_prev_in)("g_v_ref", p.g_v_ref)
   ("g_v_ref_uncond", p.g_v_ref_uncond);
  if (GPU) r("stream", p.stream);
}

}  // namespace

namespace diffrl {

void bind_sde_step(py::module_& m) {
  // CPU kernels run long on large latents: the GIL is released while they do
  def_kwargs<ForwardArgs, read_forward<false>, sde::forward_cpu, true>(
      m, "sde_step_forward_cpu", "sde_step forward on CPU memory; keyword arguments: the fields of sde::ForwardArgs");
  def_kwargs<BackwardArgs, read_backward<false>, sde::backward_cpu, true>(
      m, "sde_step_backward_cpu",
      "sde_step backward on CPU memory; keyword arguments: the fields of sde::BackwardArgs");
#ifdef DIFFRL_WITH_CUDA
  // CUDA launches are asynchronous: no GIL release needed
  def_kwargs<ForwardArgs, read_forward<true>, sde::forward_cuda, false>(
      m, "sde_step_forward_cuda",
      "sde_step forward on the given stream; keyword arguments: the fields of sde::ForwardArgs");
  def_kwargs<BackwardArgs, read_backward<true>, sde::backward_cuda, false>(
      m, "sde_step_backward_cuda",
      "sde_step backward on the given stream; keyword arguments: the fields of sde::BackwardArgs");
#endif
}

}  // namespace diffrl
