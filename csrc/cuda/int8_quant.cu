// INT8 gradient hook kernels: one warp per 256-value block (see int8_quant.hpp).
// The per-lane logic is csrc/quant/int8_device.hpp; this file adds the warp
// collectives and the launches.
//
// Bit-identity with csrc/quant/int8_block.cpp rests on:
//   * __fadd_rn / __fsub_rn / __fmul_rn / __fdiv_rn: IEEE round-to-nearest
//     operations that nvcc never fuses into FMAs and that do not depend on
//     -prec-div / -use_fast_math (the file is also built with -fmad=false);
//   * rintf: round half to even, like std::nearbyint in FE_TONEAREST;
//   * the absmax fold "a > m ? a : m" (exact for finite values, in any order);
//   * the NaN scale written as 0x7fc00000, std::numeric_limits<float>::quiet_NaN();
//   * denormals kept (-ftz=false, nvcc's default, set explicitly in CMakeLists.txt).
#include "cuda/int8_quant.hpp"

namespace llmio {

namespace {

using namespace int8;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerCta = 8;
constexpr int kThreads = 32 * kWarpsPerCta;

__device__ __forceinline__ uint64_t warp_id() { return (uint64_t(blockIdx.x) * kThreads + threadIdx.x) / 32; }
__device__ __forceinline__ uint64_t warp_stride() { return uint64_t(gridDim.x) * kWarpsPerCta; }

// One warp per block of op (int8_device.hpp): every lane loads, the warp folds the
// absmax (butterfly) and votes on finiteness (kReduce), every lane stores.
template <class Op>
__global__ void __launch_bounds__(kThreads) int8_block_kernel(const Op op) {
  const int lane = threadIdx.x & 31;
  for (uint64_t b = warp_id(); b < op.blocks(); b += warp_stride()) {
    float v[kPerLane];
    op.load(b, lane, v);
    if constexpr (Op::kReduce) {
      bool finite;
      float m = lane_absmax(v, &finite);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) m = fold_max(m, __shfl_xor_sync(kFull, m, off));
      finite = __all_sync(kFull, finite) != 0;
      op.store(b, lane, v, m, finite);
    } else {
      op.store(b, lane, v, 0.0f, true);
    }
  }
}

unsigned grid_for(uint64_t nblocks) {
  uint64_t g = (nblocks + kWarpsPerCta - 1) / kWarpsPerCta;
  const uint64_t cap = 1u << 20;  // the kernels stride over the rest
  return static_cast<unsigned>(g < cap ? (g ? g : 1) : cap);
}

template <class Op>
cudaError_t launch(const Op& op, cudaStream_t stream) {
  if (op.blocks() == 0) return cudaSuccess;  // nothing to do
  int8_block_kernel<Op><<<grid_for(op.blocks()), kThreads, 0, stream>>>(op);
  return cudaGetLastError();
}

template <class P>
cudaError_t launch_by_dtype(const P& p, cudaStream_t stream) {
  if (p.dtype == kF32) return launch(make_op<float>(p), stream);
  if (p.dtype == kBF16) return launch(make_op<Bf16>(p), stream);
  return launch(make_op<F16>(p), stream);
}

}  // namespace

cudaError_t launch_int8_quantize_pack(const Int8QuantizePackParams& p, cudaStream_t stream) {
  return launch_by_dtype(p, stream);
}
cudaError_t launch_int8_dequant_sum_requant(const Int8DequantSumRequantParams& p, cudaStream_t stream) {
  return launch(make_op(p), stream);
}
cudaError_t launch_int8_unpack_dequantize(const Int8UnpackDequantizeParams& p, cudaStream_t stream) {
  return launch_by_dtype(p, stream);
}
cudaError_t launch_int8_block_absmax(const Int8BlockAbsmaxParams& p, cudaStream_t stream) {
  return launch_by_dtype(p, stream);
}
cudaError_t launch_int8_quantize_pack_shared(const Int8QuantizePackSharedParams& p, cudaStream_t stream) {
  return launch_by_dtype(p, stream);
}
cudaError_t launch_int8_dequant_sum_requant_shared(const Int8DequantSumRequantSharedParams& p,
                                                   cudaStream_t stream) {
  return launch(make_op(p), stream);
}

}  // namespace llmio
