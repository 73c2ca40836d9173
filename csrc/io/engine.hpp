// The read engine interface: batches of (file, offset, length, destination)
// requests, served by io_uring or by a pread thread pool.
//
// Contract of read_batch():
//   * every request is validated first (file index, range inside the file);
//     a bad request raises before any byte is read;
//   * on return every destination holds exactly the requested bytes;
//   * on error it waits until no operation is in flight (nothing writes into
//     the caller's memory after it returns), then raises the first error,
//     naming the file, offset and length;
//   * thread safe: several threads may call it at once.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/file.hpp"

namespace llmio {

struct ReadRequest {
  uint32_t file = 0;       // index into the reader's paths
  uint64_t offset = 0;     // file offset, bytes, any value
  uint64_t nbytes = 0;     // bytes to read, any value (0 is a no-op)
  uint8_t* dst = nullptr;  // host memory, any alignment
  // Bytes the engine may scribble on before dst and after dst + nbytes. When
  // dst is congruent to offset modulo the O_DIRECT alignment and the slack
  // covers the partial blocks, the whole range is one direct read with no
  // bounce copy (read() and ring slots lay their buffers out this way).
  uint32_t slack_before = 0;
  uint32_t slack_after = 0;
};

struct EngineOptions {
  uint32_t queue_depth = 64;       // io_uring: in-flight operations per ring
  uint32_t num_threads = 16;       // thread pool: workers
  uint64_t max_io_bytes = 1 << 20; // largest single read(2)/SQE; requests are split
};

// Counters shared by both engines (monotonic, relaxed atomics).
struct EngineStats {
  std::atomic<uint64_t> batches{0}, requests{0}, bytes{0};
  std::atomic<uint64_t> ops_direct{0}, ops_buffered{0};
  std::atomic<uint64_t> bytes_direct{0}, bytes_buffered{0};
  std::atomic<uint64_t> bounce_ops{0}, bounce_bytes{0};
  std::atomic<uint64_t> fixed_buffer_ops{0};
  std::atomic<uint64_t> retries{0};       // partial reads, EINTR, EAGAIN
  std::atomic<uint64_t> submits{0};       // io_uring_submit calls
  std::atomic<uint64_t> wait_ns{0};       // time callers spent inside read_batch
  std::atomic<uint64_t> direct_fallbacks{0};
};

// One physical read the planner emits. For a bounce op the engine reads into
// a bounce buffer and copies [skip, skip + copy_len) of it to copy_dst.
struct IoOp {
  uint32_t req = 0;          // index of the request it serves
  uint32_t file = 0;
  uint64_t offset = 0;       // file offset
  uint64_t len = 0;          // bytes asked of the kernel
  uint64_t need = 0;         // bytes that must arrive (less than len only at EOF)
  uint8_t* dst = nullptr;    // target, or nullptr for a bounce op
  bool direct = false;
  bool bounce = false;
  uint8_t* copy_dst = nullptr;
  uint64_t skip = 0;
  uint64_t copy_len = 0;
};

namespace detail {
// Validates the requests against the file set and splits them into physical
// operations of at most max_io_bytes. Throws std::out_of_range for a bad file
// index and ShortReadError for a range past the end of the file.
void plan_requests(FileSet& files, const ReadRequest* reqs, size_t n,
                   uint64_t max_io_bytes, std::vector<IoOp>& ops);

// "read <path> @ off (+len)" context for an op.
std::string op_context(const FileSet& files, const IoOp& op);
}  // namespace detail

class Engine {
 public:
  Engine(std::shared_ptr<FileSet> files, EngineOptions opt)
      : files_(std::move(files)), opt_(opt) {}
  virtual ~Engine() = default;
  virtual void read_batch(const ReadRequest* reqs, size_t n) = 0;
  virtual const char* name() const = 0;
  // Backend-specific facts for stats(): "registered_files", ...
  virtual std::vector<std::pair<std::string, int64_t>> features() const { return {}; }

  // Long-lived destination memory (a ring arena) the engine may register with
  // the kernel (io_uring fixed buffers) so reads into it skip per-I/O page
  // pinning. Best effort: returns -1 when not supported or refused
  // (RLIMIT_MEMLOCK), and reads work either way. The caller guarantees no read
  // into the region is in flight when it unregisters.
  virtual int register_region(uint8_t* ptr, uint64_t nbytes) { return -1; }
  virtual void unregister_region(int id) {}

  FileSet& files() { return *files_; }
  const EngineOptions& options() const { return opt_; }
  EngineStats& stats() { return stats_; }

 protected:
  std::shared_ptr<FileSet> files_;
  EngineOptions opt_;
  EngineStats stats_;
};

std::unique_ptr<Engine> make_thread_engine(std::shared_ptr<FileSet> files, EngineOptions opt);
// Throws UnsupportedError (with the probe's reason) when io_uring is unusable.
std::unique_ptr<Engine> make_uring_engine(std::shared_ptr<FileSet> files, EngineOptions opt);

struct UringProbe {
  bool compiled = false;  // built with liburing
  bool usable = false;
  int err = 0;            // errno of the failed step, 0 when usable
  std::string reason;     // empty when usable
};
// Probed once per process (again after _set_faults).
UringProbe probe_io_uring();
void reset_io_uring_probe();

}  // namespace llmio
