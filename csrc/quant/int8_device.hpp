// The INT8 gradient hook's kernels, thread by thread: the constants, the launch
// parameters, and the per-lane logic shared by the CUDA kernels
// (csrc/cuda/int8_quant.cu) and their host emulation (csrc/quant/int8_emulate.cpp,
// exported as _core.int8_*_emulate and tested against the CPU oracle on every
// machine). Only the warp collectives (the absmax butterfly and the all-finite
// vote), the vector loads and stores, and the arithmetic primitives differ
// between the two: on the device the __f*_rn intrinsics, on the host plain IEEE
// operations compiled with -ffp-contract=off, which round the same way.
//
// One warp per 256-value block; lane l owns values 4l .. 4l+3 and
// 128+4l .. 128+4l+3 of its block (coalesced 4-value vector loads and stores).
//
// Sizes: n_pad is the padded bucket length, a multiple of 256 * world;
// shard = n_pad / world values per rank, sblocks = shard / 256 blocks.
// Per-rank packed layout (what python/llmio_native/ddp sends):
//
//   packed:       | codes[shard] (int8) | scales[sblocks] (fp32) |   stride = shard + 4 * sblocks
//   codes only:   | codes[shard] (int8) |                             stride = shard (deterministic phase 1)
//
// Alignment contract (checked once, by the bindings): fp32 arrays (residuals)
// 16-byte aligned, packed byte buffers, scales and absmax 4-byte aligned. The
// bucket may be unaligned (scalar loads then).
//
// No standard library beyond <cstdint> in device code: this header is compiled
// by nvcc for the device.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#if !defined(__CUDA_ARCH__)
#include <cmath>
#include <cstring>
#endif

#include "common/hd.hpp"

// Loop unrolling for nvcc; nothing for the host compiler (no unknown-pragma warnings).
#if defined(__CUDACC__)
#define LLMIO_UNROLL _Pragma("unroll")
#else
#define LLMIO_UNROLL
#endif

namespace llmio {
namespace int8 {

// ---------------------------------------------------------------- constants (exported to Python by _core)

constexpr uint32_t kBlock = 256;                // values per quantization block (one fp32 scale)
constexpr uint32_t kLanes = 32;                 // one warp per block
constexpr uint32_t kPerLane = kBlock / kLanes;  // 8 values per lane
constexpr uint32_t kScaleBytes = 4;             // fp32 scale per block in the packed layout

// Bucket dtype codes (the `dtype` argument of the kernels): _core.INT8_DTYPES.
enum BucketDType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
constexpr int kNumBucketDTypes = 3;

LLMIO_HD uint64_t packed_stride(uint64_t shard) { return shard + kScaleBytes * (shard / kBlock); }

// ---------------------------------------------------------------- launch parameters (one struct per kernel)

// (a) v = x + residual (x read as fp32, zero at i >= n), per-block absmax,
// quantize, residual = v - q * scale; codes and scale written into the packed
// slot of the destination rank (block b -> rank b / sblocks).
struct Int8QuantizePackParams {
  const void* x;      // [n] bucket values, dtype
  int dtype;          // BucketDType
  uint64_t n;         // values in the bucket
  uint64_t n_pad;     // a multiple of 256 * world, >= n
  uint32_t world;
  float* residual;    // [n_pad] fp32, updated (16-byte aligned)
  uint8_t* send;      // [world][packed_stride(n_pad / world)] out (4-byte aligned)
};

// (b) the owner's step: recv = world packed slots (rank order), each copy / world
// then summed in fp32 in rank order, + residual, requantized into own.
struct Int8DequantSumRequantParams {
  const uint8_t* recv;  // [world][packed_stride(shard)]
  uint32_t world;
  uint64_t shard;       // a multiple of 256
  float* residual;      // [shard] fp32, updated
  uint8_t* own;         // [packed_stride(shard)] out
};

// (c) out[i] = code * scale for i < n from world gathered packed slots, in the
// bucket's dtype (round to nearest even), in place into the bucket.
struct Int8UnpackDequantizeParams {
  const uint8_t* gathered;  // [world][packed_stride(shard)]
  uint32_t world;
  uint64_t shard;           // a multiple of 256
  void* out;                // [n] dtype
  int dtype;
  uint64_t n;               // <= world * shard
};

// Deterministic mode: absmax[b] of v = x + residual over the n_pad/256 blocks
// (+inf for a non-finite block); residual is read only.
struct Int8BlockAbsmaxParams {
  const void* x;
  int dtype;
  uint64_t n;
  uint64_t n_pad;         // a multiple of 256
  const float* residual;  // [n_pad]
  float* absmax;          // [n_pad / 256] out
};

// Deterministic (a) with the all-reduced absmax: codes only into send
// [world][shard], the scale used per block into scales [n_pad / 256].
struct Int8QuantizePackSharedParams {
  const void* x;
  int dtype;
  uint64_t n;
  uint64_t n_pad;
  uint32_t world;
  float* residual;       // [n_pad], updated
  const float* absmax;   // [n_pad / 256] (all-reduced MAX)
  uint8_t* send;         // [world][shard] out
  float* scales;         // [n_pad / 256] out
};

// Deterministic (b): recv_codes [world][shard] int8 summed exactly in int32,
// (sum / world) * shared_scales[b] + residual, requantized into own (packed).
struct Int8DequantSumRequantSharedParams {
  const uint8_t* recv_codes;   // [world][shard]
  uint32_t world;
  uint64_t shard;
  const float* shared_scales;  // [shard / 256]
  float* residual;             // [shard], updated
  uint8_t* own;                // [packed_stride(shard)] out
};

// ---------------------------------------------------------------- arithmetic primitives

// IEEE round-to-nearest operations: never fused into FMAs on the device (the
// intrinsics) nor on the host (-ffp-contract=off on the emulation's sources).
LLMIO_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LLMIO_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LLMIO_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LLMIO_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round half to even (rintf; std::nearbyint in the default FE_TONEAREST mode).
LLMIO_HD float round_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}
LLMIO_HD float abs_f(float v) {
#if defined(__CUDA_ARCH__)
  return fabsf(v);
#else
  return std::fabs(v);
#endif
}
LLMIO_HD bool finite_f(float v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}
LLMIO_HD float float_of_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
LLMIO_HD uint32_t bits_of_float(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
// The NaN scale of a non-finite block: std::numeric_limits<float>::quiet_NaN().
LLMIO_HD float quiet_nan() { return float_of_bits(0x7fc00000u); }
LLMIO_HD float pos_inf() { return float_of_bits(0x7f800000u); }
// The absmax fold, in the kernel's order (exact for finite values, in any order).
LLMIO_HD float fold_max(float m, float o) { return o > m ? o : m; }

// ---------------------------------------------------------------- bucket element types

// 16-bit buckets as their bits (the same layout as __nv_bfloat16 / __half).
struct alignas(2) Bf16 {
  uint16_t bits;
};
struct alignas(2) F16 {
  uint16_t bits;
};

LLMIO_HD float to_f32(float v) { return v; }
LLMIO_HD float to_f32(Bf16 v) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(v.bits));
#else
  return float_of_bits(uint32_t(v.bits) << 16);
#endif
}
LLMIO_HD float to_f32(F16 v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu, mant = v.bits & 0x3ffu;
  if (exp == 0x1f) return float_of_bits(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return float_of_bits(sign);
    uint32_t e = 113;  // a subnormal half: normalise
    while (!(mant & 0x400u)) mant <<= 1, --e;
    return float_of_bits(sign | (e << 23) | ((mant & 0x3ffu) << 13));
  }
  return float_of_bits(sign | ((exp + 112) << 23) | (mant << 13));
#endif
}

template <class T>
struct FromF32;
template <>
struct FromF32<float> {
  LLMIO_HD static float conv(float v) { return v; }
};
// Round to nearest even. The host keeps torch's NaN (0x7fc0 for bf16; sign | 0x7e00 for fp16).
template <>
struct FromF32<Bf16> {
  LLMIO_HD static Bf16 conv(float v) {
#if defined(__CUDA_ARCH__)
    return Bf16{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
#else
    if (std::isnan(v)) return Bf16{0x7fc0};
    const uint32_t u = bits_of_float(v);
    return Bf16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
#endif
  }
};
template <>
struct FromF32<F16> {
  LLMIO_HD static F16 conv(float v) {
#if defined(__CUDA_ARCH__)
    return F16{__half_as_ushort(__float2half_rn(v))};
#else
    // fp16_ieee_from_fp32_value (the FP16 library, what torch uses on the CPU).
    float base = (std::fabs(v) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of_float(v), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = float_of_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = bits_of_float(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
    return F16{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign))};
#endif
  }
};

// ---------------------------------------------------------------- per-lane memory access

// Four consecutive values as fp32 starting at element i (zero at i >= n).
// vec: the bucket base is aligned for 4-value vector loads (16 B fp32, 8 B 16-bit);
// the host reads the same values one by one.
template <class T>
LLMIO_HD void load4(const T* __restrict__ x, uint64_t i, uint64_t n, bool vec, float out[4]) {
#if defined(__CUDA_ARCH__)
  if (vec && i + 4 <= n) {
    if constexpr (sizeof(T) == 4) {
      const float4 f = *reinterpret_cast<const float4*>(x + i);
      out[0] = f.x, out[1] = f.y, out[2] = f.z, out[3] = f.w;
    } else {
      union {
        uint2 u;
        T h[4];
      } p;
      p.u = *reinterpret_cast<const uint2*>(x + i);
LLMIO_UNROLL
      for (int k = 0; k < 4; ++k) out[k] = to_f32(p.h[k]);
    }
    return;
  }
#endif
LLMIO_UNROLL
  for (int k = 0; k < 4; ++k) out[k] = i + k < n ? to_f32(x[i + k]) : 0.0f;
}

template <class T>
LLMIO_HD void store4(T* __restrict__ y, uint64_t i, uint64_t n, bool vec, const float v[4]) {
#if defined(__CUDA_ARCH__)
  if (vec && i + 4 <= n) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(y + i) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      union {
        uint2 u;
        T h[4];
      } p;
LLMIO_UNROLL
      for (int k = 0; k < 4; ++k) p.h[k] = FromF32<T>::conv(v[k]);
      *reinterpret_cast<uint2*>(y + i) = p.u;
    }
    return;
  }
#endif
LLMIO_UNROLL
  for (int k = 0; k < 4; ++k)
    if (i + k < n) y[i + k] = FromF32<T>::conv(v[k]);
}

// A lane's 8 residuals of the block at r (16-byte aligned).
LLMIO_HD void load_res(const float* __restrict__ r, int lane, float out[8]) {
#if defined(__CUDA_ARCH__)
  const float4 a = *reinterpret_cast<const float4*>(r + lane * 4);
  const float4 b = *reinterpret_cast<const float4*>(r + 128 + lane * 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
#else
  for (int k = 0; k < 4; ++k) out[k] = r[lane * 4 + k], out[4 + k] = r[128 + lane * 4 + k];
#endif
}

LLMIO_HD void store_res(float* __restrict__ r, int lane, const float v[8]) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(r + lane * 4) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(r + 128 + lane * 4) = make_float4(v[4], v[5], v[6], v[7]);
#else
  for (int k = 0; k < 4; ++k) r[lane * 4 + k] = v[k], r[128 + lane * 4 + k] = v[4 + k];
#endif
}

// A lane's 8 int8 codes of the block at c (4-byte aligned).
LLMIO_HD void load_codes(const uint8_t* __restrict__ c, int lane, int out[8]) {
#if defined(__CUDA_ARCH__)
  const char4 a = *reinterpret_cast<const char4*>(c + lane * 4);
  const char4 b = *reinterpret_cast<const char4*>(c + 128 + lane * 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
#else
  for (int k = 0; k < 4; ++k)
    out[k] = static_cast<int8_t>(c[lane * 4 + k]), out[4 + k] = static_cast<int8_t>(c[128 + lane * 4 + k]);
#endif
}

LLMIO_HD void store_codes(uint8_t* __restrict__ c, int lane, const int q[8]) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<char4*>(c + lane * 4) =
      make_char4(static_cast<signed char>(q[0]), static_cast<signed char>(q[1]), static_cast<signed char>(q[2]),
                 static_cast<signed char>(q[3]));
  *reinterpret_cast<char4*>(c + 128 + lane * 4) =
      make_char4(static_cast<signed char>(q[4]), static_cast<signed char>(q[5]), static_cast<signed char>(q[6]),
                 static_cast<signed char>(q[7]));
#else
  for (int k = 0; k < 4; ++k)
    c[lane * 4 + k] = static_cast<uint8_t>(static_cast<int8_t>(q[k])),
    c[128 + lane * 4 + k] = static_cast<uint8_t>(static_cast<int8_t>(q[4 + k]));
#endif
}

// ---------------------------------------------------------------- per-lane arithmetic

// The lane's part of the block absmax fold, and whether its 8 values are finite
// (the warp then folds the 32 partials with fold_max, butterfly order, and votes).
LLMIO_HD float lane_absmax(const float v[8], bool* finite_out) {
  float m = 0.0f;
  bool finite = true;
LLMIO_UNROLL
  for (int k = 0; k < 8; ++k) {
    const float a = abs_f(v[k]);
    if (!finite_f(v[k])) finite = false;
    m = a > m ? a : m;
  }
  *finite_out = finite;
  return m;
}

// quantize_one / quantize_blocks_shared_ref for one lane of a block. finite == false:
// scale NaN, codes 0, residual 0. scale == 0: codes 0, residual v. Writes the lane's
// codes (block base, 4-byte aligned) and residuals (block base, 16-byte aligned);
// returns the scale.
LLMIO_HD float lane_quantize(const float v[8], bool finite, float absmax, int lane, uint8_t* __restrict__ codes,
                             float* __restrict__ residual) {
  float res[8];
  int q[8];
  float scale;
  if (!finite) {
    scale = quiet_nan();
LLMIO_UNROLL
    for (int k = 0; k < 8; ++k) q[k] = 0, res[k] = 0.0f;
  } else {
    scale = div_rn(absmax, 127.0f);
    if (scale == 0.0f) {
LLMIO_UNROLL
      for (int k = 0; k < 8; ++k) q[k] = 0, res[k] = v[k];
    } else {
LLMIO_UNROLL
      for (int k = 0; k < 8; ++k) {
        float r = round_even(div_rn(v[k], scale));
        r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
        q[k] = static_cast<int>(r);
        res[k] = sub_rn(v[k], mul_rn(static_cast<float>(q[k]), scale));
      }
    }
  }
  store_codes(codes, lane, q);
  store_res(residual, lane, res);
  return scale;
}

// v = x + residual for block b (x zero at i >= n).
template <class T>
LLMIO_HD void lane_load_v(const T* __restrict__ x, uint64_t n, bool vec, const float* __restrict__ residual,
                          uint64_t b, int lane, float v[8]) {
  const uint64_t i0 = b * kBlock;
  float xv[8], r[8];
  load4(x, i0 + lane * 4, n, vec, xv);
  load4(x, i0 + 128 + lane * 4, n, vec, xv + 4);
  load_res(residual + i0, lane, r);
LLMIO_UNROLL
  for (int k = 0; k < 8; ++k) v[k] = add_rn(xv[k], r[k]);
}

// ---------------------------------------------------------------- the kernels, block by block
//
// Each kernel is one of these ops: `blocks()` warps' worth of work; for block b,
// every lane runs load(b, lane, v); if kReduce, the warp folds the lanes'
// lane_absmax partials (butterfly, fold_max) and votes on finiteness; then every
// lane runs store(b, lane, v, absmax, finite). The kernel and the emulation
// (emulate_blocks in int8_emulate.cpp) differ only in how they run the lanes.

template <class T>
struct QuantizePackOp {
  static constexpr bool kReduce = true;
  const T* x;
  uint64_t n;
  bool vec;
  float* residual;
  uint64_t nblocks, sblocks;
  uint8_t* send;
  LLMIO_HD uint64_t blocks() const { return nblocks; }
  LLMIO_HD void load(uint64_t b, int lane, float v[8]) const { lane_load_v(x, n, vec, residual, b, lane, v); }
  LLMIO_HD void store(uint64_t b, int lane, const float v[8], float m, bool finite) const {
    const uint64_t shard = sblocks * kBlock;
    uint8_t* dst = send + (b / sblocks) * packed_stride(shard);
    const uint64_t lb = b % sblocks;
    const float scale = lane_quantize(v, finite, m, lane, dst + lb * kBlock, residual + b * kBlock);
    if (lane == 0) reinterpret_cast<float*>(dst + shard)[lb] = scale;
  }
};

template <class T>
struct BlockAbsmaxOp {
  static constexpr bool kReduce = true;
  const T* x;
  uint64_t n;
  bool vec;
  const float* residual;
  uint64_t nblocks;
  float* absmax;
  LLMIO_HD uint64_t blocks() const { return nblocks; }
  LLMIO_HD void load(uint64_t b, int lane, float v[8]) const { lane_load_v(x, n, vec, residual, b, lane, v); }
  LLMIO_HD void store(uint64_t b, int lane, const float*, float m, bool finite) const {
    if (lane == 0) absmax[b] = finite ? m : pos_inf();
  }
};

template <class T>
struct QuantizePackSharedOp {
  static constexpr bool kReduce = false;
  const T* x;
  uint64_t n;
  bool vec;
  float* residual;
  const float* absmax;
  uint64_t nblocks, sblocks;
  uint8_t* send;
  float* scales;
  LLMIO_HD uint64_t blocks() const { return nblocks; }
  LLMIO_HD void load(uint64_t b, int lane, float v[8]) const { lane_load_v(x, n, vec, residual, b, lane, v); }
  LLMIO_HD void store(uint64_t b, int lane, const float v[8], float, bool) const {
    const uint64_t shard = sblocks * kBlock;
    const float m = absmax[b];
    uint8_t* dst = send + (b / sblocks) * shard;
    const float scale = lane_quantize(v, finite_f(m), m, lane, dst + (b % sblocks) * kBlock, residual + b * kBlock);
    if (lane == 0) scales[b] = scale;
  }
};

struct DequantSumRequantOp {
  static constexpr bool kReduce = true;
  const uint8_t* recv;
  uint32_t world;
  uint64_t sblocks;
  float* residual;
  uint8_t* own;
  LLMIO_HD uint64_t blocks() const { return sblocks; }
  LLMIO_HD void load(uint64_t lb, int lane, float v[8]) const {
    const uint64_t shard = sblocks * kBlock, stride = packed_stride(shard);
    const float wf = static_cast<float>(world);
    float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (uint32_t r = 0; r < world; ++r) {  // fixed rank order, fp32
      const uint8_t* src = recv + r * stride;
      const float sc = reinterpret_cast<const float*>(src + shard)[lb];
      int c[8];
      load_codes(src + lb * kBlock, lane, c);
LLMIO_UNROLL
      for (int k = 0; k < 8; ++k)
        s[k] = add_rn(s[k], div_rn(mul_rn(static_cast<float>(c[k]), sc), wf));  // / W first: no overflow
    }
    float res[8];
    load_res(residual + lb * kBlock, lane, res);
LLMIO_UNROLL
    for (int k = 0; k < 8; ++k) v[k] = add_rn(s[k], res[k]);
  }
  LLMIO_HD void store(uint64_t lb, int lane, const float v[8], float m, bool finite) const {
    const uint64_t shard = sblocks * kBlock;
    const float scale = lane_quantize(v, finite, m, lane, own + lb * kBlock, residual + lb * kBlock);
    if (lane == 0) reinterpret_cast<float*>(own + shard)[lb] = scale;
  }
};

struct DequantSumRequantSharedOp {
  static constexpr bool kReduce = true;
  const uint8_t* recv;
  uint32_t world;
  uint64_t sblocks;
  const float* shared_scales;
  float* residual;
  uint8_t* own;
  LLMIO_HD uint64_t blocks() const { return sblocks; }
  LLMIO_HD void load(uint64_t lb, int lane, float v[8]) const {
    const uint64_t shard = sblocks * kBlock;
    const float wf = static_cast<float>(world);
    int s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (uint32_t r = 0; r < world; ++r) {  // exact: any order gives the same sum
      int c[8];
      load_codes(recv + r * shard + lb * kBlock, lane, c);
LLMIO_UNROLL
      for (int k = 0; k < 8; ++k) s[k] += c[k];
    }
    const float sc = shared_scales[lb];
    float res[8];
    load_res(residual + lb * kBlock, lane, res);
LLMIO_UNROLL
    for (int k = 0; k < 8; ++k)
      v[k] = add_rn(mul_rn(div_rn(static_cast<float>(s[k]), wf), sc), res[k]);  // mean code * scale
  }
  LLMIO_HD void store(uint64_t lb, int lane, const float v[8], float m, bool finite) const {
    const uint64_t shard = sblocks * kBlock;
    const float scale = lane_quantize(v, finite, m, lane, own + lb * kBlock, residual + lb * kBlock);
    if (lane == 0) reinterpret_cast<float*>(own + shard)[lb] = scale;
  }
};

template <class T>
struct UnpackDequantizeOp {
  static constexpr bool kReduce = false;
  const uint8_t* gathered;
  uint64_t sblocks, nblocks;
  T* out;
  uint64_t n;
  bool vec;
  LLMIO_HD uint64_t blocks() const { return nblocks; }
  LLMIO_HD void load(uint64_t b, int lane, float v[8]) const {
    const uint64_t shard = sblocks * kBlock;
    const uint8_t* src = gathered + (b / sblocks) * packed_stride(shard);
    const uint64_t lb = b % sblocks;
    const float sc = reinterpret_cast<const float*>(src + shard)[lb];
    int c[8];
    load_codes(src + lb * kBlock, lane, c);
LLMIO_UNROLL
    for (int k = 0; k < 8; ++k) v[k] = mul_rn(static_cast<float>(c[k]), sc);
  }
  LLMIO_HD void store(uint64_t b, int lane, const float v[8], float, bool) const {
    store4(out, b * kBlock + lane * 4, n, vec, v);
    store4(out, b * kBlock + 128 + lane * 4, n, vec, v + 4);
  }
};

// ---------------------------------------------------------------- params -> ops (shared by launcher and emulation)

inline bool aligned_to(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }
inline bool vector_ok(const void* x, int dtype) { return aligned_to(x, dtype == kF32 ? 16 : 8); }

template <class T>
QuantizePackOp<T> make_op(const Int8QuantizePackParams& p) {
  const uint64_t nblocks = p.n_pad / kBlock;
  return {static_cast<const T*>(p.x), p.n, vector_ok(p.x, p.dtype), p.residual, nblocks, nblocks / p.world, p.send};
}
template <class T>
BlockAbsmaxOp<T> make_op(const Int8BlockAbsmaxParams& p) {
  return {static_cast<const T*>(p.x), p.n, vector_ok(p.x, p.dtype), p.residual, p.n_pad / kBlock, p.absmax};
}
template <class T>
QuantizePackSharedOp<T> make_op(const Int8QuantizePackSharedParams& p) {
  const uint64_t nblocks = p.n_pad / kBlock;
  return {static_cast<const T*>(p.x), p.n, vector_ok(p.x, p.dtype), p.residual, p.absmax, nblocks,
          nblocks / p.world, p.send, p.scales};
}
inline DequantSumRequantOp make_op(const Int8DequantSumRequantParams& p) {
  return {p.recv, p.world, p.shard / kBlock, p.residual, p.own};
}
inline DequantSumRequantSharedOp make_op(const Int8DequantSumRequantSharedParams& p) {
  return {p.recv_codes, p.world, p.shard / kBlock, p.shared_scales, p.residual, p.own};
}
template <class T>
UnpackDequantizeOp<T> make_op(const Int8UnpackDequantizeParams& p) {
  return {p.gathered, p.shard / kBlock, (p.n + kBlock - 1) / kBlock, static_cast<T*>(p.out), p.n,
          vector_ok(p.out, p.dtype)};
}

}  // namespace int8
}  // namespace llmio
