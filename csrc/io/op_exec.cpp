#include "io/op_exec.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common/errors.hpp"

namespace llmio {
namespace detail {

AlignedBuffer::AlignedBuffer(uint64_t nbytes, uint64_t align) : n_(nbytes) {
  void* p = nullptr;
  if (nbytes && posix_memalign(&p, align, nbytes) != 0) throw std::bad_alloc();
  p_ = static_cast<uint8_t*>(p);
}

AlignedBuffer::~AlignedBuffer() { std::free(p_); }

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& o) noexcept {
  if (this != &o) {
    std::free(p_);
    p_ = o.p_;
    n_ = o.n_;
    o.p_ = nullptr;
    o.n_ = 0;
  }
  return *this;
}

uint64_t max_alignment(const FileSet& files) {
  uint64_t a = 4096;
  for (size_t i = 0; i < files.size(); ++i) a = std::max<uint64_t>(a, files.at(i).align);
  return a;
}

uint64_t bounce_bytes(const FileSet& files, uint64_t max_io) {
  return align_up(std::max<uint64_t>(max_io, 1), max_alignment(files));
}

void demote_to_buffered(IoOp& op) {
  op.direct = false;
  if (op.bounce) {
    op.bounce = false;
    op.offset += op.skip;
    op.len = op.copy_len;
    op.need = op.copy_len;
    op.dst = op.copy_dst;
    op.skip = 0;
  }
}

int injected_read_error(const FileHandle& f) {
  const auto& flt = faults();
  if (!flt.eio_substring.empty() && f.path.find(flt.eio_substring) != std::string::npos) return EIO;
  return 0;
}

void run_op_sync(FileSet& files, EngineStats& st, IoOp op, uint8_t* bounce) {
  FileHandle& f = files.at(op.file);
  if (op.direct && !f.direct_ok.load(std::memory_order_relaxed)) demote_to_buffered(op);
  for (;;) {
    const bool direct = op.direct;
    const int fd = direct ? f.fd_direct : f.fd_buffered;
    uint8_t* target = op.bounce ? bounce : op.dst;
    uint64_t done = 0;
    int err = injected_read_error(f);
    if (!err && direct && faults().direct_read_einval) err = EINVAL;
    while (!err && done < op.need) {
      ssize_t r = ::pread(fd, target + done, op.len - done, static_cast<off_t>(op.offset + done));
      if (r < 0) {
        if (errno == EINTR || errno == EAGAIN) {
          st.retries.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        err = errno;
        break;
      }
      if (r == 0) {
        throw ShortReadError(
            ENODATA, f.path,
            op_context(files, op) + ": unexpected end of file after " + std::to_string(done) +
                " of " + std::to_string(op.need) + " bytes (file truncated while open?)");
      }
      done += static_cast<uint64_t>(r);
      if (done < op.need) {
        st.retries.fetch_add(1, std::memory_order_relaxed);
        if (direct && done % f.align != 0) {
          throw ShortReadError(ENODATA, f.path,
                               op_context(files, op) + ": unexpected end of file after " +
                                   std::to_string(done) + " bytes (file truncated while open?)");
        }
      }
    }
    if (err == EINVAL && direct) {
      if (files.disable_direct(op.file, "O_DIRECT read refused (EINVAL); reading buffered"))
        st.direct_fallbacks.fetch_add(1, std::memory_order_relaxed);
      demote_to_buffered(op);
      continue;
    }
    if (err) {
      std::string hint;
      if (err == EINVAL && direct) hint = "O_DIRECT needs " + std::to_string(f.align) + "-byte alignment";
      detail::throw_io("read", f.path, op.offset, op.len, err, hint);
    }
    if (direct) {
      st.ops_direct.fetch_add(1, std::memory_order_relaxed);
      st.bytes_direct.fetch_add(done, std::memory_order_relaxed);
    } else {
      st.ops_buffered.fetch_add(1, std::memory_order_relaxed);
      st.bytes_buffered.fetch_add(done, std::memory_order_relaxed);
    }
    if (op.bounce) {
      std::memcpy(op.copy_dst, bounce + op.skip, op.copy_len);
      st.bounce_ops.fetch_add(1, std::memory_order_relaxed);
      st.bounce_bytes.fetch_add(op.copy_len, std::memory_order_relaxed);
    }
    return;
  }
}

}  // namespace detail
}  // namespace llmio
