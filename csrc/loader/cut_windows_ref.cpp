#include <stdexcept>
#include <string>

#include "loader/cut_windows.hpp"

namespace llmio {

namespace {
template <class T>
void cut(const CutWindowsParams& p) {
  const T* tok = static_cast<const T*>(p.tokens);
  for (uint32_t b = 0; b < p.batch; ++b) {
    const int64_t s = p.starts[b];
    if (s < 0 || uint64_t(s) + p.seq_len + 1 > p.num_tokens)
      throw std::invalid_argument("window " + std::to_string(b) + " starting at token " + std::to_string(s) +
                                  " needs " + std::to_string(p.seq_len + 1) + " tokens but the buffer holds " +
                                  std::to_string(p.num_tokens));
    int64_t* x = p.x + uint64_t(b) * p.seq_len;
    int64_t* y = p.y + uint64_t(b) * p.seq_len;
    for (uint32_t t = 0; t < p.seq_len; ++t) {
      x[t] = static_cast<int64_t>(tok[s + t]);
      y[t] = static_cast<int64_t>(tok[s + t + 1]);
    }
  }
}

template <class T>
void emulate(const CutWindowsParams& p) {
  const uint32_t gx = cut_grid_x(p.seq_len);
  for (uint32_t b = 0; b < p.batch; ++b)
    for (uint32_t bx = 0; bx < gx; ++bx)
      for (uint32_t tid = 0; tid < kCutThreads; ++tid)
        cut_windows_thread(static_cast<const T*>(p.tokens), p.starts, p.seq_len, p.x, p.y, b, bx, tid, gx,
                           kCutThreads);
}
}  // namespace

void cut_windows_emulate(const CutWindowsParams& p) {
  if (p.batch == 0 || p.seq_len == 0) return;
  if (p.token_bytes == kCutTokenBytes16) emulate<uint16_t>(p);
  else emulate<uint32_t>(p);
}

void cut_windows_ref(const CutWindowsParams& p) {
  if (p.token_bytes == 2) cut<uint16_t>(p);
  else if (p.token_bytes == 4) cut<uint32_t>(p);
  else throw std::invalid_argument("token_bytes must be 2 or 4, got " + std::to_string(p.token_bytes));
}

}  // namespace llmio
