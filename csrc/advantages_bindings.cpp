// Python bindings of group_advantages, win_rate and grpo_loss (registered into diffrl._C by bindings.cpp).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "advantages_api.h"

namespace py = pybind11;
using diffrl::adv::GroupArgs;
using diffrl::adv::LossArgs;
using diffrl::adv::LossBackwardArgs;
using diffrl::adv::WinRateArgs;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

GroupArgs group_args(int vals_double, long long B, long long K, std::uintptr_t vals, std::uintptr_t weights,
                     std::uintptr_t order, std::uintptr_t sorted_ids, std::uintptr_t global_std,
                     std::uintptr_t step_weights, long long T, int mode, int std_mode, double eps, double clip,
                     int has_clip, std::uintptr_t out, std::uintptr_t stream) {
  GroupArgs p;
  p.vals_double = vals_double;
  p.B = B;
  p.K = K;
  p.vals = ptr<const void>(vals);
  p.weights = ptr<const double>(weights);
  p.order = ptr<const long long>(order);
  p.sorted_ids = ptr<const long long>(sorted_ids);
  p.global_std = ptr<const double>(global_std);
  p.step_weights = ptr<const double>(step_weights);
  p.T = T;
  p.mode = mode;
  p.std_mode = std_mode;
  p.eps = eps;
  p.clip = clip;
  p.has_clip = has_clip;
  p.out = ptr<float>(out);
  p.stream = stream;
  return p;
}

WinRateArgs win_args(int vals_double, long long B, std::uintptr_t vals, std::uintptr_t order,
                     std::uintptr_t sorted_ids, std::uintptr_t out, std::uintptr_t stream) {
  WinRateArgs p;
  p.vals_double = vals_double;
  p.B = B;
  p.vals = ptr<const void>(vals);
  p.order = ptr<const long long>(order);
  p.sorted_ids = ptr<const long long>(sorted_ids);
  p.out = ptr<float>(out);
  p.stream = stream;
  return p;
}

LossArgs loss_args(long long N, long long adv_div, std::uintptr_t logp, std::uintptr_t old, std::uintptr_t adv,
                   std::uintptr_t kl, float lo, float hi, float kl_coef, std::uintptr_t loss, std::uintptr_t stats,
                   std::uintptr_t workspace, std::uintptr_t stream) {
  LossArgs p;
  p.N = N;
  p.adv_div = adv_div;
  p.log_prob = ptr<const float>(logp);
  p.old_log_prob = ptr<const float>(old);
  p.adv = ptr<const float>(adv);
  p.kl = ptr<const float>(kl);
  p.lo = lo;
  p.hi = hi;
  p.kl_coef = kl_coef;
  p.loss = ptr<float>(loss);
  p.stats = ptr<float>(stats);
  p.workspace = ptr<double>(workspace);
  p.stream = stream;
  return p;
}

LossBackwardArgs loss_bwd_args(long long N, long long adv_div, std::uintptr_t logp, std::uintptr_t old,
                               std::uintptr_t adv, float lo, float hi, std::uintptr_t g_loss, std::uintptr_t g_logp,
                               std::uintptr_t stream) {
  LossBackwardArgs p;
  p.N = N;
  p.adv_div = adv_div;
  p.log_prob = ptr<const float>(logp);
  p.old_log_prob = ptr<const float>(old);
  p.adv = ptr<const float>(adv);
  p.lo = lo;
  p.hi = hi;
  p.g_loss = ptr<const float>(g_loss);
  p.g_log_prob = ptr<float>(g_logp);
  p.stream = stream;
  return p;
}

}  // namespace

namespace diffrl {

void bind_advantages(py::module_& m) {
  m.def("group_advantages_cpu",
        [](int vals_double, long long B, long long K, std::uintptr_t vals, std::uintptr_t weights,
           std::uintptr_t order, std::uintptr_t sorted_ids, std::uintptr_t global_std, std::uintptr_t step_weights,
           long long T, int mode, int std_mode, double eps, double clip, int has_clip, std::uintptr_t out) {
          GroupArgs p = group_args(vals_double, B, K, vals, weights, order, sorted_ids, global_std, step_weights, T,
                                   mode, std_mode, eps, clip, has_clip, out, 0);
          py::gil_scoped_release nogil;
          diffrl::adv::group_advantages_cpu(p);
        });
  m.def("win_rate_cpu", [](int vals_double, long long B, std::uintptr_t vals, std::uintptr_t order,
                           std::uintptr_t sorted_ids, std::uintptr_t out) {
    WinRateArgs p = win_args(vals_double, B, vals, order, sorted_ids, out, 0);
    py::gil_scoped_release nogil;
    diffrl::adv::win_rate_cpu(p);
  });
  m.def("grpo_loss_forward_cpu",
        [](long long N, long long adv_div, std::uintptr_t logp, std::uintptr_t old, std::uintptr_t adv,
           std::uintptr_t kl, float lo, float hi, float kl_coef, std::uintptr_t loss, std::uintptr_t stats) {
          LossArgs p = loss_args(N, adv_div, logp, old, adv, kl, lo, hi, kl_coef, loss, stats, 0, 0);
          py::gil_scoped_release nogil;
          diffrl::adv::loss_forward_cpu(p);
        });
  m.def("grpo_loss_backward_cpu",
        [](long long N, long long adv_div, std::uintptr_t logp, std::uintptr_t old, std::uintptr_t adv, float lo,
           float hi, std::uintptr_t g_loss, std::uintptr_t g_logp) {
          LossBackwardArgs p = loss_bwd_args(N, adv_div, logp, old, adv, lo, hi, g_loss, g_logp, 0);
          py::gil_scoped_release nogil;
          diffrl::adv::loss_backward_cpu(p);
        });

#ifdef DIFFRL_WITH_CUDA
  m.def("group_advantages_cuda",
        [](int vals_double, long long B, long long K, std::uintptr_t vals, std::uintptr_t weights,
           std::uintptr_t order, std::uintptr_t sorted_ids, std::uintptr_t global_std, std::uintptr_t step_weights,
           long long T, int mode, int std_mode, double eps, double clip, int has_clip, std::uintptr_t out,
           std::uintptr_t stream) {
          diffrl::adv::group_advantages_cuda(group_args(vals_double, B, K, vals, weights, order, sorted_ids,
                                                        global_std, step_weights, T, mode, std_mode, eps, clip,
                                                        has_clip, out, stream));
        });
  m.def("win_rate_cuda", [](int vals_double, long long B, std::uintptr_t vals, std::uintptr_t order,
                            std::uintptr_t sorted_ids, std::uintptr_t out, std::uintptr_t stream) {
    diffrl::adv::win_rate_cuda(win_args(vals_double, B, vals, order, sorted_ids, out, stream));
  });
  m.def("grpo_loss_forward_cuda",
        [](long long N, long long adv_div, std::uintptr_t logp, std::uintptr_t old, std::uintptr_t adv,
           std::uintptr_t kl, float lo, float hi, float kl_coef, std::uintptr_t loss, std::uintptr_t stats,
           std::uintptr_t workspace, std::uintptr_t stream) {
          diffrl::adv::loss_forward_cuda(
              loss_args(N, adv_div, logp, old, adv, kl, lo, hi, kl_coef, loss, stats, workspace, stream));
        });
  m.def("grpo_loss_backward_cuda",
        [](long long N, long long adv_div, std::uintptr_t logp, std::uintptr_t old, std::uintptr_t adv, float lo,
           float hi, std::uintptr_t g_loss, std::uintptr_t g_logp, std::uintptr_t stream) {
          diffrl::adv::loss_backward_cuda(loss_bwd_args(N, adv_div, logp, old, adv, lo, hi, g_loss, g_logp, stream));
        });
#endif
}

}  // namespace diffrl
