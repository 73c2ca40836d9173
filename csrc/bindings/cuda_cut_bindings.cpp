// llmio_native._cuda: the window cutter (csrc/cuda/cut_windows_launch.hpp).
// Device pointers and the stream as integers (0, torch's default stream,
// included); arguments checked once, here, before the launch.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include "common/cuda_check.hpp"
#include "bindings/int8_checks.hpp"
#include "cuda/cut_windows_launch.hpp"

namespace py = pybind11;
using namespace llmio;

void bind_cut_cuda(py::module_& m) {
  m.def(
      "cut_windows",
      [](uintptr_t tokens_dev, int token_bytes, uint64_t num_tokens, uintptr_t starts_dev, uint32_t batch,
         uint32_t seq_len, uintptr_t x_dev, uintptr_t y_dev, uintptr_t stream) {
        if (token_bytes != 2 && token_bytes != 4)  // before the cast to uint32_t
          checks::fail("cut_windows", "token_bytes must be 2 or 4, got " + std::to_string(token_bytes));
        const CutWindowsParams p{reinterpret_cast<const void*>(tokens_dev), static_cast<uint32_t>(token_bytes),
                                 num_tokens, reinterpret_cast<const int64_t*>(starts_dev), batch, seq_len,
                                 reinterpret_cast<int64_t*>(x_dev), reinterpret_cast<int64_t*>(y_dev)};
        checks::check("cut_windows", p);
        const cudaError_t e = launch_cut_windows(p, reinterpret_cast<cudaStream_t>(stream));
        LLMIO_CUDA_CHECK_WHAT(e, "cut_windows_kernel launch");
      },
      py::arg("tokens_dev"), py::arg("token_bytes"), py::arg("num_tokens"), py::arg("starts_dev"),
      py::arg("batch"), py::arg("seq_len"), py::arg("x_dev"), py::arg("y_dev"), py::arg("stream"),
      "Launch cut_windows_kernel on `stream` (an integer cudaStream_t; 0 = the default stream). Device pointers as "
      "integers.\n\nRaises:\n    ValueError: token_bytes not 2 or 4, or more than 65535 windows.\n"
      "    CudaError: the launch failed.");
}
