#include "codec/rans.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <queue>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace llmio {
namespace rans {
namespace {

constexpr uint32_t kNone = 0xffffffffu;
#define LLMIO_ALWAYS_INLINE __attribute__((always_inline))
constexpr uint32_t kModelVersion = 1;
constexpr size_t kDenseLimit = size_t(1) << 22;  // symbol -> rank as an array below this id

uint32_t bit_length(uint32_t v) { return v ? 32 - static_cast<uint32_t>(__builtin_clz(v)) : 0; }

uint32_t rank_bucket(uint32_t r) {
  if (r < kDirectRanks) return r;
  const uint32_t e = 31 - static_cast<uint32_t>(__builtin_clz(r));
  const uint32_t sub = (r >> (e - kMantissaBits)) & 7u;
  return kDirectRanks + (e - 7) * 8 + sub;
}

uint32_t rank_bucket_size(uint32_t b) { return 1u << rank_bucket_bits(b); }

uint32_t num_rank_buckets_for(uint32_t num_symbols) {
  return num_symbols ? rank_bucket(num_symbols - 1) + 1 : 0;
}

uint32_t token_at(const void* p, size_t i, uint32_t tb) {
  return tb == 2 ? static_cast<const uint16_t*>(p)[i] : static_cast<const uint32_t*>(p)[i];
}

void put_u32(std::vector<uint8_t>& o, uint32_t v) {
  for (int i = 0; i < 4; ++i) o.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void put_varint(std::vector<uint8_t>& o, uint64_t v) {
  while (v >= 0x80) {
    o.push_back(static_cast<uint8_t>(v | 0x80));
    v >>= 7;
  }
  o.push_back(static_cast<uint8_t>(v));
}

// Quantise bucket counts to frequencies summing to 2^scale_bits; every counted
// bucket keeps at least 1. Rounding, then a greedy fix of the sum by the change
// that costs the fewest coded bits.
std::vector<uint32_t> normalise(const std::vector<uint64_t>& count, uint32_t scale_bits) {
  const uint64_t M = uint64_t(1) << scale_bits;
  uint64_t total = 0;
  for (uint64_t c : count) total += c;
  std::vector<uint32_t> f(count.size(), 0);
  if (total == 0) return f;
  int64_t sum = 0;
  for (size_t i = 0; i < count.size(); ++i) {
    if (!count[i]) continue;
    const double ideal = static_cast<double>(count[i]) * static_cast<double>(M) / static_cast<double>(total);
    f[i] = static_cast<uint32_t>(std::max<double>(1.0, std::floor(ideal + 0.5)));
    sum += f[i];
  }
  int64_t diff = static_cast<int64_t>(M) - sum;
  using Item = std::pair<double, size_t>;  // (cost of the change, bucket)
  while (diff != 0) {
    std::priority_queue<Item, std::vector<Item>, std::greater<Item>> pq;
    for (size_t i = 0; i < count.size(); ++i) {
      if (!count[i]) continue;
      const double c = static_cast<double>(count[i]);
      if (diff > 0) {
        pq.push({-c * std::log2((f[i] + 1.0) / f[i]), i});  // gain, as a negative cost
      } else if (f[i] > 1) {
        pq.push({c * std::log2(f[i] / (f[i] - 1.0)), i});
      }
    }
    // One pass over the cheapest buckets, each changed once, then re-rank.
    const int64_t steps = std::min<int64_t>(std::llabs(diff), static_cast<int64_t>(pq.size()));
    if (steps == 0) break;  // cannot happen: at most 361 buckets, M >= 512
    for (int64_t s = 0; s < steps; ++s) {
      const size_t i = pq.top().second;
      pq.pop();
      f[i] += diff > 0 ? 1 : static_cast<uint32_t>(-1);
    }
    diff += diff > 0 ? -steps : steps;
  }
  return f;
}

}  // namespace

Model Model::build(const std::vector<std::pair<const void*, size_t>>& parts, uint32_t token_bytes,
                   uint32_t scale_bits, uint32_t escape_max_count) {
  if (token_bytes != 2 && token_bytes != 4) throw std::invalid_argument("rans: token_bytes must be 2 or 4");
  if (scale_bits < kMinScaleBits || scale_bits > kMaxScaleBits)
    throw std::invalid_argument("rans: scale_bits must be in [" + std::to_string(kMinScaleBits) + ", " +
                                std::to_string(kMaxScaleBits) + "], got " + std::to_string(scale_bits));
  // Histogram: dense below kDenseLimit, else sort a copy.
  uint32_t maxv = 0;
  size_t total = 0;
  for (auto& [p, n] : parts) {
    for (size_t i = 0; i < n; ++i) maxv = std::max(maxv, token_at(p, i, token_bytes));
    total += n;
  }
  std::vector<std::pair<uint32_t, uint64_t>> hist;  // (symbol, count), count > 0, by symbol
  if (total && maxv < kDenseLimit) {
    std::vector<uint64_t> c(size_t(maxv) + 1, 0);
    for (auto& [p, n] : parts)
      for (size_t i = 0; i < n; ++i) ++c[token_at(p, i, token_bytes)];
    for (size_t s = 0; s < c.size(); ++s)
      if (c[s]) hist.emplace_back(static_cast<uint32_t>(s), c[s]);
  } else if (total) {
    std::vector<uint32_t> all;
    all.reserve(total);
    for (auto& [p, n] : parts)
      for (size_t i = 0; i < n; ++i) all.push_back(token_at(p, i, token_bytes));
    std::sort(all.begin(), all.end());
    for (size_t i = 0; i < all.size();) {
      size_t j = i;
      while (j < all.size() && all[j] == all[i]) ++j;
      hist.emplace_back(all[i], j - i);
      i = j;
    }
  }
  Model m;
  m.token_bytes_ = token_bytes;
  m.scale_bits_ = scale_bits;
  std::vector<std::pair<uint32_t, uint64_t>> ranked;
  std::vector<uint64_t> esc(kEscapeBuckets, 0);
  for (auto& [s, c] : hist) {
    if (c <= escape_max_count)
      esc[bit_length(s)] += c;
    else
      ranked.emplace_back(s, c);
  }
  std::stable_sort(ranked.begin(), ranked.end(),
                   [](const auto& a, const auto& b) { return a.second > b.second; });  // ties: by id
  const uint32_t ns = static_cast<uint32_t>(ranked.size());
  m.num_rank_buckets_ = num_rank_buckets_for(ns);
  std::vector<uint64_t> count(m.num_rank_buckets_ + kEscapeBuckets, 0);
  m.rank_to_sym_.resize(ns);
  for (uint32_t b = 0; b < m.num_rank_buckets_; ++b) {
    const uint32_t lo = rank_bucket_base(b), hi = std::min(ns, lo + rank_bucket_size(b));
    for (uint32_t r = lo; r < hi; ++r) {
      m.rank_to_sym_[r] = ranked[r].first;
      count[b] += ranked[r].second;
    }
    std::sort(m.rank_to_sym_.begin() + lo, m.rank_to_sym_.begin() + hi);  // by id inside a bucket
  }
  // With escapes on, every bit length the token type has stays codable (frequency >= 1),
  // so the model also codes tokens it never saw.
  for (uint32_t j = 0; j < kEscapeBuckets; ++j)
    count[m.num_rank_buckets_ + j] = escape_max_count && j <= 8 * token_bytes ? std::max<uint64_t>(esc[j], 1) : esc[j];
  m.freq_ = normalise(count, scale_bits);
  m.finish();
  return m;
}

void Model::finish() {
  const uint32_t nb = num_rank_buckets_ + kEscapeBuckets;
  cum_.assign(nb, 0);
  uint32_t c = 0;
  for (uint32_t b = 0; b < nb; ++b) {
    cum_[b] = c;
    c += freq_[b];
  }
  buckets_.resize(nb);
  for (uint32_t b = 0; b < nb; ++b) {
    const bool escape = b >= num_rank_buckets_;
    buckets_[b] = {freq_[b], cum_[b], escape ? escape_base(b - num_rank_buckets_) : rank_bucket_base(b),
                   escape ? escape_bits(b - num_rank_buckets_) : rank_bucket_bits(b), escape};
  }
  slot_.assign(size_t(1) << scale_bits_, 0);
  for (uint32_t b = 0; b < nb; ++b)
    for (uint32_t s = cum_[b]; s < cum_[b] + freq_[b]; ++s) slot_[s] = static_cast<uint16_t>(b);
  // SIMD decoder tables (freq must fit 16 bits: not for a single bucket at scale 16)
  simd_fb_.clear();
  simd_info_.clear();
  simd_base_.clear();
  if (std::all_of(freq_.begin(), freq_.end(), [](uint32_t f) { return f < 65536; })) {
    simd_fb_.resize(slot_.size());
    simd_info_.resize(slot_.size());
    for (size_t s = 0; s < slot_.size(); ++s) {
      const Bucket& e = buckets_[slot_[s]];
      simd_fb_[s] = e.freq | static_cast<uint32_t>(s - e.cum) << 16;
      simd_info_[s] = e.bits | (e.escape ? 1u << 8 : 0u) | uint32_t(slot_[s]) << 16;
    }
    for (const Bucket& e : buckets_) simd_base_.push_back(e.base);
  }
  // Expected coded bits per token under the model's own frequencies.
  bits_per_token_ = 0;
  const double M = static_cast<double>(uint64_t(1) << scale_bits_);
  for (uint32_t b = 0; b < nb; ++b)
    if (freq_[b])
      bits_per_token_ += freq_[b] / M * (scale_bits_ - std::log2(static_cast<double>(freq_[b])) + buckets_[b].bits);
  dense_rank_.clear();
  sparse_rank_.clear();
  uint32_t maxv = 0;
  for (uint32_t s : rank_to_sym_) maxv = std::max(maxv, s);
  if (!rank_to_sym_.empty() && maxv < kDenseLimit) {
    dense_rank_.assign(size_t(maxv) + 1, kNone);
    for (uint32_t r = 0; r < rank_to_sym_.size(); ++r) dense_rank_[rank_to_sym_[r]] = r;
  } else {
    sparse_rank_.reserve(rank_to_sym_.size());
    for (uint32_t r = 0; r < rank_to_sym_.size(); ++r) sparse_rank_.emplace_back(rank_to_sym_[r], r);
    std::sort(sparse_rank_.begin(), sparse_rank_.end());
  }
}

uint32_t Model::rank_of(uint32_t sym) const {
  if (!dense_rank_.empty()) return sym < dense_rank_.size() ? dense_rank_[sym] : kNone;
  auto it = std::lower_bound(sparse_rank_.begin(), sparse_rank_.end(), std::make_pair(sym, 0u));
  return it != sparse_rank_.end() && it->first == sym ? it->second : kNone;
}

// ---------------------------------------------------------------- serialisation
//
//   u32 version (1) | u32 token_bytes | u32 scale_bits | u32 num_rank_buckets |
//   u32 num_symbols | u32 0 | u32 freq[num_rank_buckets + 33] |
//   per rank bucket: its ids ascending, the first as a varint, then varint deltas (>= 1)

std::vector<uint8_t> Model::serialize() const {
  std::vector<uint8_t> o;
  put_u32(o, kModelVersion);
  put_u32(o, token_bytes_);
  put_u32(o, scale_bits_);
  put_u32(o, num_rank_buckets_);
  put_u32(o, num_symbols());
  put_u32(o, 0);
  for (uint32_t f : freq_) put_u32(o, f);
  const uint32_t ns = num_symbols();
  for (uint32_t b = 0; b < num_rank_buckets_; ++b) {
    const uint32_t lo = rank_bucket_base(b), hi = std::min(ns, lo + rank_bucket_size(b));
    for (uint32_t r = lo; r < hi; ++r) put_varint(o, r == lo ? rank_to_sym_[r] : rank_to_sym_[r] - rank_to_sym_[r - 1]);
  }
  return o;
}

Model Model::parse(const uint8_t* d, size_t n) {
  auto fail = [](const std::string& what) { throw CodecError("rans model: " + what); };
  if (n < 24) fail("truncated (" + std::to_string(n) + " bytes, the fixed part is 24)");
  const uint32_t version = load_u32(d), tb = load_u32(d + 4), sb = load_u32(d + 8), nrb = load_u32(d + 12),
                 ns = load_u32(d + 16), zero = load_u32(d + 20);
  if (version != kModelVersion) fail("version " + std::to_string(version) + ", this build reads 1");
  if (tb != 2 && tb != 4) fail("token_bytes " + std::to_string(tb));
  if (sb < kMinScaleBits || sb > kMaxScaleBits) fail("scale_bits " + std::to_string(sb));
  if (zero != 0) fail("nonzero reserved word");
  if (ns > (tb == 2 ? 65536u : 0xffffffffu) || nrb != num_rank_buckets_for(ns))
    fail("num_symbols " + std::to_string(ns) + " / num_rank_buckets " + std::to_string(nrb) + " disagree");
  const size_t nb = size_t(nrb) + kEscapeBuckets;
  if (n < 24 + 4 * nb) fail("truncated frequency table");
  Model m;
  m.token_bytes_ = tb;
  m.scale_bits_ = sb;
  m.num_rank_buckets_ = nrb;
  m.freq_.resize(nb);
  uint64_t sum = 0;
  for (size_t b = 0; b < nb; ++b) {
    m.freq_[b] = load_u32(d + 24 + 4 * b);
    sum += m.freq_[b];
    if (b < nrb && m.freq_[b] == 0) fail("rank bucket " + std::to_string(b) + " has frequency 0");
    if (b >= nrb && m.freq_[b] && b - nrb > 8 * tb) fail("escape bucket wider than the token type");
  }
  if (sum != (uint64_t(1) << sb) && !(sum == 0 && ns == 0)) fail("frequencies sum to " + std::to_string(sum));
  size_t pos = 24 + 4 * nb;
  const uint64_t limit = tb == 2 ? 0xffffu : 0xffffffffu;
  m.rank_to_sym_.resize(ns);
  for (uint32_t b = 0; b < nrb; ++b) {
    const uint32_t lo = rank_bucket_base(b), hi = std::min(ns, lo + rank_bucket_size(b));
    uint64_t prev = 0;
    for (uint32_t r = lo; r < hi; ++r) {
      uint64_t v = 0;
      for (int shift = 0;; shift += 7) {
        if (pos >= n) fail("truncated symbol list");
        if (shift > 35) fail("bad varint in the symbol list");
        const uint8_t byte = d[pos++];
        v |= uint64_t(byte & 0x7f) << shift;
        if (!(byte & 0x80)) break;
      }
      if (r != lo && v == 0) fail("symbol list of bucket " + std::to_string(b) + " not ascending");
      const uint64_t sym = r == lo ? v : prev + v;
      if (sym > limit) fail("symbol " + std::to_string(sym) + " wider than the token type");
      m.rank_to_sym_[r] = static_cast<uint32_t>(sym);
      prev = sym;
    }
  }
  if (pos != n) fail(std::to_string(n - pos) + " trailing bytes");
  std::vector<uint32_t> sorted(m.rank_to_sym_);
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) fail("a symbol is listed twice");
  m.finish();
  return m;
}

std::vector<uint32_t> Model::device_image() const {
  const uint32_t nb = num_rank_buckets_ + kEscapeBuckets;
  const uint32_t bucket_off = kImageHeaderWords, table_off = bucket_off + kBucketWords * nb;
  const uint32_t rank_off = table_off + ((1u << scale_bits_) + 1) / 2;
  std::vector<uint32_t> w(size_t(rank_off) + num_symbols(), 0);
  w[0] = kImageMagic;
  w[1] = scale_bits_;
  w[2] = nb;
  w[3] = num_symbols();
  w[4] = token_bytes_;
  w[5] = bucket_off;
  w[6] = table_off;
  w[7] = rank_off;
  for (uint32_t b = 0; b < nb; ++b) {
    uint32_t* e = &w[bucket_off + kBucketWords * b];
    const bool escape = b >= num_rank_buckets_;
    e[0] = freq_[b];
    e[1] = cum_[b];
    e[2] = escape ? escape_base(b - num_rank_buckets_) : rank_bucket_base(b);
    e[3] = (escape ? escape_bits(b - num_rank_buckets_) : rank_bucket_bits(b)) | (escape ? 1u << 8 : 0u);
  }
  std::memcpy(&w[table_off], slot_.data(), slot_.size() * sizeof(uint16_t));
  std::copy(rank_to_sym_.begin(), rank_to_sym_.end(), w.begin() + rank_off);
  return w;
}

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

// ---------------------------------------------------------------- AVX2 decoder
//
// The same steps as the scalar decoder below, eight lanes per 256-bit vector,
// four vectors per step in lane order (so the word stream is consumed in the
// same order). Per-slot tables replace the bucket indirection of phase 1:
// simd_fb_ = freq | (slot - cum) << 16 and simd_info_ = bits | escape << 8 |
// bucket << 16. Renormalisation takes the next popcount(need) words with one
// unaligned load and a permutation chosen by the need mask (the SIMD rANS
// trick of F. Giesen). Full steps only; the partial last step of a block and
// blocks near the end of their words (fewer than 8 left) go through scalar
// code. Tested bit for bit against the scalar decoder (tests/test_codec_rans.py).
#if defined(__x86_64__)
namespace {

struct PermTable {
  alignas(32) uint32_t idx[256][8];
  PermTable() {
    for (unsigned m = 0; m < 256; ++m)
      for (unsigned i = 0; i < 8; ++i) idx[m][i] = static_cast<uint32_t>(__builtin_popcount(m & ((1u << i) - 1)));
  }
};
const PermTable kPerm;

bool cpu_has_avx2() {
  static const bool has = [] {
    const char* env = std::getenv("LLMIO_RANS_SIMD");
    if (env && env[0] == '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
}

__attribute__((target("avx2,popcnt"))) inline __m256i renorm8(__m256i x, const uint8_t* words, uint64_t& pos,
                                                             uint64_t end, bool& overrun) {
  const __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(x, 16), _mm256_setzero_si256());
  const unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(need)));
  if (!m) return x;
  const unsigned k = static_cast<unsigned>(__builtin_popcount(m));
  __m256i w;
  if (pos + 8 <= end) {
    w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words + 2 * pos)));
  } else {  // near the end of the block's words: bounded scalar loads
    alignas(32) uint32_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (unsigned i = 0; i < 8 && pos + i < end; ++i) tmp[i] = load_u16(words + 2 * (pos + i));
    w = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
    overrun |= pos + k > end;
  }
  w = _mm256_permutevar8x32_epi32(w, _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[m])));
  pos += k;
  return _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), w), need);
}

struct SimdArgs {
  const uint32_t* fb;
  const uint32_t* info;
  const uint32_t* base;
  const uint32_t* rank;
  uint32_t ns, scale_bits, token_bytes;
};

// Decodes `steps` full steps of one block; x: the 32 lane states (in/out).
__attribute__((target("avx2,popcnt"))) void steps_avx2(const SimdArgs& a, uint32_t* x, const uint8_t* words,
                                                      uint64_t& pos, uint64_t end, uint32_t steps, void* out,
                                                      bool& overrun, bool& bad) {
  __m256i xv[4], info[4], v[4];
  for (int k = 0; k < 4; ++k) xv[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8 * k));
  const __m256i slot_mask = _mm256_set1_epi32(static_cast<int>((1u << a.scale_bits) - 1));
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(a.scale_bits));
  const __m256i lo16 = _mm256_set1_epi32(0xffff), one = _mm256_set1_epi32(1), c16 = _mm256_set1_epi32(16);
  const __m256i bits_mask = _mm256_set1_epi32(0x1f), esc_bit = _mm256_set1_epi32(0x100);
  const __m256i ns_minus_1 = _mm256_set1_epi32(static_cast<int>(a.ns - 1)), zero = _mm256_setzero_si256();
  const __m256i all = _mm256_set1_epi32(-1);
  __m256i badv = zero;
  for (uint32_t t = 0; t < steps; ++t) {
    for (int k = 0; k < 4; ++k) {  // phase 1
      const __m256i slot = _mm256_and_si256(xv[k], slot_mask);
      const __m256i fb = _mm256_i32gather_epi32(reinterpret_cast<const int*>(a.fb), slot, 4);
      info[k] = _mm256_i32gather_epi32(reinterpret_cast<const int*>(a.info), slot, 4);
      xv[k] = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(fb, lo16), _mm256_srl_epi32(xv[k], shift)),
                               _mm256_srli_epi32(fb, 16));
      xv[k] = renorm8(xv[k], words, pos, end, overrun);
    }
    int high = 0;
    for (int k = 0; k < 4; ++k) {  // phase 2
      const __m256i bits = _mm256_and_si256(info[k], bits_mask);
      const __m256i lo = _mm256_min_epu32(bits, c16);
      v[k] = _mm256_and_si256(xv[k], _mm256_sub_epi32(_mm256_sllv_epi32(one, lo), one));
      xv[k] = _mm256_srlv_epi32(xv[k], lo);
      high |= _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(bits, c16)));
      xv[k] = renorm8(xv[k], words, pos, end, overrun);
    }
    if (high) {
      for (int k = 0; k < 4; ++k) {  // phase 3
        const __m256i hi = _mm256_sub_epi32(_mm256_max_epu32(_mm256_and_si256(info[k], bits_mask), c16), c16);
        const __m256i h = _mm256_and_si256(xv[k], _mm256_sub_epi32(_mm256_sllv_epi32(one, hi), one));
        v[k] = _mm256_or_si256(v[k], _mm256_slli_epi32(h, 16));
        xv[k] = _mm256_srlv_epi32(xv[k], hi);
        xv[k] = renorm8(xv[k], words, pos, end, overrun);
      }
    }
    for (int k = 0; k < 4; ++k) {  // symbols
      const __m256i base = _mm256_i32gather_epi32(reinterpret_cast<const int*>(a.base), _mm256_srli_epi32(info[k], 16), 4);
      const __m256i idx = _mm256_add_epi32(base, v[k]);
      const __m256i esc = _mm256_cmpeq_epi32(_mm256_and_si256(info[k], esc_bit), esc_bit);
      const __m256i in_range = a.ns ? _mm256_cmpeq_epi32(_mm256_min_epu32(idx, ns_minus_1), idx) : zero;
      const __m256i gmask = _mm256_andnot_si256(esc, in_range);
      const __m256i sym = _mm256_mask_i32gather_epi32(idx, reinterpret_cast<const int*>(a.rank), idx, gmask, 4);
      badv = _mm256_or_si256(badv, _mm256_andnot_si256(_mm256_or_si256(esc, in_range), all));
      if (a.token_bytes == 2) {
        badv = _mm256_or_si256(badv, _mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_srli_epi32(idx, 16), zero), esc));
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(sym, sym), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + size_t(t) * kLanes + 8 * k),
                         _mm256_castsi256_si128(packed));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint32_t*>(out) + size_t(t) * kLanes + 8 * k),
                            sym);
      }
    }
  }
  bad |= !_mm256_testz_si256(badv, badv);
  for (int k = 0; k < 4; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 8 * k), xv[k]);
}

}  // namespace
#endif

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
  const bool use_simd = simd && !simd_fb_.empty() && cpu_has_avx2();
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
