// rans1 AVX2 decoder: the steps of a block in which all 32 lanes take part,
// eight lanes per vector, four vectors per step in lane order (so the word
// stream is consumed in the kernel's order). Phase 1 (the context table):
// gathers of the lanes' context info and slot entries; phases 2-4 (the order-0
// bucket and raw bits of the escaped lanes) as rans decodes them, the other
// lanes masked off; renormalisation as rans does it (one unaligned load and a
// permutation chosen by the need mask, the SIMD rANS trick of F. Giesen),
// groups of eight lanes in lane order. Dispatched from
// Model::decode (rans1_decode_ref.cpp); tested bit for bit against the
// reference decoder and the kernel emulation (tests/test_codec_rans1.py).
#include <cstdint>
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
__attribute__((target("avx2,popcnt"))) void steps_impl(const ImageView& m, const Order0Tables& o, Lanes& s,
                                                      uint32_t steps, uint32_t seg, T* dst) {
  alignas(32) uint32_t sym[kLanes];
  __m256i xv[4], cv[4], e0v[4], escv[4], bitsv[4], vv[4], info0[4];
  for (int k = 0; k < 4; ++k) {
    xv[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.x + 8 * k));
    cv[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.ctx + 8 * k));
  }
  const int* ctx_info = reinterpret_cast<const int*>(m.ctx);
  const int* slots = reinterpret_cast<const int*>(m.slots);
  const int* rank = reinterpret_cast<const int*>(m.base.rank);
  const int* fb0 = reinterpret_cast<const int*>(o.fb);
  const int* info0_t = reinterpret_cast<const int*>(o.info);
  const int* base0 = reinterpret_cast<const int*>(o.base);
  const __m256i zero = _mm256_setzero_si256(), all = _mm256_set1_epi32(-1);
  const __m256i c15 = _mm256_set1_epi32(15), one = _mm256_set1_epi32(1), lo16 = _mm256_set1_epi32(0xffff);
  const __m256i c16 = _mm256_set1_epi32(16), bits_mask = _mm256_set1_epi32(0x1f), esc_bit = _mm256_set1_epi32(0x100);
  const __m256i mask0 = _mm256_set1_epi32(static_cast<int>((1u << m.base.scale_bits) - 1));
  const __m128i shift0 = _mm_cvtsi32_si128(static_cast<int>(m.base.scale_bits));
  const __m256i ns_minus_1 = _mm256_set1_epi32(static_cast<int>(m.base.num_symbols - 1));
  const __m256i exact = _mm256_set1_epi32(static_cast<int>(m.num_exact));
  const __m256i cls_shift = _mm256_set1_epi32(static_cast<int>(m.num_exact - m.cls0));  // wraps as the kernel's
  const __m256i unranked = _mm256_set1_epi32(static_cast<int>(m.num_ctx - 2));
  const __m256i min_int = _mm256_set1_epi32(INT32_MIN);
  const uint8_t* words = s.words;
  uint64_t pos = s.pos;
  const uint64_t end = s.end;
  bool overrun = false;
  __m256i badv = zero;
  for (uint32_t t = 0; t < steps; ++t) {
    unsigned esc = 0;
    for (int k = 0; k < 4; ++k) {  // phase 1: the context table
      const __m256i info = _mm256_i32gather_epi32(ctx_info, cv[k], 4);
      const __m256i bits = _mm256_and_si256(info, c15);
      const __m256i slot = _mm256_and_si256(xv[k], _mm256_sub_epi32(_mm256_sllv_epi32(one, bits), one));
      const __m256i idx2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_srli_epi32(info, 4), slot), 1);
      e0v[k] = _mm256_i32gather_epi32(slots, idx2, 4);
      const __m256i e1 = _mm256_i32gather_epi32(slots + 1, idx2, 4);
      xv[k] = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(e1, lo16), _mm256_srlv_epi32(xv[k], bits)),
                               _mm256_srli_epi32(e1, 16));
      xv[k] = renorm8(xv[k], words, pos, end, overrun);
      escv[k] = _mm256_cmpeq_epi32(_mm256_and_si256(e0v[k], lo16), lo16);
      esc |= static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(escv[k]))) << (8 * k);
    }
    if (esc) {
      for (int k = 0; k < 4; ++k) {  // phase 2: the order-0 bucket of the escaped lanes
        bitsv[k] = vv[k] = info0[k] = zero;
        if (!((esc >> (8 * k)) & 0xffu)) continue;
        const __m256i slot = _mm256_and_si256(xv[k], mask0);
        const __m256i fb = _mm256_i32gather_epi32(fb0, slot, 4);
        info0[k] = _mm256_and_si256(_mm256_i32gather_epi32(info0_t, slot, 4), escv[k]);
        const __m256i xn = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(fb, lo16), _mm256_srl_epi32(xv[k], shift0)),
                                            _mm256_srli_epi32(fb, 16));
        xv[k] = renorm8(_mm256_blendv_epi8(xv[k], xn, escv[k]), words, pos, end, overrun);
        bitsv[k] = _mm256_and_si256(info0[k], bits_mask);
      }
      int high = 0;
      for (int k = 0; k < 4; ++k) {  // phase 3: low raw bits (none: the state is unchanged)
        if (!((esc >> (8 * k)) & 0xffu)) continue;
        const __m256i lo = _mm256_min_epu32(bitsv[k], c16);
        vv[k] = _mm256_and_si256(xv[k], _mm256_sub_epi32(_mm256_sllv_epi32(one, lo), one));
        xv[k] = renorm8(_mm256_srlv_epi32(xv[k], lo), words, pos, end, overrun);
        high |= _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bitsv[k], c16)));
      }
      if (high) {
        for (int k = 0; k < 4; ++k) {  // phase 4: high raw bits
          if (!((esc >> (8 * k)) & 0xffu)) continue;
          const __m256i hi = _mm256_sub_epi32(_mm256_max_epu32(bitsv[k], c16), c16);
          const __m256i h = _mm256_and_si256(xv[k], _mm256_sub_epi32(_mm256_sllv_epi32(one, hi), one));
          vv[k] = _mm256_or_si256(vv[k], _mm256_slli_epi32(h, 16));
          xv[k] = renorm8(_mm256_srlv_epi32(xv[k], hi), words, pos, end, overrun);
        }
      }
    }
    for (int k = 0; k < 4; ++k) {  // symbols and next contexts
      const __m256i e0 = e0v[k];
      const __m256i listed = _mm256_andnot_si256(escv[k], all);
      __m256i sv = _mm256_mask_i32gather_epi32(zero, rank, _mm256_and_si256(e0, lo16), listed, 4);
      __m256i cx = _mm256_srli_epi32(e0, 16);
      if ((esc >> (8 * k)) & 0xffu) {
        const __m256i bucket = _mm256_srli_epi32(info0[k], 16);
        const __m256i idx = _mm256_add_epi32(_mm256_mask_i32gather_epi32(zero, base0, bucket, escv[k], 4), vv[k]);
        const __m256i escb = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(info0[k], esc_bit), esc_bit),
                                              escv[k]);
        const __m256i ranked = _mm256_andnot_si256(escb, escv[k]);
        const __m256i in_range = m.base.num_symbols
                                     ? _mm256_cmpeq_epi32(_mm256_min_epu32(idx, ns_minus_1), idx) : zero;
        const __m256i rs = _mm256_mask_i32gather_epi32(zero, rank, idx, _mm256_and_si256(ranked, in_range), 4);
        badv = _mm256_or_si256(badv, _mm256_andnot_si256(in_range, ranked));
        if (sizeof(T) == 2)
          badv = _mm256_or_si256(badv, _mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_srli_epi32(idx, 16), zero), escb));
        sv = _mm256_blendv_epi8(sv, _mm256_blendv_epi8(rs, idx, escb), escv[k]);
        // next context: unranked; rank < num_exact: the rank; else its bucket's class
        const __m256i below = _mm256_cmpgt_epi32(_mm256_xor_si256(exact, min_int), _mm256_xor_si256(idx, min_int));
        const __m256i ce = _mm256_blendv_epi8(_mm256_add_epi32(bucket, cls_shift), idx, below);
        cx = _mm256_blendv_epi8(cx, _mm256_blendv_epi8(ce, unranked, escb), escv[k]);
      }
      cv[k] = cx;
      _mm256_store_si256(reinterpret_cast<__m256i*>(sym + 8 * k), sv);
    }
    T* d = dst + t;
    for (uint32_t l = 0; l < kLanes; ++l) d[size_t(l) * seg] = static_cast<T>(sym[l]);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.x + 8 * k), xv[k]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.ctx + 8 * k), cv[k]);
  }
  s.pos = pos;
  s.overrun |= overrun;
  s.bad |= !_mm256_testz_si256(badv, badv);
}

}  // namespace

void steps_avx2(const ImageView& m, const Order0Tables& o, Lanes& s, uint32_t steps, uint32_t seg, uint16_t* dst) {
  steps_impl(m, o, s, steps, seg, dst);
}
void steps_avx2(const ImageView& m, const Order0Tables& o, Lanes& s, uint32_t steps, uint32_t seg, uint32_t* dst) {
  steps_impl(m, o, s, steps, seg, dst);
}
#endif  // __x86_64__

}  // namespace detail
}  // namespace rans1
}  // namespace llmio
