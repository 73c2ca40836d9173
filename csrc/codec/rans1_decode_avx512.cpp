// rans1 AVX-512 decoder: the steps of a block in which all 32 lanes take part,
// sixteen lanes per vector, two vectors per step in lane order (so the word
// stream is consumed in the kernel's order). The same tables and phases as
// the AVX2 decoder (rans1_decode_avx2.cpp); what AVX-512 changes:
//   - renormalisation: the lanes that need a word form a mask register; the next
//     popcount(mask) words are placed into them by vpexpandd (no permutation
//     table) and merged under the mask (no blend);
//   - the escaped lanes (phases 2-4): when at most 16 of the 32 escape, they are
//     packed into one vector in lane order by vpcompressd / vpexpandd and
//     unpacked the same way; when more escape, both vectors run the phases
//     under their escape masks (packing would save nothing);
//   - the output: the symbols of 16 steps are kept as rows (vpmovdw narrows a
//     uint16 row) and transposed in registers, so each lane's 16 tokens leave
//     with one vector store instead of 16 scalar ones.
// Compiled with target attributes only (no global -mavx512 flags); dispatched
// from Model::decode (rans1_decode_ref.cpp) where the CPU has AVX-512 F, BW,
// VL and DQ (rans::detail::cpu_simd_level). Tested bit for bit, corrupt
// payloads included, against the scalar decoder, the reference decoder and the
// kernel emulation (tests/test_codec_rans1.py, at every level the CPU has).
#include <cstdint>

#include "codec/rans1_impl.hpp"
#include "codec/rans_impl.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace llmio {
namespace rans1 {
namespace detail {

#if defined(__x86_64__)
#define LLMIO_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,popcnt,bmi,bmi2")))
namespace {

// The words of the block as a cursor; a read past its end yields 0 and marks
// the block overrun (the kernel's rule, rans1_impl.hpp renorm()).
struct Words {
  const uint8_t* words;
  uint64_t pos, end;
  bool overrun;
};

// Renormalises the lanes of x in `act` whose state fell below L: they take the
// next words in lane order.
LLMIO_AVX512 inline __m512i renorm16(__m512i x, __mmask16 act, Words& w) {
  const __mmask16 need = _mm512_mask_cmplt_epu32_mask(act, x, _mm512_set1_epi32(int(kStateLow)));
  // (no early return when no lane needs a word: that branch mispredicts often)
  const unsigned k = static_cast<unsigned>(__builtin_popcount(need));
  __m256i raw;
  if (w.pos + 16 <= w.end) {
    raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.words + 2 * w.pos));
  } else {  // near the end of the block's words: a masked load (never reads past the end)
    const uint64_t left = w.pos < w.end ? w.end - w.pos : 0;
    raw = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << left) - 1), w.words + 2 * w.pos);
    w.overrun |= w.pos + k > w.end;
  }
  const __m512i words = _mm512_maskz_expand_epi32(need, _mm512_cvtepu16_epi32(raw));
  w.pos += k;
  return _mm512_mask_or_epi32(x, need, _mm512_slli_epi32(x, 16), words);
}

// The order-0 model's constants, splatted once per call.
struct Consts {
  __m512i lo16, one, c16, bits_mask, esc_bit, mask0, ns_minus_1, exact, cls_shift, unranked;
  __m128i shift0;
  bool have_symbols;
};

// Phases 2-4 of G vectors of escaped lanes (lanes in `valid`; vector g before
// g + 1 in lane order), then their symbols, next contexts and infos.
// x: in/out; sym, ctx, info: out (only the valid lanes are meaningful).
template <int G, class T>
LLMIO_AVX512 inline void escaped(const Order0Tables& o, const int* rank, const Consts& c, __m512i* x,
                                 const __mmask16* valid, Words& w, __m512i* sym, __m512i* ctx, __m512i* info,
                                 __mmask16& bad) {
  const int* fb0 = reinterpret_cast<const int*>(o.fb);
  const int* info0_t = reinterpret_cast<const int*>(o.info);
  const int* base0 = reinterpret_cast<const int*>(o.base);
  const int* ctx_info = reinterpret_cast<const int*>(o.ctx_info);
  const __m512i zero = _mm512_setzero_si512();
  __m512i i0[G], bits[G], v[G];
  for (int g = 0; g < G; ++g) {  // phase 2: the order-0 bucket
    const __m512i slot = _mm512_and_si512(x[g], c.mask0);
    const __m512i fb = _mm512_mask_i32gather_epi32(zero, valid[g], slot, fb0, 4);
    i0[g] = _mm512_mask_i32gather_epi32(zero, valid[g], slot, info0_t, 4);
    const __m512i xn = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_and_si512(fb, c.lo16), _mm512_srl_epi32(x[g], c.shift0)),
                                        _mm512_srli_epi32(fb, 16));
    x[g] = renorm16(_mm512_mask_mov_epi32(x[g], valid[g], xn), valid[g], w);
    bits[g] = _mm512_and_si512(i0[g], c.bits_mask);
  }
  __mmask16 high = 0;
  for (int g = 0; g < G; ++g) {  // phase 3: low raw bits (none: the state is unchanged)
    const __m512i lo = _mm512_min_epu32(bits[g], c.c16);
    v[g] = _mm512_and_si512(x[g], _mm512_sub_epi32(_mm512_sllv_epi32(c.one, lo), c.one));
    x[g] = renorm16(_mm512_srlv_epi32(x[g], lo), valid[g], w);
    high |= _mm512_cmpgt_epu32_mask(bits[g], c.c16);
  }
  if (high) {
    for (int g = 0; g < G; ++g) {  // phase 4: high raw bits
      const __m512i hi = _mm512_sub_epi32(_mm512_max_epu32(bits[g], c.c16), c.c16);
      const __m512i h = _mm512_and_si512(x[g], _mm512_sub_epi32(_mm512_sllv_epi32(c.one, hi), c.one));
      v[g] = _mm512_or_si512(v[g], _mm512_slli_epi32(h, 16));
      x[g] = renorm16(_mm512_srlv_epi32(x[g], hi), valid[g], w);
    }
  }
  for (int g = 0; g < G; ++g) {  // symbols and next contexts
    const __m512i bucket = _mm512_srli_epi32(i0[g], 16);
    const __m512i idx = _mm512_add_epi32(_mm512_mask_i32gather_epi32(zero, valid[g], bucket, base0, 4), v[g]);
    const __mmask16 escb = _mm512_mask_test_epi32_mask(valid[g], i0[g], c.esc_bit);
    const __mmask16 ranked = valid[g] & static_cast<__mmask16>(~escb);
    const __mmask16 in_range = c.have_symbols ? _mm512_cmple_epu32_mask(idx, c.ns_minus_1) : __mmask16(0);
    const __m512i rs = _mm512_mask_i32gather_epi32(zero, ranked & in_range, idx, rank, 4);
    bad |= ranked & static_cast<__mmask16>(~in_range);
    if (sizeof(T) == 2) bad |= _mm512_mask_cmpgt_epu32_mask(escb, idx, _mm512_set1_epi32(0xffff));
    // next context: unranked; rank < num_exact: the rank; else its bucket's class
    const __mmask16 below = _mm512_cmplt_epu32_mask(idx, c.exact);
    const __m512i ce = _mm512_mask_mov_epi32(_mm512_add_epi32(bucket, c.cls_shift), below, idx);
    ctx[g] = _mm512_maskz_mov_epi32(valid[g], _mm512_mask_mov_epi32(ce, escb, c.unranked));
    sym[g] = _mm512_mask_mov_epi32(rs, escb, idx);
    info[g] = _mm512_mask_i32gather_epi32(zero, valid[g], ctx[g], ctx_info, 4);
  }
}

// The tokens of 16 steps (rows[t]: lanes 0..31 of step t) to dst: lane l's 16
// tokens are adjacent (dst + l * seg), so the rows are transposed in registers
// and each lane's tokens stored with one vector store.
LLMIO_AVX512 inline void store_run(const __m512i* rows, uint32_t seg, uint16_t* dst) {
  // rows[t] holds 32 uint16 tokens, lane l in word l. Three rounds of unpacks
  // (16-, 32-, 64-bit) within each 128-bit block of 8 lanes take each block to
  // 8 steps of one lane; a 128-bit shuffle joins steps 0-7 and 8-15.
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {  // a[2i], a[2i+1]: steps 2i, 2i+1 interleaved
    a[2 * i] = _mm512_unpacklo_epi16(rows[2 * i], rows[2 * i + 1]);      // lanes 8q+0..3
    a[2 * i + 1] = _mm512_unpackhi_epi16(rows[2 * i], rows[2 * i + 1]);  // lanes 8q+4..7
  }
  // a[2i + h]: block q: lanes 8q + 4h + j (j = 0..3), each as (step 2i, step 2i+1)
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h) {  // steps 4i..4i+3
      b[4 * i + 2 * h] = _mm512_unpacklo_epi32(a[4 * i + h], a[4 * i + 2 + h]);      // lanes 8q+4h+0..1
      b[4 * i + 2 * h + 1] = _mm512_unpackhi_epi32(a[4 * i + h], a[4 * i + 2 + h]);  // lanes 8q+4h+2..3
    }
  // b[4i + 2h + e]: block q: lanes 8q + 4h + 2e + j (j = 0..1), each as steps 4i..4i+3
  for (int i = 0; i < 2; ++i)
    for (int r = 0; r < 4; ++r) {  // steps 8i..8i+7; r = 2h + e
      a[8 * i + 2 * r] = _mm512_unpacklo_epi64(b[8 * i + r], b[8 * i + 4 + r]);      // lane 8q + 2r
      a[8 * i + 2 * r + 1] = _mm512_unpackhi_epi64(b[8 * i + r], b[8 * i + 4 + r]);  // lane 8q + 2r + 1
    }
  // a[8i + j]: block q holds steps 8i..8i+7 of lane 8q + j
  const __m512i lo_idx = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i hi_idx = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int j = 0; j < 8; ++j) {
    const __m512i lo = _mm512_permutex2var_epi64(a[j], lo_idx, a[8 + j]);  // lanes j, 8 + j
    const __m512i hi = _mm512_permutex2var_epi64(a[j], hi_idx, a[8 + j]);  // lanes 16 + j, 24 + j
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + size_t(j) * seg), _mm512_castsi512_si256(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + size_t(8 + j) * seg), _mm512_extracti64x4_epi64(lo, 1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + size_t(16 + j) * seg), _mm512_castsi512_si256(hi));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + size_t(24 + j) * seg), _mm512_extracti64x4_epi64(hi, 1));
  }
}

// uint32 tokens: rows[2t + h] holds lanes 16h .. 16h + 15 of step t; a 16 x 16
// transpose per half.
LLMIO_AVX512 inline void store_run(const __m512i* rows, uint32_t seg, uint32_t* dst) {
  for (int h = 0; h < 2; ++h) {
    __m512i a[16], b[16];
    for (int i = 0; i < 8; ++i) {
      a[2 * i] = _mm512_unpacklo_epi32(rows[2 * (2 * i) + h], rows[2 * (2 * i + 1) + h]);      // lanes 4q+0..1
      a[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * (2 * i) + h], rows[2 * (2 * i + 1) + h]);  // lanes 4q+2..3
    }
    // a[2i + e]: block q: lanes 4q + 2e + j (j = 0..1), each as (step 2i, 2i+1)
    for (int i = 0; i < 4; ++i)
      for (int e = 0; e < 2; ++e) {
        b[4 * i + 2 * e] = _mm512_unpacklo_epi64(a[4 * i + e], a[4 * i + 2 + e]);      // lane 4q + 2e
        b[4 * i + 2 * e + 1] = _mm512_unpackhi_epi64(a[4 * i + e], a[4 * i + 2 + e]);  // lane 4q + 2e + 1
      }
    // b[4i + r]: block q: steps 4i..4i+3 of lane 4q + r
    for (int r = 0; r < 4; ++r) {
      // join the four step groups of each lane: blocks (i, q) -> output of lane 4q + r, block i
      const __m512i s01lo = _mm512_shuffle_i32x4(b[r], b[4 + r], 0x44);     // i0 q0, i0 q1, i1 q0, i1 q1
      const __m512i s01hi = _mm512_shuffle_i32x4(b[r], b[4 + r], 0xee);     // i0 q2, i0 q3, i1 q2, i1 q3
      const __m512i s23lo = _mm512_shuffle_i32x4(b[8 + r], b[12 + r], 0x44);
      const __m512i s23hi = _mm512_shuffle_i32x4(b[8 + r], b[12 + r], 0xee);
      const __m512i q0 = _mm512_shuffle_i32x4(s01lo, s23lo, 0x88);  // i0 q0, i1 q0, i2 q0, i3 q0
      const __m512i q1 = _mm512_shuffle_i32x4(s01lo, s23lo, 0xdd);
      const __m512i q2 = _mm512_shuffle_i32x4(s01hi, s23hi, 0x88);
      const __m512i q3 = _mm512_shuffle_i32x4(s01hi, s23hi, 0xdd);
      uint32_t* d = dst + size_t(16 * h + r) * seg;
      _mm512_storeu_si512(d, q0);
      _mm512_storeu_si512(d + size_t(4) * seg, q1);
      _mm512_storeu_si512(d + size_t(8) * seg, q2);
      _mm512_storeu_si512(d + size_t(12) * seg, q3);
    }
  }
}

template <class T>
LLMIO_AVX512 void steps_impl(const ImageView& m, const Order0Tables& o, Lanes& s, uint32_t steps, uint32_t seg,
                             T* dst) {
  constexpr uint32_t kRun = 16;
  // A row per step: uint16 tokens one vector of 32, uint32 tokens two of 16.
  constexpr int kRowVecs = sizeof(T) == 2 ? 1 : 2;
  __m512i rows[kRun * kRowVecs];
  // Per vector of 16 lanes: state, context (kept up to date only in the lanes that
  // escaped: the others' is the `next context` word of their last entry, read at
  // the end), info of the context (rans1_impl.hpp), the byte offset of the last
  // entry, the escape mask of the last step.
  __m512i xv[2], cv[2], iv[2], eoffv[2];
  __mmask16 escm[2] = {0xffff, 0xffff};
  const int* ctx_info = reinterpret_cast<const int*>(o.ctx_info);
  const int* tab = reinterpret_cast<const int*>(o.tab);
  const int* tab_next = reinterpret_cast<const int*>(o.tab + 4);
  const int* tab_sym = reinterpret_cast<const int*>(o.tab + 8);
  const int* rank = reinterpret_cast<const int*>(m.base.rank);
  for (int k = 0; k < 2; ++k) {
    xv[k] = _mm512_loadu_si512(s.x + 16 * k);
    cv[k] = _mm512_loadu_si512(s.ctx + 16 * k);
    iv[k] = _mm512_i32gather_epi32(cv[k], ctx_info, 4);
    eoffv[k] = _mm512_setzero_si512();
  }
  Consts c;
  c.lo16 = _mm512_set1_epi32(0xffff);
  c.one = _mm512_set1_epi32(1);
  c.c16 = _mm512_set1_epi32(16);
  c.bits_mask = _mm512_set1_epi32(0x1f);
  c.esc_bit = _mm512_set1_epi32(0x100);
  c.mask0 = _mm512_set1_epi32(static_cast<int>((1u << m.base.scale_bits) - 1));
  c.shift0 = _mm_cvtsi32_si128(static_cast<int>(m.base.scale_bits));
  c.ns_minus_1 = _mm512_set1_epi32(static_cast<int>(m.base.num_symbols - 1));
  c.exact = _mm512_set1_epi32(static_cast<int>(m.num_exact));
  c.cls_shift = _mm512_set1_epi32(static_cast<int>(m.num_exact - m.cls0));  // wraps as the kernel's
  c.unranked = _mm512_set1_epi32(static_cast<int>(m.num_ctx - 2));
  c.have_symbols = m.base.num_symbols != 0;
  const __m512i c15 = _mm512_set1_epi32(15), one = c.one, two = _mm512_set1_epi32(2), lo16 = c.lo16;
  Words w{s.words, s.pos, s.end, false};
  __mmask16 bad = 0;
  for (uint32_t t = 0; t < steps; ++t) {
    // Phase 1: the context table (compact tables, rans1_impl.hpp); both vectors'
    // lookups issued together, then the states, then renormalisation.
    __m512i bitsv[2], slotv[2], fbv[2], nxv[2], sv[2];
    for (int k = 0; k < 2; ++k) {
      bitsv[k] = _mm512_and_si512(iv[k], c15);
      const __m512i rb = _mm512_andnot_si512(c15, iv[k]);
      slotv[k] = _mm512_and_si512(xv[k], _mm512_sub_epi32(_mm512_sllv_epi32(one, bitsv[k]), one));
      const __m512i idx =
          _mm512_and_si512(_mm512_i32gather_epi32(_mm512_add_epi32(rb, _mm512_add_epi32(slotv[k], slotv[k])), tab, 1), lo16);
      eoffv[k] = _mm512_add_epi32(_mm512_add_epi32(rb, _mm512_sllv_epi32(two, bitsv[k])), _mm512_slli_epi32(idx, 4));
    }
    for (int k = 0; k < 2; ++k) {
      fbv[k] = _mm512_i32gather_epi32(eoffv[k], tab, 1);
      nxv[k] = _mm512_i32gather_epi32(eoffv[k], tab_next, 1);
    }
    for (int k = 0; k < 2; ++k)
      xv[k] = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_and_si512(fbv[k], lo16), _mm512_srlv_epi32(xv[k], bitsv[k])),
                               _mm512_sub_epi32(slotv[k], _mm512_srli_epi32(fbv[k], 16)));
    for (int k = 0; k < 2; ++k) {
      xv[k] = renorm16(xv[k], 0xffff, w);
      escm[k] = _mm512_cmpeq_epi32_mask(nxv[k], _mm512_setzero_si512());
    }
    // The listed lanes' symbols (the escaped lanes' are set below) and next infos.
    for (int k = 0; k < 2; ++k) {
      sv[k] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), static_cast<__mmask16>(~escm[k]), eoffv[k], tab_sym, 1);
      iv[k] = nxv[k];
    }
    if (escm[0] | escm[1]) {
      const unsigned n0 = static_cast<unsigned>(__builtin_popcount(escm[0]));
      const unsigned n = n0 + static_cast<unsigned>(__builtin_popcount(escm[1]));
      if (n <= 16) {
        // Packed into one vector in lane order: vector 0's escaped lanes, then vector 1's.
        const __mmask16 upper = static_cast<__mmask16>(((1u << n) - 1) & ~((1u << n0) - 1));
        __m512i xc = _mm512_mask_expand_epi32(_mm512_maskz_compress_epi32(escm[0], xv[0]), upper,
                                              _mm512_maskz_compress_epi32(escm[1], xv[1]));
        const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
        __m512i scv, ccv, icv;
        escaped<1, T>(o, rank, c, &xc, &valid, w, &scv, &ccv, &icv, bad);
        // Back to the lanes: vector 0 takes packed lanes 0 .., vector 1 those from n0.
        xv[0] = _mm512_mask_expand_epi32(xv[0], escm[0], xc);
        sv[0] = _mm512_mask_expand_epi32(sv[0], escm[0], scv);
        cv[0] = _mm512_mask_expand_epi32(cv[0], escm[0], ccv);
        iv[0] = _mm512_mask_expand_epi32(iv[0], escm[0], icv);
        if (escm[1]) {
          xv[1] = _mm512_mask_expand_epi32(xv[1], escm[1], _mm512_maskz_compress_epi32(upper, xc));
          sv[1] = _mm512_mask_expand_epi32(sv[1], escm[1], _mm512_maskz_compress_epi32(upper, scv));
          cv[1] = _mm512_mask_expand_epi32(cv[1], escm[1], _mm512_maskz_compress_epi32(upper, ccv));
          iv[1] = _mm512_mask_expand_epi32(iv[1], escm[1], _mm512_maskz_compress_epi32(upper, icv));
        }
      } else {
        __m512i scv[2], ccv[2], icv[2];
        escaped<2, T>(o, rank, c, xv, escm, w, scv, ccv, icv, bad);
        for (int k = 0; k < 2; ++k) {
          sv[k] = _mm512_mask_mov_epi32(sv[k], escm[k], scv[k]);
          cv[k] = _mm512_mask_mov_epi32(cv[k], escm[k], ccv[k]);
          iv[k] = _mm512_mask_mov_epi32(iv[k], escm[k], icv[k]);
        }
      }
    }
    const uint32_t r = t % kRun;
    if (sizeof(T) == 2) {
      rows[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(sv[0])), _mm512_cvtepi32_epi16(sv[1]), 1);
    } else {
      rows[2 * r] = sv[0];
      rows[2 * r + 1] = sv[1];
    }
    if (r == kRun - 1) {
      store_run(rows, seg, dst + (t - r));
    } else if (t + 1 == steps) {  // a last, partial run: a lane at a time
      T* d = dst + (t - r);
      alignas(64) T buf[kRun][kLanes];
      for (uint32_t j = 0; j <= r; ++j)
        for (int v = 0; v < kRowVecs; ++v) _mm512_store_si512(&buf[j][v * 16], rows[kRowVecs * j + v]);
      for (uint32_t l = 0; l < kLanes; ++l, d += seg)
        for (uint32_t j = 0; j <= r; ++j) d[j] = buf[j][l];
    }
  }
  for (int k = 0; k < 2; ++k) {  // the contexts: the listed lanes' from their last entry
    cv[k] = _mm512_mask_i32gather_epi32(cv[k], static_cast<__mmask16>(~escm[k]), eoffv[k],
                                        reinterpret_cast<const int*>(o.tab + 12), 1);
    _mm512_storeu_si512(s.x + 16 * k, xv[k]);
    _mm512_storeu_si512(s.ctx + 16 * k, cv[k]);
  }
  s.pos = w.pos;
  s.overrun |= w.overrun;
  s.bad |= bad != 0;
}

}  // namespace

void steps_avx512(const ImageView& m, const Order0Tables& o, Lanes& s, uint32_t steps, uint32_t seg, uint16_t* dst) {
  steps_impl(m, o, s, steps, seg, dst);
}
void steps_avx512(const ImageView& m, const Order0Tables& o, Lanes& s, uint32_t steps, uint32_t seg, uint32_t* dst) {
  steps_impl(m, o, s, steps, seg, dst);
}
#undef LLMIO_AVX512
#endif  // __x86_64__

}  // namespace detail
}  // namespace rans1
}  // namespace llmio
