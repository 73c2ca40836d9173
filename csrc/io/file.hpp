// One input file as the read engines see it: a buffered descriptor that always
// works, and an O_DIRECT descriptor used opportunistically.
//
// O_DIRECT is best effort: a file system may refuse it at open (EINVAL) or at
// the first read (EINVAL, e.g. some FUSE and tmpfs on older kernels). Either
// way the file falls back to buffered reads, once, and the fallback is counted
// in the reader's stats. Nothing ever fails where a buffered read would work.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace llmio {

struct FileHandle {
  std::string path;
  int fd_buffered = -1;
  int fd_direct = -1;           // -1 when O_DIRECT was not asked for or was refused at open
  uint64_t size = 0;            // bytes, from fstat at open
  uint32_t align = 4096;        // O_DIRECT alignment for offsets, lengths and memory
  std::atomic<bool> direct_ok{false};
  std::string direct_reason;    // why direct_ok is false (guarded by FileSet::mu_)

  FileHandle() = default;
  FileHandle(const FileHandle&) = delete;
  FileHandle& operator=(const FileHandle&) = delete;
  ~FileHandle();
};

// The fixed set of files a Reader serves, opened once at construction.
class FileSet {
 public:
  // Opens every path. Raises IoError (ENOENT, EACCES, EISDIR ...) naming the
  // path when the buffered open fails; O_DIRECT refusal is not an error.
  FileSet(const std::vector<std::string>& paths, bool direct);

  size_t size() const { return files_.size(); }
  FileHandle& at(size_t i);  // std::out_of_range naming the index and count
  const FileHandle& at(size_t i) const;

  // Called by an engine when a direct read failed with EINVAL: the file is
  // read buffered from now on. Returns true the first time for this file.
  bool disable_direct(size_t i, const std::string& reason);

  // Files that fell back from O_DIRECT, with the reason: "path: reason".
  std::vector<std::string> fallbacks() const;

 private:
  std::vector<std::unique_ptr<FileHandle>> files_;
  mutable std::mutex mu_;
  std::vector<std::string> fallbacks_;
};

namespace detail {
// Test-only fault injection, set from LLMIO_FAULTS at load or from
// _core._set_faults(): a comma list of
//   direct_open_einval   O_DIRECT open fails with EINVAL
//   direct_read_einval   the first O_DIRECT read of each file fails with EINVAL
//   uring_eperm          io_uring_setup fails with EPERM (as under seccomp)
//   uring_enosys         io_uring_setup fails with ENOSYS
//   uring_submit_eio     io_uring_submit_and_wait reports EIO after submitting (a
//                        ring that fails with reads in flight; for a Writer, with
//                        writes in flight)
//   uring_enter_eio      io_uring_submit_and_wait fails with EIO before the kernel
//                        takes any read (they stay queued in the ring, never submitted;
//                        for a Writer, io_uring_submit of its writes fails the same way)
//   eio:<substring>      reads of files whose path contains <substring> fail with EIO
//   write_enospc[:N]     Writer writes fail with ENOSPC from file offset N on (default 0);
//                        a write crossing N is cut short there first, as on a full disk
//   write_eio[:N]        the same with EIO
//   direct_write_einval  O_DIRECT writes fail with EINVAL (the Writer falls back to buffered)
//   write_short          every Writer write(2) is cut to half its length (a direct one to
//                        whole blocks; one block is not cut), as a signal or a busy
//                        file system may cut it: the rest must be resubmitted
struct Faults {
  bool direct_open_einval = false;
  bool direct_read_einval = false;
  bool uring_eperm = false;
  bool uring_enosys = false;
  bool uring_submit_eio = false;
  bool uring_enter_eio = false;
  std::string eio_substring;
  int write_err = 0;              // ENOSPC or EIO for write_enospc / write_eio, 0 for none
  uint64_t write_err_offset = 0;  // the file offset the injected write error starts at
  uint64_t write_err_end = UINT64_MAX;  // ... and where it stops (writes wholly past it succeed)
  bool direct_write_einval = false;
  bool write_short = false;
};
const Faults& faults();
void set_faults(const std::string& spec);  // std::invalid_argument on an unknown name
std::string faults_spec();

// O_DIRECT alignment of an open file: statx(STATX_DIOALIGN) where the kernel
// reports it, never below 4096.
uint32_t direct_alignment(int fd);

// "a directory", "a FIFO (named pipe)", ... for an st_mode that is not a regular file.
const char* file_type_name(unsigned st_mode);

inline uint64_t align_down(uint64_t x, uint64_t a) { return x / a * a; }
inline uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
}  // namespace detail

}  // namespace llmio
