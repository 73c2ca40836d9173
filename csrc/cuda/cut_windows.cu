// cut_windows_kernel: one thread block row per window; threads stride over
// the window's T positions. Reads of tokens are coalesced (consecutive t),
// writes of x and y are coalesced int64 stores.
#include <cuda_runtime.h>

#include "cuda/cut_windows.hpp"

namespace llmio {

namespace {
template <class T>
__global__ void cut_windows_kernel(const T* __restrict__ tokens_dev,       // [num_tokens]
                                   const int64_t* __restrict__ starts_dev, // [batch]
                                   uint32_t seq_len,
                                   int64_t* __restrict__ x_dev,            // [batch, seq_len]
                                   int64_t* __restrict__ y_dev) {          // [batch, seq_len]
  const uint32_t b = blockIdx.y;
  const int64_t s = starts_dev[b];
  const uint64_t row = uint64_t(b) * seq_len;
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < seq_len; t += gridDim.x * blockDim.x) {
    x_dev[row + t] = static_cast<int64_t>(tokens_dev[s + t]);
    y_dev[row + t] = static_cast<int64_t>(tokens_dev[s + t + 1]);
  }
}
}  // namespace

int launch_cut_windows(const CutWindowsParams& p, uintptr_t stream) {
  if (p.batch == 0 || p.seq_len == 0) return 0;
  if (p.token_bytes != 2 && p.token_bytes != 4) return static_cast<int>(cudaErrorInvalidValue);
  if (p.batch > 65535) return static_cast<int>(cudaErrorInvalidValue);
  const unsigned threads = 256;
  unsigned bx = (p.seq_len + threads - 1) / threads;
  if (bx > 1024) bx = 1024;
  dim3 grid(bx, p.batch);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (p.token_bytes == 2)
    cut_windows_kernel<uint16_t><<<grid, threads, 0, s>>>(static_cast<const uint16_t*>(p.tokens), p.starts,
                                                          p.seq_len, p.x, p.y);
  else
    cut_windows_kernel<uint32_t><<<grid, threads, 0, s>>>(static_cast<const uint32_t*>(p.tokens), p.starts,
                                                          p.seq_len, p.x, p.y);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace llmio
