// Writer staging arena pool (see staging_pool.hpp).
#include "io/staging_pool.hpp"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <list>
#include <mutex>

namespace llmio {
namespace staging_pool {
namespace {

struct Pool {
  std::mutex mu;
  std::list<std::unique_ptr<HostBuffer>> idle;  // front: most recently returned
  uint64_t idle_bytes = 0;
  uint64_t hits = 0, misses = 0, scopes = 0;
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
  p.idle.clear();
  p.idle_bytes = 0;
  p.scopes = 0;
  p.hits = p.misses = 0;
  p.pid = me;
}

void trim_locked(Pool& p, uint64_t max_bytes) {
  while (p.idle_bytes > max_bytes && !p.idle.empty()) {
    p.idle_bytes -= p.idle.back()->size();
    p.idle.pop_back();  // least recently used
  }
}

}  // namespace

std::unique_ptr<HostBuffer> take(uint64_t nbytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> g(p.mu);
    adopt_locked(p);
    if (p.scopes > 0) {
      auto best = p.idle.end();
      for (auto it = p.idle.begin(); it != p.idle.end(); ++it) {
        const uint64_t s = (*it)->size();
        if (s >= nbytes && s / kStagingPoolMaxOversize <= nbytes && (best == p.idle.end() || s < (*best)->size()))
          best = it;
      }
      if (best != p.idle.end()) {
        std::unique_ptr<HostBuffer> b = std::move(*best);
        p.idle.erase(best);
        p.idle_bytes -= b->size();
        ++p.hits;
        return b;
      }
      ++p.misses;
    }
  }
  return std::make_unique<HostBuffer>(nbytes, /*dont_fork=*/true);
}

void give(std::unique_ptr<HostBuffer> buf) noexcept {
  if (!buf) return;
  Pool& p = pool();
  std::unique_ptr<HostBuffer> drop;  // unmapped outside the lock
  {
    std::lock_guard<std::mutex> g(p.mu);
    adopt_locked(p);
    if (p.scopes == 0 || buf->unmapped_here() || buf->size() > kStagingPoolMaxIdleBytes) {
      drop = std::move(buf);
    } else {
      p.idle_bytes += buf->size();
      p.idle.push_front(std::move(buf));
      trim_locked(p, kStagingPoolMaxIdleBytes);
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
  std::list<std::unique_ptr<HostBuffer>> drop;
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
  return s;
}

}  // namespace staging_pool
}  // namespace llmio
