// launch_cut_windows: cut_windows_kernel on a CUDA stream (llmio_native._cuda).
#pragma once

#include <cuda_runtime.h>

#include "loader/cut_windows_device.hpp"

namespace llmio {

// Contract: launch_<op>(const <Op>Params&, cudaStream_t). No checks: the binding
// checked token_bytes (2 or 4) and batch (<= kCutMaxBatch); windows are trusted to
// fit (the caller computed them on the host). stream: any cudaStream_t, 0 (torch's
// default stream) included. Returns cudaGetLastError() (cudaSuccess when empty).
cudaError_t launch_cut_windows(const CutWindowsParams& p, cudaStream_t stream);

}  // namespace llmio
