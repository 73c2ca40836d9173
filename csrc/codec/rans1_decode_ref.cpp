// rans1 decoders: the block decoder the CPU path and the host emulation of the
// CUDA kernel share (the kernel's per-lane logic from rans1_device.hpp, the
// warp's ballots as loops over the lanes), and the reference decoder (the
// oracle both are tested against), written apart from them: it searches the
// model's quantised counts instead of reading the decode image's slot tables.
#include <algorithm>
#include <string>

#include "codec/rans1.hpp"
#include "codec/rans1_impl.hpp"
#include "codec/rans_impl.hpp"

namespace llmio {
namespace rans1 {
using rans::load_u16;
using rans::load_u32;
using rans::detail::kNone;

namespace {

// Decodes one block as a warp of the kernel does (detail::step, rans1_impl.hpp);
// stops at the first overrun, as the kernel. Returns a rans::Status.
template <class T>
int32_t decode_block(const ImageView& m, const BlockSpan& span, T* dst) {
  detail::Lanes s;
  if (detail::init_lanes(m, span, s) != rans::kOk) return rans::kBadState;
  for (uint32_t t = 0; t < span.seg && !s.overrun; ++t) detail::step(m, s, t, span.seg, dst);
  return detail::finish_lanes(s);
}

// Steps [0, steps) of a block whose lanes are all active for them (steps <=
// len[31]) in plain C++ tuned for the CPU (the path without AVX2): branch-free
// renormalisation, the order-0 tables of the AVX2 decoder, the escaped lanes
// found through a bit mask. Bit-identical to detail::step().
template <class T>
void steps_scalar_impl(const ImageView& m, const detail::Order0Tables& o, detail::Lanes& s, uint32_t steps,
                       uint32_t seg, T* dst) {
  static const uint8_t kZeroWord[2] = {0, 0};
  const uint32_t* ctx_info = m.ctx;
  const uint32_t* slots = m.slots;
  const uint32_t* rank = m.base.rank;
  const uint32_t S0 = m.base.scale_bits, mask0 = (1u << S0) - 1, ns = m.base.num_symbols;
  const uint32_t exact = m.num_exact, cls_shift = m.num_exact - m.cls0, unranked = m.num_ctx - 2;
  const uint8_t* words = s.words;
  uint64_t pos = s.pos;
  const uint64_t end = s.end;
  bool overrun = false, bad = false;
  uint32_t x[kLanes], ctx[kLanes], w0[kLanes], info0[kLanes], v[kLanes];
  for (uint32_t l = 0; l < kLanes; ++l) {
    x[l] = s.x[l];
    ctx[l] = s.ctx[l];
  }
  auto renorm = [&](uint32_t& xl) LLMIO_ALWAYS_INLINE {
    const bool need = xl < kStateLow;
    const bool in = pos < end;
    const uint8_t* p = in ? words + 2 * pos : kZeroWord;
    const uint32_t w = rans::load_u16(p);
    overrun |= need & !in;
    xl = need ? (xl << 16) | w : xl;
    pos += need;
  };
  for (uint32_t t = 0; t < steps; ++t) {
    uint32_t esc = 0;
    for (uint32_t l = 0; l < kLanes; ++l) {  // phase 1
      const uint32_t info = ctx_info[ctx[l]];
      const uint32_t bits = info & 15u;
      const uint32_t* e = slots + 2 * (uint64_t(info >> 4) + (x[l] & ((1u << bits) - 1)));
      const uint32_t fb = e[1];
      x[l] = (fb & 0xffffu) * (x[l] >> bits) + (fb >> 16);
      w0[l] = e[0];
      esc |= uint32_t((e[0] & 0xffffu) == kEscapeRank) << l;
    }
    for (uint32_t l = 0; l < kLanes; ++l) renorm(x[l]);
    if (esc) {
      bool high = false;
      for (uint32_t e = esc; e; e &= e - 1) {  // phase 2
        const uint32_t l = static_cast<uint32_t>(__builtin_ctz(e));
        const uint32_t slot = x[l] & mask0;
        const uint32_t fb = o.fb[slot];
        info0[l] = o.info[slot];
        x[l] = (fb & 0xffffu) * (x[l] >> S0) + (fb >> 16);
      }
      for (uint32_t e = esc; e; e &= e - 1) renorm(x[static_cast<uint32_t>(__builtin_ctz(e))]);
      for (uint32_t e = esc; e; e &= e - 1) {  // phase 3
        const uint32_t l = static_cast<uint32_t>(__builtin_ctz(e));
        const uint32_t bits = info0[l] & 0x1fu, lo = bits < 16 ? bits : 16;
        v[l] = x[l] & ((1u << lo) - 1);
        x[l] >>= lo;
        high |= bits > 16;
      }
      for (uint32_t e = esc; e; e &= e - 1) renorm(x[static_cast<uint32_t>(__builtin_ctz(e))]);
      if (high) {
        for (uint32_t e = esc; e; e &= e - 1) {  // phase 4
          const uint32_t l = static_cast<uint32_t>(__builtin_ctz(e));
          const uint32_t bits = info0[l] & 0x1fu;
          if (bits > 16) {
            v[l] |= (x[l] & ((1u << (bits - 16)) - 1)) << 16;
            x[l] >>= bits - 16;
          }
        }
        for (uint32_t e = esc; e; e &= e - 1) renorm(x[static_cast<uint32_t>(__builtin_ctz(e))]);
      }
    }
    T* d = dst + t;
    for (uint32_t l = 0; l < kLanes; ++l) {
      uint32_t sym;
      if (!((esc >> l) & 1u)) {
        sym = rank[w0[l] & 0xffffu];
        ctx[l] = w0[l] >> 16;
      } else {
        const uint32_t b = info0[l] >> 16, idx = o.base[b] + v[l];
        if (info0[l] & 0x100u) {  // escape bucket: the value
          sym = idx;
          bad |= sizeof(T) == 2 && idx > 0xffffu;
          ctx[l] = unranked;
        } else {
          bad |= idx >= ns;
          sym = rank[idx < ns ? idx : 0];
          ctx[l] = idx < exact ? idx : b + cls_shift;
        }
      }
      d[size_t(l) * seg] = static_cast<T>(sym);
    }
  }
  for (uint32_t l = 0; l < kLanes; ++l) {
    s.x[l] = x[l];
    s.ctx[l] = ctx[l];
  }
  s.pos = pos;
  s.overrun |= overrun;
  s.bad |= bad;
}

// The CPU path: the steps all 32 lanes take part in, sixteen lanes per AVX-512
// vector or eight per AVX2 vector as `simd` (resolved) says, else steps_scalar;
// the rest (a short last block) through detail::step.
template <class T>
int32_t decode_block_fast(const ImageView& m, const detail::Order0Tables& o, const BlockSpan& span, T* dst,
                          Simd simd) {
  detail::Lanes s;
  if (detail::init_lanes(m, span, s) != rans::kOk) return rans::kBadState;
  uint32_t t = 0;
  const uint32_t full = s.len[kLanes - 1];
#if defined(__x86_64__)
  if (full && o.tab && simd == Simd::kAvx512) {
    detail::steps_avx512(m, o, s, full, span.seg, dst);
    t = full;
  } else if (full && o.tab && simd == Simd::kAvx2) {
    detail::steps_avx2(m, o, s, full, span.seg, dst);
    t = full;
  }
#endif
  if (t == 0 && full) {
    steps_scalar_impl(m, o, s, full, span.seg, dst);
    t = full;
  }
  for (; t < span.seg && !s.overrun; ++t) detail::step(m, s, t, span.seg, dst);
  return detail::finish_lanes(s);
}

std::string block_error(int32_t st, uint32_t blk, uint32_t nb, size_t nbytes) {
  const std::string where = "rans1 payload: block " + std::to_string(blk) + " of " + std::to_string(nb);
  switch (st) {
    case rans::kBadHeader:
      return "rans1 payload: header, block table or size inconsistent (block " + std::to_string(blk) + " of " +
             std::to_string(nb) + ", " + std::to_string(nbytes) + " bytes)";
    case rans::kBadState: return where + " starts from an invalid state (corrupt)";
    case rans::kOverrun: return where + " runs out of words (corrupt)";
    case rans::kBadSymbol: return where + " decodes a symbol the model does not have (corrupt)";
    default: return where + " ends in states or at a word count the encoder did not (corrupt)";
  }
}

void check_header(const uint8_t* src, size_t nbytes, uint32_t n) {
  if (nbytes < kPayloadHeaderBytes) throw CodecError("rans1 payload truncated: " + std::to_string(nbytes) + " bytes");
  if (load_u32(src) != kPayloadMagic) throw CodecError("rans1 payload: bad magic (not a rans1 chunk)");
  if (load_u32(src + 4) != n)
    throw CodecError("rans1 payload holds " + std::to_string(load_u32(src + 4)) + " tokens, expected " +
                     std::to_string(n));
  if (n == 0 && (nbytes != kPayloadHeaderBytes || load_u32(src + 8) != 0 || load_u32(src + 12) != 0))
    throw CodecError("rans1 payload: bad header for an empty chunk");
}

}  // namespace

void Model::decode(const uint8_t* src, size_t nbytes, void* out, size_t num_tokens, bool reference,
                   Simd simd) const {
  if (num_tokens > 0xffffffffu) throw CodecError("rans1 decode: more than 2^32-1 tokens");
  const uint32_t n = static_cast<uint32_t>(num_tokens);
  check_header(src, nbytes, n);
  if (reference) return decode_reference(src, nbytes, out, n);
  simd = rans::resolve_simd(simd);
  const ImageView m = image_view(image_.data());
  const detail::Order0Tables o{simd_fb_.data(), simd_info_.data(), simd_base_.data(), cpu_ctx_info_.data(),
                               cpu_tab_.empty() ? nullptr : reinterpret_cast<const uint8_t*>(cpu_tab_.data())};
  const uint32_t nb = rans::num_blocks_for(n);
  for (uint32_t blk = 0; blk < nb; ++blk) {
    BlockSpan span;
    int32_t st = locate_block(src, nbytes, n, blk, &span);
    if (st == rans::kOk) {
      const size_t first = size_t(blk) * kBlockSymbols;
      st = token_bytes_ == 2 ? decode_block_fast(m, o, span, static_cast<uint16_t*>(out) + first, simd)
                             : decode_block_fast(m, o, span, static_cast<uint32_t*>(out) + first, simd);
    }
    if (st != rans::kOk) throw CodecError(block_error(st, blk, nb, nbytes));
  }
}

// ---------------------------------------------------------------- the oracle

void Model::decode_reference(const uint8_t* src, size_t nbytes, void* out, uint32_t n) const {
  const uint32_t nb = rans::num_blocks_for(n), nrb = num_rank_buckets_, ns = num_symbols();
  const uint32_t start = static_cast<uint32_t>(ctx_.size()) - 1;
  auto put = [&](size_t i, uint32_t sym) {
    if (token_bytes_ == 2)
      static_cast<uint16_t*>(out)[i] = static_cast<uint16_t>(sym);
    else
      static_cast<uint32_t*>(out)[i] = sym;
  };
  for (uint32_t blk = 0; blk < nb; ++blk) {
    BlockSpan span;
    if (locate_block(src, nbytes, n, blk, &span) != rans::kOk)
      throw CodecError(block_error(rans::kBadHeader, blk, nb, nbytes));
    uint32_t x[kLanes], ctx[kLanes];
    for (uint32_t l = 0; l < kLanes; ++l) {
      x[l] = load_u32(span.states + 4 * l);
      ctx[l] = start;
      if (x[l] < kStateLow) throw CodecError(block_error(rans::kBadState, blk, nb, nbytes));
    }
    uint64_t pos = span.word_begin;
    auto renorm = [&](uint32_t l) {
      if (x[l] >= kStateLow) return;
      if (pos >= span.word_end) throw CodecError(block_error(rans::kOverrun, blk, nb, nbytes));
      x[l] = x[l] << 16 | load_u16(span.words + 2 * pos++);
    };
    const size_t first = size_t(blk) * kBlockSymbols;
    for (uint32_t t = 0; t < span.seg; ++t) {
      bool act[kLanes], esc[kLanes];
      uint32_t r[kLanes], bk[kLanes], raw[kLanes], val[kLanes];
      for (uint32_t l = 0; l < kLanes; ++l) {  // phase 1: find the context entry whose [cum, cum + freq) holds the slot
        act[l] = t < lane_tokens(span, l);
        esc[l] = false;
        if (!act[l]) continue;
        const Context& c = ctx_[ctx[l]];
        const uint32_t slot = x[l] & ((1u << c.bits) - 1);
        uint32_t f, cum;
        auto it = std::upper_bound(c.entries.begin(), c.entries.end(), slot,
                                   [](uint32_t s, const Entry& e) { return s < e.cum; });
        if (slot >= c.escape_cum) {
          esc[l] = true;
          f = c.escape_freq;
          cum = c.escape_cum;
        } else {
          --it;
          r[l] = it->rank;
          f = it->freq;
          cum = it->cum;
        }
        x[l] = f * (x[l] >> c.bits) + slot - cum;
      }
      for (uint32_t l = 0; l < kLanes; ++l)
        if (act[l]) renorm(l);
      for (uint32_t l = 0; l < kLanes; ++l) {  // phase 2: the order-0 bucket
        raw[l] = 0;
        val[l] = 0;
        if (!esc[l]) continue;
        const uint32_t slot = x[l] & ((1u << scale_bits_) - 1);
        const uint32_t b = static_cast<uint32_t>(std::upper_bound(cum_.begin(), cum_.end(), slot) - cum_.begin()) - 1;
        bk[l] = b;
        raw[l] = b < nrb ? rans::rank_bucket_bits(b) : rans::escape_bits(b - nrb);
        x[l] = freq_[b] * (x[l] >> scale_bits_) + slot - cum_[b];
      }
      for (uint32_t l = 0; l < kLanes; ++l)
        if (esc[l]) renorm(l);
      for (uint32_t l = 0; l < kLanes; ++l)  // phase 3: low raw bits
        if (esc[l] && raw[l]) {
          const uint32_t lo = std::min<uint32_t>(raw[l], 16);
          val[l] = x[l] & ((1u << lo) - 1);
          x[l] >>= lo;
        }
      for (uint32_t l = 0; l < kLanes; ++l)
        if (esc[l] && raw[l]) renorm(l);
      for (uint32_t l = 0; l < kLanes; ++l)  // phase 4: high raw bits
        if (esc[l] && raw[l] > 16) {
          val[l] |= (x[l] & ((1u << (raw[l] - 16)) - 1)) << 16;
          x[l] >>= raw[l] - 16;
        }
      for (uint32_t l = 0; l < kLanes; ++l)
        if (esc[l] && raw[l] > 16) renorm(l);
      for (uint32_t l = 0; l < kLanes; ++l) {
        if (!act[l]) continue;
        uint32_t sym;
        if (esc[l] && bk[l] >= nrb) {
          sym = rans::escape_base(bk[l] - nrb) + val[l];
          r[l] = kNone;
        } else {
          if (esc[l]) r[l] = rans::rank_bucket_base(bk[l]) + val[l];
          if (r[l] >= ns) throw CodecError(block_error(rans::kBadSymbol, blk, nb, nbytes));
          sym = rank_to_sym_[r[l]];
        }
        put(first + size_t(l) * span.seg + t, sym);
        ctx[l] = context_of_rank(r[l]);
      }
    }
    for (uint32_t l = 0; l < kLanes; ++l)
      if (x[l] != kStateLow) throw CodecError(block_error(rans::kBadFinal, blk, nb, nbytes));
    if (pos != span.word_end) throw CodecError(block_error(rans::kBadFinal, blk, nb, nbytes));
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
    BlockSpan span;
    int32_t st = locate_block(src + cd.src_offset, cd.src_bytes, cd.num_tokens, bd.block, &span);
    if (st == rans::kOk && m.base.token_bytes != token_bytes) st = rans::kBadHeader;
    if (st == rans::kOk) {
      const uint64_t first = cd.out_offset + uint64_t(bd.block) * kBlockSymbols;
      st = token_bytes == 2 ? decode_block(m, span, static_cast<uint16_t*>(out) + first)
                            : decode_block(m, span, static_cast<uint32_t*>(out) + first);
    }
    if (st != rans::kOk && status[bd.chunk] == rans::kOk) status[bd.chunk] = st;
  }
}

}  // namespace rans1
}  // namespace llmio
