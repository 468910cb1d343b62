// Fresh memory for large results, on transparent huge pages where the kernel offers
// them (THP "always" or "madvise"). Measured on this project's VM, first-touching 12 MB
// costs ~2-4 ms in 4 KiB pages and ~0.3 ms in 2 MiB pages when one thread faults them;
// two threads faulting huge pages of one buffer at once took ~14 ms inside a Python
// process with torch loaded, so the allocating thread faults every huge page up front.
#include <cstdlib>
#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "kcd/ops.h"

namespace kcd {
namespace cpu {

void* alloc_pages(size_t bytes, size_t* mapped) {
  if (bytes == 0) bytes = 1;
#ifdef __linux__
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t body = (bytes + kHuge - 1) / kHuge * kHuge;
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
  *mapped = body;
  return reinterpret_cast<void*>(aligned);
#else
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (p == nullptr) throw std::bad_alloc();
  *mapped = bytes;
  return p;
#endif
}

void free_pages(void* p, size_t mapped) {
#ifdef __linux__
  munmap(p, mapped);
#else
  (void)mapped;
  std::free(p);
#endif
}

}  // namespace cpu
}  // namespace kcd
