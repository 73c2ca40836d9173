// "rans": a lossless entropy codec for token streams, decoded by the CPU here
// and by the GPU in csrc/cuda/rans_decode.cu. The byte layout is specified in
// docs/format.md; in short:
//
// Model (one per group of chunks, stored once in the shard): the group's
// tokens ranked by frequency. Ranks fall into buckets (128 direct ranks, then
// 8 buckets per power of two); a token is coded as its bucket (rANS, with the
// bucket frequencies of the group quantised to 2^scale_bits) followed by its
// offset inside the bucket as raw bits. Within a bucket the tokens are listed
// by id, so the model stores, per bucket, a sorted id list (varint deltas).
// Rare tokens may instead be escaped: coded by their bit length (33 escape
// buckets) and their value, and left out of the model. The alphabet therefore
// has at most 361 buckets however large the vocabulary (uint32 ids, 2^32).
//
// Payload (one per chunk): tokens cut into blocks of 32768; each block is 32
// interleaved rANS states (32-bit, 16-bit words), symbol i of the block going
// to lane i % 32. The 32 lanes share one word stream in the order a warp
// reads it: per step, per phase (bucket, low raw bits, high raw bits), the
// lanes that need a word take consecutive words in lane order. One warp
// decodes one block; a chunk of 64K tokens is two warps.
//
//   0      4            8            12     16                16+4nb            16+132nb
//   +------+------------+------------+------+-----------------+-----------------+-------------+
//   |"rANS"| num_tokens | num_blocks |  0   | word_end[nb] u32| state[nb][32]u32| words u16 ..|
//   +------+------------+------------+------+-----------------+-----------------+-------------+
//
// Errors in the encoded data raise CodecError (never a read or write out of
// bounds); the Python layer adds the shard and chunk to the message.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "codec/rans_device.hpp"

namespace llmio {
namespace rans {

// Encoded data or a model that cannot be what the encoder wrote.
class CodecError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The CPU decoders' instruction sets, in order. kAuto: the best the CPU has,
// capped by LLMIO_RANS_SIMD (see default_simd()).
enum class Simd : int { kAuto = -1, kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// "scalar", "avx2", "avx512" or "auto".
const char* simd_name(Simd s);
// The best level this CPU runs: kAvx512 needs AVX-512 F, BW, VL and DQ; kScalar
// off x86-64.
Simd cpu_simd();
// What kAuto means: cpu_simd() capped by the environment variable
// LLMIO_RANS_SIMD, read once per process: "0" or "scalar" (the scalar code),
// "avx2" (at most AVX2), "avx512", "auto", "1" or unset (the CPU's best).
// Throws std::invalid_argument for another value.
Simd default_simd();
// The level a decode runs at: kAuto -> default_simd(); an explicit level runs
// as asked (the environment does not cap it) and throws UnsupportedError when
// the CPU lacks it. The rans decoder has no AVX-512 path: kAvx512 runs AVX2.
Simd resolve_simd(Simd requested);

class Model {
 public:
  // Build a model of the tokens in `parts` (arrays of token_bytes-wide ids).
  // Tokens seen at most `escape_max_count` times are escaped instead of
  // ranked; with escape_max_count > 0 every escape bucket the token type has
  // keeps a frequency, so the model codes any token (also unseen ones).
  // Throws std::invalid_argument for bad settings.
  static Model build(const std::vector<std::pair<const void*, size_t>>& parts, uint32_t token_bytes,
                     uint32_t scale_bits, uint32_t escape_max_count);
  // Parse serialize()'s bytes, checking every field; throws CodecError.
  static Model parse(const uint8_t* data, size_t n);
  std::vector<uint8_t> serialize() const;
  // The decoder's view for the GPU (layout in rans_device.hpp).
  std::vector<uint32_t> device_image() const;

  // Encode n tokens into a payload (appended to out). Throws CodecError when a
  // token is neither ranked nor escapable by this model.
  void encode(const void* tokens, size_t n, std::vector<uint8_t>& out) const;
  // Decode a payload of exactly num_tokens tokens into out; throws CodecError.
  // simd: use the AVX2 path where the CPU has it (bit-identical; false forces
  // the scalar reference, which the tests compare it with). LLMIO_RANS_SIMD=0
  // turns the AVX2 path off process-wide.
  void decode(const uint8_t* src, size_t nbytes, void* out, size_t num_tokens, bool simd = true) const;

  uint32_t token_bytes() const { return token_bytes_; }
  uint32_t scale_bits() const { return scale_bits_; }
  uint32_t num_symbols() const { return static_cast<uint32_t>(rank_to_sym_.size()); }
  uint32_t num_rank_buckets() const { return num_rank_buckets_; }
  const std::vector<uint32_t>& freq() const { return freq_; }
  // Expected coded bits per token under the model's own frequencies (bucket
  // bits + raw bits): what a chunk of the modelled data costs, headers aside.
  double model_bits_per_token() const { return bits_per_token_; }

 private:
  void finish();  // cum_, slot table, encoder lookup from freq_ and rank_to_sym_
  uint32_t rank_of(uint32_t sym) const;  // UINT32_MAX when not ranked

  uint32_t token_bytes_ = 2, scale_bits_ = kDefaultScaleBits, num_rank_buckets_ = 0;
  std::vector<uint32_t> freq_, cum_;        // [num_rank_buckets + 33]
  std::vector<uint32_t> rank_to_sym_;       // symbols in rank order
  struct Bucket {
    uint32_t freq, cum, base, bits;
    bool escape;
  };
  std::vector<Bucket> buckets_;             // decoder's per-bucket constants
  std::vector<uint16_t> slot_;              // [2^scale_bits] -> bucket
  std::vector<uint32_t> simd_fb_, simd_info_, simd_base_;  // AVX2 decoder tables (rans_decode_avx2.cpp)
  std::vector<uint32_t> dense_rank_;        // symbol -> rank when ids are small
  std::vector<std::pair<uint32_t, uint32_t>> sparse_rank_;  // (symbol, rank) sorted, otherwise
  double bits_per_token_ = 0;
};

// Host emulation of the CUDA kernel (one warp per block, ballot by loops): the
// same ChunkDesc/BlockDesc inputs and per-chunk status codes. `images` holds
// one pointer per model image.
void emulate_warps(const uint8_t* src, const ChunkDesc* chunks, size_t num_chunks, const BlockDesc* blocks,
                   size_t num_blocks, const uint32_t* const* images, void* out, uint32_t token_bytes,
                   int32_t* status);

}  // namespace rans
}  // namespace llmio
