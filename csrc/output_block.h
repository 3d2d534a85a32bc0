// Memory for decoded tensors: one block per payload, recycled through a small cache.
//
// A fresh 32 MB buffer costs ~8,000 page faults (each zeroes 4 KiB) before a byte is
// written, which takes longer than decoding into it, and glibc hands such memory back to
// the kernel as soon as it is freed. So the outputs of one decode() share a block, blocks
// of 4 MiB and more ask for transparent huge pages, and the last freed blocks are kept
// for the next decode (at most kCachedBlocks of at most kMaxCachedBlockBytes each).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace fibec {

constexpr size_t kCachedBlocks = 2;
constexpr size_t kMaxCachedBlockBytes = size_t{64} << 20;
constexpr size_t kOutputAlignment = 64;

// Asks the kernel to back the 2 MiB-aligned interior of a large output that is not yet
// touched with transparent huge pages (advice only: a no-op where unsupported).
void advise_huge_pages(uint8_t* data, size_t bytes);

class OutputBlock {
  public:
    // At least `bytes` bytes (64-byte aligned), recycled when possible; throws std::bad_alloc.
    static std::shared_ptr<OutputBlock> acquire(size_t bytes);
    ~OutputBlock();  // returns the memory to the cache (or to the system)
    OutputBlock(const OutputBlock&) = delete;
    OutputBlock& operator=(const OutputBlock&) = delete;
    uint8_t* data() const { return data_; }

    // Frees the cached blocks (blocks in use are not affected); returns the bytes freed.
    static size_t release_cached();
    // Bytes held by cached blocks.
    static size_t cached_bytes();

  private:
    OutputBlock(uint8_t* data, size_t capacity) : data_(data), capacity_(capacity) {}
    uint8_t* data_;
    size_t capacity_;
};

}  // namespace fibec
