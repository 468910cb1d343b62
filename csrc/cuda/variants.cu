// Opt-in kernel variants (ops.h: set_variant), read at each launch.
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

#include "check.cuh"
#include "kcd/ops.h"

namespace kcd {
namespace cuda {
namespace {
std::atomic<int> g_entropy_batch{1}, g_blend_per_thread{1};
}  // namespace

int variant(const char* name) {
  if (std::strcmp(name, "entropy_batch") == 0) return g_entropy_batch.load(std::memory_order_relaxed);
  if (std::strcmp(name, "blend_per_thread") == 0) return g_blend_per_thread.load(std::memory_order_relaxed);
  return 1;
}

void set_variant(const std::string& name, int value) {
  if (value != 1 && value != 4) {
    throw std::invalid_argument("variant " + name + " takes 1 or 4, got " + std::to_string(value));
  }
  if (name == "entropy_batch") {
    g_entropy_batch = value;
  } else if (name == "blend_per_thread") {
    g_blend_per_thread = value;
  } else {
    throw std::invalid_argument("variant must be 'entropy_batch' or 'blend_per_thread', got '" + name + "'");
  }
}

}  // namespace cuda
}  // namespace kcd
