// The io_uring write engine: IORING_OP_WRITE_FIXED from the Writer's staging
// arena, registered once as one fixed buffer, with the file's two descriptors
// (buffered, O_DIRECT) registered as fixed files. Driven by the Writer's
// thread only: submit() queues an SQE and submits without waiting; reap()
// collects completions, resubmitting short writes (the rest of the range),
// EINTR/EAGAIN, and direct writes refused with EINVAL (buffered from then on).
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>

#include "common/errors.hpp"
#include "io/engine.hpp"
#include "io/file.hpp"
#include "io/writer.hpp"

#ifdef LLMIO_HAVE_URING
#include <liburing.h>
#endif

namespace llmio {
namespace detail {

#ifndef LLMIO_HAVE_URING

std::unique_ptr<WriteEngine> make_uring_write_engine(WriteFile&, WriterStats&, uint32_t, uint8_t*, uint64_t) {
  throw UnsupportedError("io_uring backend unavailable: " + probe_io_uring().reason);
}

#else

namespace {

class UringWriteEngine final : public WriteEngine {
 public:
  UringWriteEngine(WriteFile& f, WriterStats& st, uint32_t qd, uint8_t* staging, uint64_t staging_bytes)
      : f_(f), st_(st) {
    UringProbe p = probe_io_uring();
    if (!p.usable) throw UnsupportedError("io_uring backend unavailable: " + p.reason);
    entries_ = std::max<uint32_t>(1, std::min<uint32_t>(qd, 4096));
    const int rc = io_uring_queue_init(entries_, &ring_, 0);
    if (rc < 0) {
      const std::string what = "io_uring_queue_init(" + std::to_string(entries_) + ") for writing " + f.path +
                               " failed: " + std::strerror(-rc);
      if (rc == -ENOMEM || rc == -EMFILE || rc == -ENFILE || rc == -EAGAIN)
        throw ResourceError(-rc, f.path, what + " (RLIMIT_MEMLOCK, RLIMIT_NOFILE; or a smaller queue_depth)");
      throw UnsupportedError(what);
    }
    // Both registrations are optimisations: failure (limits, old kernel) is not an error.
    int fds[2] = {f.fd_buffered, f.fd_direct};
    files_registered_ = io_uring_register_files(&ring_, fds, 2) == 0;
    struct iovec iov = {staging, static_cast<size_t>(staging_bytes)};
    buffers_registered_ = staging_bytes <= (1ull << 30) && io_uring_register_buffers(&ring_, &iov, 1) == 0;
  }

  ~UringWriteEngine() override {
    // The Writer drains before destroying its engine; should a completion still
    // be owed (a ring that failed), the kernel may write from the arena until
    // the ring is gone, and io_uring_queue_exit waits for that.
    io_uring_queue_exit(&ring_);
  }

  const char* name() const override { return "io_uring"; }
  std::vector<std::pair<std::string, int64_t>> features() const override {
    return {{"registered_files", files_registered_}, {"registered_buffers", buffers_registered_},
            {"ring_entries", static_cast<int64_t>(entries_)}};
  }

  void submit(const WriteJob& job) override {
    if (states_.size() <= job.chunk) states_.resize(job.chunk + 1);
    State& s = states_[job.chunk];
    s = State{};
    s.job = job;
    s.direct = f_.direct_ok.load(std::memory_order_relaxed) && f_.fd_direct >= 0;
    s.first_direct = s.direct;
    queue(job.chunk);
    flush_sq();
  }

  void reap(bool block, std::vector<WriteDone>& out) override {
    for (;;) {
      drain_cqes();
      while (!synthetic_.empty()) {
        out.push_back(std::move(synthetic_.front()));
        synthetic_.pop_front();
      }
      if (!block || !out.empty() || kernel_inflight_ == 0) return;
      int rc;
      do {
        rc = io_uring_submit_and_wait(&ring_, 1);
      } while (rc == -EINTR);
      if (rc >= 0 && faults().uring_submit_eio) rc = -EIO;  // test fault: the ring fails, writes in flight
      st_.submits.fetch_add(1, std::memory_order_relaxed);
      if (rc >= 0) unsubmitted_ = 0;
      else if (rc != -EAGAIN && rc != -EBUSY) fail_ring(-rc, "io_uring_submit_and_wait");
    }
  }

 private:
  struct State {
    WriteJob job;
    uint64_t done = 0;
    bool direct = false;
    bool first_direct = false;
    bool finished = false;
  };

  // Completions the kernel has posted, without waiting; results are turned
  // into finished jobs (synthetic_) or resubmissions.
  void drain_cqes() {
    struct io_uring_cqe* cqe;
    unsigned head, seen = 0;
    std::vector<std::pair<uint32_t, int>> results;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      ++seen;
      results.emplace_back(static_cast<uint32_t>(io_uring_cqe_get_data64(cqe)), cqe->res);
    }
    if (seen == 0) return;
    io_uring_cq_advance(&ring_, seen);
    kernel_inflight_ -= seen;
    for (auto& r : results) complete_now(r.first, r.second);
    flush_sq();
  }

  // Queues the rest of chunk c's job as one SQE (or finishes it at once when a
  // test fault decides its fate).
  void queue(uint32_t c) {
    State& s = states_[c];
    if (s.direct && !f_.direct_ok.load(std::memory_order_relaxed)) s.direct = false;
    if (s.direct && s.first_direct && faults().direct_write_einval) {
      s.first_direct = false;
      complete_now(c, -EINVAL);
      return;
    }
    s.first_direct = false;
    const uint64_t off = s.job.offset + s.done;
    int inj = 0;
    const uint64_t allowed = injected_write_limit(off, s.job.len - s.done, s.direct, f_.align, &inj);
    if (allowed == 0) {
      complete_now(c, -inj);
      return;
    }
    if (broken_) {
      complete_now(c, -broken_);
      return;
    }
    struct io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) {
      // The ring has as many entries as the Writer keeps in flight, so this
      // only happens with SQEs queued but not yet submitted: submit them.
      flush_sq();
      sqe = io_uring_get_sqe(&ring_);
      if (!sqe) {
        complete_now(c, -EBUSY);
        return;
      }
    }
    const int fd = files_registered_ ? (s.direct ? 1 : 0) : (s.direct ? f_.fd_direct : f_.fd_buffered);
    uint8_t* src = s.job.src + s.done;
    const unsigned len = static_cast<unsigned>(allowed);
    if (buffers_registered_) {
      io_uring_prep_write_fixed(sqe, fd, src, len, off, 0);
      st_.fixed_buffer_ops.fetch_add(1, std::memory_order_relaxed);
    } else {
      io_uring_prep_write(sqe, fd, src, len, off);
    }
    if (files_registered_) sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, c);
    ++kernel_inflight_;
    ++unsubmitted_;
  }

  void flush_sq() {
    if (unsubmitted_ == 0 || broken_) return;
    int rc;
    if (faults().uring_enter_eio) {
      rc = -EIO;  // test fault: io_uring_enter fails before the kernel takes the queued writes
    } else {
      do {
        rc = io_uring_submit(&ring_);
      } while (rc == -EINTR);
    }
    st_.submits.fetch_add(1, std::memory_order_relaxed);
    if (rc >= 0) {
      unsubmitted_ -= std::min<uint32_t>(unsubmitted_, static_cast<uint32_t>(rc));
      return;
    }
    // EAGAIN/EBUSY: the kernel is short of resources or the CQ is full; the
    // SQEs stay queued and go with the next submit_and_wait.
    if (rc == -EAGAIN || rc == -EBUSY) return;
    fail_ring(-rc, "io_uring_submit");
  }

  // The ring itself failed. SQEs the kernel never took will never complete;
  // the ones it took are waited for (their staging memory must not be reused
  // before), then every job still unfinished fails with the ring's error, and
  // nothing is submitted again.
  void fail_ring(int e, const char* what) {
    broken_ = e;
    broken_what_ = what;
    const unsigned queued = std::min<unsigned>(io_uring_sq_ready(&ring_), kernel_inflight_);
    kernel_inflight_ -= queued;
    unsubmitted_ = 0;
    std::vector<std::pair<uint32_t, int>> results;
    while (kernel_inflight_ > 0) {
      struct io_uring_cqe* c = nullptr;
      const int w = io_uring_wait_cqe(&ring_, &c);
      if (w == -EINTR) continue;
      if (w != 0 || !c) break;  // the kernel returns nothing more: the ring stays as is
      results.emplace_back(static_cast<uint32_t>(io_uring_cqe_get_data64(c)), c->res);
      io_uring_cqe_seen(&ring_, c);
      --kernel_inflight_;
    }
    for (auto& r : results) complete_now(r.first, r.second);
    for (uint32_t c = 0; c < states_.size(); ++c)
      if (states_[c].job.len && !states_[c].finished) complete_now(c, -e);
    kernel_inflight_ = 0;
  }

  void complete_now(uint32_t c, int res) {
    std::vector<WriteDone> out;
    complete(c, res, out);
    for (auto& d : out) synthetic_.push_back(std::move(d));
  }

  void finish(uint32_t c, int err, std::vector<WriteDone>& out) {
    State& s = states_[c];
    WriteDone d;
    d.chunk = c;
    d.offset = s.job.offset;
    d.err = err;
    d.done = s.done;
    if (err) {
      std::string hint;
      if (err == ENOSPC) hint = "the file system is full";
      else if (err == EDQUOT) hint = "disk quota exceeded";
      else if (err == EFBIG) hint = "file size limit (ulimit -f / RLIMIT_FSIZE) or file system maximum reached";
      else if (err == EINVAL && s.direct) hint = "O_DIRECT needs " + std::to_string(f_.align) + "-byte alignment";
      if (broken_) hint += std::string(hint.empty() ? "" : "; ") + broken_what_ + " failed";
      if (s.done) hint += std::string(hint.empty() ? "" : "; ") + std::to_string(s.done) + " bytes were written first";
      d.message = io_message("write", f_.path, s.job.offset, s.job.len, err, hint);
    } else {
      st_.ops.fetch_add(1, std::memory_order_relaxed);
      (s.direct ? st_.ops_direct : st_.ops_buffered).fetch_add(1, std::memory_order_relaxed);
    }
    s.finished = true;
    out.push_back(std::move(d));
  }

  void complete(uint32_t c, int res, std::vector<WriteDone>& out) {
    State& s = states_[c];
    if (s.finished) return;
    if (res < 0) {
      const int e = -res;
      if (!broken_ && (e == EINTR || e == EAGAIN)) {
        st_.retries.fetch_add(1, std::memory_order_relaxed);
        queue(c);
        return;
      }
      if (!broken_ && e == EINVAL && s.direct) {
        if (f_.disable_direct("O_DIRECT write refused (EINVAL); writing buffered"))
          st_.direct_fallbacks.fetch_add(1, std::memory_order_relaxed);
        s.direct = false;
        queue(c);
        return;
      }
      finish(c, e, out);
      return;
    }
    if (res == 0) {
      // write(2) of a non-empty range never returns 0 on a regular file; retrying would spin.
      finish(c, EIO, out);
      return;
    }
    s.done += static_cast<uint64_t>(res);
    (s.direct ? st_.bytes_direct : st_.bytes_buffered).fetch_add(static_cast<uint64_t>(res), std::memory_order_relaxed);
    if (s.done < s.job.len) {
      st_.retries.fetch_add(1, std::memory_order_relaxed);
      if (s.direct && (s.job.offset + s.done) % f_.align != 0) s.direct = false;
      queue(c);
      return;
    }
    finish(c, 0, out);
  }

  WriteFile& f_;
  WriterStats& st_;
  struct io_uring ring_;
  uint32_t entries_ = 0;
  bool files_registered_ = false, buffers_registered_ = false;
  std::vector<State> states_;
  std::deque<WriteDone> synthetic_;
  uint32_t kernel_inflight_ = 0, unsubmitted_ = 0;
  int broken_ = 0;
  const char* broken_what_ = "";
};

}  // namespace

std::unique_ptr<WriteEngine> make_uring_write_engine(WriteFile& f, WriterStats& st, uint32_t queue_depth,
                                                     uint8_t* staging, uint64_t staging_bytes) {
  return std::make_unique<UringWriteEngine>(f, st, queue_depth, staging, staging_bytes);
}

#endif  // LLMIO_HAVE_URING

}  // namespace detail
}  // namespace llmio
