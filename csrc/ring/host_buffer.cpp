#include "ring/host_buffer.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>

#include "common/check.hpp"

namespace llmio {

namespace {
std::atomic<uint64_t> g_live_bytes{0};
std::atomic<uint64_t> g_live_count{0};
constexpr uint64_t kHuge = 2ull << 20;
constexpr uint64_t kPage = 4096;
}  // namespace

HostBuffer::HostBuffer(uint64_t nbytes, bool dont_fork)
    : nbytes_(nbytes), owner_pid_(static_cast<int>(::getpid())) {
  if (nbytes == 0) throw std::invalid_argument("HostBuffer needs nbytes > 0");
  const bool want_huge = nbytes >= kHuge;
  const uint64_t rounded = want_huge ? (nbytes + kHuge - 1) / kHuge * kHuge
                                     : (nbytes + kPage - 1) / kPage * kPage;
  // Over-map by one huge page so the usable region can start 2 MiB-aligned.
  map_bytes_ = rounded + (want_huge ? kHuge : 0);
  void* p = ::mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) LLMIO_THROW_ERRNO(errno, "", "mmap of " + std::to_string(map_bytes_) + " bytes of host buffer");
  map_ = static_cast<uint8_t*>(p);
  data_ = map_;
  if (want_huge) {
    uintptr_t a = (reinterpret_cast<uintptr_t>(map_) + kHuge - 1) / kHuge * kHuge;
    data_ = reinterpret_cast<uint8_t*>(a);
#ifdef MADV_HUGEPAGE
    // Advisory: without transparent huge pages the buffer works on 4 KiB pages.
    huge_ = ::madvise(data_, rounded, MADV_HUGEPAGE) == 0;
#endif
  }
  if (dont_fork) {
    // The whole mapping, so no page of it is inherited by a child.
    if (::madvise(map_, map_bytes_, MADV_DONTFORK) != 0) {
      const int e = errno;
      (void)::munmap(map_, map_bytes_);  // cleanup on the error path; the madvise error is reported
      map_ = nullptr;
      LLMIO_THROW_ERRNO(e, "", "madvise(MADV_DONTFORK) of " + std::to_string(map_bytes_) + " bytes of host buffer");
    }
    dont_fork_ = true;
  }
  g_live_bytes.fetch_add(map_bytes_);
  g_live_count.fetch_add(1);
}

bool HostBuffer::unmapped_here() const {
  return dont_fork_ && static_cast<int>(::getpid()) != owner_pid_;
}

HostBuffer::~HostBuffer() {
  if (map_) {
    // In a forked child a MADV_DONTFORK mapping does not exist; the range may
    // hold another mapping of the child by now, which must not be unmapped.
    // munmap of a mapping we made can only fail on bad arguments; a destructor
    // cannot report, so the result is ignored.
    if (!unmapped_here()) (void)::munmap(map_, map_bytes_);
    g_live_bytes.fetch_sub(map_bytes_);
    g_live_count.fetch_sub(1);
  }
}

uint64_t HostBuffer::live_bytes() { return g_live_bytes.load(); }
uint64_t HostBuffer::live_count() { return g_live_count.load(); }

}  // namespace llmio
