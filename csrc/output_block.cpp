#include "output_block.h"

#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <utility>

#if __has_include(<sys/mman.h>)
#include <sys/mman.h>
#endif

namespace fibec {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Blocks big enough for huge pages start on one.
size_t alignment_for(size_t bytes) { return bytes >= 2 * kHugePage ? kHugePage : kOutputAlignment; }

uint8_t* allocate(size_t capacity) {
    void* p = std::aligned_alloc(alignment_for(capacity), capacity);
    if (!p) throw std::bad_alloc();
    advise_huge_pages(static_cast<uint8_t*>(p), capacity);
    return static_cast<uint8_t*>(p);
}

class Cache {
  public:
    // A cached block of at least `bytes` that does not waste more than half of itself.
    std::pair<uint8_t*, size_t> take(size_t bytes) {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
            if (it->second >= bytes && it->second / 2 <= bytes) {
                auto block = *it;
                blocks_.erase(it);
                return block;
            }
        }
        return {nullptr, 0};
    }

    void give(uint8_t* data, size_t capacity) {
        std::pair<uint8_t*, size_t> evicted{data, capacity};
        if (capacity <= kMaxCachedBlockBytes) {
            std::lock_guard<std::mutex> lock(mutex_);
            blocks_.emplace_front(data, capacity);
            if (blocks_.size() <= kCachedBlocks) return;
            evicted = blocks_.back();
            blocks_.pop_back();
        }
        std::free(evicted.first);
    }

    size_t release() {
        std::deque<std::pair<uint8_t*, size_t>> blocks;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            blocks.swap(blocks_);
        }
        size_t freed = 0;
        for (const auto& [data, capacity] : blocks) {
            std::free(data);
            freed += capacity;
        }
        return freed;
    }

    size_t bytes() {
        std::lock_guard<std::mutex> lock(mutex_);
        size_t total = 0;
        for (const auto& block : blocks_) total += block.second;
        return total;
    }

  private:
    std::mutex mutex_;
    std::deque<std::pair<uint8_t*, size_t>> blocks_;  // most recently freed first
};

// Never destroyed: tensors may outlive static destruction at interpreter exit.
Cache& cache() {
    static Cache* instance = new Cache();
    return *instance;
}

}  // namespace

void advise_huge_pages(uint8_t* data, size_t bytes) {
#ifdef MADV_HUGEPAGE
    if (bytes < 2 * kHugePage) return;
    const uintptr_t begin = round_up(reinterpret_cast<uintptr_t>(data), kHugePage);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) / kHugePage * kHugePage;
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // errors are harmless
#else
    (void)data;
    (void)bytes;
#endif
}

std::shared_ptr<OutputBlock> OutputBlock::acquire(size_t bytes) {
    const size_t wanted = round_up(bytes ? bytes : 1, alignment_for(bytes));
    auto [data, capacity] = cache().take(wanted);
    if (!data) {
        data = allocate(wanted);
        capacity = wanted;
    }
    return std::shared_ptr<OutputBlock>(new OutputBlock(data, capacity));
}

OutputBlock::~OutputBlock() { cache().give(data_, capacity_); }

size_t OutputBlock::release_cached() { return cache().release(); }

size_t OutputBlock::cached_bytes() { return cache().bytes(); }

}  // namespace fibec
