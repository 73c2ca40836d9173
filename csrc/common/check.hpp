// Check macros for OS calls: every call that reports failure through errno is
// either checked with one of these (the message then ends with the source
// file and line) or carries a comment saying why its result is ignored.
//
//   LLMIO_CHECK_ERRNO(expr, what)             expr returns -1/errno on failure
//   LLMIO_CHECK_ERRNO_PATH(expr, path, what)  the same, naming a file (filename set)
//   LLMIO_CHECK_NEG_ERRNO(expr, what)         expr returns -errno (liburing style)
//   LLMIO_THROW_ERRNO(err, path, what)        throw for an errno already saved,
//                                             after cleaning up
//
// All throw llmio::IoError (an OSError in Python, subclass chosen by errno)
// with the message "<what>: <strerror> [<file>:<line>]". `what` is any
// expression convertible to std::string and is evaluated only on failure.
// Nothing here includes Python or CUDA headers; CUDA calls use
// LLMIO_CUDA_CHECK from common/cuda_check.hpp.
#pragma once

#include <cerrno>
#include <string>

#include "common/errors.hpp"

namespace llmio {
namespace detail {

// "<what>: <strerror(err)> [<file>:<line>]"
std::string errno_message(int err, const std::string& what, const char* file, int line);
[[noreturn]] void throw_errno(int err, const std::string& path, const std::string& what, const char* file,
                              int line);

}  // namespace detail
}  // namespace llmio

#define LLMIO_THROW_ERRNO(err, path, what) ::llmio::detail::throw_errno((err), (path), (what), __FILE__, __LINE__)

#define LLMIO_CHECK_ERRNO_PATH(expr, path, what)                                        \
  do {                                                                                  \
    if ((expr) == -1) {                                                                 \
      const int llmio_err_ = errno;                                                     \
      ::llmio::detail::throw_errno(llmio_err_, (path), (what), __FILE__, __LINE__);     \
    }                                                                                   \
  } while (0)

#define LLMIO_CHECK_ERRNO(expr, what) LLMIO_CHECK_ERRNO_PATH(expr, std::string(), what)

#define LLMIO_CHECK_NEG_ERRNO(expr, what)                                               \
  do {                                                                                  \
    const auto llmio_rc_ = (expr);                                                      \
    if (llmio_rc_ < 0)                                                                  \
      ::llmio::detail::throw_errno(static_cast<int>(-llmio_rc_), std::string(), (what), \
                                   __FILE__, __LINE__);                                 \
  } while (0)
