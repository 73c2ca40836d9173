// rans1_decode_kernel: warp w decodes block blocks[w]; lane l decodes the l-th
// contiguous segment of the block (its context: its own previous token). Per
// step each lane decodes one token: phase 1 the context table, phase 2 the
// order-0 bucket (escaped lanes), phases 3/4 raw bits; after each phase the
// lanes whose state fell below L take the next words of the block's shared
// stream in lane order (ballot + popcount of the lower lanes). Tokens go
// through a per-warp shared-memory tile (32 steps x 32 lanes) so that the
// global stores are coalesced runs of a segment. Every word read is
// bounds-checked against the block's words; a corrupt block sets its chunk's
// status and never reads or writes outside its chunk.
#include <cuda_runtime.h>

#include "common/cuda_check.hpp"
#include "cuda/rans1_decode.hpp"

namespace llmio {
namespace {

using namespace rans1;

constexpr unsigned kWarpsPerCta = 4;

__device__ __forceinline__ void set_status(int32_t* status, uint32_t chunk, int32_t code) {
  atomicCAS(status + chunk, 0, code);
}

// At most 64 registers a thread (8 CTAs of 4 warps an SM): the kernel waits on
// dependent table reads, so more warps in flight beat a few more registers.
constexpr unsigned kMinCtasPerSm = 8;

template <class T>
__global__ void __launch_bounds__(kWarpsPerCta * 32, kMinCtasPerSm)
rans1_decode_kernel(const uint8_t* __restrict__ src, const rans::ChunkDesc* __restrict__ chunks, uint32_t num_chunks,
                    const rans::BlockDesc* __restrict__ blocks, uint32_t num_blocks,
                    const uint32_t* const* __restrict__ images, T* __restrict__ out, int32_t* __restrict__ status) {
  __shared__ T tile[kWarpsPerCta][kLanes][kLanes + 1];
  const uint32_t wib = threadIdx.x / 32;
  const uint32_t warp = blockIdx.x * kWarpsPerCta + wib;
  const uint32_t lane = threadIdx.x & 31;
  if (warp >= num_blocks) return;
  const rans::BlockDesc bd = blocks[warp];
  if (bd.chunk >= num_chunks) return;
  const rans::ChunkDesc cd = chunks[bd.chunk];
  const uint8_t* payload = src + cd.src_offset;
  const uint32_t* img = images[cd.model];
  const ImageView m = image_view(img);
  BlockSpan span;
  int32_t st = locate_block(payload, cd.src_bytes, cd.num_tokens, bd.block, &span);
  if (st == rans::kOk && (img[0] != kImageMagic || m.base.token_bytes != sizeof(T) ||
                          (reinterpret_cast<uintptr_t>(payload) & (rans::kPayloadAlign - 1))))
    st = rans::kBadHeader;
  if (st != rans::kOk) {
    if (lane == 0) set_status(status, bd.chunk, st);
    return;
  }
  const uint16_t* words = reinterpret_cast<const uint16_t*>(span.words);
  uint32_t x = reinterpret_cast<const uint32_t*>(span.states)[lane];
  if (__any_sync(0xffffffffu, x < kStateLow)) {
    if (lane == 0) set_status(status, bd.chunk, rans::kBadState);
    return;
  }
  const unsigned lower = (1u << lane) - 1;
  uint64_t pos = span.word_begin;
  const uint64_t end = span.word_end;
  bool overrun = false, bad = false;
  auto renorm = [&](bool need) {
    const unsigned ballot = __ballot_sync(0xffffffffu, need);
    if (need) {
      const uint64_t idx = pos + __popc(ballot & lower);
      overrun |= idx >= end;
      x = (x << 16) | (idx < end ? uint32_t(__ldg(words + idx)) : 0u);
    }
    pos += __popc(ballot);
  };
  const uint32_t len = lane_tokens(span, lane), seg = span.seg;
  uint32_t ctx = start_context(m);
  T* dst = out + cd.out_offset + uint64_t(bd.block) * kBlockSymbols;
  for (uint32_t t = 0; t < seg; ++t) {
    const bool active = t < len;
    uint32_t w0 = 0, b = 0, v = 0, bits = 0;
    if (active) w0 = decode_context(m, ctx, x);
    renorm(active && x < kStateLow);
    const bool esc = active && (w0 & 0xffffu) == kEscapeRank;
    if (__any_sync(0xffffffffu, esc)) {
      if (esc) {
        b = rans::decode_bucket(m.base, x);
        bits = m.base.bucket[rans::kBucketWords * b + 3] & 0xffu;
      }
      renorm(esc && x < kStateLow);
      if (bits) v = rans::take_bits(x, bits < 16 ? bits : 16);
      renorm(bits && x < kStateLow);
      if (__any_sync(0xffffffffu, bits > 16)) {
        if (bits > 16) v |= rans::take_bits(x, bits - 16) << 16;
        renorm(bits > 16 && x < kStateLow);
      }
    }
    if (active) {
      uint32_t sym;
      if (esc) {
        sym = rans::symbol_of(m.base, b, v, &bad);
        ctx = context_after_bucket(m, b, v);
      } else {
        sym = image_load(m.base.rank + (w0 & 0xffffu));
        ctx = w0 >> 16;
      }
      tile[wib][lane][t & 31] = static_cast<T>(sym);
    }
    if (__any_sync(0xffffffffu, overrun)) break;  // a corrupt block: stop reading
    if ((t & 31) == 31 || t + 1 == seg) {          // flush: lane j's last steps, 32 lanes store a run each
      __syncwarp();
      const uint32_t base = t & ~31u;
      for (uint32_t j = 0; j < kLanes; ++j) {
        const uint32_t lj = lane_tokens(span, j);
        if (base + lane <= t && base + lane < lj) dst[uint64_t(j) * seg + base + lane] = tile[wib][j][lane];
      }
      __syncwarp();
    }
  }
  const bool any_overrun = __any_sync(0xffffffffu, overrun);
  const bool any_bad = __any_sync(0xffffffffu, bad);
  const bool final_bad = __any_sync(0xffffffffu, x != kStateLow) || pos != end;
  if (lane == 0) {
    if (any_overrun)
      set_status(status, bd.chunk, rans::kOverrun);
    else if (any_bad)
      set_status(status, bd.chunk, rans::kBadSymbol);
    else if (final_bad)
      set_status(status, bd.chunk, rans::kBadFinal);
  }
}

}  // namespace

void launch_rans1_decode(const Rans1DecodeParams& p, cudaStream_t s) {
  if (p.num_blocks == 0) return;
  const unsigned grid = (p.num_blocks + kWarpsPerCta - 1) / kWarpsPerCta;
  if (p.token_bytes == 2)
    rans1_decode_kernel<uint16_t><<<grid, kWarpsPerCta * 32, 0, s>>>(
        p.src, p.chunks, p.num_chunks, p.blocks, p.num_blocks, p.images, static_cast<uint16_t*>(p.out), p.status);
  else
    rans1_decode_kernel<uint32_t><<<grid, kWarpsPerCta * 32, 0, s>>>(
        p.src, p.chunks, p.num_chunks, p.blocks, p.num_blocks, p.images, static_cast<uint32_t*>(p.out), p.status);
  LLMIO_CUDA_CHECK_WHAT(cudaGetLastError(), "rans1_decode_kernel launch");
}

}  // namespace llmio
