// Declarations shared by the decoders of the rans1 codec (rans1_decode_ref.cpp,
// rans1_decode_avx2.cpp); not part of the codec's interface (that is rans1.hpp).
//
// A block's 32 lanes as the kernel keeps them (one thread each), and one step of
// the kernel's per-lane logic over all of them in its order: phase 1 (context
// table) for every active lane, phase 2 (order-0 bucket) for the lanes that
// escaped, phases 3 / 4 (low / high raw bits) for those with raw bits; after
// each phase the lanes whose state fell below L take the next words in lane
// order (the warp's ballot + prefix popcount, here a loop). A read past the
// block's words yields 0 and marks the block overrun.
#pragma once

#include <cstddef>
#include <cstdint>

#include "codec/rans1.hpp"

namespace llmio {
namespace rans1 {
namespace detail {

struct Lanes {
  uint32_t x[kLanes], ctx[kLanes], len[kLanes];
  const uint8_t* words;
  uint64_t pos, end;
  bool overrun, bad;
};

inline int32_t init_lanes(const ImageView& m, const BlockSpan& span, Lanes& s) {
  bool bad_state = false;
  for (uint32_t l = 0; l < kLanes; ++l) {
    s.x[l] = rans::load_u32(span.states + 4 * l);
    bad_state |= s.x[l] < kStateLow;
    s.len[l] = lane_tokens(span, l);
    s.ctx[l] = start_context(m);
  }
  s.words = span.words;
  s.pos = span.word_begin;
  s.end = span.word_end;
  s.overrun = s.bad = false;
  return bad_state ? rans::kBadState : rans::kOk;
}

inline void renorm(Lanes& s, uint32_t& x) {
  if (x < kStateLow) {
    s.overrun |= s.pos >= s.end;
    x = (x << 16) | (s.pos < s.end ? rans::load_u16(s.words + 2 * s.pos) : 0u);
    ++s.pos;
  }
}

// Step t of every lane with t < len[l]; token of lane l goes to dst[l * seg + t].
template <class T>
inline void step(const ImageView& m, Lanes& s, uint32_t t, uint32_t seg, T* dst) {
  uint32_t w0[kLanes], b[kLanes], v[kLanes], bits[kLanes];
  uint32_t na = 0;  // lanes are full-length first: the active lanes are 0 .. na-1
  while (na < kLanes && s.len[na] > t) ++na;
  for (uint32_t l = 0; l < na; ++l) w0[l] = decode_context(m, s.ctx[l], s.x[l]);
  for (uint32_t l = 0; l < na; ++l) renorm(s, s.x[l]);
  bool any_escape = false, any_high = false;
  for (uint32_t l = 0; l < na; ++l) {
    bits[l] = 0;
    v[l] = 0;
    if ((w0[l] & 0xffffu) == kEscapeRank) {
      any_escape = true;
      b[l] = rans::decode_bucket(m.base, s.x[l]);
      bits[l] = m.base.bucket[rans::kBucketWords * b[l] + 3] & 0xffu;
    }
  }
  if (any_escape) {
    for (uint32_t l = 0; l < na; ++l) renorm(s, s.x[l]);
    for (uint32_t l = 0; l < na; ++l)
      if (bits[l]) {
        v[l] = rans::take_bits(s.x[l], bits[l] < 16 ? bits[l] : 16);
        any_high |= bits[l] > 16;
      }
    for (uint32_t l = 0; l < na; ++l) renorm(s, s.x[l]);
    if (any_high) {
      for (uint32_t l = 0; l < na; ++l)
        if (bits[l] > 16) v[l] |= rans::take_bits(s.x[l], bits[l] - 16) << 16;
      for (uint32_t l = 0; l < na; ++l) renorm(s, s.x[l]);
    }
  }
  for (uint32_t l = 0; l < na; ++l) {
    uint32_t sym;
    if ((w0[l] & 0xffffu) == kEscapeRank) {
      sym = rans::symbol_of(m.base, b[l], v[l], &s.bad);
      s.ctx[l] = context_after_bucket(m, b[l], v[l]);
    } else {
      sym = m.base.rank[w0[l] & 0xffffu];  // < num_symbols: the image lists only ranks the model has
      s.ctx[l] = w0[l] >> 16;
    }
    dst[size_t(l) * seg + t] = static_cast<T>(sym);
  }
}

inline int32_t finish_lanes(const Lanes& s) {
  if (s.overrun) return rans::kOverrun;
  if (s.bad) return rans::kBadSymbol;
  bool ok = s.pos == s.end;
  for (uint32_t l = 0; l < kLanes; ++l) ok &= s.x[l] == kStateLow;
  return ok ? rans::kOk : rans::kBadFinal;
}

// Per-slot tables of the order-0 model for the AVX2 decoder (Model::finish):
// fb[slot] = freq | (slot - cum) << 16, info[slot] = raw bits | escape << 8 |
// bucket << 16, base[bucket] = its first rank (or value, for escape buckets).
//
// And the compact context tables of the AVX2 decoder (CPU only, derived from
// the model like the decode image; the image's 8-byte slots cost a cache miss
// per token once the tables outgrow L2). `tab` is one byte array of 16-byte
// aligned regions, one per context:
//
//   region (at byte offset R, 16-aligned): u16 entry index [2^bits slots] |
//                                          entry [k + 1] (16 bytes each)
//   entry i (at R + 2^(bits+1) + 16 i):   u32 freq | cum << 16
//                                          u32 next info (0: the escape)
//                                          u32 symbol (0 for the escape)
//                                          u32 next context (kNone for the escape)
//
// ctx_info[c] = R | bits (the "info" of context c: bits >= 1, so an info is
// never 0). The listed entries come first in rank order, the escape last, as
// in the model. A decoder holds a lane's info instead of its context: a listed
// token's entry gives the next info without a lookup of its context.
// tab is null when the tables would pass 2^31 bytes (gather offsets are
// signed 32-bit): the scalar path decodes then.
struct Order0Tables {
  const uint32_t* fb;
  const uint32_t* info;
  const uint32_t* base;
  const uint32_t* ctx_info = nullptr;
  const uint8_t* tab = nullptr;
};
constexpr uint32_t kTabEntryBytes = 16;

#if defined(__x86_64__)
// Steps [0, steps) of a block whose lanes are all active for them (steps <=
// len[31]), eight lanes per AVX2 vector, every phase vectorised. Bit-identical
// to step(). Only where rans::cpu_simd() is at least kAvx2.
void steps_avx2(const ImageView& m, const Order0Tables& o, Lanes& s, uint32_t steps, uint32_t seg, uint16_t* dst);
void steps_avx2(const ImageView& m, const Order0Tables& o, Lanes& s, uint32_t steps, uint32_t seg, uint32_t* dst);
// The same steps, sixteen lanes per AVX-512 vector (rans1_decode_avx512.cpp).
// Only where rans::cpu_simd() is kAvx512.
void steps_avx512(const ImageView& m, const Order0Tables& o, Lanes& s, uint32_t steps, uint32_t seg, uint16_t* dst);
void steps_avx512(const ImageView& m, const Order0Tables& o, Lanes& s, uint32_t steps, uint32_t seg, uint32_t* dst);
#endif

}  // namespace detail
}  // namespace rans1
}  // namespace llmio
