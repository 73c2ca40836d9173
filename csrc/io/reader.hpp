// Reader: a fixed list of files and the engine that reads them. The public
// face of csrc/io; the bindings wrap it as llmio_native._core.Reader.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "io/engine.hpp"

namespace llmio {

class Reader {
 public:
  // backend: "io_uring" or "threads" (the Python layer resolves "auto").
  // Raises IoError for a file that cannot be opened, UnsupportedError when
  // io_uring is asked for and unusable, std::invalid_argument for a bad name.
  Reader(const std::vector<std::string>& paths, const std::string& backend, bool direct,
         EngineOptions opt);
  // In a forked child (a DataLoader worker inherits the parent's Reader) the
  // engine's worker threads do not exist: joining them, or destroying the
  // condition variable they were waiting on, would block forever. There the
  // engine is left to the process exit instead of being destroyed.
  ~Reader();
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;

  // See Engine::read_batch. Blocks; safe from several threads.
  void read_batch(const ReadRequest* reqs, size_t n) { engine_->read_batch(reqs, n); }

  const char* backend() const { return engine_->name(); }
  int register_region(uint8_t* ptr, uint64_t nbytes) { return engine_->register_region(ptr, nbytes); }
  void unregister_region(int id) { engine_->unregister_region(id); }
  size_t num_files() const { return files_->size(); }
  uint64_t file_size(size_t i) const { return files_->at(i).size; }
  uint32_t alignment(size_t i) const { return files_->at(i).align; }
  bool direct_active(size_t i) const { return files_->at(i).direct_ok.load(); }
  const std::string& path(size_t i) const { return files_->at(i).path; }
  bool direct_requested() const { return direct_; }
  std::vector<std::string> fallbacks() const { return files_->fallbacks(); }
  EngineStats& stats() { return engine_->stats(); }
  const EngineOptions& options() const { return engine_->options(); }
  std::vector<std::pair<std::string, int64_t>> features() const { return engine_->features(); }

 private:
  std::shared_ptr<FileSet> files_;
  std::unique_ptr<Engine> engine_;
  bool direct_;
  int owner_pid_;  // process that created the engine
};

}  // namespace llmio
