// Host launcher of the VAKS summary kernels (kcd/cuda/blend_kernels.cuh, shared with the
// NVRTC fallback).
#include <cuda_runtime.h>

#include "check.cuh"
#include "kcd/blend.h"
#include "kcd/cuda/blend_kernels.cuh"
#include "kcd/ops.h"

namespace kcd {
namespace cuda {
using namespace kernels;

void blend(uint8_t* images, int64_t N, int64_t D, const int64_t* dst, const int64_t* src,
           const double* eps, int64_t L, int64_t* errors, void* stream) {
  if (L == 0 || D == 0) return;
  auto* err = reinterpret_cast<unsigned long long*>(errors);
  auto s = static_cast<cudaStream_t>(stream);
  // one launch for every pair: a block per (pair, kBlendSpan bytes) step, grid-stride beyond the cap
  const int64_t spans = D > kBlendSpan ? (D + kBlendSpan - 1) / kBlendSpan : 1;
  const int64_t work = L * spans;
  const unsigned int grid = static_cast<unsigned int>(work < 65535 * 8 ? work : 65535 * 8);
  if (D % 16 == 0 && reinterpret_cast<uintptr_t>(images) % 16 == 0) {
    if (variant("blend_per_thread") == 4) {
      blend_vec16_ilp<4><<<grid, kThreads / 4, 0, s>>>(images, N, D, dst, src, eps, L, err);
    } else {
      blend_vec16<<<grid, kThreads, 0, s>>>(images, N, D, dst, src, eps, L, err);
    }
  } else {
    blend_bytes<<<grid, kThreads, 0, s>>>(images, N, D, dst, src, eps, L, err);
  }
  KCD_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda
}  // namespace kcd
