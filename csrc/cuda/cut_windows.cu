// cut_windows_kernel: one row of CTAs per window; threads stride over the
// window's T positions (cut_windows_device.hpp). Reads of tokens are coalesced
// (consecutive t), writes of x and y are coalesced int64 stores.
#include "cuda/cut_windows_launch.hpp"

namespace llmio {

namespace {
template <class T>
__global__ void cut_windows_kernel(const T* __restrict__ tokens_dev,       // [num_tokens]
                                   const int64_t* __restrict__ starts_dev, // [batch]
                                   uint32_t seq_len,
                                   int64_t* __restrict__ x_dev,            // [batch, seq_len]
                                   int64_t* __restrict__ y_dev) {          // [batch, seq_len]
  cut_windows_thread(tokens_dev, starts_dev, seq_len, x_dev, y_dev, blockIdx.y, blockIdx.x, threadIdx.x, gridDim.x,
                     blockDim.x);
}
}  // namespace

cudaError_t launch_cut_windows(const CutWindowsParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.seq_len == 0) return cudaSuccess;  // nothing to do
  dim3 grid(cut_grid_x(p.seq_len), p.batch);
  if (p.token_bytes == kCutTokenBytes16)
    cut_windows_kernel<uint16_t><<<grid, kCutThreads, 0, stream>>>(static_cast<const uint16_t*>(p.tokens), p.starts,
                                                                   p.seq_len, p.x, p.y);
  else
    cut_windows_kernel<uint32_t><<<grid, kCutThreads, 0, stream>>>(static_cast<const uint32_t*>(p.tokens), p.starts,
                                                                   p.seq_len, p.x, p.y);
  return cudaGetLastError();
}

}  // namespace llmio
