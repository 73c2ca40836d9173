#include "common/errors.hpp"
#include "common/check.hpp"

#include <cerrno>
#include <cstring>
#include <exception>

namespace llmio {
namespace detail {

std::string io_message(const char* op, const std::string& path, uint64_t offset,
                       uint64_t nbytes, int err, const std::string& hint) {
  std::string m = std::string(op) + " " + path + " @ " + std::to_string(offset) + " (+" +
                  std::to_string(nbytes) + "): " + std::strerror(err);
  if (!hint.empty()) m += " (" + hint + ")";
  return m;
}

void throw_io(const char* op, const std::string& path, uint64_t offset, uint64_t nbytes,
              int err, const std::string& hint) {
  throw IoError(err, path, io_message(op, path, offset, nbytes, err, hint));
}

std::string errno_message(int err, const std::string& what, const char* file, int line) {
  std::string f(file);
  const size_t k = f.rfind("csrc/");
  if (k != std::string::npos) f = f.substr(k);
  return what + ": " + std::strerror(err) + " [" + f + ":" + std::to_string(line) + "]";
}

void throw_errno(int err, const std::string& path, const std::string& what, const char* file, int line) {
  throw IoError(err, path, errno_message(err, what, file, line));
}

}  // namespace detail

CapturedError CapturedError::from_current(const std::string& where) {
  CapturedError c;
  c.set = true;
  const std::string prefix = where.empty() ? std::string() : where + ": ";
  try {
    throw;
  } catch (const ShortReadError& e) {
    c.kind = ErrorKind::kShortRead;
    c.err = e.err();
    c.path = e.path();
    c.message = prefix + e.what();
  } catch (const ResourceError& e) {
    c.kind = ErrorKind::kResource;
    c.err = e.err();
    c.path = e.path();
    c.message = prefix + e.what();
  } catch (const IoError& e) {
    c.kind = ErrorKind::kIo;
    c.err = e.err();
    c.path = e.path();
    c.message = prefix + e.what();
  } catch (const std::invalid_argument& e) {
    c.kind = ErrorKind::kInvalid;
    c.message = prefix + e.what();
  } catch (const UnsupportedError& e) {
    c.kind = ErrorKind::kUnsupported;
    c.message = prefix + e.what();
  } catch (const std::exception& e) {
    c.kind = ErrorKind::kOther;
    c.message = prefix + e.what();
  } catch (...) {
    c.kind = ErrorKind::kOther;
    c.message = prefix + "unknown error";
  }
  return c;
}

void CapturedError::rethrow() const {
  switch (kind) {
    case ErrorKind::kShortRead:
      throw ShortReadError(err, path, message);
    case ErrorKind::kResource:
      throw ResourceError(err, path, message);
    case ErrorKind::kIo:
      throw IoError(err, path, message);
    case ErrorKind::kInvalid:
      throw std::invalid_argument(message);
    case ErrorKind::kUnsupported:
      throw UnsupportedError(message);
    default:
      throw std::runtime_error(message);
  }
}

}  // namespace llmio
