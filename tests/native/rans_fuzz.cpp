// Seeded fuzz driver for the rans and rans1 codecs, built with AddressSanitizer and
// UndefinedBehaviorSanitizer by tests/test_codec_rans.py::test_native_fuzz_under_asan.
// For each case: random tokens (several distributions and sizes), a model, a
// round trip through the encoder, the decoder and the kernel emulation; then
// mutated payloads and models, which must either decode or throw CodecError,
// never touch memory outside their buffers (the sanitizers check that; the
// buffers are exact-size heap allocations so any overrun is caught).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "codec/rans.hpp"
#include "codec/rans1.hpp"

using namespace llmio::rans;

namespace {

template <class T>
std::vector<T> make_tokens(std::mt19937_64& rng, size_t n, int kind) {
  std::vector<T> t(n);
  const uint64_t vmax = sizeof(T) == 2 ? 0xffffu : 0xffffffffu;
  std::uniform_int_distribution<uint64_t> any(0, vmax);
  for (size_t i = 0; i < n; ++i) {
    switch (kind) {
      case 0: t[i] = static_cast<T>(any(rng)); break;                            // uniform, full range
      case 1: t[i] = static_cast<T>(7); break;                                   // one symbol
      case 2: { double u = std::uniform_real_distribution<double>(0, 1)(rng);    // heavy head
                t[i] = static_cast<T>(static_cast<uint64_t>(std::pow(50000.0, u * u)) % (vmax + 1)); break; }
      default: t[i] = static_cast<T>(i % 300); break;
    }
  }
  return t;
}

template <class T>
int run_case(std::mt19937_64& rng, int mutations) {
  static const size_t sizes[] = {0, 1, 31, 32, 33, 1000, kBlockSymbols - 1, kBlockSymbols, kBlockSymbols + 1,
                                 2 * kBlockSymbols + 77};
  const size_t n = sizes[rng() % (sizeof(sizes) / sizeof(sizes[0]))];
  const int kind = static_cast<int>(rng() % 4);
  std::vector<T> t = make_tokens<T>(rng, n, kind);
  const uint32_t esc = static_cast<uint32_t>(rng() % 3);
  Model m = Model::build({{t.data(), t.size()}}, sizeof(T), 9 + static_cast<uint32_t>(rng() % 8), esc);
  std::vector<uint8_t> enc;
  m.encode(t.data(), t.size(), enc);
  std::unique_ptr<T[]> out(new T[n ? n : 1]);
  m.decode(enc.data(), enc.size(), out.get(), n);
  if (n && std::memcmp(out.get(), t.data(), n * sizeof(T)) != 0) {
    std::printf("round trip mismatch n=%zu kind=%d\n", n, kind);
    return 1;
  }
  // the kernel emulation on an exact-size copy
  std::vector<uint32_t> img = m.device_image();
  const uint32_t* imgs[1] = {img.data()};
  ChunkDesc cd{0, enc.size(), 0, static_cast<uint32_t>(n), 0};
  std::vector<BlockDesc> bd(num_blocks_for(static_cast<uint32_t>(n)));
  for (uint32_t b = 0; b < bd.size(); ++b) bd[b] = {0, b};
  int32_t status = 0;
  m.decode(enc.data(), enc.size(), out.get(), n);
  // mutated payloads: exact-size heap copies
  for (int k = 0; k < mutations; ++k) {
    std::unique_ptr<uint8_t[]> buf(new uint8_t[enc.size() ? enc.size() : 1]);
    size_t len = enc.size();
    std::memcpy(buf.get(), enc.data(), len);
    const int what = static_cast<int>(rng() % 3);
    if (what == 0 && len) buf[rng() % len] ^= static_cast<uint8_t>(1u << (rng() % 8));
    if (what == 1 && len) buf[rng() % len] = static_cast<uint8_t>(rng());
    if (what == 2) len = len ? rng() % len : 0;  // truncation
    try {
      m.decode(buf.get(), len, out.get(), n);
    } catch (const CodecError&) {
    }
    if (len == enc.size()) {
      status = 0;
      emulate_warps(buf.get(), &cd, 1, bd.data(), bd.size(), imgs, out.get(), sizeof(T), &status);
    }
  }
  // mutated models
  std::vector<uint8_t> raw = m.serialize();
  for (int k = 0; k < mutations / 4 + 1; ++k) {
    std::unique_ptr<uint8_t[]> buf(new uint8_t[raw.size()]);
    std::memcpy(buf.get(), raw.data(), raw.size());
    size_t len = raw.size();
    if (rng() % 2) buf[rng() % len] ^= static_cast<uint8_t>(1u << (rng() % 8));
    else len = rng() % len;
    try {
      Model mm = Model::parse(buf.get(), len);
      try {  // a well-formed but different model decoding the original payload
        mm.decode(enc.data(), enc.size(), out.get(), n);
      } catch (const CodecError&) {
      }
    } catch (const CodecError&) {
    }
  }
  return 0;
}

// The rans1 CPU decoders: the reference (nullopt-like: reference = true), then the
// default path at each level the CPU runs, scalar first.
struct Decoder1 {
  bool reference;
  Simd simd;
};
std::vector<Decoder1> decoders1() {
  std::vector<Decoder1> d{{true, Simd::kScalar}, {false, Simd::kScalar}};
  if (cpu_simd() >= Simd::kAvx2) d.push_back({false, Simd::kAvx2});
  if (cpu_simd() >= Simd::kAvx512) d.push_back({false, Simd::kAvx512});
  return d;
}

// rans1: the same, with Markov-like token streams (so that contexts have entries), the
// CPU decoders (reference, scalar, every SIMD level the CPU runs) and the kernel
// emulation; mutated payloads (each SIMD level must end as the scalar code does: the
// same error or the same tokens), and mutated models, which must parse to a
// well-formed model or throw.
template <class T>
int run_case1(std::mt19937_64& rng, int mutations) {
  static const std::vector<Decoder1> decs = decoders1();
  namespace r1 = llmio::rans1;
  static const size_t sizes[] = {0, 1, 31, 32, 33, 1000, kBlockSymbols - 1, kBlockSymbols, kBlockSymbols + 1,
                                 2 * kBlockSymbols + 77};
  const size_t n = sizes[rng() % (sizeof(sizes) / sizeof(sizes[0]))];
  const int kind = static_cast<int>(rng() % 5);
  std::vector<T> t = kind < 4 ? make_tokens<T>(rng, n, kind) : std::vector<T>(n);
  if (kind == 4) {  // a chain: token i+1 is one of 4 successors of token i, sometimes random
    uint64_t cur = 0;
    for (size_t i = 0; i < n; ++i) {
      cur = rng() % 16 == 0 ? rng() % 5000 : (cur * 2654435761u + 97 * (rng() % 4)) % 5000;
      t[i] = static_cast<T>(cur);
    }
  }
  r1::BuildParams bp;
  bp.scale_bits = r1::kMinScaleBits + static_cast<uint32_t>(rng() % (r1::kMaxScaleBits - r1::kMinScaleBits + 1));
  bp.ctx_bits = r1::kMinCtxBits + static_cast<uint32_t>(rng() % (r1::kMaxCtxBits - r1::kMinCtxBits + 1));
  bp.min_count = 1 + static_cast<uint32_t>(rng() % 4);
  bp.exact_min_count = 1 + static_cast<uint32_t>(rng() % 40);
  bp.entry_cost_bits = static_cast<uint32_t>(rng() % 3) * 12;
  // a model of half the data or of all of it (the rest then goes through escapes)
  const size_t half = rng() % 2 ? n / 2 : n;
  r1::Model m = r1::Model::build({{t.data(), half}}, sizeof(T), bp);
  std::vector<uint8_t> enc;
  m.encode(t.data(), t.size(), enc);
  std::unique_ptr<T[]> out(new T[n ? n : 1]);
  for (const Decoder1& d : decs) {
    m.decode(enc.data(), enc.size(), out.get(), n, d.reference, d.simd);
    if (n && std::memcmp(out.get(), t.data(), n * sizeof(T)) != 0) {
      std::printf("rans1 round trip mismatch n=%zu kind=%d reference=%d simd=%s\n", n, kind, int(d.reference),
                  simd_name(d.simd));
      return 1;
    }
  }
  const std::vector<uint32_t>& img = m.device_image();
  std::vector<uint32_t> img_copy(img);  // an exact-size heap copy
  const uint32_t* imgs[1] = {img_copy.data()};
  ChunkDesc cd{0, enc.size(), 0, static_cast<uint32_t>(n), 0};
  std::vector<BlockDesc> bd(num_blocks_for(static_cast<uint32_t>(n)));
  for (uint32_t b = 0; b < bd.size(); ++b) bd[b] = {0, b};
  int32_t status = 0;
  r1::emulate_warps(enc.data(), &cd, 1, bd.data(), bd.size(), imgs, out.get(), sizeof(T), &status);
  if (status != 0 || (n && std::memcmp(out.get(), t.data(), n * sizeof(T)) != 0)) {
    std::printf("rans1 emulation mismatch n=%zu kind=%d status=%d\n", n, kind, status);
    return 1;
  }
  for (int k = 0; k < mutations; ++k) {
    std::unique_ptr<uint8_t[]> buf(new uint8_t[enc.size() ? enc.size() : 1]);
    size_t len = enc.size();
    std::memcpy(buf.get(), enc.data(), len);
    const int what = static_cast<int>(rng() % 3);
    if (what == 0 && len) buf[rng() % len] ^= static_cast<uint8_t>(1u << (rng() % 8));
    if (what == 1 && len) buf[rng() % len] = static_cast<uint8_t>(rng());
    if (what == 2) len = len ? rng() % len : 0;
    std::unique_ptr<T[]> first(new T[n ? n : 1]);
    std::string first_err;
    for (size_t i = 0; i < decs.size(); ++i) {
      std::string err;
      try {
        m.decode(buf.get(), len, out.get(), n, decs[i].reference, decs[i].simd);
      } catch (const CodecError& e) {
        err = e.what();
      }
      if (i == 1) {  // the scalar code: what the SIMD levels must match
        first_err = err;
        if (err.empty() && n) std::memcpy(first.get(), out.get(), n * sizeof(T));
      } else if (i > 1 && (err != first_err || (err.empty() && n &&
                                                std::memcmp(first.get(), out.get(), n * sizeof(T)) != 0))) {
        std::printf("rans1 %s differs from scalar on a mutated payload: '%s' vs '%s'\n", simd_name(decs[i].simd),
                    err.c_str(), first_err.c_str());
        return 1;
      }
    }
    ChunkDesc c2{0, len, 0, static_cast<uint32_t>(n), 0};
    status = 0;
    r1::emulate_warps(buf.get(), &c2, 1, bd.data(), bd.size(), imgs, out.get(), sizeof(T), &status);
  }
  std::vector<uint8_t> raw = m.serialize();
  for (int k = 0; k < mutations / 2 + 1; ++k) {
    std::unique_ptr<uint8_t[]> buf(new uint8_t[raw.size()]);
    std::memcpy(buf.get(), raw.data(), raw.size());
    size_t len = raw.size();
    if (rng() % 2)
      buf[rng() % len] ^= static_cast<uint8_t>(1u << (rng() % 8));
    else
      len = rng() % len;
    try {
      r1::Model mm = r1::Model::parse(buf.get(), len);
      for (const Decoder1& d : decs) {
        try {  // a well-formed but different model decoding the original payload
          mm.decode(enc.data(), enc.size(), out.get(), n, d.reference, d.simd);
        } catch (const CodecError&) {
        }
      }
      if (mm.token_bytes() == sizeof(T)) {
        std::vector<uint32_t> mi(mm.device_image());
        const uint32_t* mimgs[1] = {mi.data()};
        status = 0;
        r1::emulate_warps(enc.data(), &cd, 1, bd.data(), bd.size(), mimgs, out.get(), sizeof(T), &status);
      }
    } catch (const CodecError&) {
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 200;
  std::mt19937_64 rng(20261124);
  for (int c = 0; c < cases; ++c) {
    const int rc = (c % 2) ? run_case<uint16_t>(rng, 20) : run_case<uint32_t>(rng, 20);
    if (rc) return rc;
    const int rc1 = (c % 2) ? run_case1<uint32_t>(rng, 20) : run_case1<uint16_t>(rng, 20);
    if (rc1) return rc1;
  }
  std::printf("rans_fuzz ok: %d cases\n", cases);
  return 0;
}
