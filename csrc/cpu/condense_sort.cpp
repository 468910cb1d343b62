// Step 3 of the CPU condensation: the zone members are sorted by a stable three-pass LSD
// radix sort on the key (the first pass reads the chunks' copies in place), then by exact
// value inside the rare runs of equal keys (ties keep index order).
#include "condense_sort.h"

#include <algorithm>
#include <exception>
#include <utility>
#include <vector>

namespace kcd {
namespace cpu {
namespace condense_detail {
namespace {

constexpr int kDigits = 3;  // radix passes over the 32 key bits: 11 + 11 + 10
constexpr int kDigitShift[kDigits] = {32, 43, 54};
constexpr int kBins = 2048;  // a histogram stays in L1

// Stable LSD radix sort by the key (bits 32..63) of the m words held by S segments
// (seg[s] [seg_len[s]], in order); a, tmp [m]. The first pass reads the segments in
// place (one chunk each), the later ones T even chunks of the contiguous array. Each pass
// counts the digits of every chunk, then scatters every chunk after the lower chunks'
// items of the same digit, so equal digits keep their order. Chunks are loop iterations,
// so the result does not depend on how many threads OpenMP actually grants. Returns where
// the result is (tmp: the passes go segments -> tmp -> a -> tmp).
uint64_t* radix_sort(const uint64_t* const* seg, const int64_t* seg_len, int S, uint64_t* a, uint64_t* tmp,
                     int64_t m, int64_t* hist /* [max(S, T), kBins] */, int T) {
  static_assert(kDigits == 3, "the passes end in tmp");
#pragma omp parallel num_threads(T)
  {
    for (int d = 0; d < kDigits; ++d) {
      const int shift = kDigitShift[d];
      const uint64_t* src = d == 1 ? tmp : a;
      uint64_t* dst = d == 1 ? a : tmp;
      const int C = d == 0 ? S : T;
      auto chunk = [&](int t, const uint64_t** p, int64_t* n) {
        if (d == 0) {
          *p = seg[t];
          *n = seg_len[t];
        } else {
          const Chunk c = chunk_of(t, T, m);
          *p = src + c.begin;
          *n = c.end - c.begin;
        }
      };
#pragma omp for schedule(static, 1)
      for (int t = 0; t < C; ++t) {
        const uint64_t* p;
        int64_t n;
        chunk(t, &p, &n);
        int64_t* h = hist + static_cast<int64_t>(t) * kBins;
        std::fill(h, h + kBins, 0);
        for (int64_t i = 0; i < n; ++i) ++h[(p[i] >> shift) & (kBins - 1)];
      }  // implicit barrier
#pragma omp single
      {
        int64_t sum = 0;
        for (int b = 0; b < kBins; ++b) {
          for (int t = 0; t < C; ++t) {
            const int64_t n = hist[static_cast<int64_t>(t) * kBins + b];
            hist[static_cast<int64_t>(t) * kBins + b] = sum;
            sum += n;
          }
        }
      }  // implicit barrier
#pragma omp for schedule(static, 1)
      for (int t = 0; t < C; ++t) {
        const uint64_t* p;
        int64_t n;
        chunk(t, &p, &n);
        int64_t* h = hist + static_cast<int64_t>(t) * kBins;
        for (int64_t i = 0; i < n; ++i) dst[h[(p[i] >> shift) & (kBins - 1)]++] = p[i];
      }  // implicit barrier
    }
  }
  return tmp;
}

// Puts each run of equal keys in a[begin, end) (sorted by key, ties in index order) into
// exact value order, descending; begin and end must not split a run. Runs are rare and
// mostly already in order; one that is not is sorted as (value, word) pairs gathered once.
void order_equal_keys(uint64_t* a, int64_t begin, int64_t end, const double* v) {
  std::vector<std::pair<double, uint64_t>> run;
  for (int64_t s = begin + 1; s < end; ++s) {
    if ((a[s] >> 32) != (a[s - 1] >> 32)) continue;
    int64_t r = s - 1, e = s + 1;
    bool ordered = v[index_of(a[r])] >= v[index_of(a[s])];
    while (e < end && (a[e] >> 32) == (a[r] >> 32)) {
      ordered = ordered && v[index_of(a[e - 1])] >= v[index_of(a[e])];
      ++e;
    }
    if (!ordered) {
      run.clear();
      for (int64_t q = r; q < e; ++q) run.emplace_back(v[index_of(a[q])], a[q]);
      std::sort(run.begin(), run.end(), [](const auto& x, const auto& y) {
        return x.first > y.first || (x.first == y.first && x.second < y.second);
      });
      for (int64_t q = r; q < e; ++q) a[q] = run[q - r].second;
    }
    s = e;
  }
}

}  // namespace

uint64_t* sort_members(const Members& m, const double* v, Scratch* sc) {
  const int64_t M = m.count;
  if (M == 0) return nullptr;
  const int T = m.chunks(), TS = thread_count(M);
  uint64_t* cand;
  if (M <= 512) {
    cand = grow(sc->cand, M);
    for (int t = 0; t < T; ++t) std::copy(m.seg[t], m.seg[t] + m.len[t], cand + m.base[t]);
    std::sort(cand, cand + M);  // (key, index): ties in index order, as the radix sort leaves them
  } else {
    cand = radix_sort(m.seg.data(), m.len.data(), T, grow(sc->cand, M), grow(sc->tmp, M), M,
                      grow(sc->radix_hist, int64_t(std::max(T, TS)) * kBins), TS);
  }
  std::vector<std::exception_ptr> failed(static_cast<size_t>(TS));  // an exception must not leave the region
#pragma omp parallel for num_threads(TS) schedule(static, 1)
  for (int t = 0; t < TS; ++t) {
    auto run_start = [&](int64_t q) {
      while (q > 0 && q < M && (cand[q] >> 32) == (cand[q - 1] >> 32)) ++q;
      return q;
    };
    const Chunk c = chunk_of(t, TS, M);
    try {
      order_equal_keys(cand, run_start(c.begin), run_start(c.end), v);  // may allocate
    } catch (...) {
      failed[t] = std::current_exception();
    }
  }
  for (const std::exception_ptr& e : failed) {
    if (e) std::rethrow_exception(e);
  }
  return cand;
}

}  // namespace condense_detail
}  // namespace cpu
}  // namespace kcd
