#include "loader/permute.hpp"

#include <stdexcept>
#include <string>

namespace llmio {

void feistel_permute(const int64_t* in, int64_t* out, size_t count, uint64_t n, uint64_t key, int rounds) {
  if (n == 0) throw std::invalid_argument("permutation domain must be >= 1");
  if (rounds < 1 || rounds > 32) throw std::invalid_argument("rounds must be in [1, 32]");
  int bits = 2;
  while (bits < 64 && (uint64_t(1) << bits) < n) ++bits;
  bits += bits & 1;
  const int half = bits / 2;
  const uint64_t lo_mask = (uint64_t(1) << half) - 1;
  uint64_t rk[32];
  for (int r = 0; r < rounds; ++r) rk[r] = splitmix64(key + uint64_t(r + 1) * 0x9E3779B97F4A7C15ull);
  for (size_t i = 0; i < count; ++i) {
    if (in[i] < 0 || uint64_t(in[i]) >= n)
      throw std::invalid_argument("index " + std::to_string(in[i]) + " outside [0, " + std::to_string(n) + ")");
    uint64_t x = uint64_t(in[i]);
    if (n > 1) {
      do {
        uint64_t left = x >> half, right = x & lo_mask;
        for (int r = 0; r < rounds; ++r) {
          const uint64_t f = splitmix64(right + rk[r]) & lo_mask;
          const uint64_t nl = right;
          right = left ^ f;
          left = nl;
        }
        x = (left << half) | right;
      } while (x >= n);  // cycle-walk: a bijection of [0, 2^bits) restricted to [0, n)
    }
    out[i] = int64_t(x);
  }
}

}  // namespace llmio
