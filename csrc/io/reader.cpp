#include "io/reader.hpp"

#include <unistd.h>

#include <stdexcept>

#include "common/errors.hpp"

namespace llmio {

Reader::Reader(const std::vector<std::string>& paths, const std::string& backend, bool direct,
               EngineOptions opt)
    : direct_(direct), owner_pid_(static_cast<int>(::getpid())) {
  if (backend != "io_uring" && backend != "threads")
    throw std::invalid_argument("backend must be 'io_uring' or 'threads', got '" + backend + "'");
  if (opt.max_io_bytes == 0) throw std::invalid_argument("max_io_bytes must be > 0");
  if (backend == "io_uring") {
    // Probe before opening files so the error says why io_uring is unusable.
    UringProbe p = probe_io_uring();
    if (!p.usable) throw UnsupportedError("io_uring backend unavailable: " + p.reason);
  }
  files_ = std::make_shared<FileSet>(paths, direct);
  engine_ = backend == "io_uring" ? make_uring_engine(files_, opt) : make_thread_engine(files_, opt);
}

Reader::~Reader() {
  if (static_cast<int>(::getpid()) != owner_pid_) (void)engine_.release();
}

}  // namespace llmio
