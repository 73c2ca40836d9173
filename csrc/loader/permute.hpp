// Seeded bijection of [0, n): a balanced Feistel network over the smallest
// even bit width >= bits(n - 1), with cycle-walking back into [0, n). O(1)
// memory, no table: the loader's shuffle of window ids, per epoch and source.
// python/llmio_native/loader/order.py holds the reference (permute_ref); the
// two must agree bit for bit (tests/test_loader.py checks it).
#pragma once

#include <cstddef>
#include <cstdint>

namespace llmio {

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// out[i] = pi(in[i]) for the permutation pi of [0, n) keyed by `key`.
// Throws std::invalid_argument for n == 0 or an input outside [0, n).
void feistel_permute(const int64_t* in, int64_t* out, size_t count, uint64_t n, uint64_t key, int rounds);

}  // namespace llmio
