// rans reference decoder (the oracle the AVX2 path and the CUDA kernel are
// tested against), its runtime dispatch to the AVX2 steps, and the host
// emulation of the CUDA kernel (emulate_warps).
#include <algorithm>
#include <cstring>

#include "codec/rans.hpp"
#include "codec/rans_impl.hpp"

namespace llmio {
namespace rans {
using namespace detail;

// ---------------------------------------------------------------- decoder (the oracle)
//
// Block by block, step by step, in the order the warp of the CUDA kernel works:
// phase 1 decodes every lane's bucket, phase 2 takes the low raw bits, phase 3
// the high raw bits (only buckets wider than 16 bits have them); after each
// phase the lanes whose state fell below L take the next word, in lane order.
// Renormalisation is branch-free (a state is below L about half of the time,
// which a branch would mispredict); a read past the block's words yields 0 and
// marks the block corrupt, checked once at its end.

void Model::decode(const uint8_t* src, size_t nbytes, void* out, size_t num_tokens, bool simd) const {
  if (num_tokens > 0xffffffffu) throw CodecError("rans decode: more than 2^32-1 tokens");
  const uint32_t n = static_cast<uint32_t>(num_tokens);
  const uint32_t nb = num_blocks_for(n);
  if (nbytes < kPayloadHeaderBytes) throw CodecError("rans payload truncated: " + std::to_string(nbytes) + " bytes");
  if (load_u32(src) != kPayloadMagic) throw CodecError("rans payload: bad magic (not a rans chunk)");
  if (load_u32(src + 4) != n)
    throw CodecError("rans payload holds " + std::to_string(load_u32(src + 4)) + " tokens, expected " +
                     std::to_string(n));
  if (nb == 0 && (nbytes != kPayloadHeaderBytes || load_u32(src + 8) != 0 || load_u32(src + 12) != 0))
    throw CodecError("rans payload: bad header for an empty chunk");
  const uint32_t S = scale_bits_, mask = (1u << S) - 1, ns = num_symbols();
  const uint16_t* slot_of = slot_.data();
  const Bucket* bucket_info = buckets_.data();
  const uint32_t* rank = rank_to_sym_.data();
#if defined(__x86_64__)
  const bool use_simd = simd && !simd_fb_.empty() && avx2_available();
  const SimdArgs simd_args{simd_fb_.data(), simd_info_.data(), simd_base_.data(), rank, ns, S, token_bytes_};
#endif
  for (uint32_t blk = 0; blk < nb; ++blk) {
    BlockSpan span;
    if (locate_block(src, nbytes, n, blk, &span) != kOk)
      throw CodecError("rans payload: header, block table or size inconsistent (block " + std::to_string(blk) +
                       " of " + std::to_string(nb) + ", " + std::to_string(nbytes) + " bytes)");
    uint32_t x[kLanes], b[kLanes], v[kLanes];
    for (uint32_t l = 0; l < kLanes; ++l) {
      x[l] = load_u32(span.states + 4 * l);
      if (x[l] < kStateLow) throw CodecError("rans payload: block " + std::to_string(blk) + " lane " +
                                             std::to_string(l) + " starts from an invalid state");
    }
    const uint8_t* words = span.words;
    const uint64_t end = span.word_end;
    uint64_t pos = span.word_begin;
    bool overrun = false, bad = false;
    auto renorm = [&](uint32_t& s) {
      const bool need = s < kStateLow;
      const uint32_t w = pos < end ? load_u16(words + 2 * pos) : 0;
      overrun |= need & (pos >= end);
      s = need ? (s << 16) | w : s;
      pos += need;
    };
    const uint32_t m = span.symbols, steps = (m + kLanes - 1) / kLanes;
    const size_t first = size_t(blk) * kBlockSymbols;
    // One step of `active` lanes; full steps get a constant trip count (unrolled).
    auto step = [&](uint32_t t, uint32_t active) LLMIO_ALWAYS_INLINE {
      uint32_t bits[kLanes];
      bool any_high = false;
      for (uint32_t l = 0; l < active; ++l) {  // phase 1: bucket
        const uint32_t slot = x[l] & mask;
        b[l] = slot_of[slot];
        const Bucket& e = bucket_info[b[l]];
        bits[l] = e.bits;
        x[l] = e.freq * (x[l] >> S) + slot - e.cum;
        renorm(x[l]);
      }
      for (uint32_t l = 0; l < active; ++l) {  // phase 2: low raw bits (none: x stays >= L)
        const uint32_t lo = bits[l] < 16 ? bits[l] : 16;
        v[l] = x[l] & ((1u << lo) - 1);
        x[l] >>= lo;
        any_high |= bits[l] > 16;
        renorm(x[l]);
      }
      if (any_high) {
        for (uint32_t l = 0; l < active; ++l) {  // phase 3: high raw bits
          const uint32_t hi = bits[l] > 16 ? bits[l] - 16 : 0;
          v[l] |= (x[l] & ((1u << hi) - 1)) << 16;
          x[l] >>= hi;
          renorm(x[l]);
        }
      }
      const size_t o = first + size_t(t) * kLanes;
      for (uint32_t l = 0; l < active; ++l) {
        const Bucket& e = bucket_info[b[l]];
        const uint32_t idx = e.base + v[l];
        uint32_t sym;
        if (e.escape) {
          sym = idx;
          bad |= token_bytes_ == 2 && idx > 0xffffu;
        } else {
          bad |= idx >= ns;
          sym = rank[idx < ns ? idx : 0];
        }
        if (token_bytes_ == 2)
          static_cast<uint16_t*>(out)[o + l] = static_cast<uint16_t>(sym);
        else
          static_cast<uint32_t*>(out)[o + l] = sym;
      }
    };
    const uint32_t full = m / kLanes;
    uint32_t done = 0;
#if defined(__x86_64__)
    if (use_simd && full) {
      void* dst = token_bytes_ == 2 ? static_cast<void*>(static_cast<uint16_t*>(out) + first)
                                    : static_cast<void*>(static_cast<uint32_t*>(out) + first);
      steps_avx2(simd_args, x, words, pos, end, full, dst, overrun, bad);
      done = full;
    }
#endif
    for (uint32_t t = done; t < full; ++t) step(t, kLanes);
    if (full < steps) step(full, m - full * kLanes);
    if (overrun) throw CodecError("rans payload: block " + std::to_string(blk) + " runs out of words (corrupt)");
    if (bad) throw CodecError("rans payload: block " + std::to_string(blk) + " decodes a symbol the model does not have (corrupt)");
    for (uint32_t l = 0; l < kLanes; ++l)
      if (x[l] != kStateLow)
        throw CodecError("rans payload: block " + std::to_string(blk) + " lane " + std::to_string(l) +
                         " ends in a state the encoder did not start from (corrupt)");
    if (pos != end)
      throw CodecError("rans payload: block " + std::to_string(blk) + " leaves " + std::to_string(end - pos) +
                       " words unread (corrupt)");
  }
}

// ---------------------------------------------------------------- kernel emulation

void emulate_warps(const uint8_t* src, const ChunkDesc* chunks, size_t num_chunks, const BlockDesc* blocks,
                   size_t num_blocks, const uint32_t* const* images, void* out, uint32_t token_bytes,
                   int32_t* status) {
  for (size_t wi = 0; wi < num_blocks; ++wi) {
    const BlockDesc bd = blocks[wi];
    if (bd.chunk >= num_chunks) continue;
    const ChunkDesc cd = chunks[bd.chunk];
    const ImageView m = image_view(images[cd.model]);
    auto fail = [&](int32_t code) {
      if (status[bd.chunk] == kOk) status[bd.chunk] = code;
    };
    BlockSpan span;
    const int32_t st = locate_block(src + cd.src_offset, cd.src_bytes, cd.num_tokens, bd.block, &span);
    if (st != kOk || m.token_bytes != token_bytes) {
      fail(kBadHeader);
      continue;
    }
    uint32_t x[kLanes], b[kLanes], v[kLanes];
    bool bad_state = false;
    for (uint32_t l = 0; l < kLanes; ++l) {
      x[l] = load_u32(span.states + 4 * l);
      bad_state |= x[l] < kStateLow;
    }
    if (bad_state) {
      fail(kBadState);
      continue;
    }
    uint64_t pos = span.word_begin;
    bool overrun = false, bad_symbol = false;
    // A warp-wide renormalisation: lanes that need a word take consecutive
    // words in lane order (the kernel: ballot + popcount of lower lanes).
    auto renorm_all = [&](const bool* need) {
      uint64_t k = 0;
      for (uint32_t l = 0; l < kLanes; ++l) {
        if (!need[l]) continue;
        const uint64_t idx = pos + k++;
        const uint32_t w = idx < span.word_end ? load_u16(span.words + 2 * idx) : 0;
        overrun |= idx >= span.word_end;
        x[l] = (x[l] << 16) | w;
      }
      pos += k;
    };
    const uint32_t steps = (span.symbols + kLanes - 1) / kLanes;
    for (uint32_t t = 0; t < steps && !overrun; ++t) {
      bool active[kLanes], need[kLanes];
      bool any_hi = false;
      for (uint32_t l = 0; l < kLanes; ++l) {
        active[l] = t * kLanes + l < span.symbols;
        need[l] = false;
        if (!active[l]) continue;
        b[l] = decode_bucket(m, x[l]);
        need[l] = x[l] < kStateLow;
      }
      renorm_all(need);
      for (uint32_t l = 0; l < kLanes; ++l) {
        need[l] = false;
        v[l] = 0;
        if (!active[l]) continue;
        const uint32_t bits = m.bucket[kBucketWords * b[l] + 3] & 0xff;
        if (bits) {
          v[l] = take_bits(x[l], bits < 16 ? bits : 16);
          need[l] = x[l] < kStateLow;
        }
        any_hi |= bits > 16;
      }
      renorm_all(need);
      if (any_hi) {
        for (uint32_t l = 0; l < kLanes; ++l) {
          need[l] = false;
          if (!active[l]) continue;
          const uint32_t bits = m.bucket[kBucketWords * b[l] + 3] & 0xff;
          if (bits > 16) {
            v[l] |= take_bits(x[l], bits - 16) << 16;
            need[l] = x[l] < kStateLow;
          }
        }
        renorm_all(need);
      }
      for (uint32_t l = 0; l < kLanes; ++l) {
        if (!active[l]) continue;
        const uint32_t sym = symbol_of(m, b[l], v[l], &bad_symbol);
        const uint64_t i = cd.out_offset + uint64_t(bd.block) * kBlockSymbols + uint64_t(t) * kLanes + l;
        if (token_bytes == 2)
          static_cast<uint16_t*>(out)[i] = static_cast<uint16_t>(sym);
        else
          static_cast<uint32_t*>(out)[i] = sym;
      }
    }
    if (overrun) {
      fail(kOverrun);
      continue;
    }
    if (bad_symbol) {
      fail(kBadSymbol);
      continue;
    }
    bool final_ok = pos == span.word_end;
    for (uint32_t l = 0; l < kLanes; ++l) final_ok &= x[l] == kStateLow;
    if (!final_ok) fail(kBadFinal);
  }
}

}  // namespace rans
}  // namespace llmio
