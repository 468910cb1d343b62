// CUDA condensation: the rank order pi is formed on the device by a stable CUB radix
// sort of (value descending; ties keep index order), the keep set by a flag scatter and
// CUB select (so it comes out sorted by index), and the VAKS pairs by one gather kernel.
// Sizes are known up front (n_keep, n_prev), so nothing returns to the host.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>

#include "check.cuh"
#include "kcd/blend.h"
#include "kcd/condense_layout.h"
#include "kcd/ops.h"

namespace kcd {
namespace cuda {
namespace {

// CUB's temp bytes for N: the DoubleBuffer sort's and the select's, the larger (they run one
// after the other in the same storage).
size_t cub_temp_bytes(int64_t N) {
  size_t sort_bytes = 0, select_bytes = 0;
  const int n = static_cast<int>(N);
  cub::DoubleBuffer<double> keys(nullptr, nullptr);
  cub::DoubleBuffer<int64_t> idx(nullptr, nullptr);
  KCD_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(nullptr, sort_bytes, keys, idx, n));
  KCD_CUDA_CHECK(cub::DeviceSelect::Flagged(nullptr, select_bytes, static_cast<const int64_t*>(nullptr),
                                            static_cast<const uint8_t*>(nullptr), static_cast<int64_t*>(nullptr),
                                            static_cast<int64_t*>(nullptr), n));
  return sort_bytes > select_bytes ? sort_bytes : select_bytes;
}

CondenseLayout layout(int64_t N) { return condense_layout(N, cub_temp_bytes(N)); }

__global__ void prepare(const double* __restrict__ values, int64_t N, double* __restrict__ keys,
                        int64_t* __restrict__ idx, uint8_t* __restrict__ flags) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keys[i] = values[i] + 0.0;  // -0.0 -> +0.0: equal values must share one key
    idx[i] = i;
    flags[i] = 0;
  }
}

__global__ void iota(int64_t* __restrict__ idx, int64_t N) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    idx[i] = i;
  }
}

__global__ void mark_kept(const int64_t* __restrict__ pi, int64_t n_keep, uint8_t* __restrict__ flags) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n_keep;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    flags[pi[r]] = 1;
  }
}

__global__ void gather_pairs(const int64_t* __restrict__ pi, const int64_t* __restrict__ keep, int64_t n_keep,
                             int64_t L, int64_t P, int mode, double eps_m, const int64_t* __restrict__ random_pos,
                             int64_t* __restrict__ dropped, int64_t* __restrict__ dst, int64_t* __restrict__ src,
                             double* __restrict__ eps) {
  const int64_t work = L > P ? L : P;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < work;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (j < L) dropped[j] = pi[n_keep + j];
    if (j < P) {
      src[j] = pi[n_keep + j];
      const VaksMode m = static_cast<VaksMode>(mode);
      if (m == VaksMode::kLow) {
        dst[j] = pi[n_keep - P + j];
      } else if (m == VaksMode::kHigh) {
        dst[j] = pi[j];
      } else {
        dst[j] = keep[random_pos[j]];
      }
      eps[j] = m == VaksMode::kRandom ? eps_m : vaks_eps(j, P, eps_m);
    }
  }
}

}  // namespace

size_t condense_workspace_bytes(int64_t N) { return layout(N).total; }

void condense(const double* values, int64_t N, int64_t n_keep, int64_t n_prev, VaksMode mode,
              double eps_m, const int64_t* random_pos, void* workspace, size_t workspace_bytes,
              int64_t* keep, int64_t* dropped, int64_t* dst, int64_t* src, double* eps, void* stream) {
  if (N <= 0 || n_keep < 1 || n_keep > n_prev || n_prev > N || N > 0x7fffffff) {
    throw std::invalid_argument("condense needs 1 <= n_keep <= n_prev <= N < 2^31, got n_keep = " +
                                std::to_string(n_keep) + ", n_prev = " + std::to_string(n_prev) +
                                ", N = " + std::to_string(N));
  }
  const CondenseLayout l = layout(N);
  if (workspace_bytes < l.total) {
    throw std::invalid_argument("workspace holds " + std::to_string(workspace_bytes) + " bytes, condense needs " +
                                std::to_string(l.total));
  }
  auto s = static_cast<cudaStream_t>(stream);
  char* ws = static_cast<char*>(workspace);
  auto* flags = reinterpret_cast<uint8_t*>(ws + l.flags);
  auto* nsel = reinterpret_cast<int64_t*>(ws + l.nsel);
  void* temp = ws + l.temp;
  size_t temp_bytes = l.temp_bytes;
  const int n = static_cast<int>(N);
  // DoubleBuffer: the sort alternates between the two halves (no copies in its temp storage);
  // the sorted order ends in whichever Current() names.
  cub::DoubleBuffer<double> keys(reinterpret_cast<double*>(ws + l.keys_in), reinterpret_cast<double*>(ws + l.keys_out));
  cub::DoubleBuffer<int64_t> idx(reinterpret_cast<int64_t*>(ws + l.idx_in), reinterpret_cast<int64_t*>(ws + l.idx_out));

  prepare<<<grid_for(N), kThreads, 0, s>>>(values, N, keys.Current(), idx.Current(), flags);
  KCD_CUDA_CHECK(cudaGetLastError());
  KCD_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(temp, temp_bytes, keys, idx, n, 0,
                                                           int(sizeof(double) * 8), s));
  const int64_t* pi = idx.Current();
  int64_t* order = idx.Alternate();  // free again: 0 .. N-1 for the select (keep comes out sorted)
  iota<<<grid_for(N), kThreads, 0, s>>>(order, N);
  KCD_CUDA_CHECK(cudaGetLastError());
  mark_kept<<<grid_for(n_keep), kThreads, 0, s>>>(pi, n_keep, flags);
  KCD_CUDA_CHECK(cudaGetLastError());
  temp_bytes = l.temp_bytes;
  KCD_CUDA_CHECK(cub::DeviceSelect::Flagged(temp, temp_bytes, order, flags, keep, nsel, n, s));
  const int64_t L = n_prev - n_keep;
  const int64_t P = vaks_pairs(n_keep, n_prev, mode);
  if (L > 0) {
    gather_pairs<<<grid_for(L), kThreads, 0, s>>>(pi, keep, n_keep, L, P, static_cast<int>(mode), eps_m, random_pos,
                                                  dropped, dst, src, eps);
    KCD_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace cuda
}  // namespace kcd
