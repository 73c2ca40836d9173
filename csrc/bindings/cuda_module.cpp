// llmio_native._cuda: CUDA kernels behind integer pointers and streams. Built
// only when CMake finds nvcc; the CUDA runtime is linked statically, so the
// module imports on machines without a GPU or a toolkit and reports that
// through device_count() == 0 rather than failing at import.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda/cut_windows.hpp"

namespace py = pybind11;
using namespace llmio;

void bind_rans_cuda(py::module_& m);  // rans_cuda_bindings.cpp

namespace {
PyObject* g_cuda_error = nullptr;

[[noreturn]] void raise_cuda(int err, const std::string& what) {
  const char* name = cudaGetErrorName(static_cast<cudaError_t>(err));
  const char* desc = cudaGetErrorString(static_cast<cudaError_t>(err));
  PyErr_SetString(g_cuda_error, (what + ": " + name + " (" + desc + ")").c_str());
  throw py::error_already_set();
}
}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "llmio_native CUDA kernels (decode, window cutting, quantization)";
  // One exception class for both modules: llmio_native._core.CudaError.
  py::object core = py::module_::import("llmio_native._core");
  static py::object cuda_error = core.attr("CudaError");
  g_cuda_error = cuda_error.ptr();
  bind_rans_cuda(m);

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

  m.def(
      "cut_windows",
      [](uintptr_t tokens_dev, int token_bytes, uint64_t num_tokens, uintptr_t starts_dev, uint32_t batch,
         uint32_t seq_len, uintptr_t x_dev, uintptr_t y_dev, uintptr_t stream) {
        if (token_bytes != 2 && token_bytes != 4)
          throw std::invalid_argument("token_bytes must be 2 or 4, got " + std::to_string(token_bytes));
        if (stream == 0)
          throw std::invalid_argument("cut_windows: pass the stream explicitly "
                                      "(torch.cuda.current_stream().cuda_stream), not 0");
        CutWindowsParams p{reinterpret_cast<const void*>(tokens_dev), static_cast<uint32_t>(token_bytes),
                           num_tokens, reinterpret_cast<const int64_t*>(starts_dev), batch, seq_len,
                           reinterpret_cast<int64_t*>(x_dev), reinterpret_cast<int64_t*>(y_dev)};
        int e = launch_cut_windows(p, stream);
        if (e != 0) raise_cuda(e, "cut_windows_kernel launch");
      },
      py::arg("tokens_dev"), py::arg("token_bytes"), py::arg("num_tokens"), py::arg("starts_dev"),
      py::arg("batch"), py::arg("seq_len"), py::arg("x_dev"), py::arg("y_dev"), py::arg("stream"),
      "Launch cut_windows_kernel on `stream` (an integer cudaStream_t). Device pointers as integers.");
}
