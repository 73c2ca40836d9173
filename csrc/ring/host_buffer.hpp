// Page-aligned host memory for O_DIRECT reads and pinned host-to-device copies.
//
// Allocated with mmap (anonymous, private); regions of 2 MiB and more are
// 2 MiB-aligned and advised MADV_HUGEPAGE so transparent huge pages back them
// where the kernel allows. Page-locking for CUDA (cudaHostRegister) is done by
// the Python layer through torch.cuda.cudart(), so this file needs no CUDA;
// anonymous mmap memory is also what io_uring can register on every kernel
// (cudaHostAlloc memory cannot be registered on older ones).
#pragma once

#include <atomic>
#include <cstdint>

namespace llmio {

class HostBuffer {
 public:
  // nbytes > 0. Throws std::bad_alloc (as std::system_error ENOMEM) on failure.
  explicit HostBuffer(uint64_t nbytes);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  uint8_t* data() const { return data_; }
  uint64_t size() const { return nbytes_; }     // usable bytes
  bool huge_pages() const { return huge_; }     // MADV_HUGEPAGE accepted

  // Bytes currently mapped by all live HostBuffers of the process.
  static uint64_t live_bytes();
  static uint64_t live_count();

 private:
  uint8_t* map_ = nullptr;
  uint64_t map_bytes_ = 0;
  uint8_t* data_ = nullptr;
  uint64_t nbytes_ = 0;
  bool huge_ = false;
};

}  // namespace llmio
