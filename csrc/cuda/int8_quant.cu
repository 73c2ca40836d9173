// INT8 gradient hook kernels: one warp per 256-value block (see int8_quant.hpp).
//
// Bit-identity with csrc/quant/int8_block.cpp rests on:
//   * __fadd_rn / __fsub_rn / __fmul_rn / __fdiv_rn: IEEE round-to-nearest
//     operations that nvcc never fuses into FMAs and that do not depend on
//     -prec-div / -use_fast_math (the file is also built with -fmad=false);
//   * rintf: round half to even, like std::nearbyint in FE_TONEAREST;
//   * the absmax fold "a > m ? a : m" (exact for finite values, in any order);
//   * the NaN scale written as 0x7fc00000, std::numeric_limits<float>::quiet_NaN();
//   * denormals kept (-ftz=false, nvcc's default, set explicitly in CMakeLists.txt).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/int8_quant.hpp"

namespace llmio {

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kBlock = 256;
constexpr int kWarpsPerCta = 8;
constexpr int kThreads = 32 * kWarpsPerCta;

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

template <class T>
struct Conv;
template <>
struct Conv<float> {
  __device__ static float to(float v) { return v; }
  __device__ static float from(float v) { return v; }
};
template <>
struct Conv<__nv_bfloat16> {
  __device__ static float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Conv<__half> {
  __device__ static float to(__half v) { return __half2float(v); }
  __device__ static __half from(float v) { return __float2half_rn(v); }
};

// Four consecutive values as fp32 starting at element i (zero at i >= n).
// vec: the bucket base is aligned for 4-value vector loads (16 B fp32, 8 B 16-bit).
template <class T>
__device__ __forceinline__ void load4(const T* __restrict__ x, uint64_t i, uint64_t n, bool vec, float out[4]) {
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
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = Conv<T>::to(p.h[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = i + k < n ? Conv<T>::to(x[i + k]) : 0.0f;
  }
}

template <class T>
__device__ __forceinline__ void store4(T* __restrict__ y, uint64_t i, uint64_t n, bool vec, const float v[4]) {
  if (vec && i + 4 <= n) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(y + i) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      union {
        uint2 u;
        T h[4];
      } p;
#pragma unroll
      for (int k = 0; k < 4; ++k) p.h[k] = Conv<T>::from(v[k]);
      *reinterpret_cast<uint2*>(y + i) = p.u;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (i + k < n) y[i + k] = Conv<T>::from(v[k]);
  }
}

__device__ __forceinline__ void load_res(const float* __restrict__ r, int lane, float out[8]) {
  const float4 a = *reinterpret_cast<const float4*>(r + lane * 4);
  const float4 b = *reinterpret_cast<const float4*>(r + 128 + lane * 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

__device__ __forceinline__ void store_res(float* __restrict__ r, int lane, const float v[8]) {
  *reinterpret_cast<float4*>(r + lane * 4) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(r + 128 + lane * 4) = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void load_codes(const uint8_t* __restrict__ c, int lane, float out[8]) {
  const char4 a = *reinterpret_cast<const char4*>(c + lane * 4);
  const char4 b = *reinterpret_cast<const char4*>(c + 128 + lane * 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

__device__ __forceinline__ void load_codes_int(const uint8_t* __restrict__ c, int lane, int out[8]) {
  const char4 a = *reinterpret_cast<const char4*>(c + lane * 4);
  const char4 b = *reinterpret_cast<const char4*>(c + 128 + lane * 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

// The warp's 256 values v (8 per lane): absmax fold and finiteness.
__device__ __forceinline__ float warp_absmax(const float v[8], bool* finite_out) {
  float m = 0.0f;
  bool finite = true;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float a = fabsf(v[k]);
    if (!isfinite(v[k])) finite = false;
    m = a > m ? a : m;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(kFull, m, off);
    m = o > m ? o : m;
  }
  *finite_out = __all_sync(kFull, finite) != 0;
  return m;
}

// quantize_one / quantize_blocks_shared_ref for one block. finite == false:
// scale NaN, codes 0, residual 0. scale == 0: codes 0, residual v.
// Writes codes (block base, 4-byte aligned) and residual (block base, 16-byte
// aligned); returns the scale.
__device__ __forceinline__ float quantize_block(const float v[8], bool finite, float absmax, int lane,
                                                uint8_t* __restrict__ codes, float* __restrict__ residual) {
  float res[8];
  int q[8];
  float scale;
  if (!finite) {
    scale = quiet_nan();
#pragma unroll
    for (int k = 0; k < 8; ++k) q[k] = 0, res[k] = 0.0f;
  } else {
    scale = __fdiv_rn(absmax, 127.0f);
    if (scale == 0.0f) {
#pragma unroll
      for (int k = 0; k < 8; ++k) q[k] = 0, res[k] = v[k];
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        float r = rintf(__fdiv_rn(v[k], scale));
        r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
        q[k] = static_cast<int>(r);
        res[k] = __fsub_rn(v[k], __fmul_rn(static_cast<float>(q[k]), scale));
      }
    }
  }
  *reinterpret_cast<char4*>(codes + lane * 4) =
      make_char4(static_cast<signed char>(q[0]), static_cast<signed char>(q[1]), static_cast<signed char>(q[2]),
                 static_cast<signed char>(q[3]));
  *reinterpret_cast<char4*>(codes + 128 + lane * 4) =
      make_char4(static_cast<signed char>(q[4]), static_cast<signed char>(q[5]), static_cast<signed char>(q[6]),
                 static_cast<signed char>(q[7]));
  store_res(residual, lane, res);
  return scale;
}

// v = x + residual for block b (x zero at i >= n).
template <class T>
__device__ __forceinline__ void load_v(const T* __restrict__ x, uint64_t n, bool vec, const float* __restrict__ residual,
                                       uint64_t b, int lane, float v[8]) {
  const uint64_t i0 = b * kBlock;
  float xv[8], r[8];
  load4(x, i0 + lane * 4, n, vec, xv);
  load4(x, i0 + 128 + lane * 4, n, vec, xv + 4);
  load_res(residual + i0, lane, r);
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = __fadd_rn(xv[k], r[k]);
}

__device__ __forceinline__ uint64_t warp_id() { return (uint64_t(blockIdx.x) * kThreads + threadIdx.x) / 32; }
__device__ __forceinline__ uint64_t warp_stride() { return uint64_t(gridDim.x) * kWarpsPerCta; }

template <class T>
__global__ void __launch_bounds__(kThreads) int8_quantize_pack_kernel(const T* __restrict__ x, uint64_t n, bool vec,
                                                                      float* __restrict__ residual, uint64_t nblocks,
                                                                      uint64_t sblocks, uint8_t* __restrict__ send) {
  const int lane = threadIdx.x & 31;
  const uint64_t shard = sblocks * kBlock, stride = shard + 4 * sblocks;
  for (uint64_t b = warp_id(); b < nblocks; b += warp_stride()) {
    float v[8];
    load_v(x, n, vec, residual, b, lane, v);
    bool finite;
    const float m = warp_absmax(v, &finite);
    uint8_t* dst = send + (b / sblocks) * stride;
    const uint64_t lb = b % sblocks;
    const float scale = quantize_block(v, finite, m, lane, dst + lb * kBlock, residual + b * kBlock);
    if (lane == 0) reinterpret_cast<float*>(dst + shard)[lb] = scale;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) int8_block_absmax_kernel(const T* __restrict__ x, uint64_t n, bool vec,
                                                                     const float* __restrict__ residual,
                                                                     uint64_t nblocks, float* __restrict__ absmax) {
  const int lane = threadIdx.x & 31;
  for (uint64_t b = warp_id(); b < nblocks; b += warp_stride()) {
    float v[8];
    load_v(x, n, vec, residual, b, lane, v);
    bool finite;
    const float m = warp_absmax(v, &finite);
    if (lane == 0) absmax[b] = finite ? m : __int_as_float(0x7f800000);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    int8_quantize_pack_shared_kernel(const T* __restrict__ x, uint64_t n, bool vec, float* __restrict__ residual,
                                     const float* __restrict__ absmax, uint64_t nblocks, uint64_t sblocks,
                                     uint8_t* __restrict__ send, float* __restrict__ scales) {
  const int lane = threadIdx.x & 31;
  const uint64_t shard = sblocks * kBlock;
  for (uint64_t b = warp_id(); b < nblocks; b += warp_stride()) {
    float v[8];
    load_v(x, n, vec, residual, b, lane, v);
    const float m = absmax[b];
    uint8_t* dst = send + (b / sblocks) * shard;
    const float scale = quantize_block(v, isfinite(m), m, lane, dst + (b % sblocks) * kBlock, residual + b * kBlock);
    if (lane == 0) scales[b] = scale;
  }
}

__global__ void __launch_bounds__(kThreads)
    int8_dequant_sum_requant_kernel(const uint8_t* __restrict__ recv, uint32_t world, uint64_t sblocks,
                                    float* __restrict__ residual, uint8_t* __restrict__ own) {
  const int lane = threadIdx.x & 31;
  const uint64_t shard = sblocks * kBlock, stride = shard + 4 * sblocks;
  const float wf = static_cast<float>(world);
  for (uint64_t lb = warp_id(); lb < sblocks; lb += warp_stride()) {
    float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (uint32_t r = 0; r < world; ++r) {  // fixed rank order, fp32
      const uint8_t* src = recv + r * stride;
      const float sc = reinterpret_cast<const float*>(src + shard)[lb];
      float c[8];
      load_codes(src + lb * kBlock, lane, c);
#pragma unroll
      for (int k = 0; k < 8; ++k) s[k] = __fadd_rn(s[k], __fdiv_rn(__fmul_rn(c[k], sc), wf));  // / W first: no overflow
    }
    float res[8], v[8];
    load_res(residual + lb * kBlock, lane, res);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = __fadd_rn(s[k], res[k]);
    bool finite;
    const float m = warp_absmax(v, &finite);
    const float scale = quantize_block(v, finite, m, lane, own + lb * kBlock, residual + lb * kBlock);
    if (lane == 0) reinterpret_cast<float*>(own + shard)[lb] = scale;
  }
}

__global__ void __launch_bounds__(kThreads)
    int8_dequant_sum_requant_shared_kernel(const uint8_t* __restrict__ recv, uint32_t world, uint64_t sblocks,
                                           const float* __restrict__ shared_scales, float* __restrict__ residual,
                                           uint8_t* __restrict__ own) {
  const int lane = threadIdx.x & 31;
  const uint64_t shard = sblocks * kBlock;
  const float wf = static_cast<float>(world);
  for (uint64_t lb = warp_id(); lb < sblocks; lb += warp_stride()) {
    int s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (uint32_t r = 0; r < world; ++r) {  // exact: any order gives the same sum
      int c[8];
      load_codes_int(recv + r * shard + lb * kBlock, lane, c);
#pragma unroll
      for (int k = 0; k < 8; ++k) s[k] += c[k];
    }
    const float sc = shared_scales[lb];
    float res[8], v[8];
    load_res(residual + lb * kBlock, lane, res);
#pragma unroll
    for (int k = 0; k < 8; ++k)
      v[k] = __fadd_rn(__fmul_rn(__fdiv_rn(static_cast<float>(s[k]), wf), sc), res[k]);  // mean code * scale
    bool finite;
    const float m = warp_absmax(v, &finite);
    const float scale = quantize_block(v, finite, m, lane, own + lb * kBlock, residual + lb * kBlock);
    if (lane == 0) reinterpret_cast<float*>(own + shard)[lb] = scale;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    int8_unpack_dequantize_kernel(const uint8_t* __restrict__ gathered, uint64_t sblocks, uint64_t nblocks,
                                  T* __restrict__ out, uint64_t n, bool vec) {
  const int lane = threadIdx.x & 31;
  const uint64_t shard = sblocks * kBlock, stride = shard + 4 * sblocks;
  for (uint64_t b = warp_id(); b < nblocks; b += warp_stride()) {
    const uint8_t* src = gathered + (b / sblocks) * stride;
    const uint64_t lb = b % sblocks;
    const float sc = reinterpret_cast<const float*>(src + shard)[lb];
    float c[8];
    load_codes(src + lb * kBlock, lane, c);
#pragma unroll
    for (int k = 0; k < 8; ++k) c[k] = __fmul_rn(c[k], sc);
    store4(out, b * kBlock + lane * 4, n, vec, c);
    store4(out, b * kBlock + 128 + lane * 4, n, vec, c + 4);
  }
}

// ---------------------------------------------------------------- launch helpers

bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

unsigned grid_for(uint64_t nblocks) {
  uint64_t g = (nblocks + kWarpsPerCta - 1) / kWarpsPerCta;
  const uint64_t cap = 1u << 20;  // the kernels stride over the rest
  return static_cast<unsigned>(g < cap ? (g ? g : 1) : cap);
}

bool vec_ok(const void* x, int dtype) { return aligned(x, dtype == kBucketF32 ? 16 : 8); }

int check_common(uint64_t n_pad, uint32_t world, uintptr_t /*stream: 0 is the default stream, accepted*/) {
  if (world == 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n_pad % (uint64_t(kBlock) * world) != 0) return static_cast<int>(cudaErrorInvalidValue);
  return 0;
}

}  // namespace

int launch_int8_quantize_pack(const void* x, int dtype, uint64_t n, uint64_t n_pad, uint32_t world,
                              float* residual, uint8_t* send, uintptr_t stream) {
  if (int e = check_common(n_pad, world, stream)) return e;
  if (n > n_pad || dtype < 0 || dtype > 2) return static_cast<int>(cudaErrorInvalidValue);
  if (n_pad == 0) return 0;
  if (!aligned(residual, 16) || !aligned(send, 4)) return static_cast<int>(cudaErrorMisalignedAddress);
  const uint64_t nblocks = n_pad / kBlock, sblocks = nblocks / world;
  const bool vec = vec_ok(x, dtype);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned g = grid_for(nblocks);
  if (dtype == kBucketF32)
    int8_quantize_pack_kernel<float><<<g, kThreads, 0, s>>>(static_cast<const float*>(x), n, vec, residual, nblocks,
                                                            sblocks, send);
  else if (dtype == kBucketBF16)
    int8_quantize_pack_kernel<__nv_bfloat16><<<g, kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(x), n, vec,
                                                                    residual, nblocks, sblocks, send);
  else
    int8_quantize_pack_kernel<__half><<<g, kThreads, 0, s>>>(static_cast<const __half*>(x), n, vec, residual,
                                                             nblocks, sblocks, send);
  return static_cast<int>(cudaGetLastError());
}

int launch_int8_dequant_sum_requant(const uint8_t* recv, uint32_t world, uint64_t shard, float* residual,
                                    uint8_t* own, uintptr_t stream) {
  if (int e = check_common(shard * world, world, stream)) return e;
  if (shard % kBlock) return static_cast<int>(cudaErrorInvalidValue);
  if (shard == 0) return 0;
  if (!aligned(recv, 4) || !aligned(own, 4) || !aligned(residual, 16))
    return static_cast<int>(cudaErrorMisalignedAddress);
  const uint64_t sblocks = shard / kBlock;
  int8_dequant_sum_requant_kernel<<<grid_for(sblocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      recv, world, sblocks, residual, own);
  return static_cast<int>(cudaGetLastError());
}

int launch_int8_unpack_dequantize(const uint8_t* gathered, uint32_t world, uint64_t shard, void* out, int dtype,
                                  uint64_t n, uintptr_t stream) {
  if (int e = check_common(shard * world, world, stream)) return e;
  if (shard % kBlock || n > shard * world || dtype < 0 || dtype > 2) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return 0;
  if (!aligned(gathered, 4)) return static_cast<int>(cudaErrorMisalignedAddress);
  const uint64_t sblocks = shard / kBlock, nblocks = (n + kBlock - 1) / kBlock;
  const bool vec = vec_ok(out, dtype);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned g = grid_for(nblocks);
  if (dtype == kBucketF32)
    int8_unpack_dequantize_kernel<float><<<g, kThreads, 0, s>>>(gathered, sblocks, nblocks, static_cast<float*>(out),
                                                                n, vec);
  else if (dtype == kBucketBF16)
    int8_unpack_dequantize_kernel<__nv_bfloat16><<<g, kThreads, 0, s>>>(gathered, sblocks, nblocks,
                                                                        static_cast<__nv_bfloat16*>(out), n, vec);
  else
    int8_unpack_dequantize_kernel<__half><<<g, kThreads, 0, s>>>(gathered, sblocks, nblocks,
                                                                 static_cast<__half*>(out), n, vec);
  return static_cast<int>(cudaGetLastError());
}

int launch_int8_block_absmax(const void* x, int dtype, uint64_t n, uint64_t n_pad, const float* residual,
                             float* absmax, uintptr_t stream) {
  if (int e = check_common(n_pad, 1, stream)) return e;
  if (n > n_pad || dtype < 0 || dtype > 2) return static_cast<int>(cudaErrorInvalidValue);
  if (n_pad == 0) return 0;
  if (!aligned(residual, 16) || !aligned(absmax, 4)) return static_cast<int>(cudaErrorMisalignedAddress);
  const uint64_t nblocks = n_pad / kBlock;
  const bool vec = vec_ok(x, dtype);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned g = grid_for(nblocks);
  if (dtype == kBucketF32)
    int8_block_absmax_kernel<float><<<g, kThreads, 0, s>>>(static_cast<const float*>(x), n, vec, residual, nblocks,
                                                           absmax);
  else if (dtype == kBucketBF16)
    int8_block_absmax_kernel<__nv_bfloat16><<<g, kThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(x), n, vec,
                                                                   residual, nblocks, absmax);
  else
    int8_block_absmax_kernel<__half><<<g, kThreads, 0, s>>>(static_cast<const __half*>(x), n, vec, residual, nblocks,
                                                            absmax);
  return static_cast<int>(cudaGetLastError());
}

int launch_int8_quantize_pack_shared(const void* x, int dtype, uint64_t n, uint64_t n_pad, uint32_t world,
                                     float* residual, const float* absmax, uint8_t* send, float* scales,
                                     uintptr_t stream) {
  if (int e = check_common(n_pad, world, stream)) return e;
  if (n > n_pad || dtype < 0 || dtype > 2) return static_cast<int>(cudaErrorInvalidValue);
  if (n_pad == 0) return 0;
  if (!aligned(residual, 16) || !aligned(send, 4) || !aligned(absmax, 4) || !aligned(scales, 4))
    return static_cast<int>(cudaErrorMisalignedAddress);
  const uint64_t nblocks = n_pad / kBlock, sblocks = nblocks / world;
  const bool vec = vec_ok(x, dtype);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned g = grid_for(nblocks);
  if (dtype == kBucketF32)
    int8_quantize_pack_shared_kernel<float><<<g, kThreads, 0, s>>>(static_cast<const float*>(x), n, vec, residual,
                                                                   absmax, nblocks, sblocks, send, scales);
  else if (dtype == kBucketBF16)
    int8_quantize_pack_shared_kernel<__nv_bfloat16><<<g, kThreads, 0, s>>>(
        static_cast<const __nv_bfloat16*>(x), n, vec, residual, absmax, nblocks, sblocks, send, scales);
  else
    int8_quantize_pack_shared_kernel<__half><<<g, kThreads, 0, s>>>(static_cast<const __half*>(x), n, vec, residual,
                                                                    absmax, nblocks, sblocks, send, scales);
  return static_cast<int>(cudaGetLastError());
}

int launch_int8_dequant_sum_requant_shared(const uint8_t* recv_codes, uint32_t world, uint64_t shard,
                                           const float* shared_scales, float* residual, uint8_t* own,
                                           uintptr_t stream) {
  if (int e = check_common(shard * world, world, stream)) return e;
  if (shard % kBlock) return static_cast<int>(cudaErrorInvalidValue);
  if (shard == 0) return 0;
  if (!aligned(recv_codes, 4) || !aligned(own, 4) || !aligned(residual, 16) || !aligned(shared_scales, 4))
    return static_cast<int>(cudaErrorMisalignedAddress);
  const uint64_t sblocks = shard / kBlock;
  int8_dequant_sum_requant_shared_kernel<<<grid_for(sblocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      recv_codes, world, sblocks, shared_scales, residual, own);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace llmio
