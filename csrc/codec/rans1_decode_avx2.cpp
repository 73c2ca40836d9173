// rans1 AVX2 decoder: the steps of a block in which all 32 lanes take part,
// eight lanes per vector, four vectors per step in lane order (so the word
// stream is consumed in the kernel's order). Phase 1 (the context table) is
// vectorised: gathers of the lanes' context info and slot entries, and the
// renormalisation of rans (one unaligned load and a permutation chosen by the
// need mask, the SIMD rANS trick of F. Giesen). The lanes that escaped (a
// minority) run phases 2-4 in scalar code, in lane order. Dispatched from
// Model::decode (rans1_decode_ref.cpp); tested bit for bit against the
// reference decoder and the kernel emulation (tests/test_codec_rans1.py).
#include <cstring>

#include "codec/rans1_impl.hpp"
#include "codec/rans_impl.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace llmio {
namespace rans1 {
namespace detail {

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
    for (unsigned i = 0; i < 8 && pos + i < end; ++i) tmp[i] = rans::load_u16(words + 2 * (pos + i));
    w = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
    overrun |= pos + k > end;
  }
  w = _mm256_permutevar8x32_epi32(w, _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[m])));
  pos += k;
  return _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), w), need);
}

template <class T>
__attribute__((target("avx2,popcnt"))) void steps_impl(const ImageView& m, Lanes& s, uint32_t steps, uint32_t seg,
                                                      T* dst) {
  alignas(32) uint32_t xs[kLanes], ctxs[kLanes], sym[kLanes], e0s[kLanes];
  __m256i xv[4], cv[4];
  for (int k = 0; k < 4; ++k) {
    xv[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.x + 8 * k));
    cv[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.ctx + 8 * k));
  }
  const int* ctx_info = reinterpret_cast<const int*>(m.ctx);
  const int* slots = reinterpret_cast<const int*>(m.slots);
  const int* rank = reinterpret_cast<const int*>(m.base.rank);
  const __m256i c15 = _mm256_set1_epi32(15), one = _mm256_set1_epi32(1), lo16 = _mm256_set1_epi32(0xffff);
  const uint8_t* words = s.words;
  uint64_t pos = s.pos;
  const uint64_t end = s.end;
  bool overrun = false, bad = false;
  auto renorm1 = [&](uint32_t& x) {
    if (x < kStateLow) {
      overrun |= pos >= end;
      x = (x << 16) | (pos < end ? rans::load_u16(words + 2 * pos) : 0u);
      ++pos;
    }
  };
  for (uint32_t t = 0; t < steps; ++t) {
    unsigned esc = 0;
    for (int k = 0; k < 4; ++k) {  // phase 1: the context table
      const __m256i info = _mm256_i32gather_epi32(ctx_info, cv[k], 4);
      const __m256i bits = _mm256_and_si256(info, c15);
      const __m256i slot = _mm256_and_si256(xv[k], _mm256_sub_epi32(_mm256_sllv_epi32(one, bits), one));
      const __m256i idx2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_srli_epi32(info, 4), slot), 1);
      const __m256i e0 = _mm256_i32gather_epi32(slots, idx2, 4);
      const __m256i e1 = _mm256_i32gather_epi32(slots + 1, idx2, 4);
      xv[k] = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(e1, lo16), _mm256_srlv_epi32(xv[k], bits)),
                               _mm256_srli_epi32(e1, 16));
      xv[k] = renorm8(xv[k], words, pos, end, overrun);
      const __m256i is_esc = _mm256_cmpeq_epi32(_mm256_and_si256(e0, lo16), lo16);
      esc |= static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(is_esc))) << (8 * k);
      // the listed lanes' symbols and next contexts (escaped lanes: filled in below)
      const __m256i sv = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), rank, _mm256_and_si256(e0, lo16),
                                                     _mm256_andnot_si256(is_esc, _mm256_set1_epi32(-1)), 4);
      _mm256_store_si256(reinterpret_cast<__m256i*>(sym + 8 * k), sv);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ctxs + 8 * k), _mm256_srli_epi32(e0, 16));
      _mm256_store_si256(reinterpret_cast<__m256i*>(e0s + 8 * k), e0);
    }
    if (esc) {  // phases 2-4 of the escaped lanes, in lane order
      uint32_t b[kLanes], nbits[kLanes], v[kLanes];
      for (int k = 0; k < 4; ++k) _mm256_store_si256(reinterpret_cast<__m256i*>(xs + 8 * k), xv[k]);
      bool any_high = false;
      for (unsigned e = esc; e; e &= e - 1) {
        const unsigned l = static_cast<unsigned>(__builtin_ctz(e));
        b[l] = rans::decode_bucket(m.base, xs[l]);
        nbits[l] = m.base.bucket[rans::kBucketWords * b[l] + 3] & 0xffu;
        v[l] = 0;
      }
      for (unsigned e = esc; e; e &= e - 1) renorm1(xs[__builtin_ctz(e)]);
      for (unsigned e = esc; e; e &= e - 1) {
        const unsigned l = static_cast<unsigned>(__builtin_ctz(e));
        if (nbits[l]) v[l] = rans::take_bits(xs[l], nbits[l] < 16 ? nbits[l] : 16);
        any_high |= nbits[l] > 16;
      }
      for (unsigned e = esc; e; e &= e - 1) renorm1(xs[__builtin_ctz(e)]);
      if (any_high) {
        for (unsigned e = esc; e; e &= e - 1) {
          const unsigned l = static_cast<unsigned>(__builtin_ctz(e));
          if (nbits[l] > 16) v[l] |= rans::take_bits(xs[l], nbits[l] - 16) << 16;
        }
        for (unsigned e = esc; e; e &= e - 1) renorm1(xs[__builtin_ctz(e)]);
      }
      for (unsigned e = esc; e; e &= e - 1) {
        const unsigned l = static_cast<unsigned>(__builtin_ctz(e));
        sym[l] = rans::symbol_of(m.base, b[l], v[l], &bad);
        ctxs[l] = context_after_bucket(m, b[l], v[l]);
      }
      for (int k = 0; k < 4; ++k) xv[k] = _mm256_load_si256(reinterpret_cast<const __m256i*>(xs + 8 * k));
    }
    for (int k = 0; k < 4; ++k) cv[k] = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctxs + 8 * k));
    T* d = dst + t;
    for (uint32_t l = 0; l < kLanes; ++l) d[size_t(l) * seg] = static_cast<T>(sym[l]);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.x + 8 * k), xv[k]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.ctx + 8 * k), cv[k]);
  }
  s.pos = pos;
  s.overrun |= overrun;
  s.bad |= bad;
}

}  // namespace

void steps_avx2(const ImageView& m, Lanes& s, uint32_t steps, uint32_t seg, uint16_t* dst) {
  steps_impl(m, s, steps, seg, dst);
}
void steps_avx2(const ImageView& m, Lanes& s, uint32_t steps, uint32_t seg, uint32_t* dst) {
  steps_impl(m, s, steps, seg, dst);
}
#endif  // __x86_64__

}  // namespace detail
}  // namespace rans1
}  // namespace llmio
