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
#pragma once

#include <cstdint>
#include <memory>

#include "ring/host_buffer.hpp"

namespace llmio {

// Idle arenas kept at most (bytes, sum of their sizes).
constexpr uint64_t kStagingPoolMaxIdleBytes = 256ull << 20;
// A pooled arena serves a request of n bytes when its size is in [n, 4n].
constexpr uint64_t kStagingPoolMaxOversize = 4;

struct StagingPoolStats {
  uint64_t idle_bytes = 0;
  uint64_t idle_count = 0;
  uint64_t hits = 0;     // arenas handed out from the pool
  uint64_t misses = 0;   // arenas mapped while the pool was active
  uint64_t scopes = 0;   // scopes open now
};

namespace staging_pool {

// An arena of at least nbytes (MADV_DONTFORK): an idle pooled one when the
// pool is active and has one that fits, else a new mapping. IoError (ENOMEM).
std::unique_ptr<HostBuffer> take(uint64_t nbytes);
// Hands an arena back: kept when the pool is active and it belongs to this
// process, else unmapped. Never throws.
void give(std::unique_ptr<HostBuffer> buf) noexcept;
void scope_enter();
// Unmaps every idle arena when the last scope exits. A scope_exit without a
// matching scope_enter (in a forked child) is ignored.
void scope_exit() noexcept;
StagingPoolStats stats();

}  // namespace staging_pool
}  // namespace llmio
