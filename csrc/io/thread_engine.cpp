// The pread thread pool. The anchors (KvikIO, DeepSpeed aio, fastsafetensors)
// reach drive bandwidth this way with ~16 threads and multi-MiB requests, so it
// is a first-class engine. The calling thread works on its own batch too: a
// one-op batch (a random 4 KiB read) never pays a hand-off to a worker.
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

#include "io/engine.hpp"
#include "common/errors.hpp"
#include "io/op_exec.hpp"
#include "io/threads.hpp"

namespace llmio {
namespace {

struct Batch {
  std::vector<IoOp> ops;
  std::atomic<size_t> next{0};
  std::atomic<size_t> remaining{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::condition_variable cv;
  CapturedError err;  // first error, guarded by mu
};

class ThreadEngine final : public Engine {
 public:
  ThreadEngine(std::shared_ptr<FileSet> files, EngineOptions opt)
      : Engine(std::move(files), opt) {
    if (opt_.num_threads == 0) opt_.num_threads = 1;
    bounce_bytes_ = detail::bounce_bytes(*files_, opt_.max_io_bytes);
    align_ = detail::max_alignment(*files_);
    // Each worker's bounce buffer is allocated here, not in the thread: an
    // allocation failure then raises in the caller instead of escaping a
    // thread function (std::terminate).
    worker_bounce_.reserve(opt_.num_threads);
    for (uint32_t t = 0; t < opt_.num_threads; ++t) worker_bounce_.emplace_back(bounce_bytes_, align_);
    detail::start_threads(
        workers_, opt_.num_threads, "thread engine workers", [this](uint32_t k) { worker(k); },
        [this] {
          std::lock_guard<std::mutex> g(mu_);
          stop_ = true;
          cv_.notify_all();
        });
  }

  ~ThreadEngine() override {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  const char* name() const override { return "threads"; }

  std::vector<std::pair<std::string, int64_t>> features() const override {
    return {{"num_threads", opt_.num_threads}};
  }

  void read_batch(const ReadRequest* reqs, size_t n) override {
    auto t0 = std::chrono::steady_clock::now();
    auto b = std::make_shared<Batch>();
    detail::plan_requests(*files_, reqs, n, opt_.max_io_bytes, b->ops);
    stats_.batches.fetch_add(1, std::memory_order_relaxed);
    stats_.requests.fetch_add(n, std::memory_order_relaxed);
    for (size_t i = 0; i < n; ++i) stats_.bytes.fetch_add(reqs[i].nbytes, std::memory_order_relaxed);
    b->remaining.store(b->ops.size());
    if (!b->ops.empty()) {
      if (b->ops.size() > 1) {
        {
          std::lock_guard<std::mutex> g(mu_);
          queue_.push_back(b);
        }
        if (b->ops.size() - 1 >= workers_.size()) cv_.notify_all();
        else for (size_t i = 0; i + 1 < b->ops.size(); ++i) cv_.notify_one();
      }
      // The caller helps with its own batch.
      detail::AlignedBuffer bounce = take_bounce();
      for (;;) {
        size_t i = b->next.fetch_add(1);
        if (i >= b->ops.size()) break;
        execute(*b, i, bounce.data());
      }
      give_bounce(std::move(bounce));
      std::unique_lock<std::mutex> lk(b->mu);
      b->cv.wait(lk, [&] { return b->remaining.load() == 0; });
    }
    if (b->ops.size() > 1) {
      std::lock_guard<std::mutex> g(mu_);
      for (auto it = queue_.begin(); it != queue_.end(); ++it) {
        if (it->get() == b.get()) {
          queue_.erase(it);
          break;
        }
      }
    }
    stats_.wait_ns.fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count(),
        std::memory_order_relaxed);
    if (b->failed.load()) {
      std::lock_guard<std::mutex> g(b->mu);
      b->err.rethrow();
    }
  }

 private:
  void execute(Batch& b, size_t i, uint8_t* bounce) {
    if (!b.failed.load(std::memory_order_relaxed)) {
      try {
        detail::run_op_sync(*files_, stats_, b.ops[i], bounce);
      } catch (...) {
        CapturedError e = CapturedError::from_current("");
        std::lock_guard<std::mutex> g(b.mu);
        if (!b.failed.load()) {
          b.err = std::move(e);
          b.failed.store(true);
        }
      }
    }
    if (b.remaining.fetch_sub(1) == 1) {
      std::lock_guard<std::mutex> g(b.mu);
      b.cv.notify_all();
    }
  }

  void worker(uint32_t k) {
    detail::AlignedBuffer& bounce = worker_bounce_[k];
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      std::shared_ptr<Batch> b = queue_.front();
      size_t i = b->next.fetch_add(1);
      if (i >= b->ops.size()) {
        if (!queue_.empty() && queue_.front() == b) queue_.pop_front();
        continue;
      }
      lk.unlock();
      execute(*b, i, bounce.data());
      lk.lock();
    }
  }

  detail::AlignedBuffer take_bounce() {
    {
      std::lock_guard<std::mutex> g(bounce_mu_);
      if (!bounce_pool_.empty()) {
        detail::AlignedBuffer b = std::move(bounce_pool_.back());
        bounce_pool_.pop_back();
        return b;
      }
    }
    return detail::AlignedBuffer(bounce_bytes_, align_);
  }

  void give_bounce(detail::AlignedBuffer b) {
    std::lock_guard<std::mutex> g(bounce_mu_);
    if (bounce_pool_.size() < 8) bounce_pool_.push_back(std::move(b));
  }

  uint64_t bounce_bytes_ = 0, align_ = 4096;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::deque<std::shared_ptr<Batch>> queue_;
  std::vector<std::thread> workers_;
  std::vector<detail::AlignedBuffer> worker_bounce_;  // one per worker, fixed size
  std::mutex bounce_mu_;
  std::vector<detail::AlignedBuffer> bounce_pool_;
};

}  // namespace

std::unique_ptr<Engine> make_thread_engine(std::shared_ptr<FileSet> files, EngineOptions opt) {
  return std::make_unique<ThreadEngine>(std::move(files), opt);
}

}  // namespace llmio
