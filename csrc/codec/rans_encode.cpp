// rans encoder: tokens -> payload (layout in rans.hpp), block by block, the
// lanes' words interleaved in the order the decoders read them.
#include <algorithm>
#include <cstring>
#include <utility>

#include "codec/rans.hpp"
#include "codec/rans_impl.hpp"

namespace llmio {
namespace rans {
using namespace detail;

// ---------------------------------------------------------------- encoder
namespace {

struct Coded {
  uint32_t bucket, value, bits;
};

// rANS push of a bucket (frequency f, start c) onto state x, words to `rev`.
inline void push_bucket(uint32_t& x, uint32_t f, uint32_t c, uint32_t sb, std::vector<uint16_t>& rev) {
  const uint64_t x_max = uint64_t(f) << (32 - sb);
  if (x >= x_max) {
    rev.push_back(static_cast<uint16_t>(x));
    x >>= 16;
  }
  x = ((x / f) << sb) + (x % f) + c;
}

// A uniform symbol of `bits` (1..16) bits.
inline void push_bits(uint32_t& x, uint32_t v, uint32_t bits, std::vector<uint16_t>& rev) {
  if (uint64_t(x) >= (uint64_t(1) << (32 - bits))) {
    rev.push_back(static_cast<uint16_t>(x));
    x >>= 16;
  }
  x = (x << bits) | v;
}

}  // namespace

void Model::encode(const void* tokens, size_t n, std::vector<uint8_t>& out) const {
  if (n > 0xffffffffu) throw std::invalid_argument("rans: a chunk holds at most 2^32-1 tokens");
  const uint32_t nb = num_blocks_for(static_cast<uint32_t>(n));
  const size_t base = out.size();
  out.resize(base + kPayloadHeaderBytes + size_t(nb) * (4 + 4 * kLanes));
  auto put_at = [&](size_t at, uint32_t v) {
    for (int i = 0; i < 4; ++i) out[at + i] = static_cast<uint8_t>(v >> (8 * i));
  };
  put_at(base, kPayloadMagic);
  put_at(base + 4, static_cast<uint32_t>(n));
  put_at(base + 8, nb);
  put_at(base + 12, 0);
  std::vector<uint16_t> rev;
  std::vector<Coded> coded(kBlockSymbols);
  uint64_t words_total = 0;
  for (uint32_t blk = 0; blk < nb; ++blk) {
    const size_t first = size_t(blk) * kBlockSymbols;
    const uint32_t m = static_cast<uint32_t>(std::min<size_t>(kBlockSymbols, n - first));
    for (uint32_t i = 0; i < m; ++i) {
      const uint32_t sym = token_at(tokens, first + i, token_bytes_);
      const uint32_t r = rank_of(sym);
      Coded& c = coded[i];
      if (r != kNone) {
        c.bucket = rank_bucket(r);
        c.value = r - rank_bucket_base(c.bucket);
        c.bits = rank_bucket_bits(c.bucket);
      } else {
        const uint32_t j = bit_length(sym);
        c.bucket = num_rank_buckets_ + j;
        c.value = sym - escape_base(j);
        c.bits = escape_bits(j);
        if (freq_[c.bucket] == 0)
          throw CodecError("rans encode: token " + std::to_string(sym) + " at position " +
                           std::to_string(first + i) + " is not in the model (and the model has no escape for it)");
      }
    }
    uint32_t x[kLanes];
    for (uint32_t l = 0; l < kLanes; ++l) x[l] = kStateLow;
    rev.clear();
    const uint32_t steps = (m + kLanes - 1) / kLanes;
    for (uint32_t t = steps; t-- > 0;) {
      const uint32_t active = std::min(kLanes, m - t * kLanes);
      const Coded* c = &coded[size_t(t) * kLanes];
      for (uint32_t l = active; l-- > 0;)  // phase 3: high raw bits
        if (c[l].bits > 16) push_bits(x[l], c[l].value >> 16, c[l].bits - 16, rev);
      for (uint32_t l = active; l-- > 0;)  // phase 2: low raw bits
        if (c[l].bits) {
          const uint32_t lo = std::min<uint32_t>(c[l].bits, 16);
          push_bits(x[l], c[l].value & ((1u << lo) - 1), lo, rev);
        }
      for (uint32_t l = active; l-- > 0;)  // phase 1: the bucket
        push_bucket(x[l], freq_[c[l].bucket], cum_[c[l].bucket], scale_bits_, rev);
    }
    words_total += rev.size();
    if (words_total > 0xffffffffu) throw std::invalid_argument("rans: chunk too large");
    put_at(base + kPayloadHeaderBytes + 4 * size_t(blk), static_cast<uint32_t>(words_total));
    for (uint32_t l = 0; l < kLanes; ++l)
      put_at(base + kPayloadHeaderBytes + 4 * size_t(nb) + 4 * (size_t(blk) * kLanes + l), x[l]);
    const size_t at = out.size();
    out.resize(at + 2 * rev.size());
    uint8_t* w = out.data() + at;
    for (size_t i = 0; i < rev.size(); ++i) {  // the decoder reads them in reverse
      const uint16_t v = rev[rev.size() - 1 - i];
      w[2 * i] = static_cast<uint8_t>(v);
      w[2 * i + 1] = static_cast<uint8_t>(v >> 8);
    }
  }
}

}  // namespace rans
}  // namespace llmio
