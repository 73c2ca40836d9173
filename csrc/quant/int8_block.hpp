// Blockwise symmetric INT8 quantization with error feedback: the CPU oracle of
// the INT8 gradient hook's kernels (and its path on gloo).
//
// One block = kBlock consecutive fp32 values (the last block may be short):
//
//   v[i]     = x[i] + residual[i]                     (error feedback)
//   absmax   = max |v[i]|
//   scale    = absmax / 127                            (fp32, IEEE division)
//   q[i]     = clamp(round_half_even(v[i] / scale), -127, 127)   (int8)
//   deq[i]   = q[i] * scale
//   residual'= v - deq
//
// Special blocks: scale == 0 (all zeros, or absmax so small that absmax / 127
// underflows): q = 0 and the residual keeps v. A block with any inf or NaN:
// scale = NaN and q = 0, so every rank dequantizes NaN for the whole block
// (AMP's GradScaler then skips the step everywhere); its residual resets to 0
// so the non-finite value is not carried into the next step.
//
// Packed layout of n values (codes, then scales; 4-byte aligned scales):
//
//   | q[0] ... q[n-1] (int8) | pad to 4 | scale[0] ... scale[nblocks-1] (fp32) |
//
// Division (not a reciprocal multiply) and round-half-even keep the CUDA
// kernels bit-identical to these functions.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant/int8_device.hpp"

namespace llmio {

constexpr size_t kQuantBlock = int8::kBlock;  // defined once, in int8_device.hpp

inline size_t quant_num_blocks(size_t n) { return (n + kQuantBlock - 1) / kQuantBlock; }
inline size_t quant_codes_bytes(size_t n) { return (n + 3) / 4 * 4; }
inline size_t quant_packed_bytes(size_t n) { return quant_codes_bytes(n) + 4 * quant_num_blocks(n); }

// x: [n] fp32 in; residual: [n] fp32 in/out (may be null: no error feedback);
// codes: [n] int8 out; scales: [nblocks] fp32 out.
void quantize_blocks_ref(const float* x, float* residual, size_t n, int8_t* codes, float* scales);

// out[i] = codes[i] * scales[i / kQuantBlock]
void dequantize_blocks_ref(const int8_t* codes, const float* scales, size_t n, float* out);

// The owner's step of the two-phase all-reduce: W quantized copies of one
// shard (codes_w[r], scales_w[r] for r = 0..W-1; each dequantized copy divided
// by W, then summed in that fixed order in fp32, so values near the fp32 maximum
// on several ranks do not overflow), plus the owner's residual, requantized (residual
// updated as above). A NaN scale in any source makes the block NaN.
void dequant_sum_requant_ref(const int8_t* const* codes_w, const float* const* scales_w, size_t world,
                             size_t n, float* residual, int8_t* codes, float* scales);

// ---- deterministic mode (shared per-block scales) ----
//
// Phase 1 scales are shared by every rank: each rank computes the per-block
// absmax of v = x + residual (block_absmax_ref; +inf for a block with any
// inf/NaN so a MAX all-reduce carries "non-finite" reliably), the ranks
// all-reduce those with MAX, and every rank quantizes with the same scale
// (quantize_blocks_shared_ref). The owner then sums the W integer codes
// exactly (int32) and scales the mean code once (dequant_sum_requant_shared_ref), so the
// result does not depend on the order in which contributions arrive.

// absmax[b] = max |x[i] + residual[i]| over block b, or +inf if any value of
// v is inf/NaN. residual is read only (may be null).
void block_absmax_ref(const float* x, const float* residual, size_t n, float* absmax);

// Quantizes v = x + residual with the shared block scale absmax[b] / 127:
// absmax[b] not finite -> scale NaN, q = 0, residual reset to 0; scale == 0
// -> q = 0, residual keeps v; otherwise q = clamp(rint(v / scale), -127, 127)
// and residual = v - q * scale. scales[b] receives the scale used.
void quantize_blocks_shared_ref(const float* x, float* residual, size_t n, const float* absmax, int8_t* codes,
                                float* scales);

// The owner's step with shared scales: S[i] = sum_r codes_w[r][i] (int32,
// exact), v[i] = (float(S[i]) / W) * scales[b] + residual[i] (|S/W| <= 127: no
// overflow), then requantized
// with the owner's own per-block scale exactly like dequant_sum_requant_ref.
// scales: [nblocks] the shared scales of this shard (NaN -> block NaN).
void dequant_sum_requant_shared_ref(const int8_t* const* codes_w, size_t world, size_t n, const float* scales,
                                    float* residual, int8_t* codes, float* out_scales);

}  // namespace llmio
