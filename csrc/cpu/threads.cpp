// OpenMP team sizes for the CPU kernels. libgomp's thread pool does not survive fork(): a
// forked child (DataLoader workers, multiprocessing's "fork") that opens a parallel region
// of more than one thread after its parent used OpenMP waits forever for pool threads it
// does not have. A forked child therefore runs every kernel on one thread, as PyTorch's
// DataLoader workers do.
#include <atomic>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __unix__
#include <pthread.h>
#endif

#include "kcd/ops.h"

namespace kcd {
namespace cpu {
namespace {

std::atomic<bool> g_forked{false};

#ifdef __unix__
void mark_forked_child() { g_forked.store(true, std::memory_order_relaxed); }
// Registered when the module loads, before any kernel runs.
const int g_registered = pthread_atfork(nullptr, nullptr, mark_forked_child);
#endif

}  // namespace

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int openmp_threads() {
#ifdef _OPENMP
  return g_forked.load(std::memory_order_relaxed) ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu
}  // namespace kcd
