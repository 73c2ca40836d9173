// llmio_native._cuda: the rans GPU decoder (csrc/cuda/rans_decode.cu). Called
// from cuda_module.cpp. Pointers are integers (tensor.data_ptr()); the stream
// is torch.cuda.current_stream().cuda_stream, never 0.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda/rans_decode.hpp"

namespace py = pybind11;

void bind_rans_cuda(py::module_& m) {
  m.def(
      "rans_decode",
      [](uintptr_t src, uintptr_t chunks, uint32_t num_chunks, uintptr_t blocks, uint32_t num_blocks,
         uintptr_t images, uintptr_t out, int token_bytes, uintptr_t status, uintptr_t stream) {
        if (token_bytes != 2 && token_bytes != 4)
          throw std::invalid_argument("rans_decode: token_bytes must be 2 or 4, got " + std::to_string(token_bytes));
        if (stream == 0)
          throw std::invalid_argument("rans_decode: pass the stream explicitly "
                                      "(torch.cuda.current_stream().cuda_stream), not 0");
        if (num_blocks && (!src || !chunks || !blocks || !images || !out || !status))
          throw std::invalid_argument("rans_decode: a null device pointer");
        llmio::RansDecodeParams p{reinterpret_cast<const uint8_t*>(src),
                                  reinterpret_cast<const llmio::rans::ChunkDesc*>(chunks),
                                  num_chunks,
                                  reinterpret_cast<const llmio::rans::BlockDesc*>(blocks),
                                  num_blocks,
                                  reinterpret_cast<const uint32_t* const*>(images),
                                  reinterpret_cast<void*>(out),
                                  static_cast<uint32_t>(token_bytes),
                                  reinterpret_cast<int32_t*>(status)};
        const int e = llmio::launch_rans_decode(p, stream);
        if (e != 0) {
          static py::object cuda_error = py::module_::import("llmio_native._core").attr("CudaError");
          const auto err = static_cast<cudaError_t>(e);
          PyErr_SetString(cuda_error.ptr(), (std::string("rans_decode_kernel launch: ") + cudaGetErrorName(err) +
                                             " (" + cudaGetErrorString(err) + ")").c_str());
          throw py::error_already_set();
        }
      },
      py::arg("src"), py::arg("chunks"), py::arg("num_chunks"), py::arg("blocks"), py::arg("num_blocks"),
      py::arg("images"), py::arg("out"), py::arg("token_bytes"), py::arg("status"), py::arg("stream"),
      "Launch the rans decoder on `stream`: one warp per block descriptor; per-chunk status codes "
      "(0 = decoded) are written to `status` (zeroed by the caller). Device pointers as integers.");
}
