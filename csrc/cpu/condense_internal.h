// Private to the CPU condensation (condense*.cpp): what its stages share. The points are
// split into chunks (one per thread), the members (points inside a value zone) packed in
// 64-bit words, and the per-thread scratch reused across calls. condense.cpp describes
// the algorithm.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kcd/ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KCD_AVX512_PATH 1  // the AVX-512 and AVX2 kernels are built (per-function targets)
#else
#define KCD_AVX512_PATH 0
#endif

namespace kcd {
namespace cpu {
namespace condense_detail {

constexpr int kMaxZones = 2;  // the wanted rank ranges merge into at most two runs
constexpr int kBlock = 4096;  // points per block of pass 1 (a multiple of 64)
constexpr int kSlack = 8;     // a vector store may write this far past the last member
constexpr int kStage = 512;   // members keyed per batch in pass 1 (AVX-512, AVX2)

// Members are packed as key << 32 | index (N < 2^32); key = zone << 30 | position of the
// value in the zone (condense_zones.h). A stable sort by key from index order leaves ties in
// index order.
constexpr uint64_t kIndexMask = 0xffffffffull;

inline int64_t index_of(uint64_t c) { return static_cast<int64_t>(c & kIndexMask); }

// Threads for `work` items: the OpenMP team from 2^16 items up, else one.
inline int thread_count(int64_t work) {
#ifdef _OPENMP
  return work >= (int64_t(1) << 16) ? openmp_threads() : 1;
#else
  (void)work;
  return 1;
#endif
}

struct Chunk {
  int64_t begin, end;
};

// Chunk t of T over [0, n).
inline Chunk chunk_of(int t, int T, int64_t n) { return {n * t / T, n * (t + 1) / T}; }

// Chunk t of T over [0, n), starting on a multiple of 64: a bitmap word belongs to one chunk.
inline Chunk chunk64_of(int t, int T, int64_t n) {
  auto at = [&](int u) { return u == T ? n : (n * u / T) & ~int64_t{63}; };
  return {at(t), at(t + 1)};
}

// v.data() with room for at least n elements (grown, never shrunk).
template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Buffers reused across calls of one thread; the parallel regions use raw pointers only.
struct Scratch {
  std::vector<uint64_t> copy, cand, tmp, bits;
  std::vector<int64_t> radix_hist;
  size_t bytes() const {
    return (copy.capacity() + cand.capacity() + tmp.capacity() + bits.capacity() + radix_hist.capacity()) * 8;
  }
};

}  // namespace condense_detail
}  // namespace cpu
}  // namespace kcd
