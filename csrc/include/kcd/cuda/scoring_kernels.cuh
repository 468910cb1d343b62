// The CUDA kernels for value scoring (device code only): one warp per row of logits, the
// row math from kcd/scoring.h. Included by cuda/scoring.cu (nvcc, with the host launchers)
// and compiled at run time by NVRTC (kcd_fast/_rtc.py) where no nvcc built the module:
// one source of the kernels for both. A row is classified as the CPU does (kcd/scoring.h:
// row_status: a bad index first, then a non-finite logit or score, an overflowing KL or a
// score beyond +-kScoreLimit); a bad row is skipped and counted in errors [2] = {bad index,
// non-finite}, so no host synchronisation is needed per step. Each row's score goes to a
// scratch buffer; accumulate_kernel then adds them to the bank in row order (deterministic
// with duplicate indices). Kernels are templates in kcd::cuda::kernels (named, not
// anonymous: NVRTC looks them up by name expression).
#pragma once
#include "kcd/common.h"
#include "kcd/scoring.h"
#include "kcd/cuda/launch.cuh"

namespace kcd {
namespace cuda {
namespace kernels {

__device__ __forceinline__ float warp_max(float x) {
  for (int o = kWarp / 2; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ double warp_sum(double x) {
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Rows a launch accumulates: the scoring kernels write one score per row into scratch[B]
// (NaN for a skipped row), accumulate_kernel adds them to the bank in row order.
constexpr int64_t kAccumulateChunk = 4096;

__device__ __forceinline__ double skipped_row() { return __longlong_as_double(0x7ff8000000000000LL); }

// Classifies a row by kcd/scoring.h's row_status (the CPU's order: a bad index first, then a
// score that is not finite within +-kScoreLimit; `score` is NaN for non-finite logits) and
// counts a bad one in errors {bad index, non-finite}. Returns true (on every lane) when the
// row is added; `score` is then the row's score.
__device__ __forceinline__ bool row_ok(int64_t point, int64_t N, double score, int lane, int64_t* errors) {
  const int32_t status = row_status(point, N, score);
  if (lane == 0 && status != kRowOk) {
    atomicAdd(reinterpret_cast<unsigned long long*>(errors + (status == kRowBadIndex ? 0 : 1)), 1ull);
  }
  return status == kRowOk;
}

// 16 bytes of logits as floats: 4 float32 or 8 float16 / bfloat16.
template <FloatKind K>
struct Vec {
  static constexpr int kWidth = K == FloatKind::kF32 ? 4 : 8;
  __device__ __forceinline__ static void load(const void* base, int64_t elem, float (&out)[kWidth]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const char*>(base) + elem * (16 / kWidth));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (K == FloatKind::kF32) {
#pragma unroll
      for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(words[i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint16_t lo = static_cast<uint16_t>(words[i] & 0xffffu), hi = static_cast<uint16_t>(words[i] >> 16);
        out[2 * i] = K == FloatKind::kF16 ? half_to_float(lo) : bf16_to_float(lo);
        out[2 * i + 1] = K == FloatKind::kF16 ? half_to_float(hi) : bf16_to_float(hi);
      }
    }
  }
};

// Adds n logits to a lane's running stats: the chunk's max first (a rescale when it grows),
// then its terms summed in float32 and added to the float64 totals (kcd/scoring.h: kSumBlock).
__device__ __forceinline__ void push_chunk(RowStats& st, float& chk, const float* x, int n) {
  float cm = st.m;
  for (int i = 0; i < n; ++i) {
    cm = fmaxf(cm, x[i]);
    chk += x[i] * 0.0f;
  }
  if (cm > st.m) rescale(st, cm);
  if (isfinite(cm)) {
    float cz = 0.0f, cw = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float d = x[i] - st.m;
      const float e = exp_nonpos(d);
      cz += e;
      cw += weighted(e, d);
    }
    st.z += cz;
    st.w += cw;
  }
}

// The RowStats of one row, merged across the warp (every lane holds the result), in one
// pass over the logits: each lane streams 16-byte vectors (when the rows are 16-byte
// aligned) into running RowStats. kBatch vectors are loaded before any is used (more
// bytes in flight per lane); a lane visits its vectors in the same order for every
// kBatch, so results are identical. chk becomes NaN iff the row holds a non-finite value.
template <FloatKind K, int kBatch>
__device__ __forceinline__ RowStats warp_row_stats(const void* __restrict__ logits, int64_t base, int64_t C,
                                                   bool vec, int lane, float& chk) {
  using V = Vec<K>;
  RowStats st;
  chk = 0.0f;
  int64_t tail = 0;
  if (vec) {
    const int64_t nvec = C / V::kWidth;
    int64_t q = lane;
    for (; q + (kBatch - 1) * kWarp < nvec; q += kBatch * kWarp) {
      float x[kBatch][V::kWidth];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) V::load(logits, base + (q + b * kWarp) * V::kWidth, x[b]);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) push_chunk(st, chk, x[b], V::kWidth);
    }
    for (; q < nvec; q += kWarp) {
      float x[V::kWidth];
      V::load(logits, base + q * V::kWidth, x);
      push_chunk(st, chk, x, V::kWidth);
    }
    tail = nvec * V::kWidth;
  }
  for (int64_t j = tail + lane; j < C; j += kWarp) {
    const float x = load_logit<K>(logits, base + j);
    push_chunk(st, chk, &x, 1);
  }
  for (int o = kWarp / 2; o > 0; o /= 2) {
    RowStats other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.z, o),
                   __shfl_xor_sync(0xffffffffu, st.w, o)};
    st = merge(st, other);
    chk += __shfl_xor_sync(0xffffffffu, chk, o);
  }
  return st;
}

// One warp per row of logits.
template <FloatKind K, int kBatch>
__global__ void entropy_kernel(const void* __restrict__ logits, int64_t B, int64_t C, int64_t ld, bool vec,
                               const int64_t* __restrict__ indices, int64_t N, double* __restrict__ scratch,
                               int64_t* __restrict__ errors) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= B) return;
  float chk;
  const RowStats st = warp_row_stats<K, kBatch>(logits, row * ld, C, vec, lane, chk);
  const double h = isfinite(chk) && isfinite(st.m) ? finish_entropy(st.z, st.w) : skipped_row();
  const bool ok = row_ok(indices[row], N, h, lane, errors);
  if (lane == 0) scratch[row] = ok ? h : skipped_row();
}

// One block per sequence: warp w takes its unmasked tokens w, w + kWarps, ...; the block
// then adds the warps' sums in warp order (deterministic) and thread 0 records the
// sequence's mean token entropy. A bad mask value, no unmasked token or a non-finite
// unmasked token skips the sequence (counted in errors[1]).
template <FloatKind K>
__global__ void entropy_seq_kernel(const void* __restrict__ logits, int64_t L, int64_t V, int64_t ld, bool vec,
                                   const uint8_t* __restrict__ mask, const int64_t* __restrict__ indices, int64_t N,
                                   double* __restrict__ scratch, int64_t* __restrict__ errors) {
  constexpr int kWarps = kThreads / kWarp;
  __shared__ double warp_sum_h[kWarps];
  __shared__ int64_t warp_tokens[kWarps];
  __shared__ int warp_bad[kWarps];
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  double sum_h = 0.0;
  int64_t tokens = 0;
  int bad = 0;
  for (int64_t t = warp; t < L; t += kWarps) {
    const uint8_t m = mask[b * L + t];
    if (!mask_valid(m)) bad = 1;
    if (m != 1) continue;
    float chk;
    const RowStats st = warp_row_stats<K, 1>(logits, (b * L + t) * ld, V, vec, lane, chk);
    if (!(isfinite(chk) && isfinite(st.m))) bad = 1;
    sum_h += finish_entropy(st.z, st.w);
    ++tokens;
  }
  if (lane == 0) {
    warp_sum_h[warp] = sum_h;
    warp_tokens[warp] = tokens;
    warp_bad[warp] = bad;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  double total = 0.0;
  int64_t n_tokens = 0;
  for (int w = 0; w < kWarps; ++w) {
    total += warp_sum_h[w];
    n_tokens += warp_tokens[w];
    bad |= warp_bad[w];
  }
  const double v = bad || n_tokens == 0 ? skipped_row() : sequence_value(total, n_tokens);
  scratch[b] = row_ok(indices[b], N, v, 0, errors) ? v : skipped_row();
}

// One thread per row of caller-computed scores.
__global__ void scores_kernel(const double* __restrict__ scores, const int64_t* __restrict__ indices, int64_t B,
                              int64_t N, double* __restrict__ scratch, int64_t* __restrict__ errors) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < B;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double v = scores[r];
    scratch[r] = row_ok(indices[r], N, v, 0, errors) ? v : skipped_row();
  }
}

template <FloatKind K>
__global__ void kl_kernel(const void* __restrict__ student, const void* __restrict__ teacher, int64_t B,
                          int64_t C, int64_t ld_s, int64_t ld_t, const int64_t* __restrict__ indices,
                          int64_t N, double* __restrict__ scratch, float inv_temp, int64_t* __restrict__ errors) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= B) return;
  const int64_t bs = row * ld_s, bt = row * ld_t;
  float ma = -INFINITY, mb = -INFINITY, chk = 0.0f;
  for (int64_t j = lane; j < C; j += kWarp) {
    const float a = load_logit<K>(teacher, bt + j) * inv_temp;
    const float b = load_logit<K>(student, bs + j) * inv_temp;
    ma = fmaxf(ma, a);
    mb = fmaxf(mb, b);
    chk += a * 0.0f + b * 0.0f;
  }
  ma = warp_max(ma);
  mb = warp_max(mb);
  chk = warp_sum(chk);
  const int64_t point = indices[row];
  // warp-uniform: every lane holds the reduced ma, mb, chk
  const bool finite = isfinite(chk) && isfinite(ma) && isfinite(mb);
  double kl = skipped_row();
  if (finite && point >= 0 && point < N) {
    double za = 0.0, wa = 0.0, zb = 0.0;  // float64 totals of float32 blocks (kSumBlock)
    for (int64_t j0 = 0; j0 < C; j0 += kSumBlock) {
      const int64_t j1 = C - j0 < kSumBlock ? C : j0 + kSumBlock;
      float pa = 0.0f, pw = 0.0f, pb = 0.0f;
      for (int64_t j = j0 + lane; j < j1; j += kWarp) {
        const float a = load_logit<K>(teacher, bt + j) * inv_temp;
        const float b = load_logit<K>(student, bs + j) * inv_temp;
        const float ea = exp_nonpos(a - ma);
        pa += ea;
        pw += weighted(ea, a - b);
        pb += exp_nonpos(b - mb);
      }
      za += pa;
      wa += pw;
      zb += pb;
    }
    kl = finish_kl(ma, warp_sum(za), warp_sum(wa), mb, warp_sum(zb));  // +inf when it overflows: refused
  }
  const bool ok = row_ok(point, N, kl, lane, errors);
  if (lane == 0) scratch[row] = ok ? kl : skipped_row();
}

// Rows of one launch chunk (at most kAccumulateChunk) into the bank, in row order: the first
// row of each index adds the scores of all rows with that index, one after another (sums[p]
// += s_1, then += s_2, ... as the CPU loop does), and their count; skipped rows (NaN) add
// nothing. No atomics: duplicate indices (DDP's wrap padding) give the same bits on every
// run, so resume stays bit-exact. Cost: every row scans the rows before it in its chunk for
// an earlier row of its index (O(rows) per row, repeated or not: O(chunk^2) compares per
// launch, which is why launches are kAccumulateChunk rows); a first row also scans the rows
// after it.
__global__ void accumulate_kernel(const int64_t* __restrict__ indices, const double* __restrict__ scratch,
                                  int64_t B, double* __restrict__ sums, int32_t* __restrict__ counts) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < B;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double v = scratch[r];
    if (isnan(v)) continue;
    const int64_t p = indices[r];
    bool first = true;
    for (int64_t j = 0; j < r && first; ++j) first = !(indices[j] == p && !isnan(scratch[j]));
    if (!first) continue;
    double acc = sums[p] + v;
    int32_t n = 1;
    for (int64_t j = r + 1; j < B; ++j) {
      if (indices[j] == p && !isnan(scratch[j])) {
        acc += scratch[j];
        ++n;
      }
    }
    sums[p] = acc;
    counts[p] += n;
  }
}

__global__ void values_kernel(const double* __restrict__ sums, const int32_t* __restrict__ counts, int64_t N,
                              double period, double alpha, double* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = point_value(sums[i], counts[i], period, alpha);
  }
}

}  // namespace kernels
}  // namespace cuda
}  // namespace kcd
