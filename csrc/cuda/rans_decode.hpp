// GPU decoder of the rans token codec (csrc/codec/rans.hpp): one warp per
// 32768-token block, any number of chunks and models per launch. The per-lane
// arithmetic is shared with the host emulation rans::emulate_warps through
// csrc/codec/rans_device.hpp, which the CPU tests compare bit for bit with the
// C++ decoder.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "codec/rans_device.hpp"

namespace llmio {

struct RansDecodeParams {
  const uint8_t* src;                 // device: the chunks' payloads (each 4-byte aligned)
  const rans::ChunkDesc* chunks;      // device: [num_chunks]
  uint32_t num_chunks;
  const rans::BlockDesc* blocks;      // device: [num_blocks], one warp each
  uint32_t num_blocks;
  const uint32_t* const* images;      // device: model image pointers (device memory)
  void* out;                          // device: decoded tokens (token_bytes wide)
  uint32_t token_bytes;               // 2 or 4
  int32_t* status;                    // device: [num_chunks], zeroed by the caller; rans::Status codes
};

// Launches on `stream` (0 is the legacy default stream, which torch uses by
// default). The binding has checked everything (token_bytes, null pointers,
// rans::check_descriptors in codec/rans_check.hpp): no argument checks here.
// A launch failure throws llmio::CudaError (LLMIO_CUDA_CHECK).
void launch_rans_decode(const RansDecodeParams& p, cudaStream_t stream);

}  // namespace llmio
