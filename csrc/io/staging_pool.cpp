// Writer staging arena pool (see staging_pool.hpp).
#include "io/staging_pool.hpp"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <iterator>
#include <list>
#include <mutex>

namespace llmio {
namespace staging_pool {
namespace {

struct Pool {
  std::mutex mu;
  std::list<PooledArena> idle;  // front: most recently returned
  uint64_t idle_bytes = 0;
  uint64_t hits = 0, misses = 0, scopes = 0, attachment_hits = 0;
  pid_t pid = ::getpid();
};

Pool& pool() {
  static Pool* p = [] {
    auto* q = new Pool();  // never destroyed: Writers may be released during interpreter exit
    // The mutex is held across fork by the forking thread only (prepare), so the
    // child can take it; the child then forgets the parent's arenas.
    (void)::pthread_atfork([] { pool().mu.lock(); }, [] { pool().mu.unlock(); },
                           [] { pool().mu.unlock(); });
    return q;
  }();
  return *p;
}

// Caller holds the mutex. In a forked child: forget the parent's arenas (not
// mapped here; their destructors do not unmap) and scopes.
void adopt_locked(Pool& p) {
  const pid_t me = ::getpid();
  if (p.pid == me) return;
  p.idle.clear();  // attachments destroyed first (their child-side copies), arenas not unmapped here
  p.idle_bytes = 0;
  p.scopes = 0;
  p.hits = p.misses = p.attachment_hits = 0;
  p.pid = me;
}

// Evicted entries go to `drop` (destroyed by the caller outside the lock).
void trim_locked(Pool& p, uint64_t max_bytes, std::list<PooledArena>& drop) {
  while (p.idle_bytes > max_bytes && !p.idle.empty()) {
    p.idle_bytes -= p.idle.back().buf->size();
    drop.splice(drop.end(), p.idle, std::prev(p.idle.end()));  // least recently used
  }
  uint64_t attached = 0;
  for (auto& a : p.idle) {
    if (!a.attachment) continue;
    if (++attached > kStagingPoolMaxIdleAttachments) {
      drop.emplace_back();
      drop.back().attachment = std::move(a.attachment);  // the arena stays pooled
    }
  }
}

}  // namespace

PooledArena take_arena(uint64_t nbytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> g(p.mu);
    adopt_locked(p);
    if (p.scopes > 0) {
      // The smallest arena that fits; among equal sizes one with an attachment.
      auto best = p.idle.end();
      for (auto it = p.idle.begin(); it != p.idle.end(); ++it) {
        const uint64_t s = it->buf->size();
        if (s < nbytes || s / kStagingPoolMaxOversize > nbytes) continue;
        if (best == p.idle.end() || s < best->buf->size() ||
            (s == best->buf->size() && it->attachment && !best->attachment))
          best = it;
      }
      if (best != p.idle.end()) {
        PooledArena a = std::move(*best);
        p.idle.erase(best);
        p.idle_bytes -= a.buf->size();
        ++p.hits;
        if (a.attachment) ++p.attachment_hits;
        return a;
      }
      ++p.misses;
    }
  }
  PooledArena a;
  a.buf = std::make_unique<HostBuffer>(nbytes, /*dont_fork=*/true);
  return a;
}

std::unique_ptr<HostBuffer> take(uint64_t nbytes) {
  return take_arena(nbytes).buf;  // an attachment, if any, destroyed here
}

void give(std::unique_ptr<HostBuffer> buf, std::unique_ptr<ArenaAttachment> attachment) noexcept {
  if (!buf) return;
  Pool& p = pool();
  std::list<PooledArena> drop;  // destroyed outside the lock, each attachment before its arena
  {
    std::lock_guard<std::mutex> g(p.mu);
    adopt_locked(p);
    PooledArena a{std::move(buf), std::move(attachment)};
    if (p.scopes == 0 || a.buf->unmapped_here() || a.buf->size() > kStagingPoolMaxIdleBytes) {
      drop.push_back(std::move(a));
    } else {
      p.idle_bytes += a.buf->size();
      p.idle.push_front(std::move(a));
      trim_locked(p, kStagingPoolMaxIdleBytes, drop);
    }
  }
}

void scope_enter() {
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  adopt_locked(p);
  ++p.scopes;
}

void scope_exit() noexcept {
  Pool& p = pool();
  std::list<PooledArena> drop;
  {
    std::lock_guard<std::mutex> g(p.mu);
    adopt_locked(p);
    if (p.scopes == 0) return;
    if (--p.scopes == 0) {
      drop.swap(p.idle);
      p.idle_bytes = 0;
    }
  }
}

StagingPoolStats stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  adopt_locked(p);
  StagingPoolStats s;
  s.idle_bytes = p.idle_bytes;
  s.idle_count = p.idle.size();
  s.hits = p.hits;
  s.misses = p.misses;
  s.scopes = p.scopes;
  s.attachment_hits = p.attachment_hits;
  for (auto& a : p.idle) s.idle_attachments += a.attachment ? 1 : 0;
  return s;
}

}  // namespace staging_pool
}  // namespace llmio
