// "rans1": a context-modelled lossless entropy codec for token streams,
// decoded by the CPU here and by the GPU in csrc/cuda/rans1_decode.cu. The
// byte layout is specified in docs/format.md ("The rans1 codec"); the decode
// image and payload layout in rans1_device.hpp. In short:
//
// Model (one per group of chunks, stored once in the shard, transmitted as raw
// counts which the decoder quantises itself with integer arithmetic only):
//   - the order-0 part of "rans": tokens ranked by frequency, rank buckets and
//     escape buckets, with the bucket counts of the tokens the contexts escape;
//   - one table per context (previous token of rank < num_exact, or the rank
//     bucket of a rarer previous token, or "unranked", or "segment start"):
//     the ranks that follow it at least min_count times, with their counts,
//     and the count of the rest (the escape to the order-0 part).
// Payload (one per chunk): blocks of 32768 tokens, each 32 rANS states, lane l
// coding a contiguous segment; the lanes share one word stream in the order a
// warp reads it (per step, per phase, lanes that need a word in lane order).
//
// Errors in the encoded data raise rans::CodecError (never a read or write out
// of bounds); the Python layer adds the shard and chunk to the message.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "codec/rans.hpp"
#include "codec/rans1_device.hpp"

namespace llmio {
namespace rans1 {

using rans::CodecError;
using rans::Simd;

struct BuildParams {
  uint32_t scale_bits = kDefaultScaleBits;  // order-0 model: frequencies sum to 2^scale_bits
  uint32_t ctx_bits = kDefaultCtxBits;      // a context table has at most 2^ctx_bits slots
  uint32_t min_count = 2;                   // a (context, token) pair seen this often gets an entry
  uint32_t exact_min_count = 16;            // a token seen this often gets its own context
  uint32_t max_exact = kMaxExact;           // at most this many single-token contexts
  // An entry is kept only when it saves more than this many bits over coding its
  // tokens through the escape (an estimate: order-0 frequencies, the context's
  // escape share); about what an entry costs in the model. 0: keep every pair
  // seen min_count times.
  uint32_t entry_cost_bits = 16;
  // Most slots the context tables may take together (at most kMaxSlots): a model
  // that needs more gets smaller tables (ctx_bits lowered, see build()).
  uint64_t max_slots = kMaxSlots;
};

class Model {
 public:
  // Model of the tokens in `parts` (arrays of token_bytes-wide ids; each part
  // is a chunk, cut into blocks and lane segments as encode() cuts it). Every
  // token is codable (the escape buckets of the token type keep a frequency),
  // also tokens the parts do not hold. Throws std::invalid_argument for bad
  // settings.
  static Model build(const std::vector<std::pair<const void*, size_t>>& parts, uint32_t token_bytes,
                     const BuildParams& params);
  // Parse serialize()'s bytes, checking every field; throws CodecError.
  static Model parse(const uint8_t* data, size_t n);
  std::vector<uint8_t> serialize() const;
  // The decoder's tables (layout in rans1_device.hpp), also used by the CPU decoder.
  const std::vector<uint32_t>& device_image() const { return image_; }

  // Encode n tokens into a payload appended to `out`.
  void encode(const void* tokens, size_t n, std::vector<uint8_t>& out) const;
  // Decode a payload of exactly num_tokens tokens into out; throws CodecError.
  // The default path runs the kernel's per-lane logic (rans1_device.hpp) on the
  // decode image; reference = true runs the oracle instead, written apart from
  // it (searches the model's counts, no slot tables), which the tests compare.
  // simd: the instruction set of the default path (bit-identical at every
  // level): kAuto is the best the CPU has (AVX-512, else AVX2, else the scalar
  // code) capped by LLMIO_RANS_SIMD; an explicit level runs as asked and throws
  // UnsupportedError where the CPU lacks it (rans::resolve_simd).
  void decode(const uint8_t* src, size_t nbytes, void* out, size_t num_tokens, bool reference = false,
              Simd simd = Simd::kAuto) const;

  uint32_t token_bytes() const { return token_bytes_; }
  uint32_t scale_bits() const { return scale_bits_; }
  uint32_t ctx_bits() const { return ctx_bits_; }
  uint32_t num_symbols() const { return static_cast<uint32_t>(rank_to_sym_.size()); }
  uint32_t num_contexts() const { return static_cast<uint32_t>(ctx_.size()); }
  uint32_t num_exact() const { return num_exact_; }
  uint64_t num_entries() const;
  uint64_t num_slots() const { return num_slots_; }
  // Expected coded bits per token of the data the model was built from (its
  // own counts under its quantised frequencies); 0 for a parsed model.
  double model_bits_per_token() const { return bits_per_token_; }

 private:
  struct Entry {
    uint32_t rank;
    uint64_t count;           // raw count (>= 1)
    uint32_t freq = 0, cum = 0;  // quantised
  };
  struct Context {
    std::vector<Entry> entries;  // ascending rank
    uint64_t escape_count = 0;   // raw count of the tokens not listed
    uint32_t bits = 0, escape_freq = 0, escape_cum = 0;
    uint64_t first_slot = 0;
  };
  void finish_ranks();
  void decode_reference(const uint8_t* src, size_t nbytes, void* out, uint32_t n) const;  // symbol -> rank lookup from rank_to_sym_
  void finish();  // quantisation, encoder lookups and the decode image, from the raw counts
  uint32_t rank_of(uint32_t sym) const;  // kNone when not ranked
  uint32_t context_of_rank(uint32_t r) const;  // r == kNone: unranked

  uint32_t token_bytes_ = 2, scale_bits_ = kDefaultScaleBits, ctx_bits_ = kDefaultCtxBits;
  uint32_t num_rank_buckets_ = 0, num_exact_ = 0, cls0_ = 0;
  std::vector<uint32_t> rank_to_sym_;
  std::vector<uint64_t> bucket_count_;  // order-0 raw counts [num_rank_buckets + 8 * token_bytes + 1]
  std::vector<uint32_t> freq_, cum_;    // quantised order-0 frequencies
  std::vector<Context> ctx_;
  uint64_t num_slots_ = 0;
  std::vector<uint32_t> dense_rank_;
  std::vector<std::pair<uint32_t, uint32_t>> sparse_rank_;
  std::vector<uint32_t> image_;
  std::vector<uint32_t> simd_fb_, simd_info_, simd_base_;  // order-0 tables of the AVX2 decoder (rans1_impl.hpp)
  std::vector<uint32_t> cpu_ctx_info_, cpu_tab_;  // compact context tables of the AVX2 decoder (rans1_impl.hpp)
  double bits_per_token_ = 0;
};

// Quantise counts to frequencies summing to 2^bits, each >= 1, with integer
// arithmetic only (the decoder repeats it): each gets 1, the rest of 2^bits is
// shared in proportion to the counts (floor), what floor leaves goes to the
// first largest count. Needs 2^bits >= counts.size(); counts may be 0.
std::vector<uint32_t> quantize(const std::vector<uint64_t>& counts, uint32_t bits);

// Host emulation of the CUDA kernel (one warp per block, ballot by loops): the
// same descriptors and per-chunk status codes as rans::emulate_warps.
void emulate_warps(const uint8_t* src, const ChunkDesc* chunks, size_t num_chunks, const BlockDesc* blocks,
                   size_t num_blocks, const uint32_t* const* images, void* out, uint32_t token_bytes,
                   int32_t* status);

}  // namespace rans1
}  // namespace llmio
