// Typed errors of the native core. The bindings map each one to a Python
// exception once (csrc/bindings/errors_bindings.cpp); nothing here knows Python.
// Check macros that throw them: common/check.hpp (errno), common/cuda_check.hpp.
//
//   IoError          -> OSError subclass chosen by errno (FileNotFoundError,
//                       PermissionError, ...), filename set
//   ShortReadError   -> llmio_native.ShortReadError (an OSError, errno ENODATA)
//   ResourceError    -> llmio_native.ResourceError (an OSError; errno EAGAIN when
//                       the OS refused a thread, ENOMEM for memory)
//   UnsupportedError -> llmio_native.UnsupportedError
//   CudaError        -> llmio_native._core.CudaError (a RuntimeError); thrown by
//                       LLMIO_CUDA_CHECK (common/cuda_check.hpp)
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace llmio {

// An OS-level failure on a file. what() is the full context message:
// "read shard.bin @ 4096 (+1048576): Input/output error (hint)".
class IoError : public std::runtime_error {
 public:
  IoError(int err, std::string path, const std::string& message)
      : std::runtime_error(message), err_(err), path_(std::move(path)) {}
  int err() const noexcept { return err_; }
  const std::string& path() const noexcept { return path_; }

 private:
  int err_;
  std::string path_;
};

// The file ended before the requested range did (a truncated file, or a
// request past EOF).
class ShortReadError : public IoError {
 public:
  using IoError::IoError;
};

// The OS refused a resource the core needed (a thread: EAGAIN under
// RLIMIT_NPROC or a pids limit). path is empty; what() names what was being
// started and how many.
class ResourceError : public IoError {
 public:
  using IoError::IoError;
};

// A feature that was explicitly requested is not available here.
class UnsupportedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A failed CUDA runtime call or kernel launch. code() is the cudaError_t value.
// Header-only, so the CUDA module needs no other file of common/.
class CudaError : public std::runtime_error {
 public:
  CudaError(int code, const std::string& message) : std::runtime_error(message), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

// An error raised in a background thread, re-raised in the consumer with
// where it happened. `kind` keeps the original type for the mapping.
enum class ErrorKind { kIo, kShortRead, kResource, kInvalid, kUnsupported, kOther };

struct CapturedError {
  ErrorKind kind = ErrorKind::kOther;
  int err = 0;
  std::string path;
  std::string message;
  bool set = false;

  static CapturedError from_current(const std::string& where);
  [[noreturn]] void rethrow() const;
};

namespace detail {
// "read <path> @ <offset> (+<nbytes>): <strerror>[ (<hint>)]"
std::string io_message(const char* op, const std::string& path, uint64_t offset,
                       uint64_t nbytes, int err, const std::string& hint = {});
[[noreturn]] void throw_io(const char* op, const std::string& path, uint64_t offset,
                           uint64_t nbytes, int err, const std::string& hint = {});
}  // namespace detail

}  // namespace llmio
