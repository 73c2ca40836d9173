#include "codec/rans_check.hpp"

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace llmio {
namespace rans {
namespace {

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument("rans decode: " + what); }

}  // namespace

const char* status_text(int32_t code) {
  switch (code) {
    case kOk: return "ok";
    case kBadHeader: return "payload header, block table or size inconsistent";
    case kBadState: return "invalid initial state";
    case kOverrun: return "a block needs more words than it has";
    case kBadSymbol: return "a symbol the model does not have";
    case kBadFinal: return "final states or word count differ from the encoder's";
    default: return "unknown status";
  }
}

void check_descriptors(uintptr_t src_addr, uint64_t src_nbytes, const ChunkDesc* chunks, size_t num_chunks,
                       const BlockDesc* blocks, size_t num_blocks, size_t num_images, uint64_t out_tokens) {
  for (size_t i = 0; i < num_chunks; ++i) {
    const ChunkDesc& c = chunks[i];
    const std::string chunk = "chunk " + std::to_string(i) + ": ";
    // Written so that no sum can wrap around (offsets come from files).
    if (c.src_offset > src_nbytes || c.src_bytes > src_nbytes - c.src_offset)
      bad(chunk + "source range [" + std::to_string(c.src_offset) + ", +" + std::to_string(c.src_bytes) +
          ") lies outside src (" + std::to_string(src_nbytes) + " bytes)");
    const uint64_t addr = static_cast<uint64_t>(src_addr) + c.src_offset;
    if (addr % kPayloadAlign)
      bad(chunk + "misaligned source: payload at address " + hex(addr) + " (src " + hex(src_addr) + " + offset " +
          std::to_string(c.src_offset) + ") is not " + std::to_string(kPayloadAlign) + "-byte aligned");
    if (c.model >= num_images)
      bad(chunk + "model index " + std::to_string(c.model) + " out of range (" + std::to_string(num_images) +
          " model image(s))");
    if (c.out_offset > out_tokens || c.num_tokens > out_tokens - c.out_offset)
      bad(chunk + "output range [" + std::to_string(c.out_offset) + ", +" + std::to_string(c.num_tokens) +
          ") lies outside out (" + std::to_string(out_tokens) + " tokens)");
  }
  // Every block of every chunk listed exactly once: a missing block would leave zeros in
  // the output with status ok (the kernel decodes only what the table lists).
  std::vector<uint64_t> base(num_chunks + 1, 0);
  for (size_t i = 0; i < num_chunks; ++i) base[i + 1] = base[i] + num_blocks_for(chunks[i].num_tokens);
  if (base[num_chunks] != num_blocks)
    bad("the block table lists " + std::to_string(num_blocks) + " block(s), the chunks have " +
        std::to_string(base[num_chunks]) + " (every block of every chunk exactly once)");
  std::vector<uint8_t> seen(num_blocks, 0);
  for (size_t j = 0; j < num_blocks; ++j) {
    const BlockDesc& b = blocks[j];
    if (b.chunk >= num_chunks)
      bad("block " + std::to_string(j) + ": chunk index " + std::to_string(b.chunk) + " out of range (" +
          std::to_string(num_chunks) + " chunk(s))");
    const uint32_t nb = num_blocks_for(chunks[b.chunk].num_tokens);
    if (b.block >= nb)
      bad("block " + std::to_string(j) + ": block " + std::to_string(b.block) + " of chunk " +
          std::to_string(b.chunk) + ", which has " + std::to_string(nb) + " block(s)");
    uint8_t& s = seen[base[b.chunk] + b.block];
    if (s)
      bad("block " + std::to_string(j) + ": block " + std::to_string(b.block) + " of chunk " +
          std::to_string(b.chunk) + " is listed twice (so another block of the table is missing)");
    s = 1;
  }
}

}  // namespace rans
}  // namespace llmio
