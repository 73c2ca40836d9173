// Pieces of the rans1 token decoder shared by the CUDA kernel
// (csrc/cuda/rans1_decode.cu), the C++ reference decoder and the host
// emulation of the kernel (csrc/codec/rans1_decode_ref.cpp): the layout of the
// model's decode image, of the payload, and the per-lane arithmetic. Only the
// warp-collective parts (ballot, prefix popcount) differ between kernel and
// emulation, so a test of the emulation checks the kernel's logic bit for bit.
//
// rans1 codes each token with a frequency table selected by its context (the
// lane's previous token); a token the context's table does not list is an
// escape followed by the token coded with an order-0 bucket model exactly as
// "rans" codes it (rans_device.hpp: rank buckets + raw bits, escape buckets).
// A block of 32768 tokens is cut into 32 contiguous segments, one per lane, so
// that a lane's previous token is its own previous token.
//
// No standard library beyond <cstdint>: compiled by nvcc for the device.
#pragma once

#include <cstdint>

#include "codec/rans_device.hpp"
#include "common/hd.hpp"

namespace llmio {
namespace rans1 {

using rans::BlockDesc;
using rans::ChunkDesc;
using rans::kBlockSymbols;
using rans::kLanes;
using rans::kStateLow;

constexpr uint32_t kPayloadMagic = 0x314e4172u;  // "rAN1"
constexpr uint32_t kPayloadHeaderBytes = 16;
constexpr uint32_t kImageMagic = 0x4d493152u;    // "R1IM"
constexpr uint32_t kImageHeaderWords = 16;
constexpr uint32_t kEscapeRank = 0xffffu;        // an entry's rank field for the escape
constexpr uint32_t kMaxEntryRank = 0xfffeu;      // ranks a context table may list
constexpr uint32_t kMinCtxBits = 8, kMaxCtxBits = 15;   // largest context table: 2^ctx_bits slots
constexpr uint32_t kDefaultCtxBits = 11;
constexpr uint32_t kMinScaleBits = 9, kMaxScaleBits = 15;  // the order-0 (escape) model
constexpr uint32_t kDefaultScaleBits = 12;
constexpr uint32_t kMaxExact = 32767;            // contexts of single previous tokens (ranks < this)
constexpr uint64_t kMaxSlots = uint64_t(1) << 25;  // all context tables together (256 MiB image)

// The decode image, one contiguous array of uint32 words:
//
//   [0] kImageMagic [1] scale_bits [2] num_buckets [3] num_symbols [4] token_bytes
//   [5] bucket_off  [6] table_off   [7] rank_off    (the order-0 model, as rans_device.hpp)
//   [8] num_ctx     [9] num_exact   [10] cls0       [11] ctx_off   [12] slot_off
//   [13] num_slots  [14] num_rank_buckets           [15] 0
//   bucket_off: num_buckets x {freq, cum, base, bits | escape << 8}
//   table_off:  2^scale_bits uint16 bucket ids, two per word
//   rank_off:   num_symbols uint32 symbol ids in rank order
//   ctx_off:    num_ctx words: first slot << 4 | table bits (the context's table has 2^bits slots)
//   slot_off:   num_slots x 2 words: {rank | next context << 16, freq | (slot - cum) << 16}
//               (rank kEscapeRank: the escape; next context is the context the token sets)
//
// Contexts: the lane's previous token of rank r < num_exact selects context r;
// a ranked token of rank r >= num_exact selects num_exact + bucket(r) - cls0
// (one class per rank bucket, cls0 = bucket(num_exact)); an escaped (unranked)
// token selects num_ctx - 2; the first token of a segment num_ctx - 1.
struct ImageView {
  rans::ImageView base;  // the order-0 model (decode_bucket / take_bits / symbol_of of rans)
  uint32_t num_ctx, num_exact, cls0, num_slots;
  const uint32_t* ctx;
  const uint32_t* slots;
};

LLMIO_HD ImageView image_view(const uint32_t* w) {
  ImageView v;
  v.base = rans::image_view(w);
  v.num_ctx = w[8];
  v.num_exact = w[9];
  v.cls0 = w[10];
  v.ctx = w + w[11];
  v.slots = w + w[12];
  v.num_slots = w[13];
  return v;
}

LLMIO_HD uint32_t start_context(const ImageView& m) { return m.num_ctx - 1; }

// A read of the decode image (read-only while a kernel runs: the read-only data
// cache on the device, a plain load on the host).
LLMIO_HD uint32_t image_load(const uint32_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// The context set by a token decoded through the order-0 model (bucket b, raw value v).
LLMIO_HD uint32_t context_after_bucket(const ImageView& m, uint32_t b, uint32_t v) {
  const uint32_t* e = m.base.bucket + rans::kBucketWords * b;
  if (e[3] >> 8) return m.num_ctx - 2;  // escaped value: not ranked
  const uint32_t r = e[2] + v;
  return r < m.num_exact ? r : m.num_exact + b - m.cls0;
}

// Phase 1: the context table's entry for state x; x advances (needs a word
// after when x < L). Returns the entry's first word (rank | next context << 16).
LLMIO_HD uint32_t decode_context(const ImageView& m, uint32_t ctx, uint32_t& x) {
  const uint32_t info = image_load(m.ctx + ctx);
  const uint32_t bits = info & 15u;
  const uint32_t slot = x & ((1u << bits) - 1);
  const uint32_t* e = m.slots + 2 * (uint64_t(info >> 4) + slot);
  const uint32_t fb = image_load(e + 1);
  x = (fb & 0xffffu) * (x >> bits) + (fb >> 16);
  return image_load(e);
}

// Payload of a chunk (little-endian):
//   0      4            8            12     16                16+4nb            16+132nb
//   +------+------------+------------+------+-----------------+-----------------+-------------+
//   |"rAN1"| num_tokens | num_blocks |  0   | word_end[nb] u32| state[nb][32]u32| words u16 ..|
//   +------+------------+------------+------+-----------------+-----------------+-------------+
// Block b holds tokens [b * 32768, ...) of the chunk, m of them; lane l decodes
// its segment [l * S, min(m, (l + 1) * S)) with S = ceil(m / 32).
struct BlockSpan {
  uint64_t word_begin, word_end;
  const uint8_t* words;
  const uint8_t* states;
  uint32_t symbols;  // m
  uint32_t seg;      // S
};

LLMIO_HD uint32_t lane_tokens(const BlockSpan& s, uint32_t lane) {
  const uint32_t first = lane * s.seg;
  return first >= s.symbols ? 0u : (s.symbols - first < s.seg ? s.symbols - first : s.seg);
}

LLMIO_HD int32_t locate_block(const uint8_t* p, uint64_t bytes, uint32_t num_tokens, uint32_t blk, BlockSpan* out) {
  using rans::load_u32;
  if (bytes < kPayloadHeaderBytes) return rans::kBadHeader;
  const uint32_t nb = rans::num_blocks_for(num_tokens);
  if (load_u32(p) != kPayloadMagic || load_u32(p + 4) != num_tokens || load_u32(p + 8) != nb ||
      load_u32(p + 12) != 0 || blk >= nb)
    return rans::kBadHeader;
  const uint64_t fixed = kPayloadHeaderBytes + uint64_t(nb) * (4 + 4 * kLanes);
  if (bytes < fixed) return rans::kBadHeader;
  const uint64_t total_words = load_u32(p + kPayloadHeaderBytes + 4 * uint64_t(nb - 1));
  if (fixed + 2 * total_words != bytes) return rans::kBadHeader;
  out->word_begin = blk ? load_u32(p + kPayloadHeaderBytes + 4 * uint64_t(blk - 1)) : 0;
  out->word_end = load_u32(p + kPayloadHeaderBytes + 4 * uint64_t(blk));
  if (out->word_begin > out->word_end || out->word_end > total_words) return rans::kBadHeader;
  out->words = p + fixed;
  out->states = p + kPayloadHeaderBytes + 4 * uint64_t(nb) + 4 * uint64_t(kLanes) * blk;
  const uint32_t first = blk * kBlockSymbols;
  out->symbols = num_tokens - first < kBlockSymbols ? num_tokens - first : kBlockSymbols;
  out->seg = (out->symbols + kLanes - 1) / kLanes;
  return rans::kOk;
}

}  // namespace rans1
}  // namespace llmio
