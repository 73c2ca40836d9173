// GPU decoder of the rans1 token codec (csrc/codec/rans1.hpp): one warp per
// 32768-token block, lane l decoding the block's l-th contiguous segment, any
// number of chunks and models per launch. The per-lane arithmetic is shared
// with the host emulation rans1::emulate_warps through
// csrc/codec/rans1_device.hpp, which the CPU tests compare bit for bit with the
// reference decoder. The descriptors are those of rans (rans_device.hpp).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "codec/rans1_device.hpp"

namespace llmio {

struct Rans1DecodeParams {
  const uint8_t* src;                 // device: the chunks' payloads (each 4-byte aligned)
  const rans::ChunkDesc* chunks;      // device: [num_chunks]
  uint32_t num_chunks;
  const rans::BlockDesc* blocks;      // device: [num_blocks], one warp each
  uint32_t num_blocks;
  const uint32_t* const* images;      // device: rans1 decode image pointers (device memory)
  void* out;                          // device: decoded tokens (token_bytes wide)
  uint32_t token_bytes;               // 2 or 4
  int32_t* status;                    // device: [num_chunks], zeroed by the caller; rans::Status codes
};

// Launches on `stream`. The binding has checked everything that does not
// depend on encoded bytes (rans::check_descriptors); a launch failure throws
// llmio::CudaError.
void launch_rans1_decode(const Rans1DecodeParams& p, cudaStream_t stream);

}  // namespace llmio
