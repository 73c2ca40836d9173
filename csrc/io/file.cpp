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

#include "common/check.hpp"
#include "common/errors.hpp"

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
    else if (item == "direct_write_einval") f.direct_write_einval = true;
    else if (item == "write_short") f.write_short = true;
    else if (item.rfind("write_enospc", 0) == 0 || item.rfind("write_eio", 0) == 0) {
      const bool nospc = item.rfind("write_enospc", 0) == 0;
      const std::string rest = item.substr(nospc ? 12 : 9);
      f.write_err = nospc ? ENOSPC : EIO;
      f.write_err_offset = 0;
      f.write_err_end = UINT64_MAX;
      if (!rest.empty()) {
        // ":OFFSET" (every write reaching OFFSET fails) or ":START-END" (only
        // writes overlapping [START, END) fail: a later chunk lands, as on a
        // real disk that frees space while an earlier write is failing).
        const std::string body = rest.size() > 1 ? rest.substr(1) : std::string();
        const size_t dash = body.find('-');
        auto number = [](const std::string& t) {
          return !t.empty() && t.find_first_not_of("0123456789") == std::string::npos;
        };
        const std::string a = body.substr(0, dash), b = dash == std::string::npos ? "" : body.substr(dash + 1);
        if (rest[0] != ':' || !number(a) || (dash != std::string::npos && (!number(b) || std::stoull(b) <= std::stoull(a))))
          throw std::invalid_argument("fault '" + item + "': expected " + (nospc ? "write_enospc" : "write_eio") +
                                      "[:OFFSET] or [:START-END] with decimal byte offsets, START < END");
        f.write_err_offset = std::stoull(a);
        if (dash != std::string::npos) f.write_err_end = std::stoull(b);
      }
    }
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
  // close(2) results ignored on purpose: read-only descriptors have no data to
  // lose, a destructor cannot report, and retrying close is wrong on Linux.
  if (fd_direct >= 0) (void)::close(fd_direct);
  if (fd_buffered >= 0) (void)::close(fd_buffered);
}

namespace detail {

// O_DIRECT alignment: statx(STATX_DIOALIGN) where the kernel reports it, never
// below 4096 (a multiple of every logical block size in use, and the page size
// our host buffers are aligned to anyway).
uint32_t direct_alignment(int fd) {
  uint32_t a = 4096;
#ifdef SYS_statx
  struct statx sx;
  std::memset(&sx, 0, sizeof(sx));
  // A failing statx (old kernel, seccomp) is not an error: the default stays.
  if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 &&
      (sx.stx_mask & STATX_DIOALIGN)) {
    if (sx.stx_dio_offset_align > a) a = sx.stx_dio_offset_align;
    if (sx.stx_dio_mem_align > a) a = sx.stx_dio_mem_align;
  }
#endif
  return a;
}

const char* file_type_name(unsigned m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO (named pipe)";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISLNK(m)) return "a symbolic link";
  return "not a regular file";
}

}  // namespace detail

namespace {

using detail::file_type_name;

// The path as an error message shows it: an embedded NUL as \0.
std::string printable_path(const std::string& p) {
  std::string out;
  for (char c : p) {
    if (c == '\0') out += "\\0";
    else out += c;
  }
  return out;
}

// Opens p read-only without ever blocking: O_NONBLOCK keeps open(2) of a FIFO
// from waiting for a writer (and a device from waiting for carrier), and
// fstat on the descriptor (not the path: no race with a rename) refuses
// anything but a regular file. O_NONBLOCK is then cleared again. A directory
// raises EISDIR (IsADirectoryError); other non-regular files EINVAL, naming
// the path and the file type.
int open_regular(const std::string& p, int extra_flags, struct stat& st) {
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | extra_flags);
  if (fd < 0) return -1;
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    (void)::close(fd);  // cleanup on the error path; the fstat error is what is reported
    LLMIO_THROW_ERRNO(e, p, "stat " + p);
  }
  if (!S_ISREG(st.st_mode)) {
    (void)::close(fd);  // cleanup on the error path
    const int e = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
    throw IoError(e, p, "open " + p + ": " + std::strerror(e) + " (" + file_type_name(st.st_mode) +
                            "; a Reader serves regular files only)");
  }
  // Ignored on purpose: O_NONBLOCK has no effect on reads of a regular file,
  // clearing it is hygiene only and must not fail an open that worked.
  int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0) (void)::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  return fd;
}

}  // namespace

FileSet::FileSet(const std::vector<std::string>& paths, bool direct) {
  files_.reserve(paths.size());
  const auto& flt = detail::faults();
  for (const auto& p : paths) {
    // open(2) would silently use the part before an embedded NUL.
    if (p.find('\0') != std::string::npos)
      throw std::invalid_argument("path '" + printable_path(p) + "' contains a NUL byte");
    if (p.empty()) throw std::invalid_argument("path '' is empty");
  }
  for (const auto& p : paths) {
    auto f = std::make_unique<FileHandle>();
    f->path = p;
    struct stat st;
    f->fd_buffered = open_regular(p, 0, st);
    if (f->fd_buffered < 0) {
      int e = errno;
      std::string hint;
      struct stat ps;
      // A socket refuses open(2) itself (ENXIO): say what the path is.
      if (::stat(p.c_str(), &ps) == 0 && !S_ISREG(ps.st_mode) && !S_ISDIR(ps.st_mode))
        hint = std::string(" (") + file_type_name(ps.st_mode) + "; a Reader serves regular files only)";
      throw IoError(e, p, "open " + p + ": " + std::strerror(e) + hint);
    }
    f->size = static_cast<uint64_t>(st.st_size);
    if (direct) {
      int fd = -1;
      int e = EINVAL;
      if (!flt.direct_open_einval) {
        struct stat st2;
        fd = open_regular(p, O_DIRECT, st2);
        e = errno;
        if (fd >= 0 && (st2.st_dev != st.st_dev || st2.st_ino != st.st_ino)) {
          // Replaced between the two opens: never read another file's bytes.
          (void)::close(fd);  // cleanup on the error path
          throw IoError(ESTALE, p, "open " + p + ": " + std::strerror(ESTALE) +
                                       " (the file was replaced while it was being opened)");
        }
      }
      if (fd >= 0) {
        f->fd_direct = fd;
        f->align = detail::direct_alignment(fd);
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
