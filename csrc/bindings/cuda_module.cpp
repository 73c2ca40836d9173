// llmio_native._cuda: CUDA kernels behind integer pointers and streams. Built
// only when CMake finds nvcc; the CUDA runtime is linked statically, so the
// module imports on machines without a GPU or a toolkit and reports that
// through device_count() == 0 rather than failing at import.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "common/cuda_check.hpp"

#include <stdexcept>
#include <string>


namespace py = pybind11;
using namespace llmio;

// One registration per component (their files: rans_cuda_bindings.cpp (rans and rans1),
// cuda_int8_bindings.cpp, cuda_cut_bindings.cpp).
void bind_rans_cuda(py::module_& m);
void bind_int8_cuda(py::module_& m);
void bind_cut_cuda(py::module_& m);

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "llmio_native CUDA kernels (decode, window cutting, quantization)";
  // One exception class for both modules: every llmio::CudaError a binding of this module
  // throws (LLMIO_CUDA_CHECK, common/cuda_check.hpp) becomes llmio_native._core.CudaError.
  static py::object cuda_error = py::module_::import("llmio_native._core").attr("CudaError");
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const llmio::CudaError& e) {
      PyErr_SetString(cuda_error.ptr(), e.what());
    }
  });
  bind_rans_cuda(m);
  bind_int8_cuda(m);
  bind_cut_cuda(m);

  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("driver_version", [] {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
    return v;
  });
  m.def("device_count", [] {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no driver / no device" error
      return 0;
    }
    return n;
  }, "Number of usable CUDA devices; 0 without a driver or GPU.");
  m.def("device_count_error", [] {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    cudaGetLastError();
    return e == cudaSuccess ? std::string() : std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  }, "Why device_count() is 0, or an empty string.");
}
