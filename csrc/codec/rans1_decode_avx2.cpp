// rans1 AVX2 decoder: the steps of a block in which all 32 lanes take part,
// eight lanes per vector, four vectors per step in lane order (so the word
// stream is consumed in the kernel's order). Phase 1 (the context table):
// gathers from the compact CPU tables (rans1_impl.hpp: a u16 slot -> entry
// index, then the 16-byte entry, whose next-context word is the lane's next
// table), the four vectors' lookups issued together; phases 2-4 (the order-0
// bucket and raw bits of the escaped lanes) as rans decodes them, on the
// escaped lanes only, packed in lane order into as few vectors as they fill
// (by permutations) and unpacked after; renormalisation as rans does it (one
// unaligned load and a permutation chosen by the need mask, the SIMD rANS
// trick of F. Giesen), groups of eight lanes in lane order. The symbols of 16
// steps are stored together: uint16 tokens transposed in registers (a vector
// store a lane), uint32 tokens a lane at a time. Dispatched from Model::decode
// (rans1_decode_ref.cpp); tested bit for bit against the reference decoder and
// the kernel emulation (tests/test_codec_rans1.py).
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
  alignas(32) uint32_t idx[256][8];  // idx[m][i]: the set bits of m below bit i
  alignas(32) uint32_t pack[256][8];  // pack[m][j]: the j-th set bit of m (0 past the last)
  PermTable() {
    for (unsigned m = 0; m < 256; ++m) {
      unsigned j = 0;
      for (unsigned i = 0; i < 8; ++i) {
        idx[m][i] = static_cast<uint32_t>(__builtin_popcount(m & ((1u << i) - 1)));
        pack[m][i] = 0;
        if ((m >> i) & 1u) pack[m][j++] = i;
      }
    }
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

// A full run of 16 steps of uint16 tokens (sym[16][32], a step a row) to dst,
// lane l's 16 tokens adjacent at dst + l * seg: transposed in registers, eight
// lanes at a time, one 32-byte store a lane (the scalar loop's 512 loads and
// stores cost about 5% of a decode).
__attribute__((target("avx2"))) inline void store_run16(const uint32_t* sym, uint32_t seg, uint16_t* dst) {
  const __m256i lo16 = _mm256_set1_epi32(0xffff);
  // per 128-bit lane: words 0-3 and 4-7 interleaved (step 2s and 2s+1 of a lane side by side)
  const __m256i inter = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                         0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
  for (int g = 0; g < 4; ++g) {  // lanes 8g .. 8g + 7
    __m256i c[8];
    for (int s = 0; s < 8; ++s) {
      const __m256i a = _mm256_and_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(sym + 32 * (2 * s) + 8 * g)), lo16);
      const __m256i b =
          _mm256_and_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(sym + 32 * (2 * s + 1) + 8 * g)), lo16);
      // 128-bit lane h, dword j: steps 2s, 2s + 1 of lane 8g + 4h + j
      c[s] = _mm256_shuffle_epi8(_mm256_packus_epi32(a, b), inter);
    }
    __m256i u[2][4];
    for (int q = 0; q < 2; ++q) {  // steps 8q .. 8q + 7: a 4 x 4 dword transpose per 128-bit lane
      const __m256i t0 = _mm256_unpacklo_epi32(c[4 * q], c[4 * q + 1]);
      const __m256i t1 = _mm256_unpackhi_epi32(c[4 * q], c[4 * q + 1]);
      const __m256i t2 = _mm256_unpacklo_epi32(c[4 * q + 2], c[4 * q + 3]);
      const __m256i t3 = _mm256_unpackhi_epi32(c[4 * q + 2], c[4 * q + 3]);
      u[q][0] = _mm256_unpacklo_epi64(t0, t2);  // lane 8g + 4h + 0
      u[q][1] = _mm256_unpackhi_epi64(t0, t2);
      u[q][2] = _mm256_unpacklo_epi64(t1, t3);
      u[q][3] = _mm256_unpackhi_epi64(t1, t3);
    }
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + size_t(8 * g + j) * seg),
                          _mm256_permute2x128_si256(u[0][j], u[1][j], 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + size_t(8 * g + 4 + j) * seg),
                          _mm256_permute2x128_si256(u[0][j], u[1][j], 0x31));
    }
  }
}

template <class T>
__attribute__((target("avx2,popcnt"))) void steps_impl(const ImageView& m, const Order0Tables& o, Lanes& s,
                                                      uint32_t steps, uint32_t seg, T* dst) {
  // The symbols of kRun steps, stored to dst a lane at a time: a step's tokens
  // lie seg apart (32 lines that share a few cache sets), a lane's are adjacent.
  constexpr uint32_t kRun = 16;
  alignas(32) uint32_t sym[kLanes * kRun];
  // Per vector of 8 lanes: state, context (kept up to date only in the lanes that
  // escaped: the others' is the `next context` word of their last entry, read at
  // the end), info of the context (rans1_impl.hpp), the byte offset of the last
  // entry, the escape mask of the last step.
  __m256i xv[4], cv[4], iv[4], eoffv[4], escv[4];
  const int* ctx_info = reinterpret_cast<const int*>(o.ctx_info);
  const int* tab = reinterpret_cast<const int*>(o.tab);
  const int* tab_next = reinterpret_cast<const int*>(o.tab + 4);
  const int* tab_sym = reinterpret_cast<const int*>(o.tab + 8);
  const int* rank = reinterpret_cast<const int*>(m.base.rank);
  for (int k = 0; k < 4; ++k) {
    xv[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.x + 8 * k));
    cv[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.ctx + 8 * k));
    iv[k] = _mm256_i32gather_epi32(ctx_info, cv[k], 4);
    escv[k] = _mm256_set1_epi32(-1);
    eoffv[k] = _mm256_setzero_si256();
  }
  const int* fb0 = reinterpret_cast<const int*>(o.fb);
  const int* info0_t = reinterpret_cast<const int*>(o.info);
  const int* base0 = reinterpret_cast<const int*>(o.base);
  const __m256i zero = _mm256_setzero_si256(), all = _mm256_set1_epi32(-1);
  const __m256i c15 = _mm256_set1_epi32(15), one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2), lo16 = _mm256_set1_epi32(0xffff);
  const __m256i c16 = _mm256_set1_epi32(16), bits_mask = _mm256_set1_epi32(0x1f), esc_bit = _mm256_set1_epi32(0x100);
  const __m256i mask0 = _mm256_set1_epi32(static_cast<int>((1u << m.base.scale_bits) - 1));
  const __m128i shift0 = _mm_cvtsi32_si128(static_cast<int>(m.base.scale_bits));
  const __m256i ns_minus_1 = _mm256_set1_epi32(static_cast<int>(m.base.num_symbols - 1));
  const __m256i exact = _mm256_set1_epi32(static_cast<int>(m.num_exact));
  const __m256i cls_shift = _mm256_set1_epi32(static_cast<int>(m.num_exact - m.cls0));  // wraps as the kernel's
  const __m256i unranked = _mm256_set1_epi32(static_cast<int>(m.num_ctx - 2));
  const __m256i min_int = _mm256_set1_epi32(INT32_MIN);
  const __m256i c7 = _mm256_set1_epi32(7), iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), state_low = _mm256_set1_epi32(int(kStateLow));
  const uint8_t* words = s.words;
  uint64_t pos = s.pos;
  const uint64_t end = s.end;
  bool overrun = false;
  __m256i badv = zero;
  for (uint32_t t = 0; t < steps; ++t) {
    unsigned esc = 0;
    __m256i nxv[4];
    // Phase 1: the context table (compact tables, rans1_impl.hpp); the four
    // vectors' lookups issued together, then the states, then renormalisation.
    __m256i bitsv[4], slotv[4], fbv[4];
    for (int k = 0; k < 4; ++k) {
      bitsv[k] = _mm256_and_si256(iv[k], c15);
      const __m256i rb = _mm256_andnot_si256(c15, iv[k]);
      slotv[k] = _mm256_and_si256(xv[k], _mm256_sub_epi32(_mm256_sllv_epi32(one, bitsv[k]), one));
      const __m256i idx =
          _mm256_and_si256(_mm256_i32gather_epi32(tab, _mm256_add_epi32(rb, _mm256_add_epi32(slotv[k], slotv[k])), 1), lo16);
      eoffv[k] = _mm256_add_epi32(_mm256_add_epi32(rb, _mm256_sllv_epi32(two, bitsv[k])), _mm256_slli_epi32(idx, 4));
    }
    for (int k = 0; k < 4; ++k) {
      fbv[k] = _mm256_i32gather_epi32(tab, eoffv[k], 1);
      nxv[k] = _mm256_i32gather_epi32(tab_next, eoffv[k], 1);
    }
    for (int k = 0; k < 4; ++k)
      xv[k] = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(fbv[k], lo16), _mm256_srlv_epi32(xv[k], bitsv[k])),
                               _mm256_sub_epi32(slotv[k], _mm256_srli_epi32(fbv[k], 16)));
    for (int k = 0; k < 4; ++k) {
      xv[k] = renorm8(xv[k], words, pos, end, overrun);
      escv[k] = _mm256_cmpeq_epi32(nxv[k], zero);
      esc |= static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(escv[k]))) << (8 * k);
    }
    // The listed lanes' symbols (an escape entry's is 0, replaced below) and next infos.
    uint32_t* row = sym + kLanes * (t % kRun);
    __m256i sv[4];
    for (int k = 0; k < 4; ++k) {
      sv[k] = _mm256_i32gather_epi32(tab_sym, eoffv[k], 1);
      iv[k] = nxv[k];
    }
    if (esc) {
      // The escaped lanes, packed in lane order into nc vectors (usually one) by
      // permutations: vector k's go to packed lanes off[k] .. off[k] + popcount - 1.
      // The order-0 phases run on those only, and take the words in the kernel's order.
      const uint32_t n = static_cast<uint32_t>(__builtin_popcount(esc));
      const int nc = static_cast<int>((n + 7) / 8);
      __m256i xc[4], validv[4], bitsc[4], vc[4], i0c[4], scv[4], ccv[4], icv[4];
      unsigned mks[4];
      int offk[4], cntk[4];
      for (int k = 0, off = 0; k < 4; ++k) {
        mks[k] = (esc >> (8 * k)) & 0xffu;
        cntk[k] = __builtin_popcount(mks[k]);
        offk[k] = off;
        off += cntk[k];
      }
      for (int g = 0; g < nc; ++g) {
        __m256i acc = state_low;  // (a state >= L: the unused lanes take no words)
        for (int k = 0; k < 4; ++k) {
          if (!mks[k] || offk[k] >= 8 * g + 8 || offk[k] + cntk[k] <= 8 * g) continue;
          const __m256i rel = _mm256_add_epi32(iota, _mm256_set1_epi32(8 * g - offk[k]));  // index among k's escaped
          const __m256i q = _mm256_permutevar8x32_epi32(
              _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.pack[mks[k]])), _mm256_and_si256(rel, c7));
          const __m256i in =
              _mm256_andnot_si256(_mm256_cmpgt_epi32(zero, rel), _mm256_cmpgt_epi32(_mm256_set1_epi32(cntk[k]), rel));
          acc = _mm256_blendv_epi8(acc, _mm256_permutevar8x32_epi32(xv[k], q), in);
        }
        xc[g] = acc;
      }
      for (int g = 0; g < nc; ++g) {  // phase 2: the order-0 bucket
        validv[g] = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n) - 8 * g), iota);
        const __m256i slot = _mm256_and_si256(xc[g], mask0);
        const __m256i fb = _mm256_i32gather_epi32(fb0, slot, 4);
        i0c[g] = _mm256_and_si256(_mm256_i32gather_epi32(info0_t, slot, 4), validv[g]);
        const __m256i xn = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(fb, lo16), _mm256_srl_epi32(xc[g], shift0)),
                                            _mm256_srli_epi32(fb, 16));
        xc[g] = renorm8(_mm256_blendv_epi8(xc[g], xn, validv[g]), words, pos, end, overrun);
        bitsc[g] = _mm256_and_si256(i0c[g], bits_mask);
      }
      int high = 0;
      for (int g = 0; g < nc; ++g) {  // phase 3: low raw bits (none: the state is unchanged)
        const __m256i lo = _mm256_min_epu32(bitsc[g], c16);
        vc[g] = _mm256_and_si256(xc[g], _mm256_sub_epi32(_mm256_sllv_epi32(one, lo), one));
        xc[g] = renorm8(_mm256_srlv_epi32(xc[g], lo), words, pos, end, overrun);
        high |= _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bitsc[g], c16)));
      }
      if (high) {
        for (int g = 0; g < nc; ++g) {  // phase 4: high raw bits
          const __m256i hi = _mm256_sub_epi32(_mm256_max_epu32(bitsc[g], c16), c16);
          const __m256i h = _mm256_and_si256(xc[g], _mm256_sub_epi32(_mm256_sllv_epi32(one, hi), one));
          vc[g] = _mm256_or_si256(vc[g], _mm256_slli_epi32(h, 16));
          xc[g] = renorm8(_mm256_srlv_epi32(xc[g], hi), words, pos, end, overrun);
        }
      }
      for (int g = 0; g < nc; ++g) {  // symbols and next contexts
        const __m256i valid = validv[g];
        const __m256i bucket = _mm256_srli_epi32(i0c[g], 16);
        const __m256i idx = _mm256_add_epi32(_mm256_mask_i32gather_epi32(zero, base0, bucket, valid, 4), vc[g]);
        const __m256i escb = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(i0c[g], esc_bit), esc_bit), valid);
        const __m256i ranked = _mm256_andnot_si256(escb, valid);
        const __m256i in_range = m.base.num_symbols
                                     ? _mm256_cmpeq_epi32(_mm256_min_epu32(idx, ns_minus_1), idx) : zero;
        const __m256i rs = _mm256_mask_i32gather_epi32(zero, rank, idx, _mm256_and_si256(ranked, in_range), 4);
        badv = _mm256_or_si256(badv, _mm256_andnot_si256(in_range, ranked));
        if (sizeof(T) == 2)
          badv = _mm256_or_si256(badv, _mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_srli_epi32(idx, 16), zero), escb));
        // next context: unranked; rank < num_exact: the rank; else its bucket's class
        const __m256i below = _mm256_cmpgt_epi32(_mm256_xor_si256(exact, min_int), _mm256_xor_si256(idx, min_int));
        const __m256i ce = _mm256_blendv_epi8(_mm256_add_epi32(bucket, cls_shift), idx, below);
        const __m256i cn = _mm256_and_si256(_mm256_blendv_epi8(ce, unranked, escb), valid);
        scv[g] = _mm256_blendv_epi8(rs, idx, escb);
        ccv[g] = cn;
        icv[g] = _mm256_mask_i32gather_epi32(zero, ctx_info, cn, valid, 4);
      }
      for (int k = 0; k < 4; ++k) {  // back to the lanes: lane i of vector k is packed lane p
        if (!mks[k]) continue;
        const __m256i p = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[mks[k]])),
                                           _mm256_set1_epi32(offk[k]));
        const int g0 = offk[k] >> 3, g1 = (offk[k] + cntk[k] - 1) >> 3;
        for (int g = g0; g <= g1; ++g) {  // (vpermd reads the low 3 bits of p)
          const __m256i sel = g0 == g1 ? escv[k]
                                       : _mm256_and_si256(escv[k], _mm256_cmpeq_epi32(_mm256_srli_epi32(p, 3),
                                                                                      _mm256_set1_epi32(g)));
          xv[k] = _mm256_blendv_epi8(xv[k], _mm256_permutevar8x32_epi32(xc[g], p), sel);
          sv[k] = _mm256_blendv_epi8(sv[k], _mm256_permutevar8x32_epi32(scv[g], p), sel);
          cv[k] = _mm256_blendv_epi8(cv[k], _mm256_permutevar8x32_epi32(ccv[g], p), sel);
          iv[k] = _mm256_blendv_epi8(iv[k], _mm256_permutevar8x32_epi32(icv[g], p), sel);
        }
      }
    }
    for (int k = 0; k < 4; ++k) _mm256_store_si256(reinterpret_cast<__m256i*>(row + 8 * k), sv[k]);
    if (sizeof(T) == 2 && t % kRun == kRun - 1) {
      store_run16(sym, seg, reinterpret_cast<uint16_t*>(dst) + (t - (kRun - 1)));
    } else if (t % kRun == kRun - 1 || t + 1 == steps) {  // a run of steps: kRun tokens a lane, stored together
      const uint32_t t0 = t - t % kRun, nt = t - t0 + 1;
      T* d = dst + t0;
      for (uint32_t l = 0; l < kLanes; ++l, d += seg)
        for (uint32_t j = 0; j < nt; ++j) d[j] = static_cast<T>(sym[kLanes * j + l]);
    }
  }
  for (int k = 0; k < 4; ++k) {  // the contexts: the listed lanes' from their last entry
    const __m256i listed = _mm256_andnot_si256(escv[k], all);
    cv[k] = _mm256_mask_i32gather_epi32(cv[k], reinterpret_cast<const int*>(o.tab + 12), eoffv[k], listed, 1);
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
