// The io_uring engine: O_DIRECT reads with registered files and registered
// (fixed) bounce buffers, up to queue_depth operations in flight per ring, one
// submit per refill. A small pool of rings serves concurrent callers.
//
// io_uring is often unusable (seccomp in Docker/containerd denies it with EPERM,
// kernel.io_uring_disabled, gVisor): probe_io_uring() finds out once and the
// Python layer picks the thread engine instead, unless io_uring was forced.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>

#include "io/engine.hpp"
#include "common/errors.hpp"
#include "io/op_exec.hpp"

#ifdef LLMIO_HAVE_URING
#include <liburing.h>
#endif

namespace llmio {

namespace {
std::mutex g_probe_mu;
bool g_probe_done = false;
UringProbe g_probe;

std::string sysctl_reason(int err) {
  std::ifstream in("/proc/sys/kernel/io_uring_disabled");
  int v = -1;
  if (in >> v) {
    if (v == 2) return "disabled by sysctl kernel.io_uring_disabled=2";
    if (v == 1 && err == EPERM)
      return "restricted by sysctl kernel.io_uring_disabled=1 to members of kernel.io_uring_group";
  }
  if (err == EPERM)
    return "io_uring_setup denied (EPERM): a seccomp policy (Docker/containerd default profile) "
           "or a security module forbids io_uring";
  if (err == ENOSYS) return "kernel has no io_uring (ENOSYS): too old, or a sandbox such as gVisor";
  if (err == ENOMEM) return "io_uring_setup failed with ENOMEM (RLIMIT_MEMLOCK too small for the ring)";
  return std::string("io_uring_setup failed: ") + std::strerror(err);
}
}  // namespace

void reset_io_uring_probe() {
  std::lock_guard<std::mutex> g(g_probe_mu);
  g_probe_done = false;
}

UringProbe probe_io_uring() {
  std::lock_guard<std::mutex> g(g_probe_mu);
  if (g_probe_done) return g_probe;
  UringProbe p;
#ifndef LLMIO_HAVE_URING
  p.compiled = false;
  p.usable = false;
  p.err = ENOSYS;
  p.reason = "built without liburing (install liburing-dev and rebuild)";
#else
  p.compiled = true;
  const auto& flt = detail::faults();
  int err = 0;
  if (flt.uring_eperm) err = EPERM;
  else if (flt.uring_enosys) err = ENOSYS;
  if (err) {
    p.err = err;
    p.reason = sysctl_reason(err) + " [injected by LLMIO_FAULTS]";
  } else {
    struct io_uring ring;
    int r = io_uring_queue_init(4, &ring, 0);
    if (r < 0) {
      p.err = -r;
      p.reason = sysctl_reason(-r);
    } else {
      struct io_uring_probe* pr = io_uring_get_probe_ring(&ring);
      if (!pr) {
        p.err = ENOSYS;
        p.reason = "io_uring has no opcode probe (kernel older than 5.6)";
      } else {
        if (!io_uring_opcode_supported(pr, IORING_OP_READ)) {
          p.err = ENOSYS;
          p.reason = "io_uring lacks IORING_OP_READ (kernel older than 5.6)";
        } else {
          p.usable = true;
        }
        io_uring_free_probe(pr);
      }
      io_uring_queue_exit(&ring);
    }
  }
#endif
  g_probe = p;
  g_probe_done = true;
  return p;
}

#ifndef LLMIO_HAVE_URING

std::unique_ptr<Engine> make_uring_engine(std::shared_ptr<FileSet>, EngineOptions) {
  throw UnsupportedError("io_uring backend unavailable: " + probe_io_uring().reason);
}

#else

namespace {

constexpr size_t kMaxRegions = 16;

struct Region {
  uint8_t* ptr = nullptr;
  uint64_t len = 0;
};

struct Ring {
  struct io_uring ring;
  bool files_registered = false;
  bool buffers_registered = false;
  // Sparse buffer table: bounce buffers first, then kMaxRegions region slots
  // kept in sync with the engine's registered regions (by generation).
  bool sparse = false;
  uint64_t regions_gen = 0;
  Region regions[kMaxRegions];  // as registered in this ring's table
  int region_index(const uint8_t* p, uint64_t len) const {
    for (size_t k = 0; k < kMaxRegions; ++k)
      if (regions[k].ptr && p >= regions[k].ptr && p + len <= regions[k].ptr + regions[k].len)
        return static_cast<int>(bounce.size() + k);
    return -1;
  }
  // Bounce buffers: [0, nsmall) hold one small op each (ragged heads and
  // tails, small random reads), the rest one max_io op each. Small reads must
  // not queue behind a handful of MiB-sized buffers.
  std::vector<detail::AlignedBuffer> bounce;
  std::vector<int> free_small, free_large;
  uint64_t small_bytes = 0;
  std::vector<int>& free_for(uint64_t len) { return len <= small_bytes ? free_small : free_large; }
  void give_back(int idx) { (static_cast<size_t>(idx) < nsmall ? free_small : free_large).push_back(idx); }
  size_t nsmall = 0;
  // Set when a batch failed in a way that makes the ring unfit for reuse:
  // kDestroy - nothing of ours is in flight, but its queue may still hold reads
  //            the kernel never took (they would be submitted on the next use);
  // kLeak    - the kernel may still complete reads into its bounce buffers.
  enum Fate { kKeep, kDestroy, kLeak } fate = kKeep;
  ~Ring() { io_uring_queue_exit(&ring); }  // returns void
};

class UringEngine final : public Engine {
 public:
  UringEngine(std::shared_ptr<FileSet> files, EngineOptions opt) : Engine(std::move(files), opt) {
    UringProbe p = probe_io_uring();
    if (!p.usable) throw UnsupportedError("io_uring backend unavailable: " + p.reason);
    if (opt_.queue_depth == 0) opt_.queue_depth = 1;
    if (opt_.queue_depth > 4096) opt_.queue_depth = 4096;
    bounce_bytes_ = detail::bounce_bytes(*files_, opt_.max_io_bytes);
    align_ = detail::max_alignment(*files_);
    // Create the first ring now so setup errors surface at construction.
    free_.push_back(make_ring());
    created_ = 1;
  }

  const char* name() const override { return "io_uring"; }

  std::vector<std::pair<std::string, int64_t>> features() const override {
    return {{"queue_depth", opt_.queue_depth},
            {"registered_files", registered_files_.load()},
            {"registered_buffers", registered_buffers_.load()},
            {"registered_regions", registered_regions_.load()},
            {"rings", static_cast<int64_t>(created_)}};
  }

  int register_region(uint8_t* ptr, uint64_t nbytes) override {
    if (!ptr || nbytes == 0 || nbytes > (1ull << 30)) return -1;  // kernel limit: 1 GiB per buffer
    int id = -1;
    {
      std::lock_guard<std::mutex> g(regions_mu_);
      for (size_t k = 0; k < kMaxRegions; ++k) {
        if (!regions_[k].ptr) {
          regions_[k] = Region{ptr, nbytes};
          id = static_cast<int>(k);
          ++regions_gen_;
          break;
        }
      }
    }
    if (id < 0) return -1;
    sync_free_rings();
    return id;
  }

  void unregister_region(int id) override {
    if (id < 0 || static_cast<size_t>(id) >= kMaxRegions) return;
    {
      std::lock_guard<std::mutex> g(regions_mu_);
      regions_[id] = Region{};
      ++regions_gen_;
    }
    // Rings in use sync when they are released; free ones now, so the pages
    // of an arena about to be unmapped are unpinned promptly.
    sync_free_rings();
  }

  void read_batch(const ReadRequest* reqs, size_t n) override {
    auto t0 = std::chrono::steady_clock::now();
    std::vector<IoOp> ops;
    detail::plan_requests(*files_, reqs, n, opt_.max_io_bytes, ops);
    stats_.batches.fetch_add(1, std::memory_order_relaxed);
    stats_.requests.fetch_add(n, std::memory_order_relaxed);
    for (size_t i = 0; i < n; ++i) stats_.bytes.fetch_add(reqs[i].nbytes, std::memory_order_relaxed);
    if (!ops.empty()) {
      std::unique_ptr<Ring> ring = acquire();
      try {
        run(*ring, ops);
      } catch (...) {
        release(std::move(ring));
        throw;
      }
      release(std::move(ring));
    }
    stats_.wait_ns.fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count(),
        std::memory_order_relaxed);
  }

 private:
  // Brings a ring's region slots up to date with the engine's regions. A slot
  // the kernel refuses (RLIMIT_MEMLOCK) stays empty: reads into it are plain.
  void sync_regions(Ring& r) {
    if (!r.sparse) return;
    Region want[kMaxRegions];
    uint64_t gen;
    {
      std::lock_guard<std::mutex> g(regions_mu_);
      gen = regions_gen_;
      if (gen == r.regions_gen) return;
      for (size_t k = 0; k < kMaxRegions; ++k) want[k] = regions_[k];
    }
    for (size_t k = 0; k < kMaxRegions; ++k) {
      if (want[k].ptr == r.regions[k].ptr && want[k].len == r.regions[k].len) continue;
      struct iovec iov = {want[k].ptr, static_cast<size_t>(want[k].len)};
      int rc = io_uring_register_buffers_update_tag(&r.ring, r.bounce.size() + k, &iov, nullptr, 1);
      if (rc == 1) {
        r.regions[k] = want[k];
      } else {
        // Could not pin (or unpin by replacing): leave the slot unused. Best
        // effort, result ignored on purpose: a slot the kernel kept is never
        // used again (r.regions[k] is cleared), reads fall back to plain ones.
        struct iovec none = {nullptr, 0};
        (void)io_uring_register_buffers_update_tag(&r.ring, r.bounce.size() + k, &none, nullptr, 1);
        r.regions[k] = Region{};
      }
    }
    r.regions_gen = gen;
    int64_t live = 0;
    for (size_t k = 0; k < kMaxRegions; ++k) live += r.regions[k].ptr != nullptr;
    registered_regions_.store(live);
  }

  void sync_free_rings() {
    std::lock_guard<std::mutex> g(pool_mu_);
    for (auto& r : free_) sync_regions(*r);
  }

  std::unique_ptr<Ring> make_ring() {
    auto r = std::make_unique<Ring>();
    int rc = io_uring_queue_init(opt_.queue_depth, &r->ring, 0);
    if (rc < 0) {
      // Ring already destroyed by the failed init; avoid a double exit.
      r.release();
      const std::string what = std::string("io_uring_queue_init(") + std::to_string(opt_.queue_depth) +
                               ") failed: " + std::strerror(-rc);
      // Out of a resource (locked memory on kernels < 5.12, descriptors): an
      // OSError the caller can act on, not "unsupported".
      if (rc == -ENOMEM || rc == -EMFILE || rc == -ENFILE || rc == -EAGAIN)
        throw ResourceError(-rc, "", what + " (RLIMIT_MEMLOCK, RLIMIT_NOFILE; or a smaller queue_depth)");
      throw UnsupportedError(what);
    }
    // Registered files: slot 2i is the buffered fd of file i, 2i+1 the direct fd
    // (-1, a sparse slot, when there is none).
    std::vector<int> fds;
    fds.reserve(files_->size() * 2);
    for (size_t i = 0; i < files_->size(); ++i) {
      fds.push_back(files_->at(i).fd_buffered);
      fds.push_back(files_->at(i).fd_direct);
    }
    // Registration is an optimisation: failure (old kernel, limits) is not an error.
    if (!fds.empty() && io_uring_register_files(&r->ring, fds.data(), fds.size()) == 0) {
      r->files_registered = true;
      registered_files_.store(1);
    }
    // Bounce buffers, registered as fixed buffers when RLIMIT_MEMLOCK allows;
    // without registration they still work as plain buffers.
    // Memory per ring: queue_depth x 64 KiB small + 8 x max_io large.
    r->small_bytes = std::min<uint64_t>(bounce_bytes_, detail::align_up(kSmallBounce, align_));
    r->nsmall = std::min<uint32_t>(opt_.queue_depth, 256);
    const size_t nlarge = bounce_bytes_ > r->small_bytes ? 8 : 0;
    std::vector<struct iovec> iov;
    for (size_t i = 0; i < r->nsmall + nlarge; ++i) {
      const uint64_t sz = i < r->nsmall ? r->small_bytes : bounce_bytes_;
      r->bounce.emplace_back(sz, align_);
      iov.push_back({r->bounce.back().data(), static_cast<size_t>(sz)});
      r->give_back(static_cast<int>(i));
    }
    const bool sparse_table = io_uring_register_buffers_sparse(&r->ring, iov.size() + kMaxRegions) == 0;
    if (sparse_table && io_uring_register_buffers_update_tag(&r->ring, 0, iov.data(), nullptr, iov.size()) ==
                            static_cast<int>(iov.size())) {
      r->sparse = true;
      r->buffers_registered = true;
    } else {
      // A sparse table whose update failed is dropped before the plain
      // registration (which would otherwise fail with EBUSY). Result ignored on
      // purpose: should it fail, so does the registration below, and the ring
      // then runs with plain reads.
      if (sparse_table) (void)io_uring_unregister_buffers(&r->ring);
      r->sparse = false;
      r->buffers_registered = io_uring_register_buffers(&r->ring, iov.data(), iov.size()) == 0;
    }
    if (r->buffers_registered) registered_buffers_.store(1);
    sync_regions(*r);
    return r;
  }

  std::unique_ptr<Ring> acquire() {
    std::unique_lock<std::mutex> lk(pool_mu_);
    for (;;) {
      if (!free_.empty()) {
        auto r = std::move(free_.back());
        free_.pop_back();
        lk.unlock();
        sync_regions(*r);
        return r;
      }
      if (created_ < ring_limit_) {
        ++created_;
        lk.unlock();
        try {
          return make_ring();
        } catch (const ResourceError&) {
          lk.lock();
          --created_;
          if (created_ == 0) throw;
          // The OS refuses another ring (descriptors, locked memory): share the
          // rings that exist instead of failing this read.
          ring_limit_ = created_;
          continue;
        } catch (...) {
          lk.lock();
          --created_;
          throw;
        }
      }
      pool_cv_.wait(lk);
    }
  }

  void release(std::unique_ptr<Ring> r) {
    if (r->fate != Ring::kKeep) {
      // Never reused. Destroying is safe when the kernel owns nothing of it (reads
      // still queued in it are dropped with it); otherwise it is leaked, buffers and
      // all, since the kernel may still write into them. A fresh ring replaces it.
      if (r->fate == Ring::kLeak) (void)r.release();
      r.reset();
      {
        std::lock_guard<std::mutex> g(pool_mu_);
        --created_;
      }
      pool_cv_.notify_one();
      return;
    }
    sync_regions(*r);
    {
      std::lock_guard<std::mutex> g(pool_mu_);
      free_.push_back(std::move(r));
    }
    pool_cv_.notify_one();
  }

  struct OpState {
    uint64_t done = 0;
    int bounce = -1;
    bool direct = false;
  };

  // Drives all ops of one batch through the ring; returns when none is in
  // flight. Raises the first error after the ring has drained.
  void run(Ring& R, std::vector<IoOp>& ops) {
    std::vector<OpState> st(ops.size());
    std::deque<size_t> pending;
    for (size_t i = 0; i < ops.size(); ++i) pending.push_back(i);
    size_t inflight = 0, completed = 0;
    CapturedError err;
    // Returns the bounce buffer of every op: only once the kernel owns none of them.
    auto give_back_all = [&] {
      for (OpState& s : st) {
        if (s.bounce >= 0) {
          R.give_back(s.bounce);
          s.bounce = -1;
        }
      }
    };
    auto fail = [&](size_t i) {
      if (!err.set) err = CapturedError::from_current("");
      if (st[i].bounce >= 0) {
        R.give_back(st[i].bounce);
        st[i].bounce = -1;
      }
      ++completed;
    };

    while (completed < ops.size()) {
      // Refill: no new submissions once something failed, only draining.
      unsigned queued = 0;
      while (!err.set && !pending.empty() && inflight < opt_.queue_depth) {
        size_t i = pending.front();
        IoOp& op = ops[i];
        FileHandle& f = files_->at(op.file);
        if (st[i].done == 0) {
          if (op.direct && !f.direct_ok.load(std::memory_order_relaxed)) detail::demote_to_buffered(op);
          st[i].direct = op.direct;
          if (int e = detail::injected_read_error(f)) {
            pending.pop_front();
            try {
              detail::throw_io("read", f.path, op.offset, op.len, e);
            } catch (...) {
              fail(i);
            }
            continue;
          }
        }
        if (st[i].direct && st[i].done == 0 && detail::faults().direct_read_einval) {
          pending.pop_front();
          on_complete(R, ops, st, pending, i, -EINVAL, completed, fail);
          continue;
        }
        if (op.bounce && st[i].bounce < 0) {
          std::vector<int>& fl = R.free_for(op.len);
          if (fl.empty()) break;  // wait for a completion
          st[i].bounce = fl.back();
          fl.pop_back();
        }
        struct io_uring_sqe* sqe = io_uring_get_sqe(&R.ring);
        if (!sqe) break;
        pending.pop_front();
        const bool direct = st[i].direct;
        const int slot = static_cast<int>(op.file) * 2 + (direct ? 1 : 0);
        const int fd = R.files_registered ? slot : (direct ? f.fd_direct : f.fd_buffered);
        uint8_t* base = op.bounce ? R.bounce[st[i].bounce].data() : op.dst;
        const uint64_t d = st[i].done;
        const unsigned len = static_cast<unsigned>(op.len - d);
        const int region = op.bounce ? -1 : R.region_index(op.dst, op.len);
        if (op.bounce && R.buffers_registered) {
          io_uring_prep_read_fixed(sqe, fd, base + d, len, op.offset + d, st[i].bounce);
          stats_.fixed_buffer_ops.fetch_add(1, std::memory_order_relaxed);
        } else if (region >= 0) {
          io_uring_prep_read_fixed(sqe, fd, base + d, len, op.offset + d, region);
          stats_.fixed_buffer_ops.fetch_add(1, std::memory_order_relaxed);
        } else {
          io_uring_prep_read(sqe, fd, base + d, len, op.offset + d);
        }
        if (R.files_registered) sqe->flags |= IOSQE_FIXED_FILE;
        io_uring_sqe_set_data64(sqe, i);
        ++inflight;
        ++queued;
      }
      if (inflight == 0) {
        if (completed < ops.size() && !err.set && !pending.empty()) {
          // Nothing in flight and nothing could be queued: no bounce buffer is free on
          // this ring although no op of this batch holds one in flight. Waiting for one
          // would spin forever; fail the batch and retire the ring instead.
          give_back_all();
          R.fate = Ring::kDestroy;
          throw std::runtime_error("io_uring engine: no free bounce buffer on a ring with nothing in flight "
                                   "(buffers lost by an earlier failure); the ring is retired");
        }
        if (completed < ops.size() && err.set) {
          // Ops never submitted after a failure count as done. A partly read
          // op waiting to be resubmitted still holds its bounce buffer: give
          // it back, or the ring loses it for good (and once all are lost,
          // every later bounce read on this ring spins forever).
          for (size_t j : pending) {
            if (st[j].bounce >= 0) {
              R.give_back(st[j].bounce);
              st[j].bounce = -1;
            }
          }
          completed += pending.size();
          pending.clear();
          continue;
        }
        if (completed < ops.size() && pending.empty()) break;  // cannot happen
        continue;
      }
      int rc;
      if (detail::faults().uring_enter_eio) {
        rc = -EIO;  // as if io_uring_enter failed before taking the queued reads
      } else {
        do {
          rc = io_uring_submit_and_wait(&R.ring, 1);
        } while (rc == -EINTR);
      }
      if (rc >= 0 && detail::faults().uring_submit_eio) rc = -EIO;
      stats_.submits.fetch_add(1, std::memory_order_relaxed);
      if (rc < 0 && rc != -EAGAIN && rc != -EBUSY) {
        // The ring itself failed. Nothing may write into the caller's memory
        // after we return: reap whatever is still in flight, then raise.
        if (!err.set) {
          err.set = true;
          err.kind = ErrorKind::kIo;
          err.err = -rc;
          err.message = std::string("io_uring_submit_and_wait: ") + std::strerror(-rc);
        }
        // Reads still queued in the ring (not taken by the kernel) will never
        // complete: only the rest is waited for. Such a ring must not be used again
        // (its next submit would start them, into memory we are about to hand back).
        const unsigned queued_only = std::min<unsigned>(io_uring_sq_ready(&R.ring), inflight);
        size_t owned = inflight - queued_only;
        while (owned > 0) {
          struct io_uring_cqe* c = nullptr;
          const int wrc = io_uring_wait_cqe(&R.ring, &c);
          if (wrc == -EINTR) continue;
          if (wrc != 0 || !c) break;
          io_uring_cqe_seen(&R.ring, c);
          --owned;
        }
        // Every op is over (reaped, or never submitted): their bounce buffers go back
        // to the ring, or later bounce reads on it would wait for them forever. Should
        // the kernel not give back all completions, it may still write into the
        // buffers: the ring is leaked (never reused, never freed) instead.
        if (owned == 0) {
          give_back_all();
          if (queued_only > 0) R.fate = Ring::kDestroy;
        } else {
          R.fate = Ring::kLeak;
        }
        err.rethrow();
      }
      struct io_uring_cqe* cqe;
      unsigned head, seen = 0;
      io_uring_for_each_cqe(&R.ring, head, cqe) {
        ++seen;
        --inflight;
        const size_t i = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
        const int res = cqe->res;
        on_complete(R, ops, st, pending, i, res, completed, fail);
      }
      io_uring_cq_advance(&R.ring, seen);
    }
    if (err.set) err.rethrow();
  }

  template <class Fail>
  void on_complete(Ring& R, std::vector<IoOp>& ops, std::vector<OpState>& st,
                   std::deque<size_t>& pending, size_t i, int res, size_t& completed, Fail& fail) {
    IoOp& op = ops[i];
    FileHandle& f = files_->at(op.file);
    try {
      if (res < 0) {
        const int e = -res;
        if (e == EINTR || e == EAGAIN) {
          stats_.retries.fetch_add(1, std::memory_order_relaxed);
          pending.push_front(i);
          return;
        }
        if (e == EINVAL && st[i].direct) {
          if (files_->disable_direct(op.file, "O_DIRECT read refused (EINVAL); reading buffered"))
            stats_.direct_fallbacks.fetch_add(1, std::memory_order_relaxed);
          if (st[i].bounce >= 0) {
            R.give_back(st[i].bounce);
            st[i].bounce = -1;
          }
          detail::demote_to_buffered(op);
          st[i] = OpState{};
          pending.push_front(i);
          return;
        }
        std::string hint;
        if (e == EINVAL) hint = "O_DIRECT needs " + std::to_string(f.align) + "-byte alignment";
        detail::throw_io("read", f.path, op.offset, op.len, e, hint);
      }
      if (res == 0 && st[i].done < op.need) {
        throw ShortReadError(ENODATA, f.path,
                             detail::op_context(*files_, op) + ": unexpected end of file after " +
                                 std::to_string(st[i].done) + " of " + std::to_string(op.need) +
                                 " bytes (file truncated while open?)");
      }
      st[i].done += static_cast<uint64_t>(res);
      if (st[i].done < op.need) {
        stats_.retries.fetch_add(1, std::memory_order_relaxed);
        if (st[i].direct && st[i].done % f.align != 0) {
          throw ShortReadError(ENODATA, f.path,
                               detail::op_context(*files_, op) + ": unexpected end of file after " +
                                   std::to_string(st[i].done) + " bytes (file truncated while open?)");
        }
        pending.push_front(i);
        return;
      }
      if (st[i].direct) {
        stats_.ops_direct.fetch_add(1, std::memory_order_relaxed);
        stats_.bytes_direct.fetch_add(st[i].done, std::memory_order_relaxed);
      } else {
        stats_.ops_buffered.fetch_add(1, std::memory_order_relaxed);
        stats_.bytes_buffered.fetch_add(st[i].done, std::memory_order_relaxed);
      }
      if (op.bounce) {
        std::memcpy(op.copy_dst, R.bounce[st[i].bounce].data() + op.skip, op.copy_len);
        stats_.bounce_ops.fetch_add(1, std::memory_order_relaxed);
        stats_.bounce_bytes.fetch_add(op.copy_len, std::memory_order_relaxed);
        R.give_back(st[i].bounce);
        st[i].bounce = -1;
      }
      ++completed;
    } catch (...) {
      fail(i);
    }
  }

  static constexpr size_t kMaxRings = 8;
  static constexpr uint64_t kSmallBounce = 64 * 1024;
  uint64_t bounce_bytes_ = 0, align_ = 4096;
  std::mutex pool_mu_;
  std::condition_variable pool_cv_;
  std::vector<std::unique_ptr<Ring>> free_;
  size_t created_ = 0;
  size_t ring_limit_ = kMaxRings;  // lowered when the OS refuses a ring (guarded by pool_mu_)
  std::atomic<int64_t> registered_files_{0}, registered_buffers_{0}, registered_regions_{0};
  std::mutex regions_mu_;
  Region regions_[kMaxRegions];
  uint64_t regions_gen_ = 0;
};

}  // namespace

std::unique_ptr<Engine> make_uring_engine(std::shared_ptr<FileSet> files, EngineOptions opt) {
  return std::make_unique<UringEngine>(std::move(files), opt);
}

#endif  // LLMIO_HAVE_URING

}  // namespace llmio
