// Built with -ffp-contract=off (CMakeLists.txt): every multiply and add is
// rounded on its own, as in the oracle and the kernels (no FMA contraction of
// the intrinsics either). See int8_fast.hpp for the contract.
#include "quant/int8_fast.hpp"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>

#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#define LLMIO_INT8_X86 1
#include <immintrin.h>
#endif

namespace llmio {
namespace int8 {

namespace {

constexpr size_t B = kBlock;

// ---------------------------------------------------------------- per-ISA primitives on one 256-value block
//
// add:      v = a + b
// absmax:   max |v| and whether all of v is finite
// quant:    q = clamp(rint(v / scale), -127, 127), res = v - float(q) * scale   (scale finite, > 0)
// deq:      out = float(c) * sc
// add_absmax, dsr, dsr_int: the fused passes below
//
// The owner's step divides by W. For W = 2^k, x / W and x * 2^-k are the same real number, and
// IEEE division and multiplication both round it correctly (normal, subnormal, inf and NaN
// alike), so the multiply gives the oracle's bits; tests/test_quant.py checks W = 1..5 at
// every level.
//
// The vector levels fold it further: (c * sc) * 2^-k == c * (sc * 2^-k) when every scale of the
// block lies in [2^-126 * W, 2^120] (fold_ok). Then sc * 2^-k is a normal number (exact), |c| <=
// 128 keeps |c * sc| <= 2^127 (no overflow), and |c| >= 1 keeps both c * sc and c * sc * 2^-k
// normal, so the two roundings see the same significand at exponents 2^k apart: the same bits
// (c = 0: +-0 either way). A block with a scale outside the range (0, subnormal, huge, NaN) keeps
// the two multiplies. tests/test_quant.py checks every level against the oracle there.
struct Kern {
  void (*add)(const float* a, const float* b, float* v);
  float (*absmax)(const float* v, bool* finite);
  // own: scale = fl(m / 127) for m = max |v| of this block (not a shared absmax), so a level may
  // skip the clamp where it cannot bind
  void (*quant)(const float* v, float scale, uint8_t* q, float* res, bool own);
  void (*deq)(const uint8_t* c, float sc, float* out);
  // fused: v = a + b and its absmax (one pass)
  float (*add_absmax)(const float* a, const float* b, float* v, bool* finite);
  // fused owner's step: v = ((0 + t_0) + t_1 ...) + res, t_r = (float(c_r) * sc_r) / W (or * 1/W when
  // pow2), and its absmax (one pass over the W code blocks)
  float (*dsr)(const uint8_t* const* c, const float* sc, uint32_t world, float w, bool pow2, const float* res,
               float* v, bool* finite);
  // fused shared-scale owner's step: v = (float(sum_r c_r) / W) * sc + res (or * 1/W), and its absmax
  float (*dsr_int)(const uint8_t* const* c, uint32_t world, float w, bool pow2, float sc, const float* res,
                   float* v, bool* finite);
  // 16-bit buckets (f16: fp16, else bf16), len <= B values: widen = to_f32 of each (exact); narrow =
  // FromF32 of each (round to nearest even, FromF32's NaN), bit for bit at every level
  void (*widen)(const uint16_t* x, bool f16, size_t len, float* out);
  void (*narrow)(const float* v, bool f16, size_t len, uint16_t* out);
};

namespace scalar {
void add(const float* a, const float* b, float* v) {
  for (size_t i = 0; i < B; ++i) v[i] = a[i] + b[i];
}
float absmax(const float* v, bool* finite) {
  float m = 0.0f;
  bool fin = true;
  for (size_t i = 0; i < B; ++i) {
    const float a = std::fabs(v[i]);
    if (!std::isfinite(v[i])) fin = false;
    m = a > m ? a : m;
  }
  *finite = fin;
  return m;
}
void quant(const float* v, float scale, uint8_t* q, float* res, bool /*own*/) {
  for (size_t i = 0; i < B; ++i) {
    float r = std::nearbyint(v[i] / scale);
    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
    const int qi = static_cast<int>(r);
    q[i] = static_cast<uint8_t>(static_cast<int8_t>(qi));
    res[i] = v[i] - static_cast<float>(qi) * scale;
  }
}
void deq(const uint8_t* c, float sc, float* out) {
  for (size_t i = 0; i < B; ++i) out[i] = static_cast<float>(static_cast<int8_t>(c[i])) * sc;
}
float add_absmax(const float* a, const float* b, float* v, bool* finite) {
  add(a, b, v);
  return absmax(v, finite);
}
float dsr(const uint8_t* const* c, const float* sc, uint32_t world, float w, bool pow2, const float* res, float* v,
          bool* finite) {
  for (size_t i = 0; i < B; ++i) {
    float x = 0.0f;
    for (uint32_t r = 0; r < world; ++r) {
      const float t = static_cast<float>(static_cast<int8_t>(c[r][i])) * sc[r];
      x = x + (pow2 ? t * w : t / w);
    }
    v[i] = x + res[i];
  }
  return absmax(v, finite);
}
float dsr_int(const uint8_t* const* c, uint32_t world, float w, bool pow2, float sc, const float* res, float* v,
              bool* finite) {
  for (size_t i = 0; i < B; ++i) {
    int32_t x = 0;
    for (uint32_t r = 0; r < world; ++r) x += static_cast<int8_t>(c[r][i]);
    const float f = static_cast<float>(x);
    v[i] = (pow2 ? f * w : f / w) * sc + res[i];
  }
  return absmax(v, finite);
}
void widen(const uint16_t* x, bool f16, size_t len, float* out) {
  if (f16) {
    for (size_t i = 0; i < len; ++i) out[i] = to_f32(F16{x[i]});
  } else {
    for (size_t i = 0; i < len; ++i) out[i] = to_f32(Bf16{x[i]});
  }
}
void narrow(const float* v, bool f16, size_t len, uint16_t* out) {
  if (f16) {
    for (size_t i = 0; i < len; ++i) out[i] = FromF32<F16>::conv(v[i]).bits;
  } else {
    for (size_t i = 0; i < len; ++i) out[i] = FromF32<Bf16>::conv(v[i]).bits;
  }
}
constexpr Kern kern{add, absmax, quant, deq, add_absmax, dsr, dsr_int, widen, narrow};
}  // namespace scalar

#if defined(LLMIO_INT8_X86)
#define LLMIO_AVX2 __attribute__((target("avx2")))
#define LLMIO_AVX2_F16C __attribute__((target("avx2,f16c")))
#define LLMIO_AVX512 __attribute__((target("avx512f")))
constexpr int kRound = _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC;  // as std::nearbyint

// Whether the owner's step may multiply codes by sc * (1/W) in one step (see Kern): W a power of
// two (w = 1/W) and every rank's scale in [2^-126 W, 2^120]; sw receives the folded scales.
inline bool fold_ok(const float* sc, uint32_t world, float w, bool pow2, float* sw) {
  if (!pow2 || world > 64) return false;
  const float lo = 0x1.0p-126f / w;  // 2^-126 * W, exact
  for (uint32_t r = 0; r < world; ++r) {
    if (!(sc[r] >= lo && sc[r] <= 0x1.0p120f)) return false;  // NaN fails too
    sw[r] = sc[r] * w;
  }
  return true;
}

// fp16 conversions in hardware (F16C; AVX-512F has its own): vcvtph2ps is exact, as to_f32.
// vcvtps2ph with round-to-nearest-even gives FromF32<F16>'s bits for every non-NaN value (both are
// IEEE conversions: subnormals, ties and overflow to inf alike) when the scalar version's float
// arithmetic runs in the default MXCSR state (round to nearest, no FTZ/DAZ); in another state, and
// for vectors with a NaN (FromF32's canonical NaN, not the hardware's payload), the scalar code runs.
// bf16 uses integer operations only (the same as FromF32<Bf16>), so it is exact in any state.
bool has_f16c() {
  static const bool has = __builtin_cpu_supports("f16c");
  return has;
}
inline bool default_mxcsr() { return (_mm_getcsr() & 0xE040u) == 0; }  // RC = nearest, FTZ and DAZ off

// The quantizer's rint(v / scale) from a reciprocal multiply, exactly. With scale normal
// (>= FLT_MIN, so inv = fl(1 / scale) is finite and normal) and |v| <= absmax = 127 * scale
// (1 + u), u = 2^-24: m = fl(v * inv) = (v / scale)(1 + d1)(1 + d2), |d| <= u, so
// |m - v/scale| <= 128 * (2u + u^2) < 2^-16.9, and the oracle's d = fl(v / scale) is within
// 128 u = 2^-17 of v / scale: |m - d| < 2^-15.9. Round-half-even of m and of d differ only if
// a half-integer lies within |m - d| of m; m - rint(m) is exact (Sterbenz), so a vector whose
// lanes all have |m - rint(m)| < 0.5 - 2^-14 (distance to the nearest half-integer > 2^-14)
// rounds exactly as the division would, and any other vector is divided. Only in the
// round-to-nearest mode (else the boundaries are the integers): the MXCSR is checked. Tests:
// tests/test_quant.py (values at exact half-codes, every level) against the oracle.
constexpr float kNearHalf = 0.5f - 0x1.0p-14f;
inline bool reciprocal_ok(float scale) {
  return scale >= 1.17549435e-38f && (_mm_getcsr() & 0x6000u) == 0;  // normal scale; round to nearest
}

namespace avx2 {
LLMIO_AVX2 void add(const float* a, const float* b, float* v) {
  for (size_t i = 0; i < B; i += 8)
    _mm256_storeu_ps(v + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
}
LLMIO_AVX2 float absmax(const float* v, bool* finite) {
  const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(3.40282347e+38f);
  __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (size_t i = 0; i < B; i += 8) {
    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  // inf or NaN
    m = _mm256_max_ps(m, a);
  }
  *finite = _mm256_movemask_ps(bad) == 0;
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = 0.0f;
  for (float x : t) r = x > r ? x : r;
  return r;
}
LLMIO_AVX2 void quant(const float* v, float scale, uint8_t* q, float* res, bool own) {
  const __m256 s = _mm256_set1_ps(scale), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f), inv = _mm256_set1_ps(1.0f / scale), near = _mm256_set1_ps(kNearHalf);
  const bool recip = reciprocal_ok(scale);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (size_t i = 0; i < B; i += 32) {
    __m256i qi[4];
    __m256 x[4], r[4];
    for (int k = 0; k < 4; ++k) x[k] = _mm256_loadu_ps(v + i + 8 * k);
    if (recip) {  // x * (1 / scale), then division where a half-integer is near (see reciprocal_ok)
      __m256 close = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        const __m256 m = _mm256_mul_ps(x[k], inv);
        r[k] = _mm256_round_ps(m, kRound);
        close = _mm256_or_ps(close, _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(m, r[k])), near, _CMP_GE_OQ));
      }
      if (_mm256_movemask_ps(close))  // the division gives the same codes elsewhere: redo all 32
        for (int k = 0; k < 4; ++k) r[k] = _mm256_round_ps(_mm256_div_ps(x[k], s), kRound);
      // own: a normal scale = fl(absmax / 127) and |x| <= absmax give |x / scale| <= 127 (1 + 2^-23) and
      // |x * inv| <= 127 (1 + 2^-24)^3, both below 127.5: the codes are within +-127, the clamp is a no-op
      if (!own)
        for (int k = 0; k < 4; ++k) r[k] = _mm256_min_ps(_mm256_max_ps(r[k], lo), hi);
    } else {
      for (int k = 0; k < 4; ++k)
        r[k] = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_div_ps(x[k], s), kRound), lo), hi);
    }
    for (int k = 0; k < 4; ++k) {
      qi[k] = _mm256_cvtps_epi32(r[k]);
      _mm256_storeu_ps(res + i + 8 * k, _mm256_sub_ps(x[k], _mm256_mul_ps(_mm256_cvtepi32_ps(qi[k]), s)));
    }
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(p, perm));
  }
}
LLMIO_AVX2 inline __m256 codes8(const uint8_t* c) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
}
LLMIO_AVX2 void deq(const uint8_t* c, float sc, float* out) {
  const __m256 vs = _mm256_set1_ps(sc);
  for (size_t i = 0; i < B; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(codes8(c + i), vs));
}
LLMIO_AVX2 inline float fold8(__m256 m) {
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = 0.0f;
  for (float x : t) r = x > r ? x : r;
  return r;
}
LLMIO_AVX2 float add_absmax(const float* a, const float* b, float* v, bool* finite) {
  const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(3.40282347e+38f);
  __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (size_t i = 0; i < B; i += 8) {
    const __m256 x = _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
    _mm256_storeu_ps(v + i, x);
    const __m256 ax = _mm256_andnot_ps(sign, x);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(ax, big, _CMP_NLE_UQ));
    m = _mm256_max_ps(m, ax);
  }
  *finite = _mm256_movemask_ps(bad) == 0;
  return fold8(m);
}
LLMIO_AVX2 float dsr(const uint8_t* const* c, const float* sc, uint32_t world, float w, bool pow2, const float* res,
                     float* v, bool* finite) {
  const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(3.40282347e+38f), vw = _mm256_set1_ps(w);
  __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  float sw[64];
  if (fold_ok(sc, world, w, pow2, sw)) {  // one multiply per code (see Kern)
    for (size_t i = 0; i < B; i += 8) {
      __m256 x = _mm256_setzero_ps();
      for (uint32_t r = 0; r < world; ++r)
        x = _mm256_add_ps(x, _mm256_mul_ps(codes8(c[r] + i), _mm256_set1_ps(sw[r])));
      x = _mm256_add_ps(x, _mm256_loadu_ps(res + i));
      _mm256_storeu_ps(v + i, x);
      const __m256 ax = _mm256_andnot_ps(sign, x);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(ax, big, _CMP_NLE_UQ));
      m = _mm256_max_ps(m, ax);
    }
    *finite = _mm256_movemask_ps(bad) == 0;
    return fold8(m);
  }
  for (size_t i = 0; i < B; i += 8) {
    __m256 x = _mm256_setzero_ps();
    for (uint32_t r = 0; r < world; ++r) {
      const __m256 t = _mm256_mul_ps(codes8(c[r] + i), _mm256_set1_ps(sc[r]));
      x = _mm256_add_ps(x, pow2 ? _mm256_mul_ps(t, vw) : _mm256_div_ps(t, vw));
    }
    x = _mm256_add_ps(x, _mm256_loadu_ps(res + i));
    _mm256_storeu_ps(v + i, x);
    const __m256 ax = _mm256_andnot_ps(sign, x);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(ax, big, _CMP_NLE_UQ));
    m = _mm256_max_ps(m, ax);
  }
  *finite = _mm256_movemask_ps(bad) == 0;
  return fold8(m);
}
LLMIO_AVX2 float dsr_int(const uint8_t* const* c, uint32_t world, float w, bool pow2, float sc, const float* res,
                         float* v, bool* finite) {
  const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(3.40282347e+38f), vw = _mm256_set1_ps(w),
               vs = _mm256_set1_ps(sc);
  __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (size_t i = 0; i < B; i += 8) {
    __m256i si = _mm256_setzero_si256();
    for (uint32_t r = 0; r < world; ++r)
      si = _mm256_add_epi32(si, _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c[r] + i))));
    const __m256 f = _mm256_cvtepi32_ps(si);
    const __m256 x = _mm256_add_ps(_mm256_mul_ps(pow2 ? _mm256_mul_ps(f, vw) : _mm256_div_ps(f, vw), vs),
                                   _mm256_loadu_ps(res + i));
    _mm256_storeu_ps(v + i, x);
    const __m256 ax = _mm256_andnot_ps(sign, x);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(ax, big, _CMP_NLE_UQ));
    m = _mm256_max_ps(m, ax);
  }
  *finite = _mm256_movemask_ps(bad) == 0;
  return fold8(m);
}
LLMIO_AVX2_F16C void widen(const uint16_t* x, bool f16, size_t len, float* out) {
  if (f16 && !has_f16c()) return scalar::widen(x, f16, len, out);
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    _mm256_storeu_ps(out + i, f16 ? _mm256_cvtph_ps(h)
                                  : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  scalar::widen(x + i, f16, len - i, out + i);
}
LLMIO_AVX2_F16C void narrow(const float* v, bool f16, size_t len, uint16_t* out) {
  if (f16 && (!has_f16c() || !default_mxcsr())) return scalar::narrow(v, f16, len, out);
  const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff);
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 f = _mm256_loadu_ps(v + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(f, f, _CMP_UNORD_Q))) {
      scalar::narrow(v + i, f16, 8, out + i);
      continue;
    }
    __m128i h;
    if (f16) {
      h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
    } else {  // (u + 0x7fff + ((u >> 16) & 1)) >> 16: no carry out of 32 bits for a non-NaN u
      const __m256i u = _mm256_castps_si256(f);
      const __m256i r = _mm256_srli_epi32(
          _mm256_add_epi32(_mm256_add_epi32(u, half), _mm256_and_si256(_mm256_srli_epi32(u, 16), one)), 16);
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // <= 0xffff: no saturation
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  scalar::narrow(v + i, f16, len - i, out + i);
}
constexpr Kern kern{add, absmax, quant, deq, add_absmax, dsr, dsr_int, widen, narrow};
}  // namespace avx2

namespace avx512 {
LLMIO_AVX512 void add(const float* a, const float* b, float* v) {
  for (size_t i = 0; i < B; i += 16)
    _mm512_storeu_ps(v + i, _mm512_add_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
}
LLMIO_AVX512 float absmax(const float* v, bool* finite) {
  const __m512 big = _mm512_set1_ps(3.40282347e+38f);
  __m512 m = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (size_t i = 0; i < B; i += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(v + i));
    bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);  // inf or NaN
    m = _mm512_max_ps(m, a);
  }
  *finite = bad == 0;
  return _mm512_reduce_max_ps(m);  // exact: a max of finite values in any order
}
LLMIO_AVX512 void quant(const float* v, float scale, uint8_t* q, float* res, bool /*own*/) {
  const __m512 s = _mm512_set1_ps(scale), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
  const bool recip = reciprocal_ok(scale);
  const __m512 inv = _mm512_set1_ps(1.0f / scale), near = _mm512_set1_ps(kNearHalf);
  for (size_t i = 0; i < B; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    __m512 r;
    if (recip) {  // x * (1 / scale), then division only where a half-integer is near (see reciprocal_ok)
      const __m512 m = _mm512_mul_ps(x, inv);
      r = _mm512_roundscale_ps(m, kRound);
      const __m512 t = _mm512_abs_ps(_mm512_sub_ps(m, r));
      if (_mm512_cmp_ps_mask(t, near, _CMP_GE_OQ)) r = _mm512_roundscale_ps(_mm512_div_ps(x, s), kRound);
    } else {
      r = _mm512_roundscale_ps(_mm512_div_ps(x, s), kRound);
    }
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    const __m512i qi = _mm512_cvtps_epi32(r);
    _mm512_storeu_ps(res + i, _mm512_sub_ps(x, _mm512_mul_ps(_mm512_cvtepi32_ps(qi), s)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(qi));
  }
}
LLMIO_AVX512 inline __m512i codes16(const uint8_t* c) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
}
LLMIO_AVX512 void deq(const uint8_t* c, float sc, float* out) {
  const __m512 vs = _mm512_set1_ps(sc);
  for (size_t i = 0; i < B; i += 16) _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(codes16(c + i)), vs));
}
LLMIO_AVX512 float add_absmax(const float* a, const float* b, float* v, bool* finite) {
  const __m512 big = _mm512_set1_ps(3.40282347e+38f);
  __m512 m = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (size_t i = 0; i < B; i += 16) {
    const __m512 x = _mm512_add_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i));
    _mm512_storeu_ps(v + i, x);
    const __m512 ax = _mm512_abs_ps(x);
    bad |= _mm512_cmp_ps_mask(ax, big, _CMP_NLE_UQ);
    m = _mm512_max_ps(m, ax);
  }
  *finite = bad == 0;
  return _mm512_reduce_max_ps(m);
}
LLMIO_AVX512 float dsr(const uint8_t* const* c, const float* sc, uint32_t world, float w, bool pow2,
                       const float* res, float* v, bool* finite) {
  const __m512 big = _mm512_set1_ps(3.40282347e+38f), vw = _mm512_set1_ps(w);
  __m512 m = _mm512_setzero_ps();
  __mmask16 bad = 0;
  float sw[64];
  if (fold_ok(sc, world, w, pow2, sw)) {  // one multiply per code (see Kern)
    for (size_t i = 0; i < B; i += 16) {
      __m512 x = _mm512_setzero_ps();
      for (uint32_t r = 0; r < world; ++r)
        x = _mm512_add_ps(x, _mm512_mul_ps(_mm512_cvtepi32_ps(codes16(c[r] + i)), _mm512_set1_ps(sw[r])));
      x = _mm512_add_ps(x, _mm512_loadu_ps(res + i));
      _mm512_storeu_ps(v + i, x);
      const __m512 ax = _mm512_abs_ps(x);
      bad |= _mm512_cmp_ps_mask(ax, big, _CMP_NLE_UQ);
      m = _mm512_max_ps(m, ax);
    }
    *finite = bad == 0;
    return _mm512_reduce_max_ps(m);
  }
  for (size_t i = 0; i < B; i += 16) {
    __m512 x = _mm512_setzero_ps();
    for (uint32_t r = 0; r < world; ++r) {
      const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(codes16(c[r] + i)), _mm512_set1_ps(sc[r]));
      x = _mm512_add_ps(x, pow2 ? _mm512_mul_ps(t, vw) : _mm512_div_ps(t, vw));
    }
    x = _mm512_add_ps(x, _mm512_loadu_ps(res + i));
    _mm512_storeu_ps(v + i, x);
    const __m512 ax = _mm512_abs_ps(x);
    bad |= _mm512_cmp_ps_mask(ax, big, _CMP_NLE_UQ);
    m = _mm512_max_ps(m, ax);
  }
  *finite = bad == 0;
  return _mm512_reduce_max_ps(m);
}
LLMIO_AVX512 float dsr_int(const uint8_t* const* c, uint32_t world, float w, bool pow2, float sc, const float* res,
                           float* v, bool* finite) {
  const __m512 big = _mm512_set1_ps(3.40282347e+38f), vw = _mm512_set1_ps(w), vs = _mm512_set1_ps(sc);
  __m512 m = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (size_t i = 0; i < B; i += 16) {
    __m512i si = _mm512_setzero_si512();
    for (uint32_t r = 0; r < world; ++r) si = _mm512_add_epi32(si, codes16(c[r] + i));
    const __m512 f = _mm512_cvtepi32_ps(si);
    const __m512 x = _mm512_add_ps(_mm512_mul_ps(pow2 ? _mm512_mul_ps(f, vw) : _mm512_div_ps(f, vw), vs),
                                   _mm512_loadu_ps(res + i));
    _mm512_storeu_ps(v + i, x);
    const __m512 ax = _mm512_abs_ps(x);
    bad |= _mm512_cmp_ps_mask(ax, big, _CMP_NLE_UQ);
    m = _mm512_max_ps(m, ax);
  }
  *finite = bad == 0;
  return _mm512_reduce_max_ps(m);
}
LLMIO_AVX512 void widen(const uint16_t* x, bool f16, size_t len, float* out) {
  size_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    _mm512_storeu_ps(out + i, f16 ? _mm512_cvtph_ps(h)
                                  : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  scalar::widen(x + i, f16, len - i, out + i);
}
LLMIO_AVX512 void narrow(const float* v, bool f16, size_t len, uint16_t* out) {
  if (f16 && !default_mxcsr()) return scalar::narrow(v, f16, len, out);
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
  size_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 f = _mm512_loadu_ps(v + i);
    if (_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q)) {
      scalar::narrow(v + i, f16, 16, out + i);
      continue;
    }
    __m256i h;
    if (f16) {
      h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
    } else {
      const __m512i u = _mm512_castps_si512(f);
      h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(
          _mm512_add_epi32(_mm512_add_epi32(u, half), _mm512_and_si512(_mm512_srli_epi32(u, 16), one)), 16));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), h);
  }
  scalar::narrow(v + i, f16, len - i, out + i);
}
constexpr Kern kern{add, absmax, quant, deq, add_absmax, dsr, dsr_int, widen, narrow};
}  // namespace avx512
#endif  // LLMIO_INT8_X86

// ---------------------------------------------------------------- dispatch

bool cpu_has(Isa isa) {
  if (isa == Isa::kScalar) return true;
#if defined(LLMIO_INT8_X86)
  __builtin_cpu_init();
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2");
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("avx512f");
#endif
  return false;
}

Isa best_isa() {
  if (cpu_has(Isa::kAvx512)) return Isa::kAvx512;
  if (cpu_has(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

Isa initial_isa() {
  const char* e = std::getenv("LLMIO_INT8_ISA");
  if (e && *e) {
    const Isa want = parse_isa(e);  // throws on an unknown name
    if (!cpu_has(want))
      throw std::invalid_argument(std::string("LLMIO_INT8_ISA=") + e + ": this CPU cannot run " + isa_name(want));
    return want;
  }
  return best_isa();
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{-1};
  return slot;
}

const Kern& kern_for(Isa isa) {
#if defined(LLMIO_INT8_X86)
  if (isa == Isa::kAvx512) return avx512::kern;
  if (isa == Isa::kAvx2) return avx2::kern;
#endif
  return scalar::kern;
}

// ---------------------------------------------------------------- thread pool

unsigned default_threads() {
  if (const char* e = std::getenv("LLMIO_INT8_THREADS")) {
    const long v = std::strtol(e, nullptr, 10);
    if (v >= 1) return static_cast<unsigned>(std::min<long>(v, 64));
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return std::max(1u, std::min(hw, 4u));
}

std::atomic<unsigned>& threads_slot() {
  static std::atomic<unsigned> slot{0};
  return slot;
}

// Persistent workers (created on first use, grown on demand, never joined: the pool is
// leaked so no joinable std::thread is destroyed at exit). One job at a time; a caller
// that finds the pool busy runs its job alone. Recreated in a forked child.
class Pool {
 public:
  // Runs fn over [0, total) in chunks of `grain` on up to `threads` threads (the caller
  // included), each worker with the caller's MXCSR.
  void run(size_t total, size_t grain, unsigned threads, const std::function<void(size_t, size_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || threads <= 1 || total <= grain) {
      fn(0, total);
      return;
    }
    ensure(threads - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &fn;
      total_ = total;
      grain_ = grain;
      next_.store(0);
      want_ = std::min<size_t>(threads - 1, workers_);
      joined_ = 0;
      finished_ = 0;
#if defined(LLMIO_INT8_X86)
      csr_ = _mm_getcsr();
#endif
      ++gen_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return finished_ == joined_ && (joined_ == want_ || next_.load() >= total_); });
    job_ = nullptr;
    ++gen_;  // late workers see a new generation with no job
  }

 private:
  void work() {
    for (;;) {
      const size_t b0 = next_.fetch_add(grain_);
      if (b0 >= total_) return;
      (*job_)(b0, std::min(total_, b0 + grain_));
    }
  }

  void ensure(size_t n) {
    while (workers_ < n) {
      try {
        std::thread t([this] { loop(); });
        t.detach();
      } catch (const std::system_error&) {
        return;  // the OS refused a thread: run with the workers there are (results do not change)
      }
      ++workers_;
    }
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (job_ == nullptr || joined_ >= want_) continue;
      ++joined_;
      lk.unlock();
#if defined(LLMIO_INT8_X86)
      _mm_setcsr(csr_);
#endif
      work();
      lk.lock();
      ++finished_;
      done_cv_.notify_all();
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(size_t, size_t)>* job_ = nullptr;
  size_t total_ = 0, grain_ = 1, want_ = 0, joined_ = 0, finished_ = 0, workers_ = 0;
  std::atomic<size_t> next_{0};
  uint64_t gen_ = 0;
  unsigned csr_ = 0;
};

Pool& pool() {
  static std::mutex mu;
  static Pool* p = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lk(mu);
  if (p == nullptr || owner != getpid()) {  // a forked child has none of the parent's workers
    p = new Pool();                         // leaked on purpose (see Pool)
    owner = getpid();
  }
  return *p;
}

// Blocks per task: 1024 blocks = 256 Ki values (1 MiB of fp32); smaller calls run on the caller.
constexpr size_t kGrain = 1024;

void for_blocks(size_t nblocks, const std::function<void(size_t, size_t)>& fn) {
  if (nblocks == 0) return;
  const unsigned t = fast_threads();
  if (t <= 1 || nblocks <= kGrain) {
    fn(0, nblocks);
    return;
  }
  // one chunk per thread at least, no smaller than kGrain blocks
  const size_t grain = std::max(kGrain, (nblocks + 4 * t - 1) / (4 * t));
  pool().run(nblocks, grain, t, fn);
}

// ---------------------------------------------------------------- block drivers (ISA independent)

inline void put_f32(uint8_t* p, float v) { std::memcpy(p, &v, 4); }
inline float get_f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

// Block b of x as fp32 (zero at i >= n): a pointer into x for a full fp32 block, else tmp.
const float* load_x(const Kern& k, const void* x, int dtype, uint64_t n, uint64_t b, float* tmp) {
  const uint64_t i0 = b * B;
  const uint64_t len = i0 >= n ? 0 : std::min<uint64_t>(B, n - i0);
  if (dtype == kF32) {
    const float* xf = static_cast<const float*>(x) + i0;
    if (len == B) return xf;
    std::memcpy(tmp, xf, len * 4);
  } else {
    k.widen(static_cast<const uint16_t*>(x) + i0, dtype == kF16, len, tmp);
  }
  std::fill(tmp + len, tmp + B, 0.0f);
  return tmp;
}

// quantize_one of the oracle for one block of v (absmax m, finite): codes and residual
// written, the scale returned. own: m is max |v| of this block (see Kern::quant).
float quantize_block(const Kern& k, const float* v, bool finite, float m, uint8_t* codes, float* res, bool own) {
  if (!finite) {
    std::memset(codes, 0, B);
    std::fill(res, res + B, 0.0f);
    return quiet_nan();
  }
  const float scale = m / 127.0f;
  if (scale == 0.0f) {
    std::memset(codes, 0, B);
    std::memcpy(res, v, B * 4);
    return 0.0f;
  }
  k.quant(v, scale, codes, res, own);
  return scale;
}

const Kern& kern() { return kern_for(fast_isa()); }

}  // namespace

// ---------------------------------------------------------------- public

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
    if (name == isa_name(i)) return i;
  throw std::invalid_argument("unknown INT8 kernel level '" + name + "' (expected scalar, avx2 or avx512)");
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa i : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512})
    if (cpu_has(i)) out.push_back(i);
  return out;
}

Isa fast_isa() {
  int v = isa_slot().load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(initial_isa());
    isa_slot().store(v);
  }
  return static_cast<Isa>(v);
}

void set_fast_isa(Isa isa) {
  if (!cpu_has(isa)) throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) +
                                                 " INT8 kernels (supported: scalar" +
                                                 (cpu_has(Isa::kAvx2) ? ", avx2" : "") + ")");
  isa_slot().store(static_cast<int>(isa));
}

unsigned fast_threads() {
  unsigned v = threads_slot().load(std::memory_order_relaxed);
  if (v == 0) {
    v = default_threads();
    threads_slot().store(v);
  }
  return v;
}

void set_fast_threads(unsigned n) {
  if (n < 1 || n > 64) throw std::invalid_argument("INT8 kernel threads must be 1..64, got " + std::to_string(n));
  threads_slot().store(n);
}

void quantize_pack_fast(const Int8QuantizePackParams& p) {
  const Kern& k = kern();
  const uint64_t nblocks = p.n_pad / B, sblocks = nblocks / p.world, shard = sblocks * B;
  const uint64_t stride = packed_stride(shard);
  for_blocks(nblocks, [&](size_t b0, size_t b1) {
    alignas(64) float tmp[B], v[B];
    bool fin;
    for (uint64_t b = b0; b < b1; ++b) {
      float* r = p.residual + b * B;
      const float m = k.add_absmax(load_x(k, p.x, p.dtype, p.n, b, tmp), r, v, &fin);
      uint8_t* dst = p.send + (b / sblocks) * stride;
      const uint64_t lb = b % sblocks;
      put_f32(dst + shard + 4 * lb, quantize_block(k, v, fin, m, dst + lb * B, r, true));
    }
  });
}

void block_absmax_fast(const Int8BlockAbsmaxParams& p) {
  const Kern& k = kern();
  for_blocks(p.n_pad / B, [&](size_t b0, size_t b1) {
    alignas(64) float tmp[B], v[B];
    bool fin;
    for (uint64_t b = b0; b < b1; ++b) {
      const float m = k.add_absmax(load_x(k, p.x, p.dtype, p.n, b, tmp), p.residual + b * B, v, &fin);
      p.absmax[b] = fin ? m : pos_inf();
    }
  });
}

void quantize_pack_shared_fast(const Int8QuantizePackSharedParams& p) {
  const Kern& k = kern();
  const uint64_t nblocks = p.n_pad / B, sblocks = nblocks / p.world, shard = sblocks * B;
  for_blocks(nblocks, [&](size_t b0, size_t b1) {
    alignas(64) float tmp[B], v[B];
    for (uint64_t b = b0; b < b1; ++b) {
      float* r = p.residual + b * B;
      k.add(load_x(k, p.x, p.dtype, p.n, b, tmp), r, v);
      const float m = p.absmax[b];
      uint8_t* dst = p.send + (b / sblocks) * shard + (b % sblocks) * B;
      p.scales[b] = quantize_block(k, v, finite_f(m), m, dst, r, false);  // a shared absmax: clamp
    }
  });
}

void dequant_sum_requant_fast(const Int8DequantSumRequantParams& p) {
  const Kern& k = kern();
  const uint64_t sblocks = p.shard / B, stride = packed_stride(p.shard);
  const float wf = static_cast<float>(p.world);
  const bool pow2 = (p.world & (p.world - 1)) == 0;  // / W == * (1 / W) exactly (see Kern)
  const float w = pow2 ? 1.0f / wf : wf;
  for_blocks(sblocks, [&](size_t b0, size_t b1) {
    alignas(64) float v[B];
    std::vector<const uint8_t*> c(p.world);
    std::vector<float> sc(p.world);
    bool fin;
    for (uint64_t lb = b0; lb < b1; ++lb) {
      for (uint32_t r = 0; r < p.world; ++r) {  // fixed rank order, fp32
        const uint8_t* src = p.recv + r * stride;
        c[r] = src + lb * B;
        sc[r] = get_f32(src + p.shard + 4 * lb);
      }
      float* res = p.residual + lb * B;
      const float m = k.dsr(c.data(), sc.data(), p.world, w, pow2, res, v, &fin);
      put_f32(p.own + p.shard + 4 * lb, quantize_block(k, v, fin, m, p.own + lb * B, res, true));
    }
  });
}

void dequant_sum_requant_shared_fast(const Int8DequantSumRequantSharedParams& p) {
  const Kern& k = kern();
  const uint64_t sblocks = p.shard / B;
  const float wf = static_cast<float>(p.world);
  const bool pow2 = (p.world & (p.world - 1)) == 0;  // / W == * (1 / W) exactly (see Kern)
  const float w = pow2 ? 1.0f / wf : wf;
  for_blocks(sblocks, [&](size_t b0, size_t b1) {
    alignas(64) float v[B];
    std::vector<const uint8_t*> c(p.world);
    bool fin;
    for (uint64_t lb = b0; lb < b1; ++lb) {
      for (uint32_t r = 0; r < p.world; ++r) c[r] = p.recv_codes + r * p.shard + lb * B;  // exact int32 sum
      float* res = p.residual + lb * B;
      const float m = k.dsr_int(c.data(), p.world, w, pow2, p.shared_scales[lb], res, v, &fin);
      put_f32(p.own + p.shard + 4 * lb, quantize_block(k, v, fin, m, p.own + lb * B, res, true));
    }
  });
}

void unpack_dequantize_fast(const Int8UnpackDequantizeParams& p) {
  const Kern& k = kern();
  const uint64_t sblocks = p.shard / B, stride = packed_stride(p.shard);
  const uint64_t nblocks = (p.n + B - 1) / B;
  for_blocks(nblocks, [&](size_t b0, size_t b1) {
    alignas(64) float tmp[B];
    for (uint64_t b = b0; b < b1; ++b) {
      const uint8_t* src = p.gathered + (b / sblocks) * stride;
      const uint64_t lb = b % sblocks, i0 = b * B;
      const float sc = get_f32(src + p.shard + 4 * lb);
      const uint64_t len = std::min<uint64_t>(B, p.n - i0);
      if (p.dtype == kF32 && len == B) {
        k.deq(src + lb * B, sc, static_cast<float*>(p.out) + i0);
        continue;
      }
      k.deq(src + lb * B, sc, tmp);
      if (p.dtype == kF32) {
        std::memcpy(static_cast<float*>(p.out) + i0, tmp, len * 4);
      } else {
        k.narrow(tmp, p.dtype == kF16, len, static_cast<uint16_t*>(p.out) + i0);
      }
    }
  });
}

}  // namespace int8
}  // namespace llmio
