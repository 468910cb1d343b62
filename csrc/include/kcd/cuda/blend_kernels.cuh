// The CUDA kernels for the VAKS summary (device code only; math in kcd/blend.h): every pair
// of a condensation in one launch, each pair cut into spans of kBlendSpan bytes, one block
// per (pair, span) step of a grid-stride loop (a 1 GiB pair is blended by 16384 blocks, not
// one), 16-byte vector accesses when every image row is 16-byte aligned. Included by
// cuda/blend.cu (nvcc) and compiled at run time by NVRTC (kcd_fast/_rtc.py).
#pragma once
#include "kcd/blend.h"
#include "kcd/common.h"

namespace kcd {
namespace cuda {
namespace kernels {

__device__ __forceinline__ uint32_t blend4(uint32_t d, uint32_t s, double e, double f) {
  uint32_t out = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint8_t px = blend_px(static_cast<uint8_t>(d >> (8 * k)), static_cast<uint8_t>(s >> (8 * k)), e, f);
    out |= static_cast<uint32_t>(px) << (8 * k);
  }
  return out;
}

// Bytes of one pair a block blends per step (a multiple of 16; kcd_fast/_rtc.py reads it).
constexpr int64_t kBlendSpan = 65536;

// Steps of an image of D bytes: its spans (at least 1).
__device__ __forceinline__ int64_t blend_spans(int64_t D) {
  return D > kBlendSpan ? (D + kBlendSpan - 1) / kBlendSpan : 1;
}

// A pair whose points lie outside [0, N) or whose weight is outside [0, 1] is skipped by
// every block of it and counted once, by its first span's block (every thread of a block
// reads the same pair, so all skip it together).
__device__ __forceinline__ bool pair_ok(int64_t d, int64_t s, double e, int64_t N, bool first_span,
                                        unsigned long long* errors) {
  const bool ok = d >= 0 && d < N && s >= 0 && s < N && e >= 0.0 && e <= 1.0;
  if (!ok && first_span && threadIdx.x == 0) atomicAdd(errors, 1ull);
  return ok;
}

__global__ void blend_vec16(uint8_t* __restrict__ images, int64_t N, int64_t D, const int64_t* __restrict__ dst,
                            const int64_t* __restrict__ src, const double* __restrict__ eps, int64_t L,
                            unsigned long long* __restrict__ errors) {
  const int64_t spans = blend_spans(D);
  for (int64_t w = blockIdx.x; w < L * spans; w += gridDim.x) {
    const int64_t j = w / spans, part = w % spans;
    if (!pair_ok(dst[j], src[j], eps[j], N, part == 0, errors)) continue;
    uint4* out = reinterpret_cast<uint4*>(images + dst[j] * D);
    const uint4* in = reinterpret_cast<const uint4*>(images + src[j] * D);
    const double e = eps[j], f = 1.0 - eps[j];
    const int64_t k1 = (part + 1) * (kBlendSpan / 16) < D / 16 ? (part + 1) * (kBlendSpan / 16) : D / 16;
    for (int64_t k = part * (kBlendSpan / 16) + threadIdx.x; k < k1; k += blockDim.x) {
      const uint4 a = out[k], b = in[k];
      out[k] = make_uint4(blend4(a.x, b.x, e, f), blend4(a.y, b.y, e, f), blend4(a.z, b.z, e, f), blend4(a.w, b.w, e, f));
    }
  }
}

// The same with kPer 16-byte chunks per thread per round, all loaded before any is
// blended (more bytes in flight); launched with small blocks so more pairs are resident.
template <int kPer>
__global__ void blend_vec16_ilp(uint8_t* __restrict__ images, int64_t N, int64_t D, const int64_t* __restrict__ dst,
                                const int64_t* __restrict__ src, const double* __restrict__ eps, int64_t L,
                                unsigned long long* __restrict__ errors) {
  const int64_t spans = blend_spans(D);
  for (int64_t w = blockIdx.x; w < L * spans; w += gridDim.x) {
    const int64_t j = w / spans, part = w % spans;
    if (!pair_ok(dst[j], src[j], eps[j], N, part == 0, errors)) continue;
    uint4* out = reinterpret_cast<uint4*>(images + dst[j] * D);
    const uint4* in = reinterpret_cast<const uint4*>(images + src[j] * D);
    const double e = eps[j], f = 1.0 - eps[j];
    const int64_t n16 = (part + 1) * (kBlendSpan / 16) < D / 16 ? (part + 1) * (kBlendSpan / 16) : D / 16;
    for (int64_t k0 = part * (kBlendSpan / 16) + threadIdx.x; k0 < n16;
         k0 += static_cast<int64_t>(kPer) * blockDim.x) {
      uint4 a[kPer], b[kPer];
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * blockDim.x;
        if (k < n16) {
          a[u] = out[k];
          b[u] = in[k];
        }
      }
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
        const int64_t k = k0 + static_cast<int64_t>(u) * blockDim.x;
        if (k < n16) {
          out[k] = make_uint4(blend4(a[u].x, b[u].x, e, f), blend4(a[u].y, b[u].y, e, f), blend4(a[u].z, b[u].z, e, f),
                              blend4(a[u].w, b[u].w, e, f));
        }
      }
    }
  }
}

__global__ void blend_bytes(uint8_t* __restrict__ images, int64_t N, int64_t D, const int64_t* __restrict__ dst,
                            const int64_t* __restrict__ src, const double* __restrict__ eps, int64_t L,
                            unsigned long long* __restrict__ errors) {
  const int64_t spans = blend_spans(D);
  for (int64_t w = blockIdx.x; w < L * spans; w += gridDim.x) {
    const int64_t j = w / spans, part = w % spans;
    if (!pair_ok(dst[j], src[j], eps[j], N, part == 0, errors)) continue;
    uint8_t* out = images + dst[j] * D;
    const uint8_t* in = images + src[j] * D;
    const double e = eps[j], f = 1.0 - eps[j];
    const int64_t k1 = (part + 1) * kBlendSpan < D ? (part + 1) * kBlendSpan : D;
    for (int64_t k = part * kBlendSpan + threadIdx.x; k < k1; k += blockDim.x) out[k] = blend_px(out[k], in[k], e, f);
  }
}

}  // namespace kernels
}  // namespace cuda
}  // namespace kcd
