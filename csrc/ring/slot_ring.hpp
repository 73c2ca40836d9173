// SlotRing: N fixed-size host slots in one aligned arena, filled by producer
// threads from a Reader and handed to one consumer in submission order.
//
//   consumer                       producers (C++ threads)
//   submit(tag, requests) -> seq   take the oldest job and a free slot,
//                                  read every request into the slot
//   get() -> slot of job seq       (in seq order, whatever finished first)
//   release(slot[, fence])         the slot is free again (once the fence completed)
//
// Slot states (the whole lifecycle lives here):
//
//   free --producer takes it--> filling --read done--> ready (done_, by seq)
//     ^                                                  | get() delivers it in order
//     |                                                  v
//     +--- fence complete ---- releasing <--release(f)-- held by the consumer
//     +------------------------------------release()----+
//
// A fence is the consumer's proof that nothing still reads the slot (a CUDA
// event recorded after the host-to-device copy out of it). Fences are called
// only from the consumer's own calls (submit, get, release, poll, close), never
// from producer threads and never with the ring's mutex held (the bindings'
// fence takes the GIL). A fence whose query() or synchronize() throws leaves its
// slot releasing (the ring is unchanged) and the exception reaches the caller;
// a later call asks that fence again.
//
// Slot layout of a job ("aligned"): request k starts at an offset congruent to
// its file offset modulo the file's O_DIRECT alignment, with its neighbours
// rounded to that alignment, so each request is a single direct read with no
// bounce copy:
//
//   | pad | req0 bytes | pad || pad | req1 bytes | pad || ...
//   ^ A-aligned               ^ A-aligned
//
// "packed" puts requests back to back instead (the engine bounces the ragged
// blocks). Offsets of each request are returned with the slot.
//
// Back-pressure: producers wait for a free slot; the job queue itself is not
// bounded (the caller decides how far ahead it submits). Shutdown: close()
// stops the producers after their current read and joins them. A producer's
// error is re-raised by get() when the consumer reaches that job; producers
// stop taking new jobs after an error. get() never waits forever: it raises
// when nothing was submitted or when every slot is held by the consumer; when
// the consumer holds none but some wait only on fences, it synchronizes the
// oldest fence and continues. close() synchronizes every pending fence before
// its slot is freed.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "common/errors.hpp"
#include "io/reader.hpp"
#include "ring/host_buffer.hpp"

namespace llmio {

struct RingRequest {
  uint32_t file = 0;
  uint64_t offset = 0;
  uint64_t nbytes = 0;
};

struct FilledSlot {
  uint32_t slot = 0;
  uint64_t seq = 0;
  int64_t tag = 0;
  std::vector<uint64_t> offsets;  // where each request's bytes start in the slot
  std::vector<uint64_t> nbytes;
  uint64_t used = 0;              // bytes of the slot the layout spans
};

// A completion the consumer attaches to a released slot. query(): done, without
// waiting; synchronize(): wait until done. Either may throw.
class Fence {
 public:
  virtual ~Fence() = default;
  virtual bool query() = 0;
  virtual void synchronize() = 0;
};

struct RingStats {
  uint64_t submitted = 0, delivered = 0;
  uint64_t released = 0;           // slots given back and free again
  uint64_t releasing = 0;          // slots now waiting on a fence (a gauge)
  uint64_t fence_waits = 0;        // get() synchronized a fence to make progress
  uint64_t bytes = 0;
  uint64_t producer_busy_ns = 0;   // time producers spent reading
  uint64_t consumer_wait_ns = 0;   // time get() waited for a filled slot
  uint64_t consumer_waits = 0;     // get() calls that had to wait
};

class SlotRing {
 public:
  SlotRing(std::shared_ptr<Reader> reader, uint32_t num_slots, uint64_t slot_bytes,
           uint32_t num_producers);
  ~SlotRing();
  SlotRing(const SlotRing&) = delete;
  SlotRing& operator=(const SlotRing&) = delete;

  // Bytes a job needs in a slot. std::out_of_range for a bad file index.
  uint64_t required_bytes(const std::vector<RingRequest>& reqs, bool packed) const;

  // Queues a job; returns its sequence number. std::invalid_argument when the
  // job does not fit a slot; std::runtime_error after close().
  uint64_t submit(int64_t tag, const std::vector<RingRequest>& reqs, bool packed);

  // Next job in order, waiting up to timeout_ms (nullopt on timeout). Re-raises
  // a producer error; std::logic_error when waiting could never end.
  std::optional<FilledSlot> get(int64_t timeout_ms);

  // Gives a slot back: free now, or releasing until `fence` completes (it is
  // queried at once). std::invalid_argument if the consumer does not hold it.
  // The slot leaves the consumer's hands even when the fence's query() throws.
  void release(uint32_t slot, std::shared_ptr<Fence> fence = nullptr);

  // Frees the releasing slots whose fences completed; returns how many.
  uint32_t poll();

  // Stops and joins the producers, then synchronizes every pending fence and
  // frees its slot (oldest first). Jobs not yet delivered are dropped. If a
  // fence throws, its slot and the later ones stay releasing and a second
  // close() asks them again; otherwise idempotent.
  void close();
  bool closed() const;

  uint8_t* slot_ptr(uint32_t slot) const { return arena_->data() + uint64_t(slot) * slot_bytes_; }
  uint8_t* arena() const { return arena_->data(); }
  uint64_t arena_bytes() const { return uint64_t(num_slots_) * slot_bytes_; }
  uint32_t num_slots() const { return num_slots_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  bool huge_pages() const { return arena_->huge_pages(); }
  uint64_t pending() const;  // submitted, not yet delivered
  uint32_t held() const;     // slots the consumer holds
  uint32_t releasing() const;  // slots released behind a fence not yet complete
  RingStats stats() const;

 private:
  struct Job {
    uint64_t seq;
    int64_t tag;
    std::vector<RingRequest> reqs;
    std::vector<uint64_t> offsets;
    uint64_t used;
  };
  struct Done {
    uint32_t slot;
    Job job;
    CapturedError err;
  };

  struct Releasing {
    uint64_t id;
    uint32_t slot;
    std::shared_ptr<Fence> fence;
  };

  void layout(const std::vector<RingRequest>& reqs, bool packed, std::vector<uint64_t>& offsets,
              uint64_t& used) const;
  void producer();
  // Fences are called with mu_ unlocked; entries are found again by id, so a
  // fence that throws leaves the list as it was.
  bool free_releasing(uint64_t id);  // takes mu_; false if no longer releasing
  bool sync_oldest_fence();          // synchronize the oldest entry, free its slot; false if none

  std::shared_ptr<Reader> reader_;
  uint32_t num_slots_;
  uint64_t slot_bytes_;
  std::unique_ptr<HostBuffer> arena_;

  // The process that created the ring. In a forked child (a DataLoader worker
  // that inherited it) the producer threads do not exist and the mutex or the
  // condition variables may be copied mid-use: there every call but close()
  // raises, and the destructor leaves threads and synchronisation objects to
  // the process exit instead of joining or destroying them (either would hang).
  // The arena is MADV_DONTFORK (see HostBuffer): the child has no pages there
  // at all, so it costs a worker nothing, and the child must not touch it (the
  // bindings refuse slot views there; HostBuffer's destructor skips munmap).
  // The engine's registrations of the arena belong to the parent and are not
  // undone.
  int owner_pid_;
  void check_owner(const char* what) const;

 public:
  // True in a process forked after the ring was made.
  bool foreign() const;

 private:
  struct Sync {
    std::mutex mu;
    std::condition_variable cv_work, cv_done;
  };
  std::unique_ptr<Sync> sync_;
  std::mutex& mu_;
  std::condition_variable& cv_work_;  // producers: job + free slot, or stop
  std::condition_variable& cv_done_;  // consumer: next job done
  std::deque<Job> queue_;
  std::vector<uint32_t> free_;
  std::vector<uint8_t> held_;        // 1 while the consumer holds the slot
  std::deque<Releasing> releasing_;  // released behind a fence, oldest first
  uint64_t next_release_id_ = 0;
  bool joined_ = false;              // close() stopped and joined the producers
  std::map<uint64_t, Done> done_;
  uint64_t next_seq_ = 0, next_deliver_ = 0;
  uint32_t busy_ = 0;                // producers in a read
  bool stop_ = false, failed_ = false;
  CapturedError fail_err_;
  RingStats stats_;
  std::vector<std::thread> threads_;
  std::vector<int> regions_;         // engine registrations of the arena
};

}  // namespace llmio
