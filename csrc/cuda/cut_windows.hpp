// Window cutting: the last step of the loader, turning a staging buffer of
// tokens into the (x, y) int64 batch a model consumes.
//
//   tokens: [ ... | t[s_b] t[s_b+1] ... t[s_b+T] | ... ]   uint16 or uint32
//   x[b, t] = tokens[starts[b] + t]        t in [0, T)
//   y[b, t] = tokens[starts[b] + t + 1]    (y is x shifted by one)
//
// cut_windows_ref is the CPU oracle (and the CPU loader's path);
// launch_cut_windows runs cut_windows_kernel on a CUDA stream.
#pragma once

#include <cstdint>

namespace llmio {

struct CutWindowsParams {
  const void* tokens;       // token buffer (host for _ref, device for the kernel)
  uint32_t token_bytes;     // 2 (uint16) or 4 (uint32)
  uint64_t num_tokens;      // elements in tokens; every window must fit
  const int64_t* starts;    // [batch] first token of each window (same memory space as tokens)
  uint32_t batch;
  uint32_t seq_len;         // T
  int64_t* x;               // [batch, T] out
  int64_t* y;               // [batch, T] out
};

// Throws std::invalid_argument naming the window that does not fit.
void cut_windows_ref(const CutWindowsParams& p);

// Checks what it can on the host (sizes, token_bytes); windows are trusted to
// fit (the caller checked them on the host where it computed them). stream is
// a cudaStream_t passed as an integer (torch.cuda.current_stream().cuda_stream;
// 0, torch's default stream, is accepted).
// Returns a cudaError_t value (0 on success).
int launch_cut_windows(const CutWindowsParams& p, uintptr_t stream);

}  // namespace llmio
