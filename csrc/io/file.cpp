#include "io/file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/stat.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "io/errors.hpp"

#ifndef STATX_DIOALIGN
#define STATX_DIOALIGN 0x00002000U
#endif

namespace llmio {

namespace detail {
namespace {
std::mutex g_faults_mu;
Faults g_faults;
std::string g_faults_spec;
bool g_faults_loaded = false;

void parse_faults(const std::string& spec, Faults& out) {
  Faults f;
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    if (item == "direct_open_einval") f.direct_open_einval = true;
    else if (item == "direct_read_einval") f.direct_read_einval = true;
    else if (item == "uring_eperm") f.uring_eperm = true;
    else if (item == "uring_enosys") f.uring_enosys = true;
    else if (item == "uring_submit_eio") f.uring_submit_eio = true;
    else if (item == "uring_enter_eio") f.uring_enter_eio = true;
    else if (item.rfind("eio:", 0) == 0) f.eio_substring = item.substr(4);
    else throw std::invalid_argument("unknown fault '" + item + "' in LLMIO_FAULTS");
  }
  out = f;
}
}  // namespace

const Faults& faults() {
  std::lock_guard<std::mutex> g(g_faults_mu);
  if (!g_faults_loaded) {
    g_faults_loaded = true;
    const char* env = std::getenv("LLMIO_FAULTS");
    if (env) {
      try {
        parse_faults(env, g_faults);
        g_faults_spec = env;
      } catch (const std::exception&) {
        // An unknown fault in the environment is ignored here; _set_faults raises.
      }
    }
  }
  return g_faults;
}

void set_faults(const std::string& spec) {
  Faults f;
  parse_faults(spec, f);
  std::lock_guard<std::mutex> g(g_faults_mu);
  g_faults = f;
  g_faults_spec = spec;
  g_faults_loaded = true;
}

std::string faults_spec() {
  faults();
  std::lock_guard<std::mutex> g(g_faults_mu);
  return g_faults_spec;
}

}  // namespace detail

FileHandle::~FileHandle() {
  if (fd_direct >= 0) ::close(fd_direct);
  if (fd_buffered >= 0) ::close(fd_buffered);
}

namespace {

// O_DIRECT alignment: statx(STATX_DIOALIGN) where the kernel reports it, never
// below 4096 (a multiple of every logical block size in use, and the page size
// our host buffers are aligned to anyway).
uint32_t direct_alignment(int fd) {
  uint32_t a = 4096;
#ifdef SYS_statx
  struct statx sx;
  std::memset(&sx, 0, sizeof(sx));
  if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
      (sx.stx_mask & STATX_DIOALIGN)) {
    if (sx.stx_dio_offset_align > a) a = sx.stx_dio_offset_align;
    if (sx.stx_dio_mem_align > a) a = sx.stx_dio_mem_align;
  }
#endif
  return a;
}

}  // namespace

FileSet::FileSet(const std::vector<std::string>& paths, bool direct) {
  files_.reserve(paths.size());
  const auto& flt = detail::faults();
  for (const auto& p : paths) {
    auto f = std::make_unique<FileHandle>();
    f->path = p;
    f->fd_buffered = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (f->fd_buffered < 0) {
      int e = errno;
      throw IoError(e, p, "open " + p + ": " + std::strerror(e));
    }
    struct stat st;
    if (::fstat(f->fd_buffered, &st) != 0) {
      int e = errno;
      throw IoError(e, p, "stat " + p + ": " + std::strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
      throw IoError(EISDIR, p, "open " + p + ": " + std::strerror(EISDIR));
    }
    f->size = static_cast<uint64_t>(st.st_size);
    if (direct) {
      int fd = -1;
      int e = EINVAL;
      if (!flt.direct_open_einval) {
        fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
        e = errno;
      }
      if (fd >= 0) {
        f->fd_direct = fd;
        f->align = direct_alignment(fd);
        f->direct_ok.store(true);
      } else {
        f->direct_reason = std::string("O_DIRECT open refused: ") + std::strerror(e);
        fallbacks_.push_back(p + ": " + f->direct_reason);
      }
    } else {
      f->direct_reason = "direct=False";
    }
    files_.push_back(std::move(f));
  }
}

FileHandle& FileSet::at(size_t i) {
  if (i >= files_.size())
    throw std::out_of_range("file index " + std::to_string(i) + " out of range for " +
                            std::to_string(files_.size()) + " files");
  return *files_[i];
}

const FileHandle& FileSet::at(size_t i) const {
  return const_cast<FileSet*>(this)->at(i);
}

bool FileSet::disable_direct(size_t i, const std::string& reason) {
  FileHandle& f = at(i);
  bool expected = true;
  if (!f.direct_ok.compare_exchange_strong(expected, false)) return false;
  std::lock_guard<std::mutex> g(mu_);
  f.direct_reason = reason;
  fallbacks_.push_back(f.path + ": " + reason);
  return true;
}

std::vector<std::string> FileSet::fallbacks() const {
  std::lock_guard<std::mutex> g(mu_);
  return fallbacks_;
}

}  // namespace llmio
