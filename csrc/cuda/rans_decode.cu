// rans_decode_kernel: warp w decodes block blocks[w]. Per step the 32 lanes
// decode 32 consecutive tokens; after each phase (bucket, low raw bits, high
// raw bits) the lanes whose state fell below L take the next words of the
// block's shared stream in lane order (ballot + popcount of the lower lanes),
// so the stream is read front to back, 32 words at a time at most, and the
// 32 tokens are written with one coalesced store per step. Every read is
// bounds-checked against the block's words; a corrupt block sets its chunk's
// status and never reads or writes outside its chunk.
#include <cuda_runtime.h>

#include "common/cuda_check.hpp"
#include "cuda/rans_decode.hpp"

namespace llmio {
namespace {

using namespace rans;

constexpr unsigned kWarpsPerCta = 4;

__device__ __forceinline__ void set_status(int32_t* status, uint32_t chunk, int32_t code) {
  atomicCAS(status + chunk, 0, code);
}

template <class T>
__global__ void __launch_bounds__(kWarpsPerCta * 32)
rans_decode_kernel(const uint8_t* __restrict__ src, const ChunkDesc* __restrict__ chunks, uint32_t num_chunks,
                   const BlockDesc* __restrict__ blocks, uint32_t num_blocks,
                   const uint32_t* const* __restrict__ images, T* __restrict__ out, int32_t* __restrict__ status) {
  const uint32_t warp = blockIdx.x * kWarpsPerCta + threadIdx.x / 32;
  const uint32_t lane = threadIdx.x & 31;
  if (warp >= num_blocks) return;
  const BlockDesc bd = blocks[warp];
  if (bd.chunk >= num_chunks) return;
  const ChunkDesc cd = chunks[bd.chunk];
  const uint8_t* payload = src + cd.src_offset;
  const ImageView m = image_view(images[cd.model]);
  BlockSpan span;
  int32_t st = locate_block(payload, cd.src_bytes, cd.num_tokens, bd.block, &span);
  if (st == kOk && (m.token_bytes != sizeof(T) || (reinterpret_cast<uintptr_t>(payload) & (kPayloadAlign - 1)))) st = kBadHeader;
  if (st != kOk) {
    if (lane == 0) set_status(status, bd.chunk, st);
    return;
  }
  const uint16_t* words = reinterpret_cast<const uint16_t*>(span.words);
  uint32_t x = reinterpret_cast<const uint32_t*>(span.states)[lane];
  if (__any_sync(0xffffffffu, x < kStateLow)) {
    if (lane == 0) set_status(status, bd.chunk, kBadState);
    return;
  }
  const unsigned lower = (1u << lane) - 1;
  uint64_t pos = span.word_begin;
  const uint64_t end = span.word_end;
  bool overrun = false, bad = false;
  // Lanes with `need` take consecutive words in lane order; pos stays warp-uniform.
  auto renorm = [&](bool need) {
    const unsigned ballot = __ballot_sync(0xffffffffu, need);
    if (need) {
      const uint64_t idx = pos + __popc(ballot & lower);
      overrun |= idx >= end;
      x = (x << 16) | (idx < end ? uint32_t(__ldg(words + idx)) : 0u);
    }
    pos += __popc(ballot);
  };
  T* dst = out + cd.out_offset + uint64_t(bd.block) * kBlockSymbols;
  const uint32_t steps = (span.symbols + kLanes - 1) / kLanes;
  for (uint32_t t = 0; t < steps; ++t) {
    const bool active = t * kLanes + lane < span.symbols;
    uint32_t b = 0, v = 0, bits = 0;
    if (active) b = decode_bucket(m, x);
    renorm(active && x < kStateLow);
    if (active) {
      bits = m.bucket[kBucketWords * b + 3] & 0xffu;
      v = take_bits(x, bits < 16 ? bits : 16);
    }
    renorm(active && x < kStateLow);
    if (__any_sync(0xffffffffu, bits > 16)) {
      if (bits > 16) v |= take_bits(x, bits - 16) << 16;
      renorm(active && x < kStateLow);
    }
    if (active) dst[uint64_t(t) * kLanes + lane] = static_cast<T>(symbol_of(m, b, v, &bad));
    if (__any_sync(0xffffffffu, overrun)) break;  // a corrupt block: stop reading
  }
  const bool any_overrun = __any_sync(0xffffffffu, overrun);
  const bool any_bad = __any_sync(0xffffffffu, bad);
  const bool final_bad = __any_sync(0xffffffffu, x != kStateLow) || pos != end;
  if (lane == 0) {
    if (any_overrun)
      set_status(status, bd.chunk, kOverrun);
    else if (any_bad)
      set_status(status, bd.chunk, kBadSymbol);
    else if (final_bad)
      set_status(status, bd.chunk, kBadFinal);
  }
}

}  // namespace

void launch_rans_decode(const RansDecodeParams& p, cudaStream_t s) {
  if (p.num_blocks == 0) return;
  const unsigned grid = (p.num_blocks + kWarpsPerCta - 1) / kWarpsPerCta;
  if (p.token_bytes == 2)
    rans_decode_kernel<uint16_t><<<grid, kWarpsPerCta * 32, 0, s>>>(
        p.src, p.chunks, p.num_chunks, p.blocks, p.num_blocks, p.images, static_cast<uint16_t*>(p.out), p.status);
  else
    rans_decode_kernel<uint32_t><<<grid, kWarpsPerCta * 32, 0, s>>>(
        p.src, p.chunks, p.num_chunks, p.blocks, p.num_blocks, p.images, static_cast<uint32_t*>(p.out), p.status);
  LLMIO_CUDA_CHECK_WHAT(cudaGetLastError(), "rans_decode_kernel launch");
}

}  // namespace llmio
