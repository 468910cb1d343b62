// Memory for large results, on transparent huge pages where the kernel offers them (THP
// "always" or "madvise"), with a small cache of released buffers. Measured on this
// project's VM, first-touching 12 MB costs ~2-4 ms in 4 KiB pages and ~0.3 ms in 2 MiB
// pages when one thread faults them; two threads faulting huge pages of one buffer at once
// took ~14 ms inside a Python process with torch loaded, so the allocating thread faults
// every huge page up front. A released buffer is kept (up to a byte limit) and handed to
// the next request it fits, as glibc's malloc does for the heap and torch's caching
// allocator does on the GPU: in the kernel benchmark that saves ~0.7 ms of a 1.9 ms call.
// empty_bytes hands such a buffer out as a DLPack tensor (the Python side's result memory).
#include <algorithm>
#include <array>
#include <cstdlib>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#endif

#include "kcd/ops.h"
#include "kcd/pages.h"

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

// At most kMaxCached + 1 buffers move at once, so fixed arrays hold them: releasing a
// buffer runs in a DLPack deleter and must not allocate (nor throw).
using Batch = std::array<Cached, kMaxCached + 1>;

struct PagesCache {
  std::mutex mu;
  Batch held{};  // [count], oldest first
  size_t count = 0;
  size_t bytes = 0;
  size_t limit = size_t{256} << 20;

  // Moves the oldest held buffers to out until the cache fits its limits; returns how many.
  size_t evict(size_t max_count, Batch* out) {
    size_t n = 0;
    while (count > 0 && (bytes > limit || count > max_count)) {
      (*out)[n++] = held[0];
      bytes -= held[0].mapped;
      std::move(held.begin() + 1, held.begin() + count, held.begin());
      --count;
    }
    return n;
  }
};

// Never destroyed: a DLPack deleter may release a buffer during interpreter shutdown,
// after static destructors have run. Around a fork (DataLoader workers) the forking thread
// holds the mutex, so the child never inherits it locked by a thread it does not have.
PagesCache* g_cache = nullptr;
void lock_for_fork() { g_cache->mu.lock(); }
void unlock_after_fork() { g_cache->mu.unlock(); }

PagesCache& cache() {
  static PagesCache* c = [] {
    g_cache = new PagesCache();
#ifdef __linux__
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
#endif
    return g_cache;
  }();
  return *c;
}

size_t body_bytes(size_t bytes) { return (std::max<size_t>(bytes, 1) + kHuge - 1) / kHuge * kHuge; }

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

// The DLPack tensor of empty_bytes and what its deleter needs: one allocation, freed by
// the deleter.
struct PagesHolder {
  DLManagedTensor managed;
  int64_t shape[1];
  size_t mapped;
};

void delete_pages_holder(DLManagedTensor* self) {
  auto* holder = static_cast<PagesHolder*>(self->manager_ctx);
  free_pages(self->dl_tensor.data, holder->mapped);
  delete holder;
}

}  // namespace

void* alloc_pages(size_t bytes, size_t* mapped) {
  const size_t body = body_bytes(bytes);
  {
    PagesCache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    // The smallest held buffer that fits without being over twice the request.
    size_t best = c.count;
    for (size_t i = 0; i < c.count; ++i) {
      const size_t m = c.held[i].mapped;
      if (m >= body && m <= 2 * body && (best == c.count || m < c.held[best].mapped)) best = i;
    }
    if (best < c.count) {
      const Cached got = c.held[best];
      std::move(c.held.begin() + best + 1, c.held.begin() + c.count, c.held.begin() + best);
      --c.count;
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
  Batch evicted;
  size_t n = 0;
  {
    PagesCache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    if (mapped > 0 && mapped <= c.limit) {  // count <= kMaxCached here: room for one more
      c.held[c.count++] = {p, mapped};
      c.bytes += mapped;
      p = nullptr;
    }
    n = c.evict(kMaxCached, &evicted);
  }
  if (p != nullptr) unmap({p, mapped});
  for (size_t i = 0; i < n; ++i) unmap(evicted[i]);
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
  Batch evicted;
  size_t n = 0, previous;
  {
    PagesCache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    previous = c.limit;
    c.limit = limit;
    n = c.evict(kMaxCached, &evicted);  // down to the new limit, oldest first
  }
  for (size_t i = 0; i < n; ++i) unmap(evicted[i]);
  return previous;
}

size_t empty_pages_cache() {
  Batch evicted;
  size_t n = 0, released = 0;
  {
    PagesCache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    released = c.bytes;
    n = c.evict(0, &evicted);
  }
  for (size_t i = 0; i < n; ++i) unmap(evicted[i]);
  return released;
}

DLManagedTensor* empty_bytes(int64_t nbytes) {
  if (nbytes < 0) throw std::invalid_argument("nbytes must be >= 0, got " + std::to_string(nbytes));
  auto* h = new PagesHolder{};
  try {
    h->managed.dl_tensor.data = alloc_pages(static_cast<size_t>(nbytes), &h->mapped);
  } catch (...) {
    delete h;
    throw;
  }
  h->shape[0] = nbytes;
  h->managed.dl_tensor.device = {kDLCPU, 0};
  h->managed.dl_tensor.ndim = 1;
  h->managed.dl_tensor.dtype = {kDLUInt, 8, 1};
  h->managed.dl_tensor.shape = h->shape;
  h->managed.dl_tensor.strides = nullptr;
  h->managed.dl_tensor.byte_offset = 0;
  h->managed.manager_ctx = h;
  h->managed.deleter = delete_pages_holder;
  return &h->managed;
}

}  // namespace cpu
}  // namespace kcd
