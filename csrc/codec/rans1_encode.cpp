// rans1 encoder: tokens -> payload (layout in rans1_device.hpp), block by
// block, the lanes' words interleaved in the order the decoders read them.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "codec/rans1.hpp"
#include "codec/rans_impl.hpp"

namespace llmio {
namespace rans1 {
using rans::detail::bit_length;
using rans::detail::kNone;
using rans::detail::rank_bucket;
using rans::detail::token_at;

namespace {

struct Coded {
  uint32_t f1, c1, s1;     // phase 1: the context table
  uint32_t escape;         // phases 2-4 only when set
  uint32_t fb, cb;         // phase 2: the order-0 bucket
  uint32_t value, bits;    // phases 3-4: raw bits
};

inline void push_bucket(uint32_t& x, uint32_t f, uint32_t c, uint32_t sb, std::vector<uint16_t>& rev) {
  const uint64_t x_max = uint64_t(f) << (32 - sb);
  if (x >= x_max) {
    rev.push_back(static_cast<uint16_t>(x));
    x >>= 16;
  }
  x = ((x / f) << sb) + (x % f) + c;
}

inline void push_bits(uint32_t& x, uint32_t v, uint32_t bits, std::vector<uint16_t>& rev) {
  if (uint64_t(x) >= (uint64_t(1) << (32 - bits))) {
    rev.push_back(static_cast<uint16_t>(x));
    x >>= 16;
  }
  x = (x << bits) | v;
}

}  // namespace

void Model::encode(const void* tokens, size_t n, std::vector<uint8_t>& out) const {
  if (n > 0xffffffffu) throw std::invalid_argument("rans1: a chunk holds at most 2^32-1 tokens");
  const uint32_t nb = rans::num_blocks_for(static_cast<uint32_t>(n));
  const size_t base = out.size();
  out.resize(base + kPayloadHeaderBytes + size_t(nb) * (4 + 4 * kLanes));
  auto put_at = [&](size_t at, uint32_t v) {
    for (int i = 0; i < 4; ++i) out[at + i] = static_cast<uint8_t>(v >> (8 * i));
  };
  put_at(base, kPayloadMagic);
  put_at(base + 4, static_cast<uint32_t>(n));
  put_at(base + 8, nb);
  put_at(base + 12, 0);
  const uint32_t nrb = num_rank_buckets_, start = static_cast<uint32_t>(ctx_.size()) - 1;
  std::vector<uint16_t> rev;
  std::vector<Coded> coded(kBlockSymbols);  // [step][lane]
  uint64_t words_total = 0;
  for (uint32_t blk = 0; blk < nb; ++blk) {
    const size_t first = size_t(blk) * kBlockSymbols;
    const uint32_t m = static_cast<uint32_t>(std::min<size_t>(kBlockSymbols, n - first));
    const uint32_t seg = (m + kLanes - 1) / kLanes;
    uint32_t len[kLanes];
    for (uint32_t l = 0; l < kLanes; ++l) {
      const uint32_t f = l * seg;
      len[l] = f >= m ? 0 : std::min(seg, m - f);
      uint32_t ctx = start;
      for (uint32_t t = 0; t < len[l]; ++t) {
        const size_t i = first + size_t(l) * seg + t;
        const uint32_t sym = token_at(tokens, i, token_bytes_);
        const uint32_t r = rank_of(sym);
        const Context& cx = ctx_[ctx];
        Coded& c = coded[size_t(t) * kLanes + l];
        c.s1 = cx.bits;
        auto it = std::lower_bound(cx.entries.begin(), cx.entries.end(), r,
                                   [](const Entry& e, uint32_t v) { return e.rank < v; });
        if (r != kNone && it != cx.entries.end() && it->rank == r) {
          c.f1 = it->freq;
          c.c1 = it->cum;
          c.escape = 0;
        } else {
          c.f1 = cx.escape_freq;
          c.c1 = cx.escape_cum;
          c.escape = 1;
          uint32_t b;
          if (r != kNone) {
            b = rank_bucket(r);
            c.value = r - rans::rank_bucket_base(b);
            c.bits = rans::rank_bucket_bits(b);
          } else {
            const uint32_t j = bit_length(sym);
            b = nrb + j;
            c.value = sym - rans::escape_base(j);
            c.bits = rans::escape_bits(j);
          }
          c.fb = freq_[b];
          c.cb = cum_[b];
        }
        ctx = context_of_rank(r);
      }
    }
    uint32_t x[kLanes];
    for (uint32_t l = 0; l < kLanes; ++l) x[l] = kStateLow;
    rev.clear();
    for (uint32_t t = seg; t-- > 0;) {
      const Coded* c = &coded[size_t(t) * kLanes];
      for (uint32_t l = kLanes; l-- > 0;)  // phase 4: high raw bits
        if (t < len[l] && c[l].escape && c[l].bits > 16) push_bits(x[l], c[l].value >> 16, c[l].bits - 16, rev);
      for (uint32_t l = kLanes; l-- > 0;)  // phase 3: low raw bits
        if (t < len[l] && c[l].escape && c[l].bits) {
          const uint32_t lo = std::min<uint32_t>(c[l].bits, 16);
          push_bits(x[l], c[l].value & ((1u << lo) - 1), lo, rev);
        }
      for (uint32_t l = kLanes; l-- > 0;)  // phase 2: the order-0 bucket
        if (t < len[l] && c[l].escape) push_bucket(x[l], c[l].fb, c[l].cb, scale_bits_, rev);
      for (uint32_t l = kLanes; l-- > 0;)  // phase 1: the context table
        if (t < len[l]) push_bucket(x[l], c[l].f1, c[l].c1, c[l].s1, rev);
    }
    words_total += rev.size();
    if (words_total > 0xffffffffu) throw std::invalid_argument("rans1: chunk too large");
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

}  // namespace rans1
}  // namespace llmio
