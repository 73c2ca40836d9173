#include <cerrno>
#include <stdexcept>

#include "io/engine.hpp"
#include "common/errors.hpp"

namespace llmio {
namespace detail {

std::string op_context(const FileSet& files, const IoOp& op) {
  return "read " + files.at(op.file).path + " @ " + std::to_string(op.offset) + " (+" +
         std::to_string(op.len) + ")";
}

namespace {

// Emits ops for [off, off+len) of file f read straight into dst (no bounce).
void emit_plain(std::vector<IoOp>& ops, uint32_t req, uint32_t file, uint64_t off,
                uint64_t len, uint64_t need_end, uint8_t* dst, bool direct, uint64_t max_io) {
  uint64_t end = off + len;
  for (uint64_t o = off; o < end; o += max_io) {
    IoOp op;
    op.req = req;
    op.file = file;
    op.offset = o;
    op.len = std::min<uint64_t>(max_io, end - o);
    uint64_t ne = std::min<uint64_t>(need_end, o + op.len);
    op.need = ne > o ? ne - o : 0;
    op.dst = dst + (o - off);
    op.direct = direct;
    ops.push_back(op);
  }
}

// Emits bounce ops covering the aligned range [a0, a1) that copy the part
// intersecting [off, off+len) to dst.
void emit_bounce(std::vector<IoOp>& ops, uint32_t req, uint32_t file, uint64_t a0,
                 uint64_t a1, uint64_t off, uint64_t len, uint64_t fsize, uint8_t* dst,
                 uint64_t max_io) {
  const uint64_t end = off + len;
  for (uint64_t o = a0; o < a1; o += max_io) {
    IoOp op;
    op.req = req;
    op.file = file;
    op.offset = o;
    op.len = std::min<uint64_t>(max_io, a1 - o);
    const uint64_t c0 = std::max(o, off);
    const uint64_t c1 = std::min(o + op.len, end);
    if (c1 <= c0) continue;
    op.need = std::min<uint64_t>(c1, fsize) - o;
    op.direct = true;
    op.bounce = true;
    op.copy_dst = dst + (c0 - off);
    op.skip = c0 - o;
    op.copy_len = c1 - c0;
    ops.push_back(op);
  }
}

}  // namespace

void plan_requests(FileSet& files, const ReadRequest* reqs, size_t n, uint64_t max_io,
                   std::vector<IoOp>& ops) {
  ops.clear();
  if (max_io == 0) throw std::invalid_argument("max_io_bytes must be > 0");
  // Validate everything before planning anything.
  for (size_t r = 0; r < n; ++r) {
    const ReadRequest& q = reqs[r];
    const FileHandle& f = files.at(q.file);
    // A zero-length read is fine anywhere up to the end of the file, never past it.
    if (q.nbytes == 0 && q.offset <= f.size) continue;
    if (q.nbytes && q.dst == nullptr)
      throw std::invalid_argument("read request " + std::to_string(r) + " has a null destination");
    if (q.offset > f.size || q.nbytes > f.size - q.offset) {
      throw ShortReadError(
          ENODATA, f.path,
          "read " + f.path + " @ " + std::to_string(q.offset) + " (+" + std::to_string(q.nbytes) +
              "): past end of file (size " + std::to_string(f.size) + " bytes)");
    }
  }
  for (size_t r = 0; r < n; ++r) {
    const ReadRequest& q = reqs[r];
    if (q.nbytes == 0) continue;
    FileHandle& f = files.at(q.file);
    const uint32_t req = static_cast<uint32_t>(r);
    const uint64_t off = q.offset, len = q.nbytes, end = off + len;
    if (!f.direct_ok.load(std::memory_order_relaxed)) {
      emit_plain(ops, req, q.file, off, len, end, q.dst, false, max_io);
      continue;
    }
    const uint64_t A = f.align;
    // Direct reads need max_io to be a multiple of the alignment.
    const uint64_t mio = std::max<uint64_t>(A, align_down(max_io, A));
    const uint64_t a0 = align_down(off, A), a1 = align_up(end, A);
    const bool congruent = (reinterpret_cast<uintptr_t>(q.dst) % A) == (off % A);
    if (congruent && q.slack_before >= off - a0 && q.slack_after >= a1 - end) {
      // Whole aligned range straight into the caller's (padded) buffer.
      emit_plain(ops, req, q.file, a0, a1 - a0, std::min(a1, f.size), q.dst - (off - a0), true, mio);
      // need must cover the requested bytes only; beyond them EOF is fine.
      for (auto it = ops.end(); it != ops.begin();) {
        --it;
        if (it->req != req) break;
        uint64_t ne = std::min<uint64_t>(end, it->offset + it->len);
        it->need = ne > it->offset ? ne - it->offset : 0;
      }
      continue;
    }
    const uint64_t m0 = align_up(off, A), m1 = align_down(end, A);
    if (congruent && m0 < m1) {
      if (off < m0) emit_bounce(ops, req, q.file, a0, m0, off, len, f.size, q.dst, mio);
      emit_plain(ops, req, q.file, m0, m1 - m0, m1, q.dst + (m0 - off), true, mio);
      if (m1 < end) emit_bounce(ops, req, q.file, m1, a1, off, len, f.size, q.dst, mio);
    } else {
      emit_bounce(ops, req, q.file, a0, a1, off, len, f.size, q.dst, mio);
    }
  }
}

}  // namespace detail
}  // namespace llmio
