// Starting native threads without ever aborting the process.
//
// std::thread's constructor throws std::system_error (EAGAIN) when the OS
// refuses a thread: RLIMIT_NPROC (ulimit -u), a container's pids limit,
// kernel.threads-max, or address space for the stack. Left alone that error
// escapes a constructor whose std::thread members are joinable, and the
// destructor of a joinable std::thread calls std::terminate. start_threads()
// turns it into a ResourceError naming what was started and how many, and
// stops and joins the threads already started (through `stop`) first, so the
// caller is left with nothing half-built.
#pragma once

#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "common/errors.hpp"

namespace llmio {
namespace detail {

// Starts `count` threads running body(k) into `threads`. On failure calls
// stop() (which must make every started thread return), joins them, clears
// `threads` and throws ResourceError.
template <class Body, class Stop>
void start_threads(std::vector<std::thread>& threads, uint32_t count, const char* what, Body body,
                   Stop stop) {
  threads.reserve(threads.size() + count);
  for (uint32_t k = 0; k < count; ++k) {
    try {
      threads.emplace_back([body, k] { body(k); });
    } catch (const std::system_error& e) {
      const int err = e.code().value() ? e.code().value() : EAGAIN;
      stop();
      for (auto& t : threads)
        if (t.joinable()) t.join();
      threads.clear();
      throw ResourceError(err, "",
                          std::string("start ") + what + ": thread " + std::to_string(k + 1) + " of " +
                              std::to_string(count) + " refused by the OS: " + std::strerror(err) +
                              " (thread limit: ulimit -u / RLIMIT_NPROC, a container pids limit, "
                              "kernel.threads-max; or ask for fewer threads)");
    }
  }
}

}  // namespace detail
}  // namespace llmio
