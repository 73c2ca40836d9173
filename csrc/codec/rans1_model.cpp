// rans1 model: build (counting contexts), the serialised form (raw counts,
// serialize/parse), the deterministic quantisation and the decode image (finish).
#include <algorithm>
#include <cmath>
#include <cstring>
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

constexpr uint32_t kModelVersion = 1;
constexpr size_t kDenseLimit = size_t(1) << 22;
constexpr uint64_t kMaxCount = uint64_t(1) << 40;      // any one raw count
constexpr uint64_t kMaxTotal = uint64_t(1) << 46;      // the counts of one table together
constexpr uint64_t kMaxImageWords = uint64_t(1) << 30;  // 4 GiB

uint32_t num_rank_buckets_for(uint32_t ns) { return ns ? rank_bucket(ns - 1) + 1 : 0; }
uint32_t num_buckets_for(uint32_t nrb, uint32_t tb) { return nrb + 8 * tb + 1; }
uint32_t ceil_log2(uint64_t v) { return v <= 1 ? 0 : 64 - static_cast<uint32_t>(__builtin_clzll(v - 1)); }
uint32_t bucket_size(uint32_t b) { return 1u << rans::rank_bucket_bits(b); }

// Slots of a context table, as 2^bits: enough for 2 per count, and for the smallest
// count to get about 2^kPrecisionBits slots (more buys nothing but cache misses), at
// most 2^ceil_log2(total) and 2^ctx_bits. `counts` holds the entries' counts and the
// escape's (escape_count + 1); total is their sum, smallest their minimum.
constexpr uint32_t kPrecisionBits = 4;
uint32_t table_bits(uint64_t total, uint64_t smallest, uint64_t num_counts, uint32_t ctx_bits) {
  const uint32_t need = std::min(ceil_log2(total), ceil_log2((total + smallest - 1) / smallest) + kPrecisionBits);
  return std::min(ctx_bits, std::max(need, ceil_log2(2 * num_counts)));
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

}  // namespace

std::vector<uint32_t> quantize(const std::vector<uint64_t>& counts, uint32_t bits) {
  const uint64_t M = uint64_t(1) << bits, k = counts.size();
  if (k == 0 || k > M) throw std::logic_error("rans1 quantize: " + std::to_string(k) + " counts for 2^" + std::to_string(bits));
  uint64_t total = 0;
  size_t top = 0;
  for (size_t i = 0; i < k; ++i) {
    total += counts[i];
    if (counts[i] > counts[top]) top = i;
  }
  const uint64_t rest = M - k;  // counts < 2^46 and rest < 2^16: no product overflows
  std::vector<uint32_t> f(k);
  uint64_t sum = 0;
  for (size_t i = 0; i < k; ++i) {
    f[i] = static_cast<uint32_t>(1 + (total ? counts[i] * rest / total : 0));
    sum += f[i];
  }
  f[top] += static_cast<uint32_t>(M - sum);
  return f;
}

uint32_t Model::rank_of(uint32_t sym) const {
  if (!dense_rank_.empty() || sparse_rank_.empty()) return sym < dense_rank_.size() ? dense_rank_[sym] : kNone;
  auto it = std::lower_bound(sparse_rank_.begin(), sparse_rank_.end(), std::make_pair(sym, 0u));
  return it != sparse_rank_.end() && it->first == sym ? it->second : kNone;
}

uint32_t Model::context_of_rank(uint32_t r) const {
  const uint32_t nctx = static_cast<uint32_t>(ctx_.size());
  if (r == kNone) return nctx - 2;
  return r < num_exact_ ? r : num_exact_ + rank_bucket(r) - cls0_;
}

uint64_t Model::num_entries() const {
  uint64_t n = 0;
  for (const Context& c : ctx_) n += c.entries.size();
  return n;
}

// ---------------------------------------------------------------- build

Model Model::build(const std::vector<std::pair<const void*, size_t>>& parts, uint32_t token_bytes,
                   const BuildParams& p) {
  if (token_bytes != 2 && token_bytes != 4) throw std::invalid_argument("rans1: token_bytes must be 2 or 4");
  if (p.scale_bits < kMinScaleBits || p.scale_bits > kMaxScaleBits)
    throw std::invalid_argument("rans1: scale_bits must be in [" + std::to_string(kMinScaleBits) + ", " +
                                std::to_string(kMaxScaleBits) + "], got " + std::to_string(p.scale_bits));
  if (p.ctx_bits < kMinCtxBits || p.ctx_bits > kMaxCtxBits)
    throw std::invalid_argument("rans1: ctx_bits must be in [" + std::to_string(kMinCtxBits) + ", " +
                                std::to_string(kMaxCtxBits) + "], got " + std::to_string(p.ctx_bits));
  if (p.min_count < 1) throw std::invalid_argument("rans1: min_count must be >= 1");
  for (auto& [ptr, n] : parts)
    if (n > 0xffffffffu) throw std::invalid_argument("rans1: a chunk holds at most 2^32-1 tokens");
  // Histogram: dense below kDenseLimit, else sort a copy.
  uint32_t maxv = 0;
  size_t total = 0;
  for (auto& [ptr, n] : parts) {
    for (size_t i = 0; i < n; ++i) maxv = std::max(maxv, token_at(ptr, i, token_bytes));
    total += n;
  }
  std::vector<std::pair<uint32_t, uint64_t>> hist;
  if (total && maxv < kDenseLimit) {
    std::vector<uint64_t> c(size_t(maxv) + 1, 0);
    for (auto& [ptr, n] : parts)
      for (size_t i = 0; i < n; ++i) ++c[token_at(ptr, i, token_bytes)];
    for (size_t s = 0; s < c.size(); ++s)
      if (c[s]) hist.emplace_back(static_cast<uint32_t>(s), c[s]);
  } else if (total) {
    std::vector<uint32_t> all;
    all.reserve(total);
    for (auto& [ptr, n] : parts)
      for (size_t i = 0; i < n; ++i) all.push_back(token_at(ptr, i, token_bytes));
    std::sort(all.begin(), all.end());
    for (size_t i = 0; i < all.size();) {
      size_t j = i;
      while (j < all.size() && all[j] == all[i]) ++j;
      hist.emplace_back(all[i], j - i);
      i = j;
    }
  }
  std::stable_sort(hist.begin(), hist.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  Model m;
  m.token_bytes_ = token_bytes;
  m.scale_bits_ = p.scale_bits;
  m.ctx_bits_ = p.ctx_bits;
  const uint32_t ns = static_cast<uint32_t>(hist.size());
  m.num_rank_buckets_ = num_rank_buckets_for(ns);
  m.rank_to_sym_.resize(ns);
  for (uint32_t b = 0; b < m.num_rank_buckets_; ++b) {
    const uint32_t lo = rans::rank_bucket_base(b), hi = std::min(ns, lo + bucket_size(b));
    for (uint32_t r = lo; r < hi; ++r) m.rank_to_sym_[r] = hist[r].first;
    std::sort(m.rank_to_sym_.begin() + lo, m.rank_to_sym_.begin() + hi);  // by id inside a bucket
  }
  uint32_t exact = 0;
  while (exact < ns && hist[exact].second >= p.exact_min_count) ++exact;
  m.num_exact_ = std::min({exact, p.max_exact, kMaxExact});
  m.cls0_ = m.num_exact_ < ns ? rank_bucket(m.num_exact_) : m.num_rank_buckets_;
  m.ctx_.resize(size_t(m.num_exact_) + (m.num_rank_buckets_ - m.cls0_) + 2);
  m.finish_ranks();
  // (context, rank) of every token, cut as encode() cuts: blocks, then lane segments.
  std::vector<uint64_t> keys;
  keys.reserve(total);
  const uint32_t start = static_cast<uint32_t>(m.ctx_.size()) - 1;
  for (auto& [ptr, n] : parts) {
    for (size_t first = 0; first < n; first += kBlockSymbols) {
      const uint32_t bm = static_cast<uint32_t>(std::min<size_t>(kBlockSymbols, n - first));
      const uint32_t seg = (bm + kLanes - 1) / kLanes;
      uint32_t prev = 0;
      for (uint32_t i = 0; i < bm; ++i) {
        const uint32_t r = m.rank_of(token_at(ptr, first + i, token_bytes));
        const uint32_t c = i % seg == 0 ? start : m.context_of_rank(prev);
        keys.push_back(uint64_t(c) << 32 | r);
        prev = r;
      }
    }
  }
  std::sort(keys.begin(), keys.end());
  m.bucket_count_.assign(num_buckets_for(m.num_rank_buckets_, token_bytes), 0);
  const size_t cap = (size_t(1) << (p.ctx_bits - 1)) - 1;
  std::vector<double> log2_p0;  // order-0 information of each rank, for entry_cost_bits
  if (p.entry_cost_bits) {
    log2_p0.resize(ns);
    for (uint32_t r = 0; r < ns; ++r)
      log2_p0[r] = std::log2(static_cast<double>(hist[r].second) / static_cast<double>(total));
    // hist is in count order, rank_to_sym_ re-orders inside buckets: look the counts up by symbol
    std::vector<std::pair<uint32_t, uint64_t>> by_sym(hist);
    std::sort(by_sym.begin(), by_sym.end());
    for (uint32_t r = 0; r < ns; ++r) {
      auto it = std::lower_bound(by_sym.begin(), by_sym.end(), std::make_pair(m.rank_to_sym_[r], uint64_t(0)));
      log2_p0[r] = std::log2(static_cast<double>(it->second) / static_cast<double>(total));
    }
  }
  std::vector<Entry> cand, kept;
  for (size_t i = 0; i < keys.size();) {
    const uint32_t c = static_cast<uint32_t>(keys[i] >> 32);
    Context& ctx = m.ctx_[c];
    cand.clear();
    size_t j = i;
    while (j < keys.size() && (keys[j] >> 32) == c) {
      size_t k = j;
      while (k < keys.size() && keys[k] == keys[j]) ++k;
      const uint32_t r = static_cast<uint32_t>(keys[j]);
      const uint64_t cnt = k - j;
      if (r <= kMaxEntryRank && cnt >= p.min_count) {
        cand.push_back({r, cnt});
      } else {
        ctx.escape_count += cnt;
        m.bucket_count_[rank_bucket(r)] += cnt;
      }
      j = k;
    }
    if (p.entry_cost_bits && !cand.empty()) {  // drop entries that cost more than they save
      const double n_c = static_cast<double>(j - i);
      double cover = 0;
      for (const Entry& e : cand) cover += static_cast<double>(e.count);
      const double log2_esc = std::log2((n_c - cover + 1) / (n_c + 1));
      kept.clear();
      for (const Entry& e : cand) {
        const double cnt = static_cast<double>(e.count);
        const double gain = cnt * (std::log2(cnt / n_c) - log2_esc - log2_p0[e.rank]);
        if (gain > p.entry_cost_bits) {
          kept.push_back(e);
        } else {
          ctx.escape_count += e.count;
          m.bucket_count_[rank_bucket(e.rank)] += e.count;
        }
      }
      cand.swap(kept);
    }
    if (cand.size() > cap) {  // keep the most frequent; the rest escape
      std::stable_sort(cand.begin(), cand.end(), [](const Entry& a, const Entry& b) { return a.count > b.count; });
      for (size_t e = cap; e < cand.size(); ++e) {
        ctx.escape_count += cand[e].count;
        m.bucket_count_[rank_bucket(cand[e].rank)] += cand[e].count;
      }
      cand.resize(cap);
      std::sort(cand.begin(), cand.end(), [](const Entry& a, const Entry& b) { return a.rank < b.rank; });
    }
    ctx.entries = cand;
    i = j;
  }
  m.finish();
  // Too many slots for a decode image: smaller tables (ctx_bits - 1, each context keeping its
  // most frequent entries under the smaller cap) until they fit.
  const uint64_t budget = std::min<uint64_t>(p.max_slots, kMaxSlots);
  while (m.num_slots_ > budget && m.ctx_bits_ > kMinCtxBits) {
    --m.ctx_bits_;
    const size_t cap2 = (size_t(1) << (m.ctx_bits_ - 1)) - 1;
    for (Context& cx : m.ctx_) {
      if (cx.entries.size() <= cap2) continue;
      std::stable_sort(cx.entries.begin(), cx.entries.end(),
                       [](const Entry& a, const Entry& b) { return a.count > b.count; });
      for (size_t e = cap2; e < cx.entries.size(); ++e) {
        cx.escape_count += cx.entries[e].count;
        m.bucket_count_[rank_bucket(cx.entries[e].rank)] += cx.entries[e].count;
      }
      cx.entries.resize(cap2);
      std::sort(cx.entries.begin(), cx.entries.end(), [](const Entry& a, const Entry& b) { return a.rank < b.rank; });
    }
    m.finish();
  }
  if (m.num_slots_ > budget)
    throw std::invalid_argument("rans1: the context tables need " + std::to_string(m.num_slots_) +
                                " slots even with ctx_bits " + std::to_string(kMinCtxBits) + ", more than " +
                                std::to_string(budget));
  return m;
}

void Model::finish_ranks() {
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

// ---------------------------------------------------------------- quantisation and the decode image

void Model::finish() {
  const uint32_t nrb = num_rank_buckets_, nb = num_buckets_for(nrb, token_bytes_);
  freq_ = quantize(bucket_count_, scale_bits_);
  cum_.assign(nb, 0);
  for (uint32_t b = 1; b < nb; ++b) cum_[b] = cum_[b - 1] + freq_[b - 1];
  double bits = 0;
  uint64_t coded = 0;
  num_slots_ = 0;
  std::vector<uint64_t> counts;
  for (Context& c : ctx_) {
    counts.clear();
    uint64_t total = c.escape_count + 1;
    for (const Entry& e : c.entries) {
      counts.push_back(e.count);
      total += e.count;
    }
    counts.push_back(c.escape_count + 1);
    c.bits = table_bits(total, *std::min_element(counts.begin(), counts.end()), counts.size(), ctx_bits_);
    const std::vector<uint32_t> f = quantize(counts, c.bits);
    uint32_t cum = 0;
    for (size_t i = 0; i < c.entries.size(); ++i) {
      c.entries[i].freq = f[i];
      c.entries[i].cum = cum;
      cum += f[i];
      bits += static_cast<double>(c.entries[i].count) * (c.bits - std::log2(static_cast<double>(f[i])));
      coded += c.entries[i].count;
    }
    c.escape_freq = f.back();
    c.escape_cum = cum;
    bits += static_cast<double>(c.escape_count) * (c.bits - std::log2(static_cast<double>(c.escape_freq)));
    coded += c.escape_count;
    c.first_slot = num_slots_;
    num_slots_ += uint64_t(1) << c.bits;
  }
  for (uint32_t b = 0; b < nb; ++b) {
    const uint32_t raw = b < nrb ? rans::rank_bucket_bits(b) : rans::escape_bits(b - nrb);
    bits += static_cast<double>(bucket_count_[b]) * (scale_bits_ - std::log2(static_cast<double>(freq_[b])) + raw);
  }
  bits_per_token_ = coded ? bits / static_cast<double>(coded) : 0;
  // The decode image (rans1_device.hpp).
  const uint64_t ns = rank_to_sym_.size(), nctx = ctx_.size();
  const uint64_t bucket_off = kImageHeaderWords, table_off = bucket_off + rans::kBucketWords * uint64_t(nb);
  const uint64_t rank_off = table_off + ((uint64_t(1) << scale_bits_) + 1) / 2;
  const uint64_t ctx_off = rank_off + ns, slot_off = ctx_off + nctx, end = slot_off + 2 * num_slots_;
  if (end > kMaxImageWords || num_slots_ > (uint64_t(1) << 28))
    throw CodecError("rans1 model: too large to decode (" + std::to_string(end) + " image words)");
  image_.assign(end, 0);
  uint32_t* w = image_.data();
  const uint32_t hdr[kImageHeaderWords] = {kImageMagic,
                                           scale_bits_,
                                           nb,
                                           static_cast<uint32_t>(ns),
                                           token_bytes_,
                                           static_cast<uint32_t>(bucket_off),
                                           static_cast<uint32_t>(table_off),
                                           static_cast<uint32_t>(rank_off),
                                           static_cast<uint32_t>(nctx),
                                           num_exact_,
                                           cls0_,
                                           static_cast<uint32_t>(ctx_off),
                                           static_cast<uint32_t>(slot_off),
                                           static_cast<uint32_t>(num_slots_),
                                           nrb,
                                           0};
  std::memcpy(w, hdr, sizeof hdr);
  uint16_t* table = reinterpret_cast<uint16_t*>(w + table_off);
  for (uint32_t b = 0; b < nb; ++b) {
    uint32_t* e = w + bucket_off + rans::kBucketWords * b;
    const bool escape = b >= nrb;
    e[0] = freq_[b];
    e[1] = cum_[b];
    e[2] = escape ? rans::escape_base(b - nrb) : rans::rank_bucket_base(b);
    e[3] = (escape ? rans::escape_bits(b - nrb) : rans::rank_bucket_bits(b)) | (escape ? 1u << 8 : 0u);
    for (uint32_t s = cum_[b]; s < cum_[b] + freq_[b]; ++s) table[s] = static_cast<uint16_t>(b);
  }
  std::copy(rank_to_sym_.begin(), rank_to_sym_.end(), w + rank_off);
  simd_fb_.resize(size_t(1) << scale_bits_);
  simd_info_.resize(size_t(1) << scale_bits_);
  simd_base_.resize(nb);
  for (uint32_t b = 0; b < nb; ++b) {
    const uint32_t* e = w + bucket_off + rans::kBucketWords * b;
    simd_base_[b] = e[2];
    for (uint32_t s = cum_[b]; s < cum_[b] + freq_[b]; ++s) {
      simd_fb_[s] = freq_[b] | (s - cum_[b]) << 16;
      simd_info_[s] = (e[3] & 0xffu) | (e[3] >> 8 ? 1u << 8 : 0u) | b << 16;
    }
  }
  for (uint64_t c = 0; c < nctx; ++c) {
    const Context& cx = ctx_[c];
    w[ctx_off + c] = static_cast<uint32_t>(cx.first_slot << 4) | cx.bits;
    uint32_t* s = w + slot_off + 2 * cx.first_slot;
    auto fill = [&](uint32_t first_word, uint32_t freq, uint32_t cum) {
      for (uint32_t k = cum; k < cum + freq; ++k) {
        s[2 * k] = first_word;
        s[2 * k + 1] = freq | (k - cum) << 16;
      }
    };
    for (const Entry& e : cx.entries) fill(e.rank | context_of_rank(e.rank) << 16, e.freq, e.cum);
    fill(kEscapeRank, cx.escape_freq, cx.escape_cum);
  }
}

// ---------------------------------------------------------------- serialisation
//
//   u32 version (1) | u32 token_bytes | u32 scale_bits | u32 ctx_bits | u32 num_symbols | u32 num_exact |
//   varint bucket_count[num_rank_buckets + 8 * token_bytes + 1] |
//   per rank bucket: its ids ascending, the first as a varint, then varint deltas (>= 1) |
//   per context (num_exact + num_rank_buckets - cls0 + 2 of them):
//     varint num_entries | varint escape_count | per entry: varint rank delta (the first: the rank) and
//     varint count - 1

std::vector<uint8_t> Model::serialize() const {
  std::vector<uint8_t> o;
  put_u32(o, kModelVersion);
  put_u32(o, token_bytes_);
  put_u32(o, scale_bits_);
  put_u32(o, ctx_bits_);
  put_u32(o, num_symbols());
  put_u32(o, num_exact_);
  for (uint64_t c : bucket_count_) put_varint(o, c);
  const uint32_t ns = num_symbols();
  for (uint32_t b = 0; b < num_rank_buckets_; ++b) {
    const uint32_t lo = rans::rank_bucket_base(b), hi = std::min(ns, lo + bucket_size(b));
    for (uint32_t r = lo; r < hi; ++r) put_varint(o, r == lo ? rank_to_sym_[r] : rank_to_sym_[r] - rank_to_sym_[r - 1]);
  }
  for (const Context& c : ctx_) {
    put_varint(o, c.entries.size());
    put_varint(o, c.escape_count);
    uint32_t prev = 0;
    for (size_t i = 0; i < c.entries.size(); ++i) {
      put_varint(o, i ? c.entries[i].rank - prev : c.entries[i].rank);
      put_varint(o, c.entries[i].count - 1);
      prev = c.entries[i].rank;
    }
  }
  return o;
}

Model Model::parse(const uint8_t* d, size_t n) {
  auto fail = [](const std::string& what) { throw CodecError("rans1 model: " + what); };
  if (n < 24) fail("truncated (" + std::to_string(n) + " bytes, the fixed part is 24)");
  using rans::load_u32;
  const uint32_t version = load_u32(d), tb = load_u32(d + 4), sb = load_u32(d + 8), cb = load_u32(d + 12),
                 ns = load_u32(d + 16), exact = load_u32(d + 20);
  if (version != kModelVersion) fail("version " + std::to_string(version) + ", this build reads 1");
  if (tb != 2 && tb != 4) fail("token_bytes " + std::to_string(tb));
  if (sb < kMinScaleBits || sb > kMaxScaleBits) fail("scale_bits " + std::to_string(sb));
  if (cb < kMinCtxBits || cb > kMaxCtxBits) fail("ctx_bits " + std::to_string(cb));
  if (tb == 2 && ns > 65536) fail("num_symbols " + std::to_string(ns) + " for 2-byte tokens");
  if (exact > ns || exact > kMaxExact) fail("num_exact " + std::to_string(exact) + " (num_symbols " + std::to_string(ns) + ")");
  size_t pos = 24;
  auto varint = [&](const char* what) -> uint64_t {
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      if (pos >= n) fail(std::string("truncated ") + what);
      if (shift > 56) fail(std::string("bad varint in ") + what);
      const uint8_t byte = d[pos++];
      v |= uint64_t(byte & 0x7f) << shift;
      if (!(byte & 0x80)) break;
    }
    return v;
  };
  Model m;
  m.token_bytes_ = tb;
  m.scale_bits_ = sb;
  m.ctx_bits_ = cb;
  m.num_rank_buckets_ = num_rank_buckets_for(ns);
  m.num_exact_ = exact;
  m.cls0_ = exact < ns ? rank_bucket(exact) : m.num_rank_buckets_;
  const uint32_t nb = num_buckets_for(m.num_rank_buckets_, tb);
  m.bucket_count_.resize(nb);
  for (uint32_t b = 0; b < nb; ++b) {
    m.bucket_count_[b] = varint("bucket counts");
    if (m.bucket_count_[b] > kMaxTotal) fail("bucket count too large");
  }
  // Each symbol takes at least one byte: a count larger than what is left is truncation, not an allocation.
  if (ns > n - pos) fail("truncated symbol list (" + std::to_string(ns) + " symbols)");
  const uint64_t limit = tb == 2 ? 0xffffu : 0xffffffffu;
  m.rank_to_sym_.resize(ns);
  for (uint32_t b = 0; b < m.num_rank_buckets_; ++b) {
    const uint32_t lo = rans::rank_bucket_base(b), hi = std::min(ns, lo + bucket_size(b));
    uint64_t prev = 0;
    for (uint32_t r = lo; r < hi; ++r) {
      const uint64_t v = varint("symbol list");
      if (r != lo && v == 0) fail("symbol list of bucket " + std::to_string(b) + " not ascending");
      const uint64_t sym = r == lo ? v : prev + v;
      if (sym > limit) fail("symbol " + std::to_string(sym) + " wider than the token type");
      m.rank_to_sym_[r] = static_cast<uint32_t>(sym);
      prev = sym;
    }
  }
  {
    std::vector<uint32_t> sorted(m.rank_to_sym_);
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) fail("a symbol is listed twice");
  }
  const size_t nctx = size_t(exact) + (m.num_rank_buckets_ - m.cls0_) + 2;
  if (nctx > n - pos) fail("truncated context tables");
  m.ctx_.resize(nctx);
  const uint64_t cap = (uint64_t(1) << (cb - 1)) - 1;
  const uint64_t max_rank = std::min<uint64_t>(ns ? ns - 1 : 0, kMaxEntryRank);
  uint64_t slots = 0;
  for (size_t c = 0; c < nctx; ++c) {
    Context& cx = m.ctx_[c];
    const uint64_t k = varint("context table");
    if (k > cap || (k && ns == 0)) fail("context " + std::to_string(c) + " lists " + std::to_string(k) + " tokens");
    if (k > (n - pos) / 2) fail("truncated context " + std::to_string(c));
    cx.escape_count = varint("context table");
    uint64_t total = cx.escape_count + 1, smallest = total;
    if (total > kMaxTotal) fail("context " + std::to_string(c) + ": escape count too large");
    cx.entries.resize(k);
    uint64_t prev = 0;
    for (uint64_t i = 0; i < k; ++i) {
      const uint64_t v = varint("context table");
      if (i && v == 0) fail("context " + std::to_string(c) + ": ranks not ascending");
      const uint64_t r = i ? prev + v : v;
      if (r > max_rank) fail("context " + std::to_string(c) + ": rank " + std::to_string(r) + " out of range");
      const uint64_t cnt = varint("context table") + 1;
      if (cnt > kMaxCount) fail("context " + std::to_string(c) + ": count too large");
      total += cnt;
      smallest = std::min(smallest, cnt);
      if (total > kMaxTotal) fail("context " + std::to_string(c) + ": counts too large");
      cx.entries[i] = {static_cast<uint32_t>(r), cnt};
      prev = r;
    }
    slots += uint64_t(1) << table_bits(total, smallest, k + 1, cb);
    if (slots > kMaxSlots) fail("context tables larger than " + std::to_string(kMaxSlots) + " slots");
  }
  if (pos != n) fail(std::to_string(n - pos) + " trailing bytes");
  m.finish_ranks();
  m.finish();
  return m;
}

}  // namespace rans1
}  // namespace llmio
