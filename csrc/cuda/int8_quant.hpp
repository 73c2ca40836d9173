// Fused CUDA kernels of the INT8 gradient hook (python/llmio_native/ddp.py).
// Raw device pointers and a cudaStream_t passed as an integer; no torch
// headers. Every kernel is bit-identical to the CPU oracle in
// csrc/quant/int8_block.hpp (IEEE division, round half to even, the same
// zero / denormal / non-finite branches, no FMA contraction).
//
// Sizes: n_pad is the padded bucket length, a multiple of 256 * world;
// shard = n_pad / world values per rank, sblocks = shard / 256 blocks.
// Per-rank packed layout (what ddp.py sends):
//
//   packed:       | codes[shard] (int8) | scales[sblocks] (fp32) |   stride = shard + 4 * sblocks
//   codes only:   | codes[shard] (int8) |                             stride = shard (deterministic phase 1)
//
// One warp per 256-value block; each lane owns values lane*4 .. lane*4+3 and
// 128+lane*4 .. 128+lane*4+3 (coalesced 4-value vector loads and stores).
//
// Alignment contract (checked by the launchers, which return
// cudaErrorMisalignedAddress otherwise): fp32 arrays (residuals, scales,
// absmax) 16-byte aligned, packed byte buffers 4-byte aligned. The bucket
// may be unaligned (scalar loads then). Launchers return a cudaError_t value
// (0 = success); stream is any cudaStream_t, 0 (torch's default stream,
// torch.cuda.current_stream().cuda_stream outside a stream context) included.
#pragma once

#include <cstdint>

namespace llmio {

enum Int8BucketDType : int { kBucketF32 = 0, kBucketBF16 = 1, kBucketF16 = 2 };

// (a) v = x + residual (x read as fp32, zero at i >= n), per-block absmax,
// quantize, residual = v - q * scale, codes and scale written into the packed
// slot of the destination rank (block b -> rank b / sblocks).
int launch_int8_quantize_pack(const void* x, int dtype, uint64_t n, uint64_t n_pad, uint32_t world,
                              float* residual, uint8_t* send, uintptr_t stream);

// (b) the owner's step: recv = world packed slots [world][shard + 4*sblocks]
// (rank order), each copy / world then summed in fp32 in rank order, + residual,
// requantized into own (one packed slot).
int launch_int8_dequant_sum_requant(const uint8_t* recv, uint32_t world, uint64_t shard, float* residual,
                                    uint8_t* own, uintptr_t stream);

// (c) out[i] = codes * scale for i < n from world gathered packed slots, in
// the bucket's dtype (round to nearest even), in place into the bucket.
int launch_int8_unpack_dequantize(const uint8_t* gathered, uint32_t world, uint64_t shard, void* out, int dtype,
                                  uint64_t n, uintptr_t stream);

// ---- deterministic mode (shared scales; see block_absmax_ref etc.) ----

// absmax[b] of v = x + residual over the n_pad/256 blocks (+inf for a
// non-finite block); residual is read only.
int launch_int8_block_absmax(const void* x, int dtype, uint64_t n, uint64_t n_pad, const float* residual,
                             float* absmax, uintptr_t stream);

// (a) with the all-reduced absmax: codes only into send [world][shard],
// the scale used per block into scales[n_pad/256].
int launch_int8_quantize_pack_shared(const void* x, int dtype, uint64_t n, uint64_t n_pad, uint32_t world,
                                     float* residual, const float* absmax, uint8_t* send, float* scales,
                                     uintptr_t stream);

// (b) with shared scales: recv_codes [world][shard] int8 summed exactly in
// int32, (sum / world) * shared_scales[b] + residual, requantized into own (packed).
int launch_int8_dequant_sum_requant_shared(const uint8_t* recv_codes, uint32_t world, uint64_t shard,
                                           const float* shared_scales, float* residual, uint8_t* own,
                                           uintptr_t stream);

}  // namespace llmio
