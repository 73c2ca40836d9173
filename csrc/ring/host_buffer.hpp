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
  // nbytes > 0. Throws IoError (ENOMEM) when the mapping fails.
  //
  // dont_fork: madvise(MADV_DONTFORK), for memory that is page-locked for DMA
  // (a ring arena under cudaHostRegister or io_uring fixed buffers). A fork
  // would otherwise share those pages copy-on-write, and on older kernels the
  // parent's next write can move it to a fresh page while the device keeps
  // reading the old one. A forked child has no mapping at that address then;
  // the destructor does not munmap it there (the child may have mapped
  // something else at that address since), and users of the buffer must not
  // touch it in a child (SlotRing refuses every call there).
  explicit HostBuffer(uint64_t nbytes, bool dont_fork = false);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  uint8_t* data() const { return data_; }
  uint64_t size() const { return nbytes_; }     // usable bytes
  bool huge_pages() const { return huge_; }     // MADV_HUGEPAGE accepted
  bool dont_fork() const { return dont_fork_; } // MADV_DONTFORK applied
  // True in a process forked after this buffer was made with dont_fork: the
  // memory is not mapped here.
  bool unmapped_here() const;

  // Bytes currently mapped by all live HostBuffers of the process.
  static uint64_t live_bytes();
  static uint64_t live_count();

 private:
  uint8_t* map_ = nullptr;
  uint64_t map_bytes_ = 0;
  uint8_t* data_ = nullptr;
  uint64_t nbytes_ = 0;
  bool huge_ = false;
  bool dont_fork_ = false;
  int owner_pid_ = 0;
};

}  // namespace llmio
