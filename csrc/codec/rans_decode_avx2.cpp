// rans AVX2 decoder: full steps of a block, eight lanes per vector
// (dispatched from Model::decode in rans_decode_ref.cpp).
#include <cstdlib>
#include <cstring>
#include <string>

#include "codec/rans.hpp"
#include "codec/rans_impl.hpp"
#include "common/errors.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace llmio {
namespace rans {

// ---------------------------------------------------------------- levels

const char* simd_name(Simd s) {
  switch (s) {
    case Simd::kScalar: return "scalar";
    case Simd::kAvx2: return "avx2";
    case Simd::kAvx512: return "avx512";
    default: return "auto";
  }
}

Simd cpu_simd() {
  static const Simd level = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Simd::kAvx512;
    if (__builtin_cpu_supports("avx2")) return Simd::kAvx2;
#endif
    return Simd::kScalar;
  }();
  return level;
}

Simd default_simd() {
  static const Simd level = [] {
    const char* env = std::getenv("LLMIO_RANS_SIMD");
    Simd cap = Simd::kAvx512;
    if (env && (env[0] == '0' || !std::strcmp(env, "scalar")))
      cap = Simd::kScalar;
    else if (env && !std::strcmp(env, "avx2"))
      cap = Simd::kAvx2;
    else if (env && *env && std::strcmp(env, "avx512") && std::strcmp(env, "auto") && std::strcmp(env, "1"))
      throw std::invalid_argument(std::string("LLMIO_RANS_SIMD=") + env +
                                  ": expected 0 or scalar, avx2, avx512, auto or 1");
    const Simd cpu = cpu_simd();
    return static_cast<int>(cap) < static_cast<int>(cpu) ? cap : cpu;
  }();
  return level;
}

Simd resolve_simd(Simd requested) {
  if (requested == Simd::kAuto) return default_simd();
  if (static_cast<int>(requested) > static_cast<int>(cpu_simd()))
    throw UnsupportedError(std::string("rans decode: simd=\"") + simd_name(requested) + "\" requested, but this CPU " +
                           (requested == Simd::kAvx512 ? "lacks AVX-512 (F, BW, VL and DQ are needed)" : "lacks AVX2") +
                           "; its best is \"" + simd_name(cpu_simd()) + "\"");
  return requested;
}

namespace detail {

// ---------------------------------------------------------------- AVX2 decoder
//
// The same steps as the scalar decoder below, eight lanes per 256-bit vector,
// four vectors per step in lane order (so the word stream is consumed in the
// same order). Per-slot tables replace the bucket indirection of phase 1:
// simd_fb_ = freq | (slot - cum) << 16 and simd_info_ = bits | escape << 8 |
// bucket << 16. Renormalisation takes the next popcount(need) words with one
// unaligned load and a permutation chosen by the need mask (the SIMD rANS
// trick of F. Giesen). Full steps only; the partial last step of a block and
// blocks near the end of their words (fewer than 8 left) go through scalar
// code. Tested bit for bit against the scalar decoder (tests/test_codec_rans.py).
#if defined(__x86_64__)
namespace {

struct PermTable {
  alignas(32) uint32_t idx[256][8];
  PermTable() {
    for (unsigned m = 0; m < 256; ++m)
      for (unsigned i = 0; i < 8; ++i) idx[m][i] = static_cast<uint32_t>(__builtin_popcount(m & ((1u << i) - 1)));
  }
};
const PermTable kPerm;

__attribute__((target("avx2,popcnt"))) inline __m256i renorm8(__m256i x, const uint8_t* words, uint64_t& pos,
                                                             uint64_t end, bool& overrun) {
  const __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(x, 16), _mm256_setzero_si256());
  const unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(need)));
  if (!m) return x;
  const unsigned k = static_cast<unsigned>(__builtin_popcount(m));
  __m256i w;
  if (pos + 8 <= end) {
    w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words + 2 * pos)));
  } else {  // near the end of the block's words: bounded scalar loads
    alignas(32) uint32_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (unsigned i = 0; i < 8 && pos + i < end; ++i) tmp[i] = load_u16(words + 2 * (pos + i));
    w = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
    overrun |= pos + k > end;
  }
  w = _mm256_permutevar8x32_epi32(w, _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[m])));
  pos += k;
  return _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), w), need);
}

}  // namespace

bool avx2_available() { return default_simd() >= Simd::kAvx2; }

__attribute__((target("avx2,popcnt"))) void steps_avx2(const SimdArgs& a, uint32_t* x, const uint8_t* words,
                                                      uint64_t& pos, uint64_t end, uint32_t steps, void* out,
                                                      bool& overrun, bool& bad) {
  __m256i xv[4], info[4], v[4];
  for (int k = 0; k < 4; ++k) xv[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8 * k));
  const __m256i slot_mask = _mm256_set1_epi32(static_cast<int>((1u << a.scale_bits) - 1));
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(a.scale_bits));
  const __m256i lo16 = _mm256_set1_epi32(0xffff), one = _mm256_set1_epi32(1), c16 = _mm256_set1_epi32(16);
  const __m256i bits_mask = _mm256_set1_epi32(0x1f), esc_bit = _mm256_set1_epi32(0x100);
  const __m256i ns_minus_1 = _mm256_set1_epi32(static_cast<int>(a.ns - 1)), zero = _mm256_setzero_si256();
  const __m256i all = _mm256_set1_epi32(-1);
  __m256i badv = zero;
  for (uint32_t t = 0; t < steps; ++t) {
    for (int k = 0; k < 4; ++k) {  // phase 1
      const __m256i slot = _mm256_and_si256(xv[k], slot_mask);
      const __m256i fb = _mm256_i32gather_epi32(reinterpret_cast<const int*>(a.fb), slot, 4);
      info[k] = _mm256_i32gather_epi32(reinterpret_cast<const int*>(a.info), slot, 4);
      xv[k] = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(fb, lo16), _mm256_srl_epi32(xv[k], shift)),
                               _mm256_srli_epi32(fb, 16));
      xv[k] = renorm8(xv[k], words, pos, end, overrun);
    }
    int high = 0;
    for (int k = 0; k < 4; ++k) {  // phase 2
      const __m256i bits = _mm256_and_si256(info[k], bits_mask);
      const __m256i lo = _mm256_min_epu32(bits, c16);
      v[k] = _mm256_and_si256(xv[k], _mm256_sub_epi32(_mm256_sllv_epi32(one, lo), one));
      xv[k] = _mm256_srlv_epi32(xv[k], lo);
      high |= _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bits, c16)));
      xv[k] = renorm8(xv[k], words, pos, end, overrun);
    }
    if (high) {
      for (int k = 0; k < 4; ++k) {  // phase 3
        const __m256i hi = _mm256_sub_epi32(_mm256_max_epu32(_mm256_and_si256(info[k], bits_mask), c16), c16);
        const __m256i h = _mm256_and_si256(xv[k], _mm256_sub_epi32(_mm256_sllv_epi32(one, hi), one));
        v[k] = _mm256_or_si256(v[k], _mm256_slli_epi32(h, 16));
        xv[k] = _mm256_srlv_epi32(xv[k], hi);
        xv[k] = renorm8(xv[k], words, pos, end, overrun);
      }
    }
    for (int k = 0; k < 4; ++k) {  // symbols
      const __m256i base = _mm256_i32gather_epi32(reinterpret_cast<const int*>(a.base), _mm256_srli_epi32(info[k], 16), 4);
      const __m256i idx = _mm256_add_epi32(base, v[k]);
      const __m256i esc = _mm256_cmpeq_epi32(_mm256_and_si256(info[k], esc_bit), esc_bit);
      const __m256i in_range = a.ns ? _mm256_cmpeq_epi32(_mm256_min_epu32(idx, ns_minus_1), idx) : zero;
      const __m256i gmask = _mm256_andnot_si256(esc, in_range);
      const __m256i sym = _mm256_mask_i32gather_epi32(idx, reinterpret_cast<const int*>(a.rank), idx, gmask, 4);
      badv = _mm256_or_si256(badv, _mm256_andnot_si256(_mm256_or_si256(esc, in_range), all));
      if (a.token_bytes == 2) {
        badv = _mm256_or_si256(badv, _mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_srli_epi32(idx, 16), zero), esc));
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(sym, sym), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + size_t(t) * kLanes + 8 * k),
                         _mm256_castsi256_si128(packed));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint32_t*>(out) + size_t(t) * kLanes + 8 * k),
                            sym);
      }
    }
  }
  bad |= !_mm256_testz_si256(badv, badv);
  for (int k = 0; k < 4; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 8 * k), xv[k]);
}

#endif  // __x86_64__

}  // namespace detail
}  // namespace rans
}  // namespace llmio
