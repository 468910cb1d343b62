// Error checking for CUDA runtime calls and kernel launches: every launch is followed
// by KCD_CUDA_CHECK(cudaGetLastError()).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kcd/cuda/launch.cuh"

#define KCD_CUDA_CHECK(expr)                                                                   \
  do {                                                                                         \
    const cudaError_t kcd_err_ = (expr);                                                       \
    if (kcd_err_ != cudaSuccess) {                                                             \
      throw std::runtime_error(std::string("CUDA error in ") + #expr + ": " +                  \
                               cudaGetErrorString(kcd_err_) + " (" __FILE__ ":" +             \
                               std::to_string(__LINE__) + ")");                               \
    }                                                                                          \
  } while (0)

namespace kcd {
namespace cuda {

// Kernel variants kept for A/B measurement on a GPU (see ops.h: set_variant).
int variant(const char* name);

inline unsigned int grid_for(long long work, int per_block = kThreads, unsigned int cap = 65535u * 16u) {
  long long g = (work + per_block - 1) / per_block;
  if (g < 1) g = 1;
  return static_cast<unsigned int>(g > cap ? cap : g);
}

}  // namespace cuda
}  // namespace kcd
