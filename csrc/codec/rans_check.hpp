// Host-side checks of a batched rans decode's descriptors (rans_device.hpp)
// against the buffers they address. The CUDA kernel trusts its descriptors for
// these (a chunk outside `src` or `out`, or a model index past the image array,
// would be an illegal address that kills the CUDA context), so both the kernel's
// binding (rans_cuda_bindings.cpp) and its host emulation (rans_bindings.cpp)
// call this one function before launching. What depends on the encoded bytes
// (headers, states, words) is the kernel's job and reported per chunk as status.
#pragma once

#include <cstddef>
#include <cstdint>

#include "codec/rans_device.hpp"

namespace llmio {
namespace rans {

// What a Status code (rans_device.hpp) means, as error messages show it;
// "unknown status" for a code outside [0, kNumStatus). Exported to Python as
// _core.RANS_STATUS.
const char* status_text(int32_t code);

// Throws std::invalid_argument naming the first bad descriptor and its value:
//   - chunk i's payload [src_offset, src_offset + src_bytes) not inside the
//     src_nbytes bytes at src_addr, or its start address not 4-byte aligned;
//   - chunk i's model index >= num_images;
//   - chunk i's output [out_offset, out_offset + num_tokens) not inside the
//     out_tokens tokens of the output;
//   - block j naming a chunk >= num_chunks or a block past its chunk's blocks.
// src_addr is the source buffer's address (host or device; only its alignment
// is looked at). Descriptor arrays are host memory.
void check_descriptors(uintptr_t src_addr, uint64_t src_nbytes, const ChunkDesc* chunks, size_t num_chunks,
                       const BlockDesc* blocks, size_t num_blocks, size_t num_images, uint64_t out_tokens);

}  // namespace rans
}  // namespace llmio
