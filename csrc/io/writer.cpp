// Writer (see writer.hpp): opening, staging, the chunk state machine, close
// and sync; the synchronous pwrite executor and the pwrite thread pool.
// The io_uring engine lives in uring_writer.cpp.
#include "io/writer.hpp"
#include "io/staging_pool.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <thread>

#include "common/errors.hpp"
#include "io/engine.hpp"
#include "io/file.hpp"
#include "io/threads.hpp"
#include "ring/host_buffer.hpp"

namespace llmio {

bool WriteFile::disable_direct(const std::string& why) {
  bool expected = true;
  if (!direct_ok.compare_exchange_strong(expected, false)) return false;
  std::lock_guard<std::mutex> g(mu);
  fallback_reason = why;
  return true;
}

namespace detail {

uint64_t injected_write_limit(uint64_t offset, uint64_t len, bool direct, uint32_t align, int* err) {
  *err = 0;
  const Faults& flt = faults();
  uint64_t allowed = len;
  if (flt.write_short && len > 1) {
    allowed = len / 2;
    if (direct) allowed = len > align ? std::max<uint64_t>(align, align_down(allowed, align)) : len;
  }
  if (!flt.write_err) return allowed;
  const uint64_t at = flt.write_err_offset;
  if (offset + allowed <= at || offset >= flt.write_err_end) return allowed;
  *err = flt.write_err;
  if (offset >= at) return 0;
  allowed = at - offset;
  if (direct) allowed = align_down(allowed, align);
  return allowed;
}

namespace {
std::string write_hint(int e, bool direct, uint32_t align, uint64_t done) {
  std::string h;
  if (e == ENOSPC) h = "the file system is full";
  else if (e == EDQUOT) h = "disk quota exceeded";
  else if (e == EFBIG) h = "file size limit (ulimit -f / RLIMIT_FSIZE) or file system maximum reached";
  else if (e == EINVAL && direct) h = "O_DIRECT needs " + std::to_string(align) + "-byte alignment";
  if (done) h += std::string(h.empty() ? "" : "; ") + std::to_string(done) + " bytes were written first";
  return h;
}
}  // namespace

WriteDone run_write_sync(WriteFile& f, WriterStats& st, const WriteJob& job) {
  WriteDone d;
  d.chunk = job.chunk;
  d.offset = job.offset;
  bool direct = f.direct_ok.load(std::memory_order_relaxed) && f.fd_direct >= 0;
  bool first_direct = direct;
  while (d.done < job.len) {
    const uint64_t off = job.offset + d.done;
    const uint64_t want = job.len - d.done;
    int inj = 0;
    const uint64_t allowed = injected_write_limit(off, want, direct, f.align, &inj);
    ssize_t r;
    int e = 0;
    if (direct && first_direct && faults().direct_write_einval) {
      r = -1;
      e = EINVAL;
    } else if (allowed == 0) {
      r = -1;
      e = inj;
    } else {
      r = ::pwrite(direct ? f.fd_direct : f.fd_buffered, job.src + d.done, allowed, static_cast<off_t>(off));
      if (r < 0) e = errno;
    }
    first_direct = false;
    if (r < 0) {
      if (e == EINTR || e == EAGAIN) {
        st.retries.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      if (e == EINVAL && direct) {
        if (f.disable_direct("O_DIRECT write refused (EINVAL); writing buffered"))
          st.direct_fallbacks.fetch_add(1, std::memory_order_relaxed);
        direct = false;
        continue;
      }
      d.err = e;
      d.message = io_message("write", f.path, job.offset, job.len, e, write_hint(e, direct, f.align, d.done));
      return d;
    }
    if (r == 0) {
      // write(2) of a non-empty range never returns 0 on a regular file;
      // retrying would spin. Report it as an I/O error.
      d.err = EIO;
      d.message = io_message("write", f.path, job.offset, job.len, EIO,
                             "write(2) returned 0 after " + std::to_string(d.done) + " bytes");
      return d;
    }
    d.done += static_cast<uint64_t>(r);
    (direct ? st.bytes_direct : st.bytes_buffered).fetch_add(static_cast<uint64_t>(r), std::memory_order_relaxed);
    if (d.done < job.len) {
      st.retries.fetch_add(1, std::memory_order_relaxed);
      // A direct write that stopped off the alignment cannot resume direct.
      if (direct && (job.offset + d.done) % f.align != 0) direct = false;
    }
  }
  st.ops.fetch_add(1, std::memory_order_relaxed);
  (direct ? st.ops_direct : st.ops_buffered).fetch_add(1, std::memory_order_relaxed);
  return d;
}

namespace {

// The pwrite pool: jobs in FIFO order, any worker takes the next one.
class ThreadWriteEngine final : public WriteEngine {
 public:
  ThreadWriteEngine(WriteFile& f, WriterStats& st, uint32_t threads) : f_(f), st_(st) {
    if (threads == 0) threads = 1;
    nthreads_ = threads;
    start_threads(
        workers_, threads, "writer threads", [this](uint32_t) { worker(); },
        [this] {
          std::lock_guard<std::mutex> g(mu_);
          stop_ = true;
          cv_.notify_all();
        });
  }

  ~ThreadWriteEngine() override {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  const char* name() const override { return "threads"; }
  std::vector<std::pair<std::string, int64_t>> features() const override {
    return {{"threads", static_cast<int64_t>(nthreads_)}};
  }

  void submit(const WriteJob& job) override {
    {
      std::lock_guard<std::mutex> g(mu_);
      jobs_.push_back(job);
      ++outstanding_;
    }
    cv_.notify_one();
  }

  void reap(bool block, std::vector<WriteDone>& out) override {
    std::unique_lock<std::mutex> lk(mu_);
    if (block) done_cv_.wait(lk, [&] { return !done_.empty() || outstanding_ == 0; });
    while (!done_.empty()) {
      out.push_back(std::move(done_.front()));
      done_.pop_front();
    }
  }

 private:
  void worker() {
    for (;;) {
      WriteJob job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
        // Stop only once the queue is empty: a queued job still owns its chunk.
        if (jobs_.empty()) return;
        job = jobs_.front();
        jobs_.pop_front();
      }
      WriteDone d = run_write_sync(f_, st_, job);
      {
        std::lock_guard<std::mutex> g(mu_);
        done_.push_back(std::move(d));
        --outstanding_;
      }
      done_cv_.notify_one();
    }
  }

  WriteFile& f_;
  WriterStats& st_;
  uint32_t nthreads_ = 1;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<WriteJob> jobs_;
  std::deque<WriteDone> done_;
  size_t outstanding_ = 0;
  bool stop_ = false;
};

}  // namespace

std::unique_ptr<WriteEngine> make_thread_write_engine(WriteFile& f, WriterStats& st, uint32_t threads) {
  return std::make_unique<ThreadWriteEngine>(f, st, threads);
}

}  // namespace detail

namespace {

constexpr uint32_t kMaxWriterThreads = 8;

std::string no_nul(const std::string& p) {
  if (p.empty()) throw std::invalid_argument("path '' is empty");
  if (p.find('\0') != std::string::npos) {
    std::string shown;
    for (char c : p) shown += c == '\0' ? std::string("\\0") : std::string(1, c);
    throw std::invalid_argument("path '" + shown + "' contains a NUL byte");
  }
  return p;
}

uint64_t elapsed_ns(std::chrono::steady_clock::time_point t0) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
}

}  // namespace

Writer::Writer(const std::string& path, const WriterOptions& opt) : opt_(opt), owner_pid_(::getpid()) {
  file_.path = no_nul(path);
  if (opt_.backend != "io_uring" && opt_.backend != "threads")
    throw std::invalid_argument("backend must be 'io_uring' or 'threads', got '" + opt_.backend + "'");
  if (opt_.queue_depth == 0) throw std::invalid_argument("queue_depth must be >= 1");
  if (opt_.chunk_bytes == 0) throw std::invalid_argument("chunk_bytes must be > 0");
  if (opt_.backend == "io_uring") {
    UringProbe p = probe_io_uring();
    if (!p.usable) throw UnsupportedError("io_uring backend unavailable: " + p.reason);
  }
  // O_NONBLOCK: opening a FIFO for writing must not wait for a reader (it
  // fails with ENXIO instead, or opens and is refused below).
  int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NONBLOCK | (opt_.exclusive ? O_EXCL : 0);
  int fd = ::open(file_.path.c_str(), flags, 0666);
  if (fd < 0) {
    const int e = errno;
    std::string hint;
    struct stat ps;
    if (::stat(file_.path.c_str(), &ps) == 0 && !S_ISREG(ps.st_mode))
      hint = std::string(" (") + detail::file_type_name(ps.st_mode) + "; a Writer writes regular files only)";
    else if (e == EEXIST)
      hint = " (exclusive=True refuses an existing file)";
    throw IoError(e, file_.path, "open " + file_.path + " for writing: " + std::strerror(e) + hint);
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    (void)::close(fd);  // cleanup on the error path; the fstat error is what is reported
    throw IoError(e, file_.path, "stat " + file_.path + ": " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    (void)::close(fd);  // cleanup on the error path
    const int e = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
    throw IoError(e, file_.path, "open " + file_.path + " for writing: " + std::strerror(e) + " (" +
                                     detail::file_type_name(st.st_mode) + "; a Writer writes regular files only)");
  }
  // Ignored on purpose: O_NONBLOCK has no effect on a regular file; clearing it is hygiene.
  const int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0) (void)::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  file_.fd_buffered = fd;

  if (opt_.direct) {
    int dfd = -1, e = EINVAL;
    if (!detail::faults().direct_open_einval) {
      dfd = ::open(file_.path.c_str(), O_WRONLY | O_CLOEXEC | O_DIRECT);
      e = errno;
    }
    struct stat st2;
    if (dfd >= 0 && (::fstat(dfd, &st2) != 0 || st2.st_dev != st.st_dev || st2.st_ino != st.st_ino)) {
      // Replaced between the two opens: never write into another file.
      (void)::close(dfd);  // cleanup on the error path
      (void)::close(fd);
      throw IoError(ESTALE, file_.path, "open " + file_.path + " for writing: " + std::strerror(ESTALE) +
                                            " (the file was replaced while it was being opened)");
    }
    if (dfd >= 0) {
      file_.fd_direct = dfd;
      file_.align = detail::direct_alignment(dfd);
      file_.direct_ok.store(true);
    } else {
      file_.fallback_reason = std::string("O_DIRECT open refused: ") + std::strerror(e);
      stats_.direct_fallbacks.fetch_add(1, std::memory_order_relaxed);
    }
  } else {
    file_.fallback_reason = "direct=False";
  }

  try {
    const uint64_t A = file_.align;
    chunk_bytes_ = detail::align_up(opt_.chunk_bytes, A);
    // The kernel takes at most 2 GiB - 4 KiB per write(2); a chunk is one op.
    if (chunk_bytes_ > (1ull << 30))
      throw std::invalid_argument("chunk_bytes must be <= 1 GiB, got " + std::to_string(opt_.chunk_bytes));
    uint64_t n = std::max<uint64_t>(2, opt_.staging_bytes / chunk_bytes_);
    n = std::min<uint64_t>(n, std::max<uint64_t>(2, static_cast<uint64_t>(opt_.queue_depth) + 1));
    // From the staging pool when a save holds it open (io/staging_pool.hpp): the
    // arena may be larger than asked; only n chunks of it are used and registered.
    staging_ = staging_pool::take(n * chunk_bytes_);
    chunks_.resize(n);
    for (uint64_t i = 0; i < n; ++i) {
      chunks_[i].data = staging_->data() + i * chunk_bytes_;
      free_.push_back(static_cast<uint32_t>(n - 1 - i));
    }
    if (opt_.backend == "io_uring")
      engine_ = detail::make_uring_write_engine(file_, stats_, opt_.queue_depth, staging_->data(), n * chunk_bytes_);
    else
      engine_ = detail::make_thread_write_engine(
          file_, stats_, std::min<uint32_t>({opt_.queue_depth, static_cast<uint32_t>(n), kMaxWriterThreads}));
  } catch (...) {
    close_fds(false, "");
    throw;
  }
}

Writer::~Writer() {
  if (::getpid() != owner_pid_) {
    // A forked child: the engine's threads and ring belong to the parent, and
    // the staging arena is not mapped here (MADV_DONTFORK). Touch nothing.
    (void)engine_.release();
    (void)staging_.release();
    return;
  }
  abort();
}

std::string Writer::fallback_reason() {
  std::lock_guard<std::mutex> g(file_.mu);
  return file_.direct_ok.load() ? std::string() : file_.fallback_reason;
}

std::vector<std::pair<std::string, int64_t>> Writer::features() const {
  auto f = engine_ ? engine_->features() : retired_features_;
  f.push_back({"queue_depth", opt_.queue_depth});
  f.push_back({"chunk_bytes", static_cast<int64_t>(chunk_bytes_)});
  f.push_back({"staging_bytes", static_cast<int64_t>(chunk_bytes_ * chunks_.size())});
  f.push_back({"alignment", file_.align});
  return f;
}

void Writer::throw_if_failed() {
  if (!err_.set) return;
  drain();  // nothing in flight when the caller sees the error, and the lowest offset wins
  trim_after_error();
  err_.rethrow();
}

void Writer::trim_after_error() noexcept {
  // Only once nothing is in flight, and only for a failed write job: a
  // failure elsewhere (the engine itself) leaves the file be.
  if (trimmed_ || !err_from_job_ || in_flight_ > 0 || file_.fd_buffered < 0) return;
  trimmed_ = true;
  struct stat st {};
  if (::fstat(file_.fd_buffered, &st) != 0 || static_cast<uint64_t>(st.st_size) <= err_valid_end_) return;
  // Best effort: the write error is what the caller is told; a file we
  // cannot cut back is one the caller already knows is bad.
  (void)::ftruncate(file_.fd_buffered, static_cast<off_t>(err_valid_end_));
}

void Writer::reap(bool block) {
  std::vector<WriteDone> done;
  auto t0 = std::chrono::steady_clock::now();
  engine_->reap(block && in_flight_ > 0, done);
  if (block) stats_.wait_ns.fetch_add(elapsed_ns(t0), std::memory_order_relaxed);
  for (WriteDone& d : done) {
    Chunk& c = chunks_.at(d.chunk);
    c.in_flight = false;
    c.fill = 0;
    free_.push_back(d.chunk);
    --in_flight_;
    if (d.err && (!err_.set || d.offset < err_offset_)) {
      err_offset_ = d.offset;
      err_valid_end_ = d.offset + d.done;
      err_from_job_ = true;
      err_.set = true;
      err_.kind = ErrorKind::kIo;
      err_.err = d.err;
      err_.path = file_.path;
      err_.message = d.message;
    }
  }
}

void Writer::drain() noexcept {
  try {
    while (in_flight_ > 0) reap(true);
  } catch (...) {
    if (!err_.set) err_ = CapturedError::from_current("write " + file_.path);
  }
}

void Writer::submit_chunk(uint32_t ci, uint64_t len) {
  while (in_flight_ >= opt_.queue_depth) reap(true);
  Chunk& c = chunks_[ci];
  c.in_flight = true;
  ++in_flight_;
  engine_->submit(WriteJob{ci, c.offset, len, c.data});
}

int Writer::acquire_chunk() {
  if (free_.empty()) reap(false);
  while (free_.empty()) {
    reap(true);
    throw_if_failed();
  }
  const uint32_t ci = free_.back();
  free_.pop_back();
  chunks_[ci].fill = 0;
  chunks_[ci].offset = logical_;
  return static_cast<int>(ci);
}

void Writer::check_owner() const {
  if (::getpid() != owner_pid_)
    throw std::runtime_error("Writer " + file_.path + " used in a forked child: its engine belongs to the parent "
                             "process (open a new Writer in the child)");
}

uint64_t Writer::write(const uint8_t* src, uint64_t n) {
  std::lock_guard<std::mutex> g(mu_);
  check_owner();
  if (closed_) throw std::invalid_argument("write to closed Writer " + file_.path);
  reap(false);
  throw_if_failed();
  const uint64_t start = logical_;
  while (n > 0) {
    if (current_ < 0) current_ = acquire_chunk();
    Chunk& c = chunks_[current_];
    const uint64_t k = std::min(n, chunk_bytes_ - c.fill);
    auto t0 = std::chrono::steady_clock::now();
    std::memcpy(c.data + c.fill, src, k);
    stats_.copy_ns.fetch_add(elapsed_ns(t0), std::memory_order_relaxed);
    c.fill += k;
    src += k;
    n -= k;
    logical_ += k;
    stats_.bytes.fetch_add(k, std::memory_order_relaxed);
    if (c.fill == chunk_bytes_) {
      const uint32_t ci = static_cast<uint32_t>(current_);
      current_ = -1;
      submit_chunk(ci, chunk_bytes_);
      throw_if_failed();
    }
  }
  return start;
}

void Writer::flush() {
  std::lock_guard<std::mutex> g(mu_);
  check_owner();
  if (closed_) throw std::invalid_argument("flush of closed Writer " + file_.path);
  while (in_flight_ > 0) reap(true);
  throw_if_failed();
}

void Writer::close_fds(bool report, const char* what) {
  int first_err = 0;
  for (int* fd : {&file_.fd_direct, &file_.fd_buffered}) {
    if (*fd >= 0) {
      // close(2) is never retried on Linux (the descriptor is gone either way).
      if (::close(*fd) != 0 && !first_err) first_err = errno;
      *fd = -1;
    }
  }
  if (report && first_err)
    throw IoError(first_err, file_.path, std::string(what) + " " + file_.path + ": " + std::strerror(first_err));
}

void Writer::close(const std::string& sync) {
  if (sync != "data" && sync != "full" && sync != "none")
    throw std::invalid_argument("sync must be 'data', 'full' or 'none', got '" + sync + "'");
  std::lock_guard<std::mutex> g(mu_);
  if (closed_) return;
  check_owner();
  closed_ = true;  // from here on the writer is closed, whatever happens
  try {
    bool padded = false;
    if (!err_.set && current_ >= 0 && chunks_[current_].fill > 0) {
      Chunk& c = chunks_[current_];
      uint64_t len = c.fill;
      if (file_.direct_ok.load()) {
        len = detail::align_up(c.fill, file_.align);
        std::memset(c.data + c.fill, 0, len - c.fill);
      }
      padded = len != c.fill;
      const uint32_t ci = static_cast<uint32_t>(current_);
      current_ = -1;
      submit_chunk(ci, len);
    }
    current_ = -1;
    drain();
    throw_if_failed();
    if (padded && ::ftruncate(file_.fd_buffered, static_cast<off_t>(logical_)) != 0) {
      const int e = errno;
      throw IoError(e, file_.path, "truncate " + file_.path + " to " + std::to_string(logical_) +
                                       " bytes (after the padded O_DIRECT tail): " + std::strerror(e));
    }
    if (sync != "none") {
      const bool data = sync == "data";
      if ((data ? ::fdatasync(file_.fd_buffered) : ::fsync(file_.fd_buffered)) != 0) {
        const int e = errno;
        throw IoError(e, file_.path, std::string(data ? "fdatasync " : "fsync ") + file_.path + " (" +
                                         std::to_string(logical_) + " bytes): " + std::strerror(e));
      }
    }
  } catch (...) {
    retire_staging();
    close_fds(false, "");
    throw;
  }
  retire_staging();
  close_fds(true, "close");
}

void Writer::retire_staging() noexcept {
  // Only with nothing in flight: the kernel or a pool thread may still read the arena.
  if (in_flight_ != 0 || ::getpid() != owner_pid_) return;
  if (engine_) {
    try {
      retired_features_ = engine_->features();  // stats() after close still report them
    } catch (...) {
    }
  }
  engine_.reset();  // joins the pool threads / unregisters the arena from the ring
  staging_pool::give(std::move(staging_));
}

void Writer::abort() noexcept {
  std::lock_guard<std::mutex> g(mu_);
  if (closed_ || ::getpid() != owner_pid_) return;  // a forked child touches nothing
  closed_ = true;
  current_ = -1;
  drain();
  trim_after_error();
  retire_staging();
  try {
    close_fds(false, "");
  } catch (...) {
  }
}

void fsync_path(const std::string& path, bool data_only) {
  no_nul(path);
  // O_NONBLOCK: a FIFO must not block the open; fsync then refuses it (EINVAL).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int e = errno;
    throw IoError(e, path, std::string(data_only ? "fdatasync " : "fsync ") + path + ": open: " + std::strerror(e));
  }
  if ((data_only ? ::fdatasync(fd) : ::fsync(fd)) != 0) {
    const int e = errno;
    (void)::close(fd);  // cleanup on the error path; the sync error is what is reported
    std::string hint;
    if (e == EINVAL || e == EROFS) hint = " (this kind of file cannot be synced)";
    throw IoError(e, path, std::string(data_only ? "fdatasync " : "fsync ") + path + ": " + std::strerror(e) + hint);
  }
  // Read-only descriptor: close cannot lose data; its result carries nothing to report.
  (void)::close(fd);
}

}  // namespace llmio
