// Writer: one file written append-only through io_uring (WRITE_FIXED from a
// registered staging arena, O_DIRECT) or a pwrite thread pool. The write
// path next to the read engines (engine.hpp); the bindings wrap it as
// llmio_native._core.Writer.
//
// Data flow. write() copies the caller's bytes into the current staging chunk
// (chunk_bytes, aligned); a full chunk is submitted asynchronously and the
// next free one is filled while it is in flight. write() blocks only when no
// chunk is free. Every chunk but the last is full, so every file offset and
// length the kernel sees is a multiple of the O_DIRECT alignment:
//
//   file:    [ chunk 0 | chunk 1 | ... | chunk k-1 | tail ......|pad ]
//            0         C         2C                kC    logical   align_up(logical)
//
// close() writes the tail padded with zeros to the alignment (O_DIRECT), then
// ftruncate()s the file to its logical size and syncs it.
//
// Fallbacks. O_DIRECT refused at open (tmpfs, some FUSE) or at the first write
// (EINVAL) -> buffered writes for the rest of the file, silently, recorded in
// stats (direct_active() false, fallback_reason()). A short write is resumed
// where it stopped (a direct one that stopped off the alignment continues
// buffered); EINTR/EAGAIN are retried. Nothing is lost.
//
// Errors. A failed write is recorded (IoError naming path, offset, length
// and the OS error: "write ckpt.bin @ 8388608 (+4194304): No space left on
// device"); no further chunk is submitted, and the next write(), flush() or
// close() first drains what is in flight, then raises the failure at the
// lowest file offset (deterministic whichever op completed first). Later
// calls raise the same error. abort() never raises.
// After a failure the file is cut back to the exact prefix that reached it:
// with several writes in flight, a chunk past the failing one can land (a
// full disk frees space, a concurrent writer's block succeeds), which would
// leave a hole of zeros followed by data. The file never holds anything but
// a prefix of what was written.
//
// Not thread safe by design (one append stream); the methods take a mutex so
// concurrent misuse serialises instead of corrupting state.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/errors.hpp"

namespace llmio {

struct WriterOptions {
  std::string backend = "threads";   // "io_uring" | "threads" (Python resolves "auto")
  bool direct = true;                // try O_DIRECT
  uint32_t queue_depth = 32;         // chunks in flight at most
  uint64_t chunk_bytes = 4ull << 20; // bytes per write op (rounded up to the alignment)
  uint64_t staging_bytes = 64ull << 20;  // staging arena (at least 2 chunks)
  bool exclusive = false;            // O_EXCL: fail when the file exists
};

// Counters (monotonic; read while the writer is idle or from its own thread).
struct WriterStats {
  std::atomic<uint64_t> bytes{0};           // logical bytes accepted by write()
  std::atomic<uint64_t> ops{0};             // completed write ops (chunks, tail)
  std::atomic<uint64_t> ops_direct{0}, ops_buffered{0};
  std::atomic<uint64_t> bytes_direct{0}, bytes_buffered{0};  // bytes written, padding included
  std::atomic<uint64_t> fixed_buffer_ops{0};  // io_uring WRITE_FIXED submissions
  std::atomic<uint64_t> retries{0};           // short writes resumed, EINTR, EAGAIN
  std::atomic<uint64_t> submits{0};           // io_uring_submit calls
  std::atomic<uint64_t> wait_ns{0};           // time callers blocked waiting for completions
  std::atomic<uint64_t> copy_ns{0};           // time spent copying into staging
  std::atomic<uint64_t> direct_fallbacks{0};
};

// The file being written, shared by the Writer and its engine.
struct WriteFile {
  std::string path;
  int fd_buffered = -1;
  int fd_direct = -1;            // -1 when O_DIRECT was not asked for or refused at open
  uint32_t align = 4096;         // O_DIRECT alignment (statx DIOALIGN, at least 4096)
  std::atomic<bool> direct_ok{false};
  std::mutex mu;                 // guards fallback_reason
  std::string fallback_reason;   // why direct_ok is false ("" when it is true)

  // First EINVAL of a direct write: the file is written buffered from now on.
  // Returns true the first time.
  bool disable_direct(const std::string& why);
};

// One write the Writer hands to an engine: a contiguous piece of staging
// memory for a contiguous range of the file.
struct WriteJob {
  uint32_t chunk = 0;        // staging chunk index (fixed buffer index for io_uring)
  uint64_t offset = 0;       // file offset
  uint64_t len = 0;          // bytes to write (padded tail included)
  uint8_t* src = nullptr;    // staging memory
};

// A finished job: err == 0 on success, else the job failed after `done` bytes.
struct WriteDone {
  uint32_t chunk = 0;
  uint64_t offset = 0;       // the job's file offset
  int err = 0;
  uint64_t done = 0;
  std::string message;       // the IoError message when err != 0
};

// The engines behind a Writer. Driven by one thread at a time (the Writer's
// mutex). submit() never blocks for I/O; reap() collects finished jobs,
// blocking for at least one when `block` (and something is in flight).
class WriteEngine {
 public:
  virtual ~WriteEngine() = default;
  virtual void submit(const WriteJob& job) = 0;
  virtual void reap(bool block, std::vector<WriteDone>& out) = 0;
  virtual const char* name() const = 0;
  virtual std::vector<std::pair<std::string, int64_t>> features() const { return {}; }
};

namespace detail {
// Writes job through pwrite(2) in the calling thread: short writes resumed,
// EINTR/EAGAIN retried, O_DIRECT EINVAL falls back to buffered. Test faults
// (write_enospc, write_eio, direct_write_einval) apply. Never throws.
WriteDone run_write_sync(WriteFile& f, WriterStats& st, const WriteJob& job);

// Test faults for writes: the number of bytes of [offset, offset + len) that
// may be written before the injected error (*err set), or len when none.
// A direct write is cut to the alignment (as a file system would stop).
uint64_t injected_write_limit(uint64_t offset, uint64_t len, bool direct, uint32_t align, int* err);

std::unique_ptr<WriteEngine> make_thread_write_engine(WriteFile& f, WriterStats& st, uint32_t threads);
// staging: the arena every job's src lies in (registered as one fixed buffer
// when RLIMIT_MEMLOCK allows). Throws UnsupportedError when io_uring is unusable.
std::unique_ptr<WriteEngine> make_uring_write_engine(WriteFile& f, WriterStats& st, uint32_t queue_depth,
                                                     uint8_t* staging, uint64_t staging_bytes);
}  // namespace detail

class HostBuffer;

class Writer {
 public:
  // Creates or truncates path (O_EXCL when exclusive). Raises IoError naming
  // the path (EEXIST, EACCES, EISDIR, ENOENT, EROFS, ...; EINVAL for a FIFO or
  // device: a Writer writes regular files only, and opening never blocks),
  // UnsupportedError when io_uring is forced and unusable,
  // std::invalid_argument for bad options.
  Writer(const std::string& path, const WriterOptions& opt);
  // Not closed: abort() (no sync). In a forked child nothing is touched.
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  // Appends [src, src + n); returns the file offset it starts at. The bytes
  // are copied before it returns. Raises the first write error recorded so
  // far; std::logic_error (ValueError) on a closed writer.
  uint64_t write(const uint8_t* src, uint64_t n);
  uint64_t tell() const { return logical_; }
  // Waits for every submitted write; raises the first error. The staged tail
  // (less than one chunk) stays staged until close().
  void flush();
  // sync: "data" (fdatasync), "full" (fsync), "none". Idempotent. Raises the
  // first write error (the file is then closed unsynced), or a sync/close
  // error naming the path.
  void close(const std::string& sync);
  // Stops, waits for in-flight writes, closes without syncing. Never throws;
  // does nothing in a forked child (write/flush/close raise there).
  void abort() noexcept;

  const std::string& path() const { return file_.path; }
  const char* backend() const { return engine_ ? engine_->name() : opt_.backend.c_str(); }
  bool direct_active() const { return file_.direct_ok.load(); }
  bool closed() const { return closed_; }
  uint32_t alignment() const { return file_.align; }
  uint64_t chunk_bytes() const { return chunk_bytes_; }
  uint64_t num_chunks() const { return chunks_.size(); }
  const WriterOptions& options() const { return opt_; }
  std::string fallback_reason();
  WriterStats& stats() { return stats_; }
  std::vector<std::pair<std::string, int64_t>> features() const;

 private:
  struct Chunk {
    uint8_t* data = nullptr;
    uint64_t offset = 0;  // file offset of data[0]
    uint64_t fill = 0;
    bool in_flight = false;
  };

  void throw_if_failed();
  void check_owner() const;  // std::runtime_error in a forked child
  void submit_chunk(uint32_t c, uint64_t len);
  void reap(bool block);
  void drain() noexcept;  // waits until nothing is in flight, records errors
  void trim_after_error() noexcept;  // after a failed write: cut the file back to its exact prefix
  int acquire_chunk();
  void close_fds(bool report, const char* what);
  // After close/abort with nothing in flight: drop the engine and hand the
  // staging arena to the pool (io/staging_pool.hpp).
  void retire_staging() noexcept;

  WriteFile file_;
  WriterOptions opt_;
  WriterStats stats_;
  std::unique_ptr<HostBuffer> staging_;
  std::unique_ptr<WriteEngine> engine_;
  std::vector<std::pair<std::string, int64_t>> retired_features_;  // engine_->features() at retire
  std::vector<Chunk> chunks_;
  std::vector<uint32_t> free_;
  int current_ = -1;
  uint32_t in_flight_ = 0;
  uint64_t chunk_bytes_ = 0;
  uint64_t logical_ = 0;
  bool closed_ = false;
  CapturedError err_;
  uint64_t err_offset_ = 0;  // file offset of the job err_ describes
  uint64_t err_valid_end_ = 0;  // err_offset_ plus what that job wrote before failing
  bool err_from_job_ = false;   // err_ came from a failed write job (the two fields above hold)
  bool trimmed_ = false;        // the file was cut back to err_valid_end_ (once)
  std::mutex mu_;
  int owner_pid_;
};

// open + fsync (or fdatasync) of a file or a directory; IoError naming the path.
void fsync_path(const std::string& path, bool data_only);

}  // namespace llmio
