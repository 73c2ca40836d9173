// The _cuda module's error path: a failed launch becomes llmio_native._core.CudaError
// naming the kernel and the CUDA error (defined in cuda_module.cpp).
#pragma once

#include <string>

namespace llmio {

// Raises CudaError("<what>: <cudaErrorName> (<description>)"); err is a cudaError_t value.
[[noreturn]] void raise_cuda(int err, const std::string& what);

}  // namespace llmio
