// CPU condensation (KCD_SPEC section 3-4) in O(N + M): the rank order pi (value
// descending, index ascending) is needed only inside a few rank ranges (the dropped
// points, the lowest / highest kept ones, the keep boundary), plus the set of the top
// n_keep points. A sample selection:
//   1. A sample of 4096 values predicts, for each wanted rank range, a value zone that
//      holds it (four binomial standard deviations of slack on each side).
//   2. One pass over the values counts, per thread, the points above / inside / below
//      each zone and copies the zone members (value, index). The counts give every
//      zone's exact rank range; where a zone misses its ranks (an unrepresentative
//      sample) the zones widen to the classes that hold them and the pass repeats once,
//      which then holds by construction.
//   3. The M members, packed as (32-bit key: zone, linear position of the value in the
//      zone; index), are sorted by a stable three-pass LSD radix sort on the key, then by
//      exact value inside the rare runs of equal keys (ties keep index order).
//   4. The point at rank n_keep - 1, (v*, i*), is the keep threshold: one pass writes the
//      indices with v > v* or (v == v* and i <= i*), in index order.
// Both passes that compact (copy, keep) use AVX-512 compress where the CPU has it and a
// branch-free scalar loop elsewhere (set_condense_isa forces either, for tests).
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define KCD_AVX512_PATH 1
#define KCD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KCD_AVX512_PATH 0
#define KCD_CLONES
#endif

#include "kcd/blend.h"
#include "kcd/ops.h"

namespace kcd {
namespace cpu {
namespace {

struct Range {
  int64_t lo, hi;  // ranks [lo, hi) wanted in order
  int64_t* out;    // [hi - lo] point indices
};

int thread_count(int64_t work) {
#ifdef _OPENMP
  return work >= (int64_t(1) << 16) ? omp_get_max_threads() : 1;
#else
  (void)work;
  return 1;
#endif
}

struct Chunk {
  int64_t begin, end;
};
Chunk chunk_of(int t, int T, int64_t n) { return {n * t / T, n * (t + 1) / T}; }

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// ---- Which compaction kernels run ------------------------------------------------------

enum class Isa : int { kAuto = -1, kGeneric = 0, kAvx512 = 1 };
std::atomic<int> g_isa{static_cast<int>(Isa::kAuto)};

bool cpu_has_avx512() {
#if KCD_AVX512_PATH
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

Isa active_isa() {
  const int forced = g_isa.load(std::memory_order_relaxed);
  if (forced != static_cast<int>(Isa::kAuto)) return static_cast<Isa>(forced);
  static const bool avx512 = cpu_has_avx512();
  return avx512 ? Isa::kAvx512 : Isa::kGeneric;
}

// ---- Pass 1: zones, counts, the copy of the members --------------------------------------

constexpr int kMaxZones = 2;  // the wanted rank ranges merge into at most two runs
constexpr int kBlock = 4096;  // points per block of pass 1
constexpr int kSlack = 8;     // a vector store may write this far past the last member

// Value zones, descending and disjoint: zone z = [lo[z], hi[z]]. Unused zones have NaN
// bounds, which no comparison matches.
struct Zones {
  int count = 0;
  double lo[kMaxZones], hi[kMaxZones];
  Zones() {
    for (int z = 0; z < kMaxZones; ++z) lo[z] = hi[z] = NAN;
  }
  // Appends [lo_, hi_] (no higher than the last zone's top), merged into the last zone
  // when they overlap.
  void add(double lo_, double hi_) {
    if (count > 0 && hi_ >= lo[count - 1]) {
      lo[count - 1] = std::min(lo[count - 1], lo_);
      hi[count - 1] = std::max(hi[count - 1], hi_);
    } else {
      if (count == kMaxZones) throw std::logic_error("condense: more zones than rank ranges");
      lo[count] = lo_;
      hi[count] = hi_;
      ++count;
    }
  }
};

// Counts of pass 1: at_or_below_hi[z] = #(x <= hi[z]), below_lo[z] = #(x < lo[z]). They
// split the points into classes by value, descending: above zone 0, zone 0, between,
// zone 1, below; class c holds ranks [class_rank[c], class_rank[c + 1]).
struct ClassCounts {
  int64_t at_or_below_hi[kMaxZones] = {0, 0}, below_lo[kMaxZones] = {0, 0}, nan = 0;
  void add(const ClassCounts& o) {
    for (int z = 0; z < kMaxZones; ++z) {
      at_or_below_hi[z] += o.at_or_below_hi[z];
      below_lo[z] += o.below_lo[z];
    }
    nan += o.nan;
  }
};

KCD_CLONES void count_classes(const double* v, int64_t begin, int64_t end, Zones zn, ClassCounts* cc) {
  const double h0 = zn.hi[0], l0 = zn.lo[0], h1 = zn.hi[1], l1 = zn.lo[1];
  int64_t a0 = 0, b0 = 0, a1 = 0, b1 = 0, nan = 0;
  for (int64_t i = begin; i < end; ++i) {
    const double x = v[i];
    a0 += x <= h0;
    b0 += x < l0;
    a1 += x <= h1;
    b1 += x < l1;
    nan += x != x;
  }
  cc->at_or_below_hi[0] += a0;
  cc->below_lo[0] += b0;
  cc->at_or_below_hi[1] += a1;
  cc->below_lo[1] += b1;
  cc->nan += nan;
}

// Copies the zone members of [begin, end) to ov / oi (room for their count + kSlack) and
// adds to the counts; returns the number copied.
int64_t scan_generic(const double* v, int64_t begin, int64_t end, Zones zn, ClassCounts* cc, double* ov,
                     uint64_t* oi) {
  count_classes(v, begin, end, zn, cc);
  const double h0 = zn.hi[0], l0 = zn.lo[0], h1 = zn.hi[1], l1 = zn.lo[1];
  int64_t m = 0;
  for (int64_t i = begin; i < end; ++i) {
    const double x = v[i];
    ov[m] = x;
    oi[m] = static_cast<uint64_t>(i);
    m += ((x >= l0) & (x <= h0)) | ((x >= l1) & (x <= h1));
  }
  return m;
}

#if KCD_AVX512_PATH
__attribute__((target("avx512f,popcnt"))) int64_t scan_avx512(const double* v, int64_t begin, int64_t end,
                                                              Zones zn, ClassCounts* cc, double* ov, uint64_t* oi) {
  const __m512d h0 = _mm512_set1_pd(zn.hi[0]), l0 = _mm512_set1_pd(zn.lo[0]);
  const __m512d h1 = _mm512_set1_pd(zn.hi[1]), l1 = _mm512_set1_pd(zn.lo[1]);
  __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(begin), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  const __m512i eight = _mm512_set1_epi64(8);
  int64_t a0 = 0, b0 = 0, a1 = 0, b1 = 0, nan = 0, m = 0, i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m512d x = _mm512_loadu_pd(v + i);
    const unsigned c0 = _mm512_cmp_pd_mask(x, h0, _CMP_LE_OQ), d0 = _mm512_cmp_pd_mask(x, l0, _CMP_LT_OQ);
    const unsigned c1 = _mm512_cmp_pd_mask(x, h1, _CMP_LE_OQ), d1 = _mm512_cmp_pd_mask(x, l1, _CMP_LT_OQ);
    const unsigned in = (c0 & ~d0) | (c1 & ~d1);
    a0 += __builtin_popcount(c0);
    b0 += __builtin_popcount(d0);
    a1 += __builtin_popcount(c1);
    b1 += __builtin_popcount(d1);
    nan += __builtin_popcount(_mm512_cmp_pd_mask(x, x, _CMP_UNORD_Q));
    _mm512_storeu_pd(ov + m, _mm512_maskz_compress_pd(static_cast<__mmask8>(in), x));
    _mm512_storeu_si512(oi + m, _mm512_maskz_compress_epi64(static_cast<__mmask8>(in), idx));
    m += __builtin_popcount(in);
    idx = _mm512_add_epi64(idx, eight);
  }
  cc->at_or_below_hi[0] += a0;
  cc->below_lo[0] += b0;
  cc->at_or_below_hi[1] += a1;
  cc->below_lo[1] += b1;
  cc->nan += nan;
  return m + scan_generic(v, i, end, zn, cc, ov + m, oi + m);
}
#endif

int64_t scan(Isa isa, const double* v, int64_t begin, int64_t end, Zones zn, ClassCounts* cc, double* ov,
             uint64_t* oi) {
#if KCD_AVX512_PATH
  if (isa == Isa::kAvx512) return scan_avx512(v, begin, end, zn, cc, ov, oi);
#endif
  (void)isa;
  return scan_generic(v, begin, end, zn, cc, ov, oi);
}

// ---- Pass 3: keep = the points ranked before the threshold (vs, is), in index order ----

// Of the copied members x / ix [n], how many are kept: at or below `hi` (the boundary
// zone's top; the points above it are kept and counted by pass 1) and ranked at or before
// the threshold point (vs, is).
KCD_CLONES int64_t count_kept_members(const double* x, const uint64_t* ix, int64_t n, double hi, double vs,
                                      int64_t is) {
  int64_t kept = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double y = x[j];
    kept += (y <= hi) & ((y > vs) | ((y == vs) & (static_cast<int64_t>(ix[j]) <= is)));
  }
  return kept;
}

// Writes the kept indices of [begin, end) to out [cap]; returns how many.
int64_t select_generic(const double* v, int64_t begin, int64_t end, double vs, int64_t is, int64_t* out,
                       int64_t cap) {
  int64_t w = 0;
  for (int64_t i = begin; i < end; ++i) {  // branch-free: the slot is overwritten unless kept
    if (w < cap) out[w] = i;
    w += (v[i] > vs) | ((v[i] == vs) & (i <= is));
  }
  return w;
}

#if KCD_AVX512_PATH
__attribute__((target("avx512f,popcnt"))) int64_t select_avx512(const double* v, int64_t begin, int64_t end,
                                                                double vs, int64_t is, int64_t* out, int64_t cap) {
  const __m512d t = _mm512_set1_pd(vs);
  const __m512i ti = _mm512_set1_epi64(is), eight = _mm512_set1_epi64(8);
  __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(begin), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  int64_t w = 0, i = begin;
  for (; i + 8 <= end && w + 8 <= cap; i += 8) {
    const __m512d x = _mm512_loadu_pd(v + i);
    const unsigned sel = _mm512_cmp_pd_mask(x, t, _CMP_GT_OQ) |
                         (_mm512_cmp_pd_mask(x, t, _CMP_EQ_OQ) & _mm512_cmp_epi64_mask(idx, ti, _MM_CMPINT_LE));
    _mm512_storeu_si512(out + w, _mm512_maskz_compress_epi64(static_cast<__mmask8>(sel), idx));
    w += __builtin_popcount(sel);
    idx = _mm512_add_epi64(idx, eight);
  }
  return w + select_generic(v, i, end, vs, is, out + w, cap - w);
}
#endif

int64_t select_kept(Isa isa, const double* v, int64_t begin, int64_t end, double vs, int64_t is, int64_t* out,
                    int64_t cap) {
#if KCD_AVX512_PATH
  if (isa == Isa::kAvx512) return select_avx512(v, begin, end, vs, is, out, cap);
#endif
  (void)isa;
  return select_generic(v, begin, end, vs, is, out, cap);
}

// ---- Step 3: sorting the members ------------------------------------------------------

// Members are packed as key << 32 | index (N < 2^32); key = zone << 30 | position of the
// value in the zone. A stable sort by key from index order leaves ties in index order.
constexpr uint64_t kIndexMask = 0xffffffffull;
constexpr uint32_t kLocalMax = (uint32_t{1} << 30) - 1;
constexpr double kLocalSteps = static_cast<double>((uint32_t{1} << 29) - 1);
constexpr int kDigits = 3;  // radix passes over the 32 key bits: 11 + 11 + 10
constexpr int kDigitShift[kDigits] = {32, 43, 54};
constexpr int kBins = 2048;  // a histogram stays in L1

inline int64_t index_of(uint64_t c) { return static_cast<int64_t>(c & kIndexMask); }

// Descending linear position of a value in a zone spanning [lo, hi] (finite): +inf -> 0,
// finite x -> 1 + (hi - x) * scale clamped to [0, 2^29 - 1], -inf -> kLocalMax. Monotone
// (every step rounds monotonically), so key order never contradicts value order; values
// outside [lo, hi] clamp and are ordered exactly later. Halves keep hi - x finite.
struct ZoneKey {
  double top = 0.0, scale = 0.0;
  uint32_t zone_bits = 0;
  ZoneKey() = default;
  ZoneKey(double lo, double hi, int zone) : top(hi * 0.5), zone_bits(static_cast<uint32_t>(zone) << 30) {
    const double span = hi * 0.5 - lo * 0.5;
    scale = span > 0.0 && std::isfinite(span) ? kLocalSteps / span : 0.0;
    if (!std::isfinite(scale)) scale = 0.0;
    if (!std::isfinite(top)) top = 0.0;
  }
  uint32_t key(double x) const {
    double d = (top - x * 0.5) * scale;
    d = d >= 0.0 ? d : 0.0;
    d = d <= kLocalSteps ? d : kLocalSteps;
    const uint32_t pos = 1 + static_cast<uint32_t>(static_cast<int32_t>(d));
    return zone_bits | (x == INFINITY ? 0 : (x == -INFINITY ? kLocalMax : pos));
  }
};

// out[j] = key(x[j]) << 32 | ix[j]; members below `split` belong to zone 1.
KCD_CLONES void pack_members(const double* x, const uint64_t* ix, int64_t n, double split, ZoneKey k0, ZoneKey k1,
                             uint64_t* out) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t key = x[j] < split ? k1.key(x[j]) : k0.key(x[j]);
    out[j] = static_cast<uint64_t>(key) << 32 | ix[j];
  }
}

// Stable LSD radix sort of a[0, m) by the key (bits 32..63); tmp [m]. Each pass counts
// the digits of T chunks, then scatters every chunk after the lower chunks' items of the
// same digit, so equal digits keep their order. Chunks are loop iterations, so the result
// does not depend on how many threads OpenMP actually grants. Returns where the result is.
uint64_t* radix_sort(uint64_t* a, uint64_t* tmp, int64_t m, int64_t* hist /* [T, kBins] */, int T) {
#pragma omp parallel num_threads(T)
  {
    uint64_t* src = a;  // each thread's copy, swapped in step after every pass
    uint64_t* dst = tmp;
    for (int d = 0; d < kDigits; ++d) {
      const int shift = kDigitShift[d];
#pragma omp for schedule(static, 1)
      for (int t = 0; t < T; ++t) {
        const Chunk c = chunk_of(t, T, m);
        int64_t* h = hist + static_cast<int64_t>(t) * kBins;
        std::fill(h, h + kBins, 0);
        for (int64_t i = c.begin; i < c.end; ++i) ++h[(src[i] >> shift) & (kBins - 1)];
      }  // implicit barrier
#pragma omp single
      {
        int64_t sum = 0;
        for (int b = 0; b < kBins; ++b) {
          for (int t = 0; t < T; ++t) {
            const int64_t n = hist[static_cast<int64_t>(t) * kBins + b];
            hist[static_cast<int64_t>(t) * kBins + b] = sum;
            sum += n;
          }
        }
      }  // implicit barrier
#pragma omp for schedule(static, 1)
      for (int t = 0; t < T; ++t) {
        const Chunk c = chunk_of(t, T, m);
        int64_t* h = hist + static_cast<int64_t>(t) * kBins;
        for (int64_t i = c.begin; i < c.end; ++i) dst[h[(src[i] >> shift) & (kBins - 1)]++] = src[i];
      }  // implicit barrier
      std::swap(src, dst);
    }
  }
  return kDigits % 2 ? tmp : a;
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

// An evenly spread sample of the values, NaN left out: 512 cache lines of 8 (few cache
// misses, yet spread over the whole array against index-correlated values).
std::vector<double> take_sample(const double* v, int64_t N) {
  std::vector<double> s;
  const int64_t lines = 512, per_line = 8;
  if (N <= lines * per_line) {
    s.assign(v, v + N);
  } else {
    s.reserve(static_cast<size_t>(lines * per_line));
    for (int64_t j = 0; j < lines; ++j) {
      const int64_t b = N * j / lines;
      s.insert(s.end(), v + b, v + b + per_line);
    }
  }
  s.erase(std::remove_if(s.begin(), s.end(), [](double x) { return std::isnan(x); }), s.end());
  return s;
}

// Zones predicted from the sample for rank ranges `wanted` (ascending, disjoint).
Zones predict_zones(std::vector<double>& sample, int64_t N, const std::vector<std::array<int64_t, 2>>& wanted) {
  const int64_t n = static_cast<int64_t>(sample.size());
  // Sample position of point rank `rank` moved up (dir < 0) or down by four binomial
  // standard deviations and a constant; the value there (nth_element, descending).
  auto bound = [&](int64_t rank, int dir) -> double {
    const double p = static_cast<double>(rank) / static_cast<double>(N);
    const double s = p * n + dir * (4.0 * std::sqrt(n * p * (1.0 - p)) + 8.0);
    const double pos = dir < 0 ? std::floor(s) : std::ceil(s);
    if (pos < 0.0 || pos >= static_cast<double>(n)) return dir < 0 ? INFINITY : -INFINITY;
    auto it = sample.begin() + static_cast<int64_t>(pos);
    std::nth_element(sample.begin(), it, sample.end(), std::greater<double>());
    return *it;
  };
  Zones zn;
  for (const auto& w : wanted) {
    zn.add(bound(w[1] - 1, +1), bound(w[0], -1));
  }
  return zn;
}

thread_local CondenseStats t_stats;

struct Scratch {
  std::vector<double> copy_value;
  std::vector<uint64_t> copy_index, cand, tmp;
  std::vector<int64_t> radix_hist;
  size_t bytes() const {
    return (copy_value.capacity() + copy_index.capacity() + cand.capacity() + tmp.capacity() +
            radix_hist.capacity()) * 8;
  }
};
// A thread keeps its scratch for the next call up to this size (first-touch faults of
// fresh buffers cost as much as a pass over the data); larger scratch is released.
constexpr size_t kKeptScratchBytes = size_t{256} << 20;

// Writes keep [n_keep] (the top n_keep points, sorted by index) and pi[lo:hi] for each range.
void partial_rank(const double* v, int64_t N, int64_t n_keep, const std::vector<Range>& ranges, int64_t* keep) {
  const int T = thread_count(N);
  const Isa isa = active_isa();
  // The wanted rank ranges, merged: the given ranges and the keep boundary.
  std::vector<std::array<int64_t, 2>> wanted;
  for (const Range& r : ranges) {
    if (r.lo < r.hi) wanted.push_back({r.lo, r.hi});
  }
  if (n_keep < N) wanted.push_back({n_keep - 1, n_keep + 1});
  std::sort(wanted.begin(), wanted.end());
  {
    std::vector<std::array<int64_t, 2>> merged;
    for (const auto& w : wanted) {
      if (!merged.empty() && w[0] <= merged.back()[1]) {
        merged.back()[1] = std::max(merged.back()[1], w[1]);
      } else {
        merged.push_back(w);
      }
    }
    wanted.swap(merged);
  }
  if (static_cast<int>(wanted.size()) > kMaxZones) throw std::logic_error("condense: more rank ranges than zones");

  std::vector<double> sample = take_sample(v, N);
  Zones zn = predict_zones(sample, N, wanted);
  // The finite range that stands in for infinite zone bounds in the keys: the sample's, less
  // its two most extreme values at each end, so that an outlier (1e300 among values of
  // order 1) cannot squeeze every key into one; the few points beyond it clamp to the
  // zone's end keys and are ordered exactly.
  double sample_lo = INFINITY, sample_hi = -INFINITY;
  {
    std::vector<double> finite;
    for (double x : sample) {
      if (std::isfinite(x)) finite.push_back(x);
    }
    if (!finite.empty()) {
      const size_t q = std::min<size_t>(2, (finite.size() - 1) / 2);
      std::nth_element(finite.begin(), finite.begin() + q, finite.end());
      sample_lo = finite[q];
      std::nth_element(finite.begin(), finite.end() - 1 - q, finite.end());
      sample_hi = finite[finite.size() - 1 - q];
    }
  }
  int64_t sampled_in = 0;
  for (double x : sample) {
    for (int z = 0; z < zn.count; ++z) sampled_in += zn.lo[z] <= x && x <= zn.hi[z];
  }
  double copy_fraction = sample.empty() ? 1.0 : static_cast<double>(sampled_in) / static_cast<double>(sample.size());

  // Scratch reused across calls of one thread, up to kKeptScratchBytes; the parallel
  // regions use raw pointers only.
  thread_local Scratch scratch;
  Scratch& sc = scratch;
  struct Release {
    Scratch& sc;
    ~Release() {
      if (sc.bytes() > kKeptScratchBytes) sc = Scratch{};
    }
  } release{sc};

  // Pass 1 (at most twice): counts and the copy of the zone members.
  std::vector<ClassCounts> counts(static_cast<size_t>(T));
  std::vector<int64_t> copy_base(static_cast<size_t>(T + 1), 0), copied(static_cast<size_t>(T), 0);
  std::array<int64_t, 2 * kMaxZones + 2> class_rank{};  // class c holds ranks [class_rank[c], class_rank[c + 1])
  t_stats = CondenseStats{};
  for (int attempt = 0;; ++attempt) {
    t_stats.passes = attempt + 1;
    for (int t = 0; t < T; ++t) {
      const Chunk c = chunk_of(t, T, N);
      const double len = static_cast<double>(c.end - c.begin);
      const int64_t cap = static_cast<int64_t>(std::ceil(len * (1.05 * copy_fraction + 0.01))) + 2 * kBlock;
      copy_base[t + 1] = copy_base[t] + std::min(cap, c.end - c.begin) + kSlack;
    }
    double* const cv = grow(sc.copy_value, copy_base[T]);
    uint64_t* const ci = grow(sc.copy_index, copy_base[T]);
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t) {
      const Chunk c = chunk_of(t, T, N);
      ClassCounts cc;
      const int64_t room = copy_base[t + 1] - copy_base[t];
      int64_t m = 0;
      bool full = false;
      for (int64_t b = c.begin; b < c.end; b += kBlock) {
        const int64_t e = std::min(c.end, b + kBlock);
        full = full || room - m < (e - b) + kSlack;
        if (full) {  // stop copying; the members are copied again below
          count_classes(v, b, e, zn, &cc);
        } else {
          m += scan(isa, v, b, e, zn, &cc, cv + copy_base[t] + m, ci + copy_base[t] + m);
        }
      }
      counts[t] = cc;
      copied[t] = full ? -1 : m;
    }
    ClassCounts all;
    for (const ClassCounts& cc : counts) all.add(cc);
    if (all.nan > 0) {
      for (int64_t i = 0; i < N; ++i) {
        if (std::isnan(v[i])) throw std::invalid_argument("values[" + std::to_string(i) + "] is nan");
      }
    }
    const int n_classes = 2 * zn.count + 1;  // above zone 0, zone 0, between, zone 1, below
    class_rank[0] = 0;
    for (int z = 0; z < zn.count; ++z) {
      class_rank[2 * z + 1] = N - all.at_or_below_hi[z];
      class_rank[2 * z + 2] = N - all.below_lo[z];
    }
    class_rank[n_classes] = N;
    bool covered = true;
    for (const auto& w : wanted) {
      bool inside = false;
      for (int z = 0; z < zn.count; ++z) inside = inside || (class_rank[2 * z + 1] <= w[0] && w[1] <= class_rank[2 * z + 2]);
      covered = covered && inside;
    }
    if (covered) break;
    if (attempt == 1) throw std::logic_error("condense: widened zones missed their ranks");
    // Widen: each wanted range takes the value bounds of the classes that hold its ranks.
    auto upper = [&](int c) { return c == 0 ? INFINITY : (c % 2 ? zn.hi[c / 2] : zn.lo[c / 2 - 1]); };
    auto lower = [&](int c) { return c == n_classes - 1 ? -INFINITY : (c % 2 ? zn.lo[c / 2] : zn.hi[c / 2]); };
    Zones wide;
    copy_fraction = 0.0;
    for (const auto& w : wanted) {
      int ca = 0, cb = 0;
      while (class_rank[ca + 1] <= w[0]) ++ca;
      while (class_rank[cb + 1] < w[1]) ++cb;
      copy_fraction += static_cast<double>(class_rank[cb + 1] - class_rank[ca]) / static_cast<double>(N);
      wide.add(lower(cb), upper(ca));
    }
    zn = wide;
  }

  // Zone z holds ranks [class_rank[2z + 1], class_rank[2z + 2]) and sorted positions from
  // zone_pos[z]; thread t holds member_base[t + 1] - member_base[t] of them.
  std::array<int64_t, kMaxZones + 1> zone_pos{};
  for (int z = 0; z < zn.count; ++z) zone_pos[z + 1] = zone_pos[z] + class_rank[2 * z + 2] - class_rank[2 * z + 1];
  const int64_t M = zone_pos[zn.count];
  std::vector<int64_t> member_base(static_cast<size_t>(T + 1), 0);
  bool copy_complete = true;
  for (int t = 0; t < T; ++t) {
    int64_t m = 0;
    for (int z = 0; z < zn.count; ++z) m += counts[t].at_or_below_hi[z] - counts[t].below_lo[z];
    member_base[t + 1] = member_base[t] + m;
    copy_complete = copy_complete && copied[t] >= 0;
  }
  std::vector<int64_t> from(copy_base.begin(), copy_base.end() - 1);  // where thread t's members start
  t_stats.members = M;
  t_stats.recopied = !copy_complete;
  if (!copy_complete) {  // the copy ran out of room: copy again, to exact sizes
    double* const cv = grow(sc.copy_value, M + T * kSlack);
    uint64_t* const ci = grow(sc.copy_index, M + T * kSlack);
    for (int t = 0; t < T; ++t) from[t] = member_base[t] + t * kSlack;
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t) {
      const Chunk c = chunk_of(t, T, N);
      ClassCounts unused;
      scan(isa, v, c.begin, c.end, zn, &unused, cv + from[t], ci + from[t]);
    }
  }

  // Pack the members with their keys.
  std::array<ZoneKey, kMaxZones> zkey;
  for (int z = 0; z < zn.count; ++z) {
    const double hi = std::isfinite(zn.hi[z]) ? zn.hi[z] : sample_hi;
    const double lo = std::isfinite(zn.lo[z]) ? zn.lo[z] : sample_lo;
    zkey[z] = ZoneKey(lo, hi, z);
  }
  uint64_t* cand = grow(sc.cand, M);
  {
    const double split = zn.count > 1 ? zn.lo[0] : -INFINITY;  // members below it are in zone 1
    const double* cv = sc.copy_value.data();
    const uint64_t* ci = sc.copy_index.data();
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t) {
      pack_members(cv + from[t], ci + from[t], member_base[t + 1] - member_base[t], split, zkey[0], zkey[1],
                   cand + member_base[t]);
    }
  }

  // Sort them.
  if (M > 0) {
    const int TS = thread_count(M);
    if (M <= 512) {
      std::sort(cand, cand + M);  // (key, index): ties in index order, as the radix sort leaves them
    } else {
      cand = radix_sort(cand, grow(sc.tmp, M), M, grow(sc.radix_hist, int64_t(TS) * kBins), TS);
    }
#pragma omp parallel for num_threads(TS) schedule(static, 1)
    for (int t = 0; t < TS; ++t) {
      auto run_start = [&](int64_t p) {
        while (p > 0 && p < M && (cand[p] >> 32) == (cand[p - 1] >> 32)) ++p;
        return p;
      };
      const Chunk c = chunk_of(t, TS, M);
      order_equal_keys(cand, run_start(c.begin), run_start(c.end), v);
    }
  }
  auto at_rank = [&](int64_t rank) {  // the sorted member of a rank inside a zone
    int z = 0;
    while (rank >= class_rank[2 * z + 2]) ++z;
    return cand + zone_pos[z] + (rank - class_rank[2 * z + 1]);
  };

  // Cut the ranges out (each lies inside one zone).
  for (const Range& r : ranges) {
    if (r.lo >= r.hi) continue;
    const uint64_t* src = at_rank(r.lo);
    const int64_t n = r.hi - r.lo;
#pragma omp parallel for num_threads(thread_count(n)) schedule(static)
    for (int64_t q = 0; q < n; ++q) r.out[q] = index_of(src[q]);
  }

  // Pass 3: keep, against the threshold of rank n_keep - 1.
  if (n_keep == N) {
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t i = 0; i < N; ++i) keep[i] = i;
    return;
  }
  const int64_t is = index_of(*at_rank(n_keep - 1));
  const double vs = v[is];
  int zk = 0;  // the zone holding the threshold
  while (n_keep - 1 >= class_rank[2 * zk + 2]) ++zk;
  const double* cv = sc.copy_value.data();
  const uint64_t* ci = sc.copy_index.data();
  std::vector<int64_t> keep_base(static_cast<size_t>(T + 1), 0);
#pragma omp parallel for num_threads(T) schedule(static, 1)
  for (int t = 0; t < T; ++t) {
    const Chunk c = chunk_of(t, T, N);
    keep_base[t + 1] = (c.end - c.begin) - counts[t].at_or_below_hi[zk] +
                       count_kept_members(cv + from[t], ci + from[t], member_base[t + 1] - member_base[t],
                                          zn.hi[zk], vs, is);
  }
  for (int t = 0; t < T; ++t) keep_base[t + 1] += keep_base[t];
  if (keep_base[T] != n_keep) throw std::logic_error("condense: the keep threshold selected a wrong count");
#pragma omp parallel for num_threads(T) schedule(static, 1)
  for (int t = 0; t < T; ++t) {
    const Chunk c = chunk_of(t, T, N);
    select_kept(isa, v, c.begin, c.end, vs, is, keep + keep_base[t], keep_base[t + 1] - keep_base[t]);
  }
}

}  // namespace

CondenseStats last_condense_stats() { return t_stats; }

const char* condense_isa() { return active_isa() == Isa::kAvx512 ? "avx512" : "generic"; }

void set_condense_isa(const std::string& name) {
  if (name == "auto") {
    g_isa = static_cast<int>(Isa::kAuto);
  } else if (name == "generic") {
    g_isa = static_cast<int>(Isa::kGeneric);
  } else if (name == "avx512") {
    if (!cpu_has_avx512()) throw std::invalid_argument("isa 'avx512': this CPU (or build) has no AVX-512F");
    g_isa = static_cast<int>(Isa::kAvx512);
  } else {
    throw std::invalid_argument("isa must be 'auto', 'generic' or 'avx512', got '" + name + "'");
  }
}

void condense(const double* values, int64_t N, int64_t n_keep, int64_t n_prev, VaksMode mode,
              double eps_m, const int64_t* random_pos, int64_t* keep, int64_t* dropped,
              int64_t* dst, int64_t* src, double* eps) {
  if (N <= 0 || n_keep < 1 || n_keep > n_prev || n_prev > N) {
    throw std::invalid_argument("condense needs 1 <= n_keep <= n_prev <= N, got n_keep = " + std::to_string(n_keep) +
                                ", n_prev = " + std::to_string(n_prev) + ", N = " + std::to_string(N));
  }
  if (N > static_cast<int64_t>(kIndexMask)) {
    throw std::invalid_argument("CPU condense handles N < 2**32 points, got N = " + std::to_string(N));
  }
  const int64_t P = vaks_pairs(n_keep, n_prev, mode);
  if (mode == VaksMode::kRandom) {
    for (int64_t j = 0; j < P; ++j) {
      if (random_pos[j] < 0 || random_pos[j] >= n_keep) {
        throw std::out_of_range("random_pos[" + std::to_string(j) + "] = " + std::to_string(random_pos[j]) +
                                " is outside [0, " + std::to_string(n_keep) + ")");
      }
    }
  }

  std::vector<Range> ranges{{n_keep, n_prev, dropped}};
  if (mode == VaksMode::kLow) ranges.push_back({n_keep - P, n_keep, dst});  // the P lowest kept
  if (mode == VaksMode::kHigh) ranges.push_back({0, P, dst});               // the P highest kept
  partial_rank(values, N, n_keep, ranges, keep);
  const bool random = mode == VaksMode::kRandom;
#pragma omp parallel for num_threads(thread_count(P)) schedule(static)
  for (int64_t j = 0; j < P; ++j) {
    src[j] = dropped[j];
    if (random) dst[j] = keep[random_pos[j]];
    eps[j] = random ? eps_m : vaks_eps(j, P, eps_m);
  }
}

}  // namespace cpu
}  // namespace kcd
