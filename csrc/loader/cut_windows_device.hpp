// Window cutting, thread by thread: the parameters and the per-thread step shared
// by cut_windows_kernel (cut_windows.cu) and its host emulation
// (cut_windows_emulate in cut_windows_ref.cpp, exported as _core.cut_windows_emulate
// and tested against cut_windows_ref on every machine).
//
//   tokens: [ ... | t[s_b] t[s_b+1] ... t[s_b+T] | ... ]   uint16 or uint32
//   x[b, t] = tokens[starts[b] + t]        t in [0, T)
//   y[b, t] = tokens[starts[b] + t + 1]    (y is x shifted by one)
//
// Grid: blockIdx.y = window b, blockIdx.x * blockDim.x + threadIdx.x = first t,
// striding by gridDim.x * blockDim.x (cut_grid).
//
// No standard library beyond <cstdint>: compiled by nvcc for the device.
#pragma once

#include <cstdint>

#include "common/hd.hpp"

namespace llmio {

// Token widths (CutWindowsParams::token_bytes).
constexpr uint32_t kCutTokenBytes16 = 2;
constexpr uint32_t kCutTokenBytes32 = 4;
constexpr uint32_t kCutThreads = 256;      // threads per CTA
constexpr uint32_t kCutMaxGridX = 1024;    // CTAs per window at most (they stride over the rest)
constexpr uint32_t kCutMaxBatch = 65535;   // gridDim.y limit: windows per launch

struct CutWindowsParams {
  const void* tokens;       // token buffer (host for _ref / _emulate, device for the kernel)
  uint32_t token_bytes;     // 2 (uint16) or 4 (uint32)
  uint64_t num_tokens;      // elements in tokens; every window must fit
  const int64_t* starts;    // [batch] first token of each window (same memory space as tokens)
  uint32_t batch;
  uint32_t seq_len;         // T
  int64_t* x;               // [batch, T] out
  int64_t* y;               // [batch, T] out
};

// CTAs along a window (gridDim.x).
LLMIO_HD uint32_t cut_grid_x(uint32_t seq_len) {
  const uint32_t bx = (seq_len + kCutThreads - 1) / kCutThreads;
  return bx > kCutMaxGridX ? kCutMaxGridX : bx;
}

// What thread (bx, tid) of window b's CTAs does: positions t = bx * threads + tid,
// striding by grid_x * threads.
template <class T>
LLMIO_HD void cut_windows_thread(const T* __restrict__ tokens, const int64_t* __restrict__ starts, uint32_t seq_len,
                                 int64_t* __restrict__ x, int64_t* __restrict__ y, uint32_t b, uint32_t bx,
                                 uint32_t tid, uint32_t grid_x, uint32_t threads) {
  const int64_t s = starts[b];
  const uint64_t row = uint64_t(b) * seq_len;
  for (uint32_t t = bx * threads + tid; t < seq_len; t += grid_x * threads) {
    x[row + t] = static_cast<int64_t>(tokens[s + t]);
    y[row + t] = static_cast<int64_t>(tokens[s + t + 1]);
  }
}

}  // namespace llmio
