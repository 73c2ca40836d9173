// Pieces both engines share: bounce buffers, op conversion on fallback, the
// synchronous pread executor, and the completion bookkeeping of one op.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "io/engine.hpp"

namespace llmio {
namespace detail {

// An aligned buffer the engine owns (bounce reads).
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(uint64_t nbytes, uint64_t align);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& o) noexcept { *this = std::move(o); }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept;
  uint8_t* data() const { return p_; }
  uint64_t size() const { return n_; }

 private:
  uint8_t* p_ = nullptr;
  uint64_t n_ = 0;
};

// Bounce buffer size for a file set: max_io rounded up to the largest alignment.
uint64_t bounce_bytes(const FileSet& files, uint64_t max_io);
uint64_t max_alignment(const FileSet& files);

// Rewrites a bounce op whose file lost O_DIRECT into a plain buffered read of
// exactly the bytes it was going to copy.
void demote_to_buffered(IoOp& op);

// Injected EIO (test faults) for a path, or 0.
int injected_read_error(const FileHandle& f);

// Reads one op with pread(2) in the calling thread; bounce is an aligned buffer
// of at least op.len bytes. Falls back from O_DIRECT on EINVAL. Throws IoError
// or ShortReadError with the op's context.
void run_op_sync(FileSet& files, EngineStats& st, IoOp op, uint8_t* bounce);

}  // namespace detail
}  // namespace llmio
