// rans model: build (counting, ranking, quantising frequencies), the serialised
// form (serialize/parse) and the decoder tables (finish, device_image).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <queue>
#include <utility>

#include "codec/rans.hpp"
#include "codec/rans_impl.hpp"

namespace llmio {
namespace rans {
using namespace detail;
namespace {

constexpr uint32_t kModelVersion = 1;
constexpr size_t kDenseLimit = size_t(1) << 22;  // symbol -> rank as an array below this id

uint32_t rank_bucket_size(uint32_t b) { return 1u << rank_bucket_bits(b); }

uint32_t num_rank_buckets_for(uint32_t num_symbols) {
  return num_symbols ? rank_bucket(num_symbols - 1) + 1 : 0;
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

}  // namespace rans
}  // namespace llmio
