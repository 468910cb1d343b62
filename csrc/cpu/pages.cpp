// Memory for large results, on transparent huge pages where the kernel offers them (THP
// "always" or "madvise"), with a small cache of released buffers. Measured on this
// project's VM, first-touching 12 MB costs ~2-4 ms in 4 KiB pages and ~1 ms in 2 MiB
// pages (the kernel zeroes them), as much as the condensation itself; two threads
// faulting huge pages of one buffer at once took ~14 ms inside a Python process with
// torch loaded, so the allocating thread faults every huge page up front. A released
// buffer is kept (up to a byte limit) and handed to the next request it fits, as glibc's
// malloc does for the heap and torch's caching allocator does on the GPU.
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "kcd/ops.h"

namespace kcd {
namespace cpu {
namespace {

#ifdef __linux__
constexpr size_t kHuge = size_t{2} << 20;
#else
constexpr size_t kHuge = 64;
#endif
constexpr size_t kMaxCached = 4;  // buffers

struct Cached {
  void* p;
  size_t mapped;
};

struct PagesCache {
  std::mutex mu;
  std::vector<Cached> held;  // oldest first
  size_t bytes = 0;
  size_t limit = size_t{256} << 20;
};

// Never destroyed: a DLPack deleter may release a buffer during interpreter shutdown,
// after static destructors have run.
PagesCache& cache() {
  static PagesCache* c = new PagesCache();
  return *c;
}

size_t body_bytes(size_t bytes) { return (bytes == 0 ? 1 : bytes + kHuge - 1) / kHuge * kHuge; }

void* map_fresh(size_t body) {
#ifdef __linux__
  const size_t len = body + kHuge;  // room to start on a 2 MiB boundary
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  const uintptr_t aligned = (start + kHuge - 1) & ~(kHuge - 1);
  if (aligned > start) munmap(p, aligned - start);
  const size_t tail = len - (aligned - start) - body;
  if (tail > 0) munmap(reinterpret_cast<void*>(aligned + body), tail);
  madvise(reinterpret_cast<void*>(aligned), body, MADV_HUGEPAGE);  // a hint; fine to fail
  volatile char* c = reinterpret_cast<volatile char*>(aligned);
  for (size_t at = 0; at < body; at += kHuge) c[at] = 0;  // a write faults the whole huge page
  return reinterpret_cast<void*>(aligned);
#else
  void* p = std::aligned_alloc(kHuge, body);
  if (p == nullptr) throw std::bad_alloc();
  return p;
#endif
}

void unmap(const Cached& c) {
#ifdef __linux__
  munmap(c.p, c.mapped);
#else
  std::free(c.p);
#endif
}

}  // namespace

void* alloc_pages(size_t bytes, size_t* mapped) {
  const size_t body = body_bytes(bytes);
  {
    PagesCache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    // The smallest held buffer that fits without wasting more than its request.
    size_t best = c.held.size();
    for (size_t i = 0; i < c.held.size(); ++i) {
      const size_t m = c.held[i].mapped;
      if (m >= body && m <= 2 * body && (best == c.held.size() || m < c.held[best].mapped)) best = i;
    }
    if (best < c.held.size()) {
      const Cached got = c.held[best];
      c.held.erase(c.held.begin() + static_cast<std::ptrdiff_t>(best));
      c.bytes -= got.mapped;
      *mapped = got.mapped;
      return got.p;
    }
  }
  void* p = map_fresh(body);
  *mapped = body;
  return p;
}

void free_pages(void* p, size_t mapped) {
  std::vector<Cached> evicted;
  {
    PagesCache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    if (mapped <= c.limit) {
      c.held.push_back({p, mapped});
      c.bytes += mapped;
      p = nullptr;
    }
    while (!c.held.empty() && (c.bytes > c.limit || c.held.size() > kMaxCached)) {
      evicted.push_back(c.held.front());
      c.bytes -= c.held.front().mapped;
      c.held.erase(c.held.begin());
    }
  }
  if (p != nullptr) unmap({p, mapped});
  for (const Cached& e : evicted) unmap(e);
}

size_t cached_pages_bytes() {
  PagesCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.bytes;
}

size_t pages_cache_limit() {
  PagesCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.limit;
}

size_t set_pages_cache_limit(size_t limit) {
  std::vector<Cached> evicted;
  size_t previous;
  {
    PagesCache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    previous = c.limit;
    c.limit = limit;
    while (!c.held.empty() && c.bytes > c.limit) {  // shrink to the new limit, oldest first
      evicted.push_back(c.held.front());
      c.bytes -= c.held.front().mapped;
      c.held.erase(c.held.begin());
    }
  }
  for (const Cached& e : evicted) unmap(e);
  return previous;
}

size_t empty_pages_cache() {
  std::vector<Cached> evicted;
  size_t released = 0;
  {
    PagesCache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    evicted.swap(c.held);
    released = c.bytes;
    c.bytes = 0;
  }
  for (const Cached& e : evicted) unmap(e);
  return released;
}

}  // namespace cpu
}  // namespace kcd
