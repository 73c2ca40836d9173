// Host emulation of the INT8 hook's CUDA kernels (csrc/cuda/int8_quant.cu): the
// same per-lane code (csrc/quant/int8_device.hpp) run in loops over (block, lane),
// with the warp collectives emulated (absmax butterfly, all-finite vote). Host
// pointers; arguments are trusted (the bindings check them, as for the kernels).
// Exported as _core.int8_*_emulate and compared bit for bit with the CPU oracle
// (csrc/quant/int8_block.hpp) by tests/test_quant.py.
#pragma once

#include "quant/int8_device.hpp"

namespace llmio {
namespace int8 {

void quantize_pack_emulate(const Int8QuantizePackParams& p);
void dequant_sum_requant_emulate(const Int8DequantSumRequantParams& p);
void unpack_dequantize_emulate(const Int8UnpackDequantizeParams& p);
void block_absmax_emulate(const Int8BlockAbsmaxParams& p);
void quantize_pack_shared_emulate(const Int8QuantizePackSharedParams& p);
void dequant_sum_requant_shared_emulate(const Int8DequantSumRequantSharedParams& p);

}  // namespace int8
}  // namespace llmio
