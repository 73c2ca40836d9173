#include "ring/slot_ring.hpp"

#include <unistd.h>

#include <chrono>
#include <stdexcept>
#include <string>

#include "io/file.hpp"
#include "io/threads.hpp"

namespace llmio {

using detail::align_up;

SlotRing::SlotRing(std::shared_ptr<Reader> reader, uint32_t num_slots, uint64_t slot_bytes,
                   uint32_t num_producers)
    : reader_(std::move(reader)),
      num_slots_(num_slots),
      owner_pid_(static_cast<int>(::getpid())),
      sync_(std::make_unique<Sync>()),
      mu_(sync_->mu),
      cv_work_(sync_->cv_work),
      cv_done_(sync_->cv_done) {
  if (!reader_) throw std::invalid_argument("SlotRing needs a reader");
  if (num_slots == 0) throw std::invalid_argument("num_slots must be >= 1");
  if (slot_bytes == 0) throw std::invalid_argument("slot_bytes must be >= 1");
  if (num_producers == 0) throw std::invalid_argument("num_producers must be >= 1");
  if (slot_bytes > (1ull << 48) || uint64_t(num_slots) * align_up(slot_bytes, 4096) > (1ull << 48))
    throw std::invalid_argument("ring of num_slots=" + std::to_string(num_slots) + " x slot_bytes=" +
                                std::to_string(slot_bytes) + " is larger than the address space");
  slot_bytes_ = align_up(slot_bytes, 4096);  // every slot starts page-aligned
  // MADV_DONTFORK: the arena is page-locked for DMA (cudaHostRegister, io_uring
  // fixed buffers); a forked child must not share its pages copy-on-write.
  arena_ = std::make_unique<HostBuffer>(uint64_t(num_slots_) * slot_bytes_, /*dont_fork=*/true);
  held_.assign(num_slots_, 0);
  for (uint32_t s = num_slots_; s-- > 0;) free_.push_back(s);
  // Register the arena as fixed buffers (1 GiB pieces) where the engine can.
  const uint64_t total = uint64_t(num_slots_) * slot_bytes_;
  for (uint64_t off = 0; off < total; off += (1ull << 30)) {
    int id = reader_->register_region(arena_->data() + off, std::min<uint64_t>(1ull << 30, total - off));
    if (id >= 0) regions_.push_back(id);
  }
  try {
    detail::start_threads(
        threads_, num_producers, "ring producers", [this](uint32_t) { producer(); },
        [this] {
          std::lock_guard<std::mutex> g(mu_);
          stop_ = true;
          cv_work_.notify_all();
        });
  } catch (...) {
    // start_threads joined the producers it started: no read targets the arena.
    for (int id : regions_) reader_->unregister_region(id);
    regions_.clear();
    throw;
  }
}

SlotRing::~SlotRing() {
  if (foreign()) {  // see owner_pid_: leak what a forked child cannot tear down
    (void)sync_.release();
    (void)new std::vector<std::thread>(std::move(threads_));
    regions_.clear();
    // A fence (a CUDA event) must not be touched in the child either.
    (void)new std::deque<Releasing>(std::move(releasing_));
    return;
  }
  try {
    close();
  } catch (...) {
    // A fence that throws: its slot stays releasing and goes with the arena.
  }
}

bool SlotRing::foreign() const { return static_cast<int>(::getpid()) != owner_pid_; }

void SlotRing::check_owner(const char* what) const {
  if (foreign())
    throw std::runtime_error(std::string("ring ") + what + ": this ring was created in process " +
                             std::to_string(owner_pid_) + " and this is a forked child (pid " +
                             std::to_string(::getpid()) + "); its producer threads do not exist here. "
                             "Create a new ring (or loader iterator) after the fork");
}

void SlotRing::layout(const std::vector<RingRequest>& reqs, bool packed,
                      std::vector<uint64_t>& offsets, uint64_t& used) const {
  offsets.clear();
  uint64_t cur = 0;
  for (const auto& r : reqs) {
    if (packed) {
      offsets.push_back(cur);
      cur += r.nbytes;
      continue;
    }
    const uint64_t A = reader_->alignment(r.file);
    const uint64_t pos = align_up(cur, A) + r.offset % A;
    offsets.push_back(pos);
    cur = align_up(pos + r.nbytes, A);
  }
  used = cur;
}

uint64_t SlotRing::required_bytes(const std::vector<RingRequest>& reqs, bool packed) const {
  std::vector<uint64_t> off;
  uint64_t used = 0;
  layout(reqs, packed, off, used);
  return used;
}

uint64_t SlotRing::submit(int64_t tag, const std::vector<RingRequest>& reqs, bool packed) {
  check_owner("submit()");
  poll();
  Job j;
  j.tag = tag;
  j.reqs = reqs;
  layout(j.reqs, packed, j.offsets, j.used);
  if (j.used > slot_bytes_)
    throw std::invalid_argument("job (tag " + std::to_string(tag) + ") needs " + std::to_string(j.used) +
                                " bytes but a slot holds " + std::to_string(slot_bytes_));
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) throw std::runtime_error("submit on a closed ring");
    j.seq = next_seq_++;
    for (const auto& r : j.reqs) stats_.bytes += r.nbytes;
    queue_.push_back(std::move(j));
    stats_.submitted++;
  }
  cv_work_.notify_one();
  return next_seq_ - 1;
}

void SlotRing::producer() {
  std::unique_lock<std::mutex> lk(mu_);
  std::vector<ReadRequest> rr;
  for (;;) {
    cv_work_.wait(lk, [&] { return stop_ || (!failed_ && !queue_.empty() && !free_.empty()); });
    if (stop_) return;
    Job job = std::move(queue_.front());
    queue_.pop_front();
    const uint32_t slot = free_.back();
    free_.pop_back();
    ++busy_;
    lk.unlock();

    auto t0 = std::chrono::steady_clock::now();
    CapturedError err;
    // Everything between taking the job and handing it back runs inside the try:
    // an exception escaping a thread function would call std::terminate.
    try {
      uint8_t* base = slot_ptr(slot);
      rr.clear();
      for (size_t k = 0; k < job.reqs.size(); ++k) {
        ReadRequest q;
        q.file = job.reqs[k].file;
        q.offset = job.reqs[k].offset;
        q.nbytes = job.reqs[k].nbytes;
        q.dst = base + job.offsets[k];
        // Slack up to the neighbouring alignment boundaries (aligned layout).
        const uint64_t A = reader_->alignment(q.file);
        const uint64_t lo = job.offsets[k] - job.offsets[k] % A;
        const uint64_t hi = std::min<uint64_t>(align_up(job.offsets[k] + q.nbytes, A), slot_bytes_);
        const uint64_t prev_end = k ? job.offsets[k - 1] + job.reqs[k - 1].nbytes : 0;
        const uint64_t next_start = k + 1 < job.reqs.size() ? job.offsets[k + 1] : slot_bytes_;
        // Never scribble over a neighbour's bytes (packed layout shares blocks).
        const uint64_t lo_ok = std::max(lo, prev_end);
        const uint64_t hi_ok = std::min(hi, next_start);
        q.slack_before = static_cast<uint32_t>(job.offsets[k] - std::min(lo_ok, job.offsets[k]));
        q.slack_after = static_cast<uint32_t>(hi_ok > job.offsets[k] + q.nbytes ? hi_ok - job.offsets[k] - q.nbytes : 0);
        rr.push_back(q);
      }
      reader_->read_batch(rr.data(), rr.size());
    } catch (...) {
      err = CapturedError::from_current("ring producer, job " + std::to_string(job.seq) + " (tag " +
                                        std::to_string(job.tag) + ")");
    }
    const uint64_t dt = std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::steady_clock::now() - t0).count();
    lk.lock();
    --busy_;
    stats_.producer_busy_ns += dt;
    if (err.set) failed_ = true;
    const uint64_t seq = job.seq;
    done_.emplace(seq, Done{slot, std::move(job), std::move(err)});
    cv_done_.notify_all();
  }
}

std::optional<FilledSlot> SlotRing::get(int64_t timeout_ms) {
  check_owner("get()");
  poll();
  std::unique_lock<std::mutex> lk(mu_);
  if (fail_err_.set) fail_err_.rethrow();
  auto ready = [&] { return done_.count(next_deliver_) > 0 || stop_; };
  if (!ready()) {
    if (next_deliver_ == next_seq_)
      throw std::logic_error("ring get(): no job submitted that has not been delivered");
    for (;;) {
      // Every slot held or releasing and nothing in flight: no producer can
      // move until a slot is free.
      uint32_t nheld = 0;
      for (auto h : held_) nheld += h;
      if (busy_ != 0 || nheld + releasing_.size() < num_slots_) break;
      // Everything held by the consumer: waiting cannot end.
      if (releasing_.empty())
        throw std::logic_error("ring get(): all " + std::to_string(num_slots_) +
                               " slots are held by the consumer; release one first");
      // Some wait only on fences: wait for the oldest and go on.
      stats_.fence_waits++;
      lk.unlock();
      sync_oldest_fence();
      lk.lock();
    }
    auto t0 = std::chrono::steady_clock::now();
    bool ok = cv_done_.wait_for(lk, std::chrono::milliseconds(timeout_ms), ready);
    stats_.consumer_wait_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now() - t0).count();
    stats_.consumer_waits++;
    if (!ok) return std::nullopt;
  }
  if (stop_ && !done_.count(next_deliver_)) throw std::runtime_error("ring is closed");
  auto it = done_.find(next_deliver_);
  Done d = std::move(it->second);
  done_.erase(it);
  if (d.err.set) {
    fail_err_ = d.err;
    free_.push_back(d.slot);
    cv_work_.notify_all();
    d.err.rethrow();
  }
  ++next_deliver_;
  held_[d.slot] = 1;
  stats_.delivered++;
  FilledSlot f;
  f.slot = d.slot;
  f.seq = d.job.seq;
  f.tag = d.job.tag;
  f.offsets = std::move(d.job.offsets);
  f.used = d.job.used;
  for (const auto& r : d.job.reqs) f.nbytes.push_back(r.nbytes);
  return f;
}

void SlotRing::release(uint32_t slot, std::shared_ptr<Fence> fence) {
  check_owner("release()");
  const bool fenced = fence != nullptr;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (slot >= num_slots_ || !held_[slot])
      throw std::invalid_argument("release(" + std::to_string(slot) + "): slot is not held by the consumer");
    held_[slot] = 0;
    if (fenced) {
      releasing_.push_back(Releasing{next_release_id_++, slot, std::move(fence)});
    } else {
      free_.push_back(slot);
      stats_.released++;
    }
  }
  if (fenced)
    poll();  // frees it now if the fence already completed
  else
    cv_work_.notify_one();
}

bool SlotRing::free_releasing(uint64_t id) {
  std::shared_ptr<Fence> drop;  // destroyed after the lock: a fence may need the GIL to die
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = releasing_.begin();
    while (it != releasing_.end() && it->id != id) ++it;
    if (it == releasing_.end()) return false;  // another consumer call freed it
    drop = std::move(it->fence);
    free_.push_back(it->slot);
    releasing_.erase(it);
    stats_.released++;
  }
  cv_work_.notify_one();
  return true;
}

bool SlotRing::sync_oldest_fence() {
  uint64_t id;
  std::shared_ptr<Fence> f;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (releasing_.empty()) return false;
    id = releasing_.front().id;
    f = releasing_.front().fence;
  }
  f->synchronize();  // may throw: the entry stays as it was
  free_releasing(id);
  return true;
}

uint32_t SlotRing::poll() {
  check_owner("poll()");
  std::vector<std::pair<uint64_t, std::shared_ptr<Fence>>> snap;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (releasing_.empty()) return 0;
    snap.reserve(releasing_.size());
    for (const auto& r : releasing_) snap.emplace_back(r.id, r.fence);
  }
  uint32_t n = 0;
  for (auto& [id, f] : snap)
    if (f->query() && free_releasing(id)) ++n;  // a throw leaves the rest releasing
  return n;
}

void SlotRing::close() {
  if (foreign()) return;  // nothing of ours runs in a forked child; the destructor leaks the rest
  bool join = false;
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
    join = !joined_;
    joined_ = true;
  }
  if (join) {
    cv_work_.notify_all();
    cv_done_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    // No producer runs now, so no read targets the arena: unregister it.
    for (int id : regions_) reader_->unregister_region(id);
    regions_.clear();
    std::lock_guard<std::mutex> g(mu_);
    threads_.clear();
    queue_.clear();
    done_.clear();
  }
  // Slots still read behind a fence (a copy to the GPU): wait before the arena
  // can go. A fence that throws stops here; a second close() goes on from it.
  while (sync_oldest_fence()) {
  }
}

bool SlotRing::closed() const {
  if (foreign()) return true;
  std::lock_guard<std::mutex> g(mu_);
  return stop_;
}

uint64_t SlotRing::pending() const {
  check_owner("pending()");
  std::lock_guard<std::mutex> g(mu_);
  return next_seq_ - next_deliver_;
}

uint32_t SlotRing::held() const {
  check_owner("held()");
  std::lock_guard<std::mutex> g(mu_);
  uint32_t n = 0;
  for (auto h : held_) n += h;
  return n;
}

uint32_t SlotRing::releasing() const {
  check_owner("releasing()");
  std::lock_guard<std::mutex> g(mu_);
  return static_cast<uint32_t>(releasing_.size());
}

RingStats SlotRing::stats() const {
  check_owner("stats()");
  std::lock_guard<std::mutex> g(mu_);
  RingStats s = stats_;
  s.releasing = releasing_.size();
  return s;
}

}  // namespace llmio
