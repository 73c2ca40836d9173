// Built with -ffp-contract=off (CMakeLists.txt): the per-lane arithmetic of
// int8_device.hpp must round every operation, as the kernels' __f*_rn do.
#include "quant/int8_emulate.hpp"

namespace llmio {
namespace int8 {

namespace {

// One warp per block, lane by lane: every lane's load, then (kReduce) the
// __shfl_xor_sync butterfly of the partial absmax and the __all_sync vote on
// finiteness, then every lane's store, as the kernel's lanes run in lockstep.
template <class Op>
void emulate_blocks(const Op& op) {
  float v[kLanes][kPerLane];
  float m[kLanes];
  bool fin[kLanes];
  for (uint64_t b = 0; b < op.blocks(); ++b) {
    bool all = true;
    for (uint32_t lane = 0; lane < kLanes; ++lane) {
      op.load(b, static_cast<int>(lane), v[lane]);
      if (Op::kReduce) {
        m[lane] = lane_absmax(v[lane], &fin[lane]);
        all = all && fin[lane];
      }
    }
    if (Op::kReduce) {
      for (uint32_t off = kLanes / 2; off > 0; off >>= 1) {
        float o[kLanes];
        for (uint32_t lane = 0; lane < kLanes; ++lane) o[lane] = m[lane ^ off];
        for (uint32_t lane = 0; lane < kLanes; ++lane) m[lane] = fold_max(m[lane], o[lane]);
      }
    }
    for (uint32_t lane = 0; lane < kLanes; ++lane)
      op.store(b, static_cast<int>(lane), v[lane], Op::kReduce ? m[lane] : 0.0f, all);
  }
}

template <class P>
void by_dtype(const P& p) {
  if (p.dtype == kF32) emulate_blocks(make_op<float>(p));
  else if (p.dtype == kBF16) emulate_blocks(make_op<Bf16>(p));
  else emulate_blocks(make_op<F16>(p));
}

}  // namespace

void quantize_pack_emulate(const Int8QuantizePackParams& p) { by_dtype(p); }
void dequant_sum_requant_emulate(const Int8DequantSumRequantParams& p) { emulate_blocks(make_op(p)); }
void unpack_dequantize_emulate(const Int8UnpackDequantizeParams& p) { by_dtype(p); }
void block_absmax_emulate(const Int8BlockAbsmaxParams& p) { by_dtype(p); }
void quantize_pack_shared_emulate(const Int8QuantizePackSharedParams& p) { by_dtype(p); }
void dequant_sum_requant_shared_emulate(const Int8DequantSumRequantSharedParams& p) { emulate_blocks(make_op(p)); }

}  // namespace int8
}  // namespace llmio
