// A process-wide pool of Writer staging arenas, so that a save writing many
// files pays the arena's mapping, page faults and (for io_uring) the pinning
// of its pages once rather than once per file.
//
// The pool is active only while a scope is open (scope_enter/scope_exit, a
// count: nested and concurrent saves share it). While it is active, a Writer
// takes an idle arena of at least the size it needs (and at most 4x that
// size) instead of mapping a new one, and gives it back when it is closed or
// aborted with nothing in flight. Idle arenas are bounded by
// kStagingPoolMaxIdleBytes (the least recently used ones are unmapped first);
// when the last scope exits every idle arena is unmapped, so an idle process
// holds no pooled memory.
//
// Fork: arenas are MADV_DONTFORK (not mapped in a child). The pool records the
// pid it belongs to; in a forked child it forgets the parent's arenas (their
// HostBuffer destructors do not unmap there) and its scopes, and starts empty.
// A pthread_atfork handler keeps the pool's mutex usable in the child.
//
// Attachments. A Writer may give its arena back with something attached: its
// io_uring ring, quiescent, with the arena registered as its fixed buffer and
// its file slots cleared. The next Writer that takes the arena takes the ring
// too, and skips the ring's setup and the buffer's registration (pinning every
// page of the arena). At most kStagingPoolMaxIdleAttachments idle arenas keep
// theirs (each holds a descriptor); past that the least recently used
// attachment is destroyed, its arena kept. An attachment is destroyed before
// its arena is unmapped; in a forked child the parent's are destroyed when
// the child forgets the parent's arenas (a destructor must only release what
// is the child's own copy there: its descriptor, its mappings).
#pragma once

#include <cstdint>
#include <memory>

#include "ring/host_buffer.hpp"

namespace llmio {

// Idle arenas kept at most (bytes, sum of their sizes).
constexpr uint64_t kStagingPoolMaxIdleBytes = 256ull << 20;
// A pooled arena serves a request of n bytes when its size is in [n, 4n].
constexpr uint64_t kStagingPoolMaxOversize = 4;
// Idle arenas that keep an attachment (an io_uring ring: a descriptor each).
constexpr uint64_t kStagingPoolMaxIdleAttachments = 8;

// What a Writer leaves attached to an arena it gives back (see above).
class ArenaAttachment {
 public:
  virtual ~ArenaAttachment() = default;
};

// An arena and what was attached to it. Members are destroyed in reverse
// order: the attachment before the arena.
struct PooledArena {
  std::unique_ptr<HostBuffer> buf;
  std::unique_ptr<ArenaAttachment> attachment;
};

struct StagingPoolStats {
  uint64_t idle_bytes = 0;
  uint64_t idle_count = 0;
  uint64_t hits = 0;     // arenas handed out from the pool
  uint64_t misses = 0;   // arenas mapped while the pool was active
  uint64_t scopes = 0;   // scopes open now
  uint64_t idle_attachments = 0;  // idle arenas with an attachment
  uint64_t attachment_hits = 0;   // arenas handed out with their attachment
};

namespace staging_pool {

// An arena of at least nbytes (MADV_DONTFORK): an idle pooled one when the
// pool is active and has one that fits, else a new mapping. IoError (ENOMEM).
std::unique_ptr<HostBuffer> take(uint64_t nbytes);
// The same, with what was attached to the arena when it was given back (null
// for a new arena).
PooledArena take_arena(uint64_t nbytes);
// Hands an arena back (with an optional attachment): kept when the pool is
// active and it belongs to this process, else unmapped (the attachment
// destroyed first). Never throws.
void give(std::unique_ptr<HostBuffer> buf, std::unique_ptr<ArenaAttachment> attachment = nullptr) noexcept;
void scope_enter();
// Unmaps every idle arena when the last scope exits. A scope_exit without a
// matching scope_enter (in a forked child) is ignored.
void scope_exit() noexcept;
StagingPoolStats stats();

}  // namespace staging_pool
}  // namespace llmio
