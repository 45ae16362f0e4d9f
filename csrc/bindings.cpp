// diffrl._C: the pybind11 module. No libtorch: Python passes raw addresses (tensor.data_ptr()),
// sizes and the CUDA stream as integers, after validating every argument (diffrl/ops/*.py), by
// keyword into the entry points' argument structs (kwargs.h).
// Each op registers its functions from its own <op>_bindings.cpp.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu_isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef DIFFRL_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;

namespace diffrl {
void bind_sde_step(py::module_& m);
void bind_advantages(py::module_& m);
void bind_dpo_loss(py::module_& m);
}  // namespace diffrl

namespace {

py::dict build_info() {
  py::dict d;
#ifdef DIFFRL_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(DIFFRL_CUDA_ARCHS);
  d["cuda_version"] = CUDART_VERSION;
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_version"] = 0;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
  d["omp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["omp_max_threads"] = 1;
#endif
  d["compiler"] = std::string(__VERSION__);
  d["cpu_avx2_build"] = static_cast<bool>(DIFFRL_HAS_AVX2_BUILD);
  return d;
}

#ifdef DIFFRL_WITH_CUDA
// (device count, error message); no exception, so `import diffrl` never fails on a machine without a driver.
py::tuple cuda_runtime_status() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    return py::make_tuple(0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
  }
  return py::make_tuple(n, std::string());
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "diffrl native kernels (C++/OpenMP and, when built with nvcc, CUDA); raw pointers, no libtorch";
  m.def("build_info", &build_info, "What this extension was built with");
#ifdef DIFFRL_WITH_CUDA
  m.def("cuda_runtime_status", &cuda_runtime_status);
#endif
  m.def("cpu_isa", [] { return std::string(diffrl::cpu_isa_name(diffrl::cpu_isa())); },
        "The instruction set the CPU kernels use: 'avx2' or 'baseline' (both give the same bits)");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        if (name != "avx2" && name != "baseline") throw std::invalid_argument("cpu isa must be 'avx2' or 'baseline'");
        return diffrl::set_cpu_isa(name == "avx2" ? diffrl::CpuIsa::kAvx2 : diffrl::CpuIsa::kBaseline);
      },
      "Force the CPU kernels' instruction set; returns False if this CPU or build lacks it");
  diffrl::bind_sde_step(m);
  diffrl::bind_advantages(m);
  diffrl::bind_dpo_loss(m);
}
