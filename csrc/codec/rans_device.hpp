// Pieces of the rANS token decoder shared by the CUDA kernel
// (csrc/cuda/rans_decode.cu) and its host emulation (rans_emulate_warps in
// csrc/codec/rans_decode_ref.cpp, tested on every machine): the layout of the model's
// device image and of the per-launch descriptors, and the per-lane arithmetic.
// Only the warp-collective parts (ballot, prefix popcount) differ between the
// two, so a test of the emulation checks the kernel's logic bit for bit.
//
// No standard library beyond <cstdint>: this header is compiled by nvcc for
// the device.
#pragma once

#include <cstdint>

#include "common/hd.hpp"

namespace llmio {
namespace rans {

constexpr uint32_t kLanes = 32;                          // interleaved states per block (one warp)
constexpr uint32_t kBlockSteps = 1024;                   // symbols per lane per block
constexpr uint32_t kBlockSymbols = kLanes * kBlockSteps;  // 32768 tokens per block
constexpr uint32_t kStateLow = 1u << 16;                 // L: states live in [L, 2^32)
constexpr uint32_t kWordBits = 16;                       // renormalisation word
constexpr uint32_t kDirectRanks = 128;                   // ranks 0..127 get a bucket each
constexpr uint32_t kMantissaBits = 3;                    // then 8 buckets per power of two
constexpr uint32_t kEscapeBuckets = 33;                  // escaped values by bit length 0..32
constexpr uint32_t kMaxRankBuckets = kDirectRanks + (32 - 7) * (1u << kMantissaBits);  // 328
constexpr uint32_t kMaxBuckets = kMaxRankBuckets + kEscapeBuckets;                   // 361
constexpr uint32_t kMinScaleBits = 9;                    // 2^9 >= kMaxBuckets
constexpr uint32_t kMaxScaleBits = 16;
constexpr uint32_t kPayloadMagic = 0x534e4172u;          // "rANS"
constexpr uint32_t kPayloadHeaderBytes = 16;
constexpr uint32_t kImageMagic = 0x474d4952u;            // "RIMG"
constexpr uint32_t kImageHeaderWords = 8;
constexpr uint32_t kBucketWords = 4;                     // freq, cum, base, bits | escape << 8
constexpr uint32_t kPayloadAlign = 4;                    // a payload's address must be a multiple of this
constexpr uint32_t kDefaultScaleBits = 14;               // what the writer uses unless told otherwise

// Status codes the kernel and the emulation write per chunk (0 = decoded).
enum Status : int32_t {
  kOk = 0,
  kBadHeader = 1,        // magic, token count, block count or sizes disagree
  kBadState = 2,         // an initial state outside [L, 2^32)
  kOverrun = 3,          // a block needs more words than it has
  kBadSymbol = 4,        // a rank past the model's symbols, or a value too wide
  kBadFinal = 5,         // final states or word count do not match the encoder's
};
constexpr int32_t kNumStatus = 6;  // codes are 0 .. kNumStatus-1 (text: status_text in rans_check.hpp)

// Rank buckets: rank r < 128 is bucket r; above, r's exponent e = floor(log2 r)
// and its next 3 bits pick one of 8 buckets of 2^(e-3) ranks each.
LLMIO_HD uint32_t rank_bucket_base(uint32_t b) {
  if (b < kDirectRanks) return b;
  const uint32_t e = 7 + (b - kDirectRanks) / 8, sub = (b - kDirectRanks) % 8;
  return (8u + sub) << (e - kMantissaBits);
}
LLMIO_HD uint32_t rank_bucket_bits(uint32_t b) {
  return b < kDirectRanks ? 0 : 7 + (b - kDirectRanks) / 8 - kMantissaBits;
}
// Escape bucket j holds the values of bit length j: [2^(j-1), 2^j).
LLMIO_HD uint32_t escape_base(uint32_t j) { return j == 0 ? 0u : 1u << (j - 1); }
LLMIO_HD uint32_t escape_bits(uint32_t j) { return j == 0 ? 0u : j - 1; }

// The model as the decoder needs it, one contiguous array of uint32 words:
//
//   [0] kImageMagic  [1] scale_bits  [2] num_buckets  [3] num_symbols
//   [4] token_bytes  [5] bucket_off  [6] table_off    [7] rank_off      (offsets in words)
//   bucket_off: num_buckets x {freq, cum, base, bits | escape << 8}
//   table_off:  2^scale_bits uint16 bucket ids (slot -> bucket), packed two per word
//   rank_off:   num_symbols uint32 symbol ids in rank order
struct ImageView {
  const uint32_t* w;
  uint32_t scale_bits, num_buckets, num_symbols, token_bytes;
  const uint32_t* bucket;
  const uint16_t* table;
  const uint32_t* rank;
};

LLMIO_HD ImageView image_view(const uint32_t* w) {
  ImageView v;
  v.w = w;
  v.scale_bits = w[1];
  v.num_buckets = w[2];
  v.num_symbols = w[3];
  v.token_bytes = w[4];
  v.bucket = w + w[5];
  v.table = reinterpret_cast<const uint16_t*>(w + w[6]);
  v.rank = w + w[7];
  return v;
}

// One chunk of a batched decode (the same struct on host and device).
struct ChunkDesc {
  uint64_t src_offset;  // payload start in the source buffer
  uint64_t src_bytes;   // payload length
  uint64_t out_offset;  // first output token (elements of token_bytes)
  uint32_t num_tokens;  // tokens the chunk must decode to
  uint32_t model;       // index into the image pointer array
};
static_assert(sizeof(ChunkDesc) == 32, "ChunkDesc is shared with Python as 32 bytes");

struct BlockDesc {
  uint32_t chunk;  // index into the chunk descriptors
  uint32_t block;  // block within the chunk
};
static_assert(sizeof(BlockDesc) == 8, "BlockDesc is shared with Python as 8 bytes");

LLMIO_HD uint32_t num_blocks_for(uint32_t n) { return (n + kBlockSymbols - 1) / kBlockSymbols; }

LLMIO_HD uint32_t load_u32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
LLMIO_HD uint32_t load_u16(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8; }

// Where block `blk` of a payload keeps its words and states, after checking the
// payload header against what the chunk table says. Returns kOk or kBadHeader.
struct BlockSpan {
  uint64_t word_begin, word_end;  // in 16-bit words from `words`
  const uint8_t* words;
  const uint8_t* states;          // 32 little-endian uint32
  uint32_t symbols;               // tokens in this block
};

LLMIO_HD int32_t locate_block(const uint8_t* p, uint64_t bytes, uint32_t num_tokens, uint32_t blk,
                              BlockSpan* out) {
  if (bytes < kPayloadHeaderBytes) return kBadHeader;
  const uint32_t nb = num_blocks_for(num_tokens);
  if (load_u32(p) != kPayloadMagic || load_u32(p + 4) != num_tokens || load_u32(p + 8) != nb ||
      load_u32(p + 12) != 0 || blk >= nb)
    return kBadHeader;
  const uint64_t fixed = kPayloadHeaderBytes + uint64_t(nb) * (4 + 4 * kLanes);
  if (bytes < fixed) return kBadHeader;
  const uint64_t total_words = load_u32(p + kPayloadHeaderBytes + 4 * uint64_t(nb - 1));
  if (fixed + 2 * total_words != bytes) return kBadHeader;
  out->word_begin = blk ? load_u32(p + kPayloadHeaderBytes + 4 * uint64_t(blk - 1)) : 0;
  out->word_end = load_u32(p + kPayloadHeaderBytes + 4 * uint64_t(blk));
  if (out->word_begin > out->word_end || out->word_end > total_words) return kBadHeader;
  out->words = p + fixed;
  out->states = p + kPayloadHeaderBytes + 4 * uint64_t(nb) + 4 * uint64_t(kLanes) * blk;
  const uint32_t first = blk * kBlockSymbols;
  out->symbols = num_tokens - first < kBlockSymbols ? num_tokens - first : kBlockSymbols;
  return kOk;
}

// Phase 1 of a step: the bucket of lane state x; x advances. Needs a word after
// when x < L.
LLMIO_HD uint32_t decode_bucket(const ImageView& m, uint32_t& x) {
  const uint32_t mask = (1u << m.scale_bits) - 1;
  const uint32_t slot = x & mask;
  const uint32_t b = m.table[slot];
  const uint32_t* e = m.bucket + kBucketWords * b;
  x = e[0] * (x >> m.scale_bits) + slot - e[1];
  return b;
}

// Phases 2 and 3: take `bits` (<= 16) raw bits off the state.
LLMIO_HD uint32_t take_bits(uint32_t& x, uint32_t bits) {
  const uint32_t v = x & ((1u << bits) - 1);
  x >>= bits;
  return v;
}

// The symbol of bucket b and raw value v; sets *bad when it cannot exist.
LLMIO_HD uint32_t symbol_of(const ImageView& m, uint32_t b, uint32_t v, bool* bad) {
  const uint32_t* e = m.bucket + kBucketWords * b;
  const uint32_t idx = e[2] + v;
  if (e[3] >> 8) {  // escape: the value itself
    if (m.token_bytes == 2 && idx > 0xffffu) *bad = true;
    return idx;
  }
  if (idx >= m.num_symbols) {
    *bad = true;
    return 0;
  }
  return m.rank[idx];
}

}  // namespace rans
}  // namespace llmio
