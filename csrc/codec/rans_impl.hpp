// Declarations shared by the files of the rans codec (rans_model.cpp,
// rans_encode.cpp, rans_decode_avx2.cpp, rans_decode_ref.cpp); not part of the
// codec's interface (that is rans.hpp).
#pragma once

#include <cstddef>
#include <cstdint>

#include "codec/rans.hpp"

#define LLMIO_ALWAYS_INLINE __attribute__((always_inline))

namespace llmio {
namespace rans {
namespace detail {

constexpr uint32_t kNone = 0xffffffffu;

inline uint32_t bit_length(uint32_t v) { return v ? 32 - static_cast<uint32_t>(__builtin_clz(v)) : 0; }

// The bucket of rank r (inverse of rank_bucket_base / rank_bucket_bits).
inline uint32_t rank_bucket(uint32_t r) {
  if (r < kDirectRanks) return r;
  const uint32_t e = 31 - static_cast<uint32_t>(__builtin_clz(r));
  const uint32_t sub = (r >> (e - kMantissaBits)) & 7u;
  return kDirectRanks + (e - 7) * 8 + sub;
}

inline uint32_t token_at(const void* p, size_t i, uint32_t tb) {
  return tb == 2 ? static_cast<const uint16_t*>(p)[i] : static_cast<const uint32_t*>(p)[i];
}

#if defined(__x86_64__)
// AVX2 decoder (rans_decode_avx2.cpp). avx2_available(): the CPU has AVX2 and
// LLMIO_RANS_SIMD does not start with '0' (read once per process).
bool avx2_available();

struct SimdArgs {
  const uint32_t* fb;
  const uint32_t* info;
  const uint32_t* base;
  const uint32_t* rank;
  uint32_t ns, scale_bits, token_bytes;
};

// Decodes `steps` full steps of one block; x: the 32 lane states (in/out).
// Bit-identical to the reference decoder's steps (rans_decode_ref.cpp).
void steps_avx2(const SimdArgs& a, uint32_t* x, const uint8_t* words, uint64_t& pos, uint64_t end, uint32_t steps,
                void* out, bool& overrun, bool& bad);
#endif

}  // namespace detail
}  // namespace rans
}  // namespace llmio
