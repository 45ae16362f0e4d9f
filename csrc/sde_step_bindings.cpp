// Python bindings of sde_step (registered into diffrl._C by bindings.cpp).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "sde_step_api.h"

namespace py = pybind11;
using diffrl::sde::BackwardArgs;
using diffrl::sde::ForwardArgs;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

ForwardArgs forward_args(int dtype, long long B, long long D, std::uintptr_t x, std::uintptr_t v,
                         std::uintptr_t v_uncond, float w, std::uintptr_t noise, std::uintptr_t prev_in,
                         std::uintptr_t v_ref, std::uintptr_t v_ref_uncond, std::uintptr_t a, std::uintptr_t c,
                         std::uintptr_t s, std::uintptr_t prev_out, std::uintptr_t mean_out, std::uintptr_t log_prob,
                         std::uintptr_t kl, std::uintptr_t workspace, int reduce_sum, std::uintptr_t stream) {
  ForwardArgs p;
  p.dtype = dtype;
  p.B = B;
  p.D = D;
  p.x = ptr<const void>(x);
  p.v = ptr<const void>(v);
  p.v_uncond = ptr<const void>(v_uncond);
  p.w = w;
  p.noise = ptr<const void>(noise);
  p.prev_in = ptr<const void>(prev_in);
  p.v_ref = ptr<const void>(v_ref);
  p.v_ref_uncond = ptr<const void>(v_ref_uncond);
  p.a = ptr<const float>(a);
  p.c = ptr<const float>(c);
  p.s = ptr<const float>(s);
  p.prev_out = ptr<void>(prev_out);
  p.mean_out = ptr<void>(mean_out);
  p.log_prob = ptr<float>(log_prob);
  p.kl = ptr<float>(kl);
  p.workspace = ptr<float>(workspace);
  p.reduce_sum = reduce_sum;
  p.stream = stream;
  return p;
}

BackwardArgs backward_args(int dtype, long long B, long long D, std::uintptr_t x, std::uintptr_t v,
                           std::uintptr_t v_uncond, float w, std::uintptr_t prev, std::uintptr_t v_ref,
                           std::uintptr_t v_ref_uncond, std::uintptr_t a, std::uintptr_t c, std::uintptr_t s,
                           std::uintptr_t g_log_prob, std::uintptr_t g_kl, std::uintptr_t g_prev,
                           std::uintptr_t g_mean, int sampling, int reduce_sum, std::uintptr_t g_x,
                           std::uintptr_t g_v, std::uintptr_t g_v_uncond, std::uintptr_t g_prev_in,
                           std::uintptr_t g_v_ref, std::uintptr_t g_v_ref_uncond, std::uintptr_t stream) {
  BackwardArgs p;
  p.dtype = dtype;
  p.B = B;
  p.D = D;
  p.x = ptr<const void>(x);
  p.v = ptr<const void>(v);
  p.v_uncond = ptr<const void>(v_uncond);
  p.w = w;
  p.prev = ptr<const void>(prev);
  p.v_ref = ptr<const void>(v_ref);
  p.v_ref_uncond = ptr<const void>(v_ref_uncond);
  p.a = ptr<const float>(a);
  p.c = ptr<const float>(c);
  p.s = ptr<const float>(s);
  p.g_log_prob = ptr<const float>(g_log_prob);
  p.g_kl = ptr<const float>(g_kl);
  p.g_prev = ptr<const void>(g_prev);
  p.g_mean = ptr<const void>(g_mean);
  p.sampling = sampling;
  p.reduce_sum = reduce_sum;
  p.g_x = ptr<void>(g_x);
  p.g_v = ptr<void>(g_v);
  p.g_v_uncond = ptr<void>(g_v_uncond);
  p.g_prev_in = ptr<void>(g_prev_in);
  p.g_v_ref = ptr<void>(g_v_ref);
  p.g_v_ref_uncond = ptr<void>(g_v_ref_uncond);
  p.stream = stream;
  return p;
}

}  // namespace

namespace diffrl {

void bind_sde_step(py::module_& m) {
  m.def(
      "sde_step_forward_cpu",
      [](int dtype, long long B, long long D, std::uintptr_t x, std::uintptr_t v, std::uintptr_t vu, float w,
         std::uintptr_t noise, std::uintptr_t prev_in, std::uintptr_t vr, std::uintptr_t vru, std::uintptr_t a,
         std::uintptr_t c, std::uintptr_t s, std::uintptr_t prev_out, std::uintptr_t mean_out,
         std::uintptr_t log_prob, std::uintptr_t kl, int reduce_sum) {
        ForwardArgs p = forward_args(dtype, B, D, x, v, vu, w, noise, prev_in, vr, vru, a, c, s, prev_out, mean_out,
                                     log_prob, kl, 0, reduce_sum, 0);
        py::gil_scoped_release nogil;
        diffrl::sde::forward_cpu(p);
      });
  m.def(
      "sde_step_backward_cpu",
      [](int dtype, long long B, long long D, std::uintptr_t x, std::uintptr_t v, std::uintptr_t vu, float w,
         std::uintptr_t prev, std::uintptr_t vr, std::uintptr_t vru, std::uintptr_t a, std::uintptr_t c,
         std::uintptr_t s, std::uintptr_t g_logp, std::uintptr_t g_kl, std::uintptr_t g_prev, std::uintptr_t g_mean,
         int sampling, int reduce_sum, std::uintptr_t gx, std::uintptr_t gv, std::uintptr_t gvu, std::uintptr_t gxp,
         std::uintptr_t gvr, std::uintptr_t gvru) {
        BackwardArgs p = backward_args(dtype, B, D, x, v, vu, w, prev, vr, vru, a, c, s, g_logp, g_kl, g_prev, g_mean,
                                       sampling, reduce_sum, gx, gv, gvu, gxp, gvr, gvru, 0);
        py::gil_scoped_release nogil;
        diffrl::sde::backward_cpu(p);
      });

#ifdef DIFFRL_WITH_CUDA
  m.def("sde_step_forward_cuda",
        [](int dtype, long long B, long long D, std::uintptr_t x, std::uintptr_t v, std::uintptr_t vu, float w,
           std::uintptr_t noise, std::uintptr_t prev_in, std::uintptr_t vr, std::uintptr_t vru, std::uintptr_t a,
           std::uintptr_t c, std::uintptr_t s, std::uintptr_t prev_out, std::uintptr_t mean_out,
           std::uintptr_t log_prob, std::uintptr_t kl, std::uintptr_t workspace, int reduce_sum,
           std::uintptr_t stream) {
          diffrl::sde::forward_cuda(forward_args(dtype, B, D, x, v, vu, w, noise, prev_in, vr, vru, a, c, s, prev_out,
                                                 mean_out, log_prob, kl, workspace, reduce_sum, stream));
        });
  m.def("sde_step_backward_cuda",
        [](int dtype, long long B, long long D, std::uintptr_t x, std::uintptr_t v, std::uintptr_t vu, float w,
           std::uintptr_t prev, std::uintptr_t vr, std::uintptr_t vru, std::uintptr_t a, std::uintptr_t c,
           std::uintptr_t s, std::uintptr_t g_logp, std::uintptr_t g_kl, std::uintptr_t g_prev,
           std::uintptr_t g_mean, int sampling, int reduce_sum, std::uintptr_t gx, std::uintptr_t gv,
           std::uintptr_t gvu, std::uintptr_t gxp, std::uintptr_t gvr, std::uintptr_t gvru, std::uintptr_t stream) {
          diffrl::sde::backward_cuda(backward_args(dtype, B, D, x, v, vu, w, prev, vr, vru, a, c, s, g_logp, g_kl,
                                                   g_prev, g_mean, sampling, reduce_sum, gx, gv, gvu, gxp, gvr, gvru,
                                                   stream));
        });
#endif
}

}  // namespace diffrl
