// Fused CUDA kernels of the INT8 gradient hook (python/llmio_native/ddp/).
// Raw device pointers and a cudaStream_t; no torch headers. Every kernel is
// bit-identical to the CPU oracle in csrc/quant/int8_block.hpp (IEEE division,
// round half to even, the same zero / denormal / non-finite branches, no FMA
// contraction); its per-lane logic, parameters and layout are in
// csrc/quant/int8_device.hpp, shared with the host emulation.
//
// Contract: launch_<op>(const <Op>Params&, cudaStream_t stream) launches the
// kernel and returns cudaGetLastError() (cudaSuccess when there is nothing to
// do). No argument checks here: the bindings (csrc/bindings/int8_checks.hpp)
// check sizes, dtype codes and alignment once, before any launch. stream is any
// cudaStream_t, 0 (torch's default stream) included.
#pragma once

#include <cuda_runtime.h>

#include "quant/int8_device.hpp"

namespace llmio {

using int8::Int8BlockAbsmaxParams;
using int8::Int8DequantSumRequantParams;
using int8::Int8DequantSumRequantSharedParams;
using int8::Int8QuantizePackParams;
using int8::Int8QuantizePackSharedParams;
using int8::Int8UnpackDequantizeParams;

cudaError_t launch_int8_quantize_pack(const Int8QuantizePackParams& p, cudaStream_t stream);
cudaError_t launch_int8_dequant_sum_requant(const Int8DequantSumRequantParams& p, cudaStream_t stream);
cudaError_t launch_int8_unpack_dequantize(const Int8UnpackDequantizeParams& p, cudaStream_t stream);
// deterministic mode (shared scales)
cudaError_t launch_int8_block_absmax(const Int8BlockAbsmaxParams& p, cudaStream_t stream);
cudaError_t launch_int8_quantize_pack_shared(const Int8QuantizePackSharedParams& p, cudaStream_t stream);
cudaError_t launch_int8_dequant_sum_requant_shared(const Int8DequantSumRequantSharedParams& p, cudaStream_t stream);

}  // namespace llmio
