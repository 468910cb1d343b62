// Host launchers of the value-scoring kernels (kcd/cuda/scoring_kernels.cuh, shared with
// the NVRTC fallback): grid sizes, logit dtype dispatch, 16-byte alignment checks.
#include <cuda_runtime.h>

#include "check.cuh"
#include "kcd/ops.h"
#include "kcd/cuda/scoring_kernels.cuh"
#include "kcd/scoring.h"

namespace kcd {
namespace cuda {

using namespace kernels;

namespace {

unsigned int row_grid(int64_t B) { return static_cast<unsigned int>((B * kWarp + kThreads - 1) / kThreads); }

}  // namespace

void observe_entropy(const void* logits, FloatKind kind, int64_t B, int64_t C, int64_t ld,
                     const int64_t* indices, int64_t N, double* sums, int32_t* counts,
                     int64_t* errors, void* stream) {
  if (B == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  // 16-byte vector loads need every row start 16-byte aligned.
  const int64_t esize = kind == FloatKind::kF32 ? 4 : 2;
  const bool vec = reinterpret_cast<uintptr_t>(logits) % 16 == 0 && (ld * esize) % 16 == 0;
  const unsigned int grid = row_grid(B);
  const bool batch = variant("entropy_batch") == 4;
#define KCD_ENTROPY(KIND)                                                                                  \
  (batch ? entropy_kernel<KIND, 4><<<grid, kThreads, 0, s>>>(logits, B, C, ld, vec, indices, N, sums, counts, errors) \
         : entropy_kernel<KIND, 1><<<grid, kThreads, 0, s>>>(logits, B, C, ld, vec, indices, N, sums, counts, errors))
  switch (kind) {
    case FloatKind::kF32:
      KCD_ENTROPY(FloatKind::kF32);
      break;
    case FloatKind::kF16:
      KCD_ENTROPY(FloatKind::kF16);
      break;
    case FloatKind::kBF16:
      KCD_ENTROPY(FloatKind::kBF16);
      break;
  }
#undef KCD_ENTROPY
  KCD_CUDA_CHECK(cudaGetLastError());
}

void observe_kl(const void* student, const void* teacher, FloatKind kind, int64_t B, int64_t C,
                int64_t ld_s, int64_t ld_t, const int64_t* indices, int64_t N, double* sums,
                int32_t* counts, float temperature, int64_t* errors, void* stream) {
  if (B == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const float inv = 1.0f / temperature;
  switch (kind) {
    case FloatKind::kF32:
      kl_kernel<FloatKind::kF32><<<row_grid(B), kThreads, 0, s>>>(student, teacher, B, C, ld_s, ld_t, indices, N, sums, counts, inv, errors);
      break;
    case FloatKind::kF16:
      kl_kernel<FloatKind::kF16><<<row_grid(B), kThreads, 0, s>>>(student, teacher, B, C, ld_s, ld_t, indices, N, sums, counts, inv, errors);
      break;
    case FloatKind::kBF16:
      kl_kernel<FloatKind::kBF16><<<row_grid(B), kThreads, 0, s>>>(student, teacher, B, C, ld_s, ld_t, indices, N, sums, counts, inv, errors);
      break;
  }
  KCD_CUDA_CHECK(cudaGetLastError());
}

void observe_entropy_seq(const void* logits, FloatKind kind, int64_t B, int64_t L, int64_t V, int64_t ld,
                         const uint8_t* mask, const int64_t* indices, int64_t N, double* sums, int32_t* counts,
                         int64_t* errors, void* stream) {
  if (B == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t esize = kind == FloatKind::kF32 ? 4 : 2;
  const bool vec = reinterpret_cast<uintptr_t>(logits) % 16 == 0 && (ld * esize) % 16 == 0;
  const auto grid = static_cast<unsigned int>(B);
  switch (kind) {
    case FloatKind::kF32:
      entropy_seq_kernel<FloatKind::kF32><<<grid, kThreads, 0, s>>>(logits, L, V, ld, vec, mask, indices, N, sums, counts, errors);
      break;
    case FloatKind::kF16:
      entropy_seq_kernel<FloatKind::kF16><<<grid, kThreads, 0, s>>>(logits, L, V, ld, vec, mask, indices, N, sums, counts, errors);
      break;
    case FloatKind::kBF16:
      entropy_seq_kernel<FloatKind::kBF16><<<grid, kThreads, 0, s>>>(logits, L, V, ld, vec, mask, indices, N, sums, counts, errors);
      break;
  }
  KCD_CUDA_CHECK(cudaGetLastError());
}

void observe_scores(const double* scores, const int64_t* indices, int64_t B, int64_t N, double* sums,
                    int32_t* counts, int64_t* errors, void* stream) {
  if (B == 0) return;
  scores_kernel<<<grid_for(B), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(scores, indices, B, N, sums, counts,
                                                                                 errors);
  KCD_CUDA_CHECK(cudaGetLastError());
}

void values(const double* sums, const int32_t* counts, int64_t N, double period, double alpha,
            double* out, void* stream) {
  if (N == 0) return;
  values_kernel<<<grid_for(N), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(sums, counts, N, period, alpha, out);
  KCD_CUDA_CHECK(cudaGetLastError());
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

void set_device(int device) { KCD_CUDA_CHECK(cudaSetDevice(device)); }

int get_device() {
  int device = 0;
  KCD_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

}  // namespace cuda
}  // namespace kcd
