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

// The rows' scores into the bank in row order, chunk by chunk (accumulate_kernel).
void accumulate(const int64_t* indices, const double* scratch, int64_t B, double* sums, int32_t* counts,
                cudaStream_t s) {
  for (int64_t c0 = 0; c0 < B; c0 += kAccumulateChunk) {
    const int64_t n = B - c0 < kAccumulateChunk ? B - c0 : kAccumulateChunk;
    accumulate_kernel<<<grid_for(n), kThreads, 0, s>>>(indices + c0, scratch + c0, n, sums, counts);
  }
  KCD_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void observe_entropy(const void* logits, FloatKind kind, int64_t B, int64_t C, int64_t ld,
                     const int64_t* indices, int64_t N, double* sums, int32_t* counts,
                     int64_t* errors, double* sc, void* stream) {
  if (B == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  // 16-byte vector loads need every row start 16-byte aligned.
  const int64_t esize = kind == FloatKind::kF32 ? 4 : 2;
  const bool vec = reinterpret_cast<uintptr_t>(logits) % 16 == 0 && (ld * esize) % 16 == 0;
  const unsigned int grid = row_grid(B);
  const bool batch = variant("entropy_batch") == 4;
#define KCD_ENTROPY(KIND)                                                                                  \
  (batch ? entropy_kernel<KIND, 4><<<grid, kThreads, 0, s>>>(logits, B, C, ld, vec, indices, N, sc, errors) \
         : entropy_kernel<KIND, 1><<<grid, kThreads, 0, s>>>(logits, B, C, ld, vec, indices, N, sc, errors))
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
  accumulate(indices, sc, B, sums, counts, s);
}

void observe_kl(const void* student, const void* teacher, FloatKind kind, int64_t B, int64_t C,
                int64_t ld_s, int64_t ld_t, const int64_t* indices, int64_t N, double* sums,
                int32_t* counts, float temperature, int64_t* errors, double* sc, void* stream, bool commit) {
  if (B == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const float inv = 1.0f / temperature;
  switch (kind) {
    case FloatKind::kF32:
      kl_kernel<FloatKind::kF32><<<row_grid(B), kThreads, 0, s>>>(student, teacher, B, C, ld_s, ld_t, indices, N, sc, inv, errors);
      break;
    case FloatKind::kF16:
      kl_kernel<FloatKind::kF16><<<row_grid(B), kThreads, 0, s>>>(student, teacher, B, C, ld_s, ld_t, indices, N, sc, inv, errors);
      break;
    case FloatKind::kBF16:
      kl_kernel<FloatKind::kBF16><<<row_grid(B), kThreads, 0, s>>>(student, teacher, B, C, ld_s, ld_t, indices, N, sc, inv, errors);
      break;
  }
  KCD_CUDA_CHECK(cudaGetLastError());
  if (commit) accumulate(indices, sc, B, sums, counts, s);
}

void accumulate_rows(const int64_t* indices, const double* scratch, int64_t B, double* sums, int32_t* counts,
                     void* stream) {
  if (B == 0) return;
  accumulate(indices, scratch, B, sums, counts, static_cast<cudaStream_t>(stream));
}

void observe_entropy_seq(const void* logits, FloatKind kind, int64_t B, int64_t L, int64_t V, int64_t ld,
                         const uint8_t* mask, const int64_t* indices, int64_t N, double* sums, int32_t* counts,
                         int64_t* errors, double* sc, void* stream) {
  if (B == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t esize = kind == FloatKind::kF32 ? 4 : 2;
  const bool vec = reinterpret_cast<uintptr_t>(logits) % 16 == 0 && (ld * esize) % 16 == 0;
  const auto grid = static_cast<unsigned int>(B);
  switch (kind) {
    case FloatKind::kF32:
      entropy_seq_kernel<FloatKind::kF32><<<grid, kThreads, 0, s>>>(logits, L, V, ld, vec, mask, indices, N, sc, errors);
      break;
    case FloatKind::kF16:
      entropy_seq_kernel<FloatKind::kF16><<<grid, kThreads, 0, s>>>(logits, L, V, ld, vec, mask, indices, N, sc, errors);
      break;
    case FloatKind::kBF16:
      entropy_seq_kernel<FloatKind::kBF16><<<grid, kThreads, 0, s>>>(logits, L, V, ld, vec, mask, indices, N, sc, errors);
      break;
  }
  KCD_CUDA_CHECK(cudaGetLastError());
  accumulate(indices, sc, B, sums, counts, s);
}

void observe_scores(const double* scores, const int64_t* indices, int64_t B, int64_t N, double* sums,
                    int32_t* counts, int64_t* errors, double* sc, void* stream) {
  if (B == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  scores_kernel<<<grid_for(B), kThreads, 0, s>>>(scores, indices, B, N, sc, errors);
  KCD_CUDA_CHECK(cudaGetLastError());
  accumulate(indices, sc, B, sums, counts, s);
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

bool has_primary_context(int device) {
  // cuDeviceGet and cuDevicePrimaryCtxGetState through the runtime's driver entry points (no
  // libcuda link, as the module links cudart statically); asking creates no context.
  using DeviceGet = int (*)(int*, int);
  using PrimaryCtxGetState = int (*)(int, unsigned int*, int*);
  static DeviceGet device_get = nullptr;
  static PrimaryCtxGetState get_state = nullptr;
  static const bool resolved = [] {
    void* a = nullptr;
    void* b = nullptr;
    cudaDriverEntryPointQueryResult qa{}, qb{};
#if CUDART_VERSION >= 12050
    const bool ok = cudaGetDriverEntryPointByVersion("cuDeviceGet", &a, 12000, cudaEnableDefault, &qa) == cudaSuccess &&
                    cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &b, 12000, cudaEnableDefault, &qb) ==
                        cudaSuccess;
#else
    const bool ok = cudaGetDriverEntryPoint("cuDeviceGet", &a, cudaEnableDefault, &qa) == cudaSuccess &&
                    cudaGetDriverEntryPoint("cuDevicePrimaryCtxGetState", &b, cudaEnableDefault, &qb) == cudaSuccess;
#endif
    if (!ok || qa != cudaDriverEntryPointSuccess || qb != cudaDriverEntryPointSuccess || !a || !b) {
      cudaGetLastError();
      return false;
    }
    device_get = reinterpret_cast<DeviceGet>(a);
    get_state = reinterpret_cast<PrimaryCtxGetState>(b);
    return true;
  }();
  if (!resolved) return false;
  int dev = 0, active = 0;
  unsigned int flags = 0;
  if (device_get(&dev, device) != 0 || get_state(dev, &flags, &active) != 0) return false;
  return active != 0;
}

int get_device() {
  int device = 0;
  KCD_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

}  // namespace cuda
}  // namespace kcd
