// LLMIO_CUDA_CHECK(expr): checks a CUDA runtime call (or cudaGetLastError()
// after a launch) and throws llmio::CudaError on failure, with the message
// "<expr>: <cudaErrorName> (<description>) [<file>:<line>]". Usable from .cu
// files and host C++ alike; pulls in cuda_runtime.h, never Python. The
// bindings map CudaError to llmio_native._core.CudaError.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common/errors.hpp"

namespace llmio {
namespace detail {

inline std::string cuda_message(cudaError_t e, const char* what, const char* file, int line) {
  std::string f(file);
  const size_t k = f.rfind("csrc/");
  if (k != std::string::npos) f = f.substr(k);
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") [" + f + ":" +
         std::to_string(line) + "]";
}

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* what, const char* file, int line) {
  throw CudaError(static_cast<int>(e), cuda_message(e, what, file, line));
}

}  // namespace detail
}  // namespace llmio

#define LLMIO_CUDA_CHECK(expr)                                                  \
  do {                                                                          \
    const cudaError_t llmio_cuda_err_ = (expr);                                 \
    if (llmio_cuda_err_ != cudaSuccess)                                         \
      ::llmio::detail::throw_cuda(llmio_cuda_err_, #expr, __FILE__, __LINE__);  \
  } while (0)

// The same with a caller-chosen label instead of the expression text
// (e.g. "rans_decode_kernel launch").
#define LLMIO_CUDA_CHECK_WHAT(expr, what)                                       \
  do {                                                                          \
    const cudaError_t llmio_cuda_err_ = (expr);                                 \
    if (llmio_cuda_err_ != cudaSuccess)                                         \
      ::llmio::detail::throw_cuda(llmio_cuda_err_, (what), __FILE__, __LINE__); \
  } while (0)
