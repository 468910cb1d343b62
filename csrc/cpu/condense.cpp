// CPU condensation (KCD_SPEC section 3-4) in O(N + M log m): the rank order pi (value
// descending, index ascending) is needed only inside a few rank ranges (the dropped
// points and the lowest / highest kept ones), plus the set of the top n_keep points.
// A linear bucketing by value (monotone, so buckets are ordered) locates those ranges in
// three streaming passes; only the candidates in the buckets that overlap them are
// sorted, bucket by bucket (m ~ 20 points each for smooth value distributions).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kcd/blend.h"
#include "kcd/ops.h"

namespace kcd {
namespace cpu {
namespace {

struct Range {
  int64_t lo, hi;   // ranks [lo, hi) wanted in order
  int64_t* out;     // [hi - lo] point indices
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KCD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KCD_CLONES
#endif

// Monotone bucketing of values: t = (x - lo) * scale clamped to [-1, nb - 1] and
// truncated, bucket id = nb - 1 - t, so ids ascend as values descend (+inf and the
// largest values share id 0; -inf and NaN land at id nb). Any lo < hi keeps buckets
// ordered by value, so ranks of different buckets never interleave and only the buckets
// that overlap a wanted rank range need sorting; [lo, hi] (from a sample) only decides
// how evenly the points spread.
struct Bucketing {
  static constexpr int64_t kMaxBuckets = 65535;  // ids 0..65535 fit uint16_t
  int64_t nb;
  double lo, scale;

  Bucketing(int64_t nb_, double lo_, double hi_) : nb(nb_), lo(lo_) {
    const double span = hi_ - lo_;
    // scale must stay > 0 (so +inf maps to the top), whatever the sample saw
    scale = (std::isfinite(span) && span > 0.0) ? static_cast<double>(nb - 1) / span : 1.0;
    if (!std::isfinite(scale) || scale <= 0.0) scale = 1.0;
    if (!std::isfinite(lo)) lo = 0.0;
  }
  int64_t count() const { return nb + 1; }
};

// ids[i] = bucket of v[i] for i in [begin, end); returns the number of NaN values.
KCD_CLONES int64_t bucket_ids(const double* v, int64_t begin, int64_t end, uint16_t* ids, Bucketing bk) {
  const double top = static_cast<double>(bk.nb - 1);
  const int32_t last = static_cast<int32_t>(bk.nb - 1);
  int64_t nan_count = 0;
#pragma omp simd reduction(+ : nan_count)
  for (int64_t i = begin; i < end; ++i) {
    const double x = v[i];
    double t = (x - bk.lo) * bk.scale;
    t = t >= -1.0 ? t : -1.0;  // also NaN -> -1
    t = t <= top ? t : top;
    ids[i] = static_cast<uint16_t>(last - static_cast<int32_t>(t));
    nan_count += x != x;
  }
  return nan_count;
}

// The finite value range of an evenly strided sample (deterministic, O(4096)).
std::pair<double, double> sample_range(const double* v, int64_t N) {
  double lo = INFINITY, hi = -INFINITY;
  const int64_t step = std::max<int64_t>(1, N / 4096);
  for (int64_t i = 0; i < N; i += step) {
    if (std::isfinite(v[i])) {
      lo = std::min(lo, v[i]);
      hi = std::max(hi, v[i]);
    }
  }
  return {lo, hi};
}

int thread_count(int64_t N) {
#ifdef _OPENMP
  return N >= (int64_t(1) << 16) ? omp_get_max_threads() : 1;
#else
  (void)N;
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

struct Chunk {
  int64_t begin, end;
};
Chunk chunk_of(int t, int T, int64_t N) { return {N * t / T, N * (t + 1) / T}; }

struct Point {
  double value;
  int64_t index;
};

// Sorts points (arriving in index order) by value descending; ties keep index order.
// Small runs (the common case) by insertion sort, large ones by std::sort.
void sort_points(Point* first, Point* last) {
  const int64_t n = last - first;
  if (n <= 48) {
    for (int64_t i = 1; i < n; ++i) {
      const Point x = first[i];
      int64_t j = i;
      while (j > 0 && first[j - 1].value < x.value) {
        first[j] = first[j - 1];
        --j;
      }
      first[j] = x;
    }
    return;
  }
  std::sort(first, last, [](const Point& a, const Point& b) {
    return a.value > b.value || (a.value == b.value && a.index < b.index);
  });
}

void insertion_sort(Point* first, Point* last) {
  for (Point* p = first + 1; p < last; ++p) {
    const Point x = *p;
    Point* q = p;
    while (q > first && (q - 1)->value < x.value) {
      *q = *(q - 1);
      --q;
    }
    *q = x;
  }
}

// Sorts the points of one bucket (id `id`, arriving in index order) by value descending,
// ties by index: a stable counting sort into 16 sub-buckets of the same linear map (so
// the order agrees with the buckets'), then insertion sort of each (~1-2 points).
void sort_bucket(Point* first, Point* last, int64_t id, const Bucketing& bk, std::vector<Point>& tmp) {
  constexpr int R = 16;
  const int64_t n = last - first;
  if (n <= 12) {
    insertion_sort(first, last);
    return;
  }
  const double base = static_cast<double>(bk.nb - 1 - id);  // t of the bucket's lower edge
  int sub_of[4096];
  int count[R + 1] = {0};
  const bool small = n <= 4096;
  if (!small) {
    sort_points(first, last);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    double f = ((first[j].value - bk.lo) * bk.scale - base) * R;
    f = f >= 0.0 ? f : 0.0;
    f = f <= R - 1 ? f : R - 1;
    const int sub = R - 1 - static_cast<int>(f);  // ascending sub = descending value
    sub_of[j] = sub;
    ++count[sub + 1];
  }
  for (int r = 0; r < R; ++r) count[r + 1] += count[r];
  tmp.resize(static_cast<size_t>(n));
  int pos[R];
  for (int r = 0; r < R; ++r) pos[r] = count[r];
  for (int64_t j = 0; j < n; ++j) tmp[pos[sub_of[j]]++] = first[j];
  for (int r = 0; r < R; ++r) insertion_sort(tmp.data() + count[r], tmp.data() + count[r + 1]);
  std::copy(tmp.begin(), tmp.begin() + n, first);
}

struct Scratch {
  std::vector<uint16_t> bid;
  std::vector<int64_t> hist, fill, start, cand_start;
  std::vector<uint8_t> needed;
  std::vector<Point> cand;
};

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

// Writes keep [n_keep] (the top n_keep points, sorted by index) and pi[lo:hi] for each
// range: two streaming passes over the values, one over the bucket ids, plus sorting the
// buckets that overlap the ranges.
void partial_rank(const double* v, int64_t N, int64_t n_keep, const std::vector<Range>& ranges, int64_t* keep) {
  const int T = thread_count(N);
  const auto [lo, hi] = sample_range(v, N);
  const Bucketing bucket(std::max<int64_t>(2, std::min<int64_t>(Bucketing::kMaxBuckets, N / 16)), lo, hi);
  const int64_t K = bucket.count();

  // Scratch reused across calls of one thread (first-touch page faults of fresh buffers
  // cost as much as a pass over the data); the parallel regions use raw pointers only.
  thread_local Scratch scratch;
  Scratch& sc = scratch;

  // Pass 1: bucket of every point, per-chunk histograms, NaN count.
  uint16_t* const bid = grow(sc.bid, N);
  int64_t* const hist = grow(sc.hist, T * K);  // [T, K]
  std::vector<int64_t> nans(static_cast<size_t>(T), 0);
#pragma omp parallel num_threads(T)
  {
    const int t = thread_id();
    const Chunk c = chunk_of(t, T, N);
    int64_t* h = hist + t * K;
    std::fill(h, h + K, 0);
    nans[t] = bucket_ids(v, c.begin, c.end, bid, bucket);
    for (int64_t i = c.begin; i < c.end; ++i) ++h[bid[i]];
  }
  for (int t = 0; t < T; ++t) {
    if (nans[t] == 0) continue;
    for (int64_t i = 0; i < N; ++i) {
      if (std::isnan(v[i])) throw std::invalid_argument("values[" + std::to_string(i) + "] is nan");
    }
  }
  int64_t* const start = grow(sc.start, K + 1);
  start[0] = 0;
  for (int64_t k = 0; k < K; ++k) {
    int64_t total = 0;
    for (int t = 0; t < T; ++t) total += hist[t * K + k];
    start[k + 1] = start[k] + total;
  }

  // Buckets below `kept_below` are kept whole; the one bucket that straddles the keep
  // boundary (if any) is resolved first, so pass 2 can write keep in index order.
  int64_t kept_below = 0;
  while (kept_below < K && start[kept_below + 1] <= n_keep) ++kept_below;
  const bool straddles = kept_below < K && start[kept_below] < n_keep;
  std::vector<int64_t> straddle_kept;  // sorted by index
  if (straddles) {
    std::vector<std::vector<Point>> found(static_cast<size_t>(T));
    const uint16_t sb = static_cast<uint16_t>(kept_below);
#pragma omp parallel num_threads(T)
    {
      const int t = thread_id();
      const Chunk c = chunk_of(t, T, N);
      for (int64_t i = c.begin; i < c.end; ++i) {
        if (bid[i] == sb) found[t].push_back({v[i], i});
      }
    }
    std::vector<Point> members;
    for (const auto& f : found) members.insert(members.end(), f.begin(), f.end());
    sort_points(members.data(), members.data() + members.size());
    for (int64_t j = 0; j < n_keep - start[kept_below]; ++j) straddle_kept.push_back(members[j].index);
    std::sort(straddle_kept.begin(), straddle_kept.end());
  }

  // Buckets to sort: those overlapping a range; each range covers a contiguous run of
  // buckets, laid out with per-chunk runs (so candidates stay in index order).
  uint8_t* const needed = grow(sc.needed, K);
  int64_t* const cand_start = grow(sc.cand_start, K + 1);
  cand_start[0] = 0;
  int64_t need_lo = K, need_hi = -1;
  for (int64_t k = 0; k < K; ++k) {
    bool need = false;
    for (const Range& r : ranges) need = need || (start[k] < r.hi && r.lo < start[k + 1]);
    needed[k] = need;
    cand_start[k + 1] = cand_start[k] + (need ? start[k + 1] - start[k] : 0);
    if (need) {
      need_lo = std::min(need_lo, k);
      need_hi = std::max(need_hi, k);
    }
  }
  Point* const cand = grow(sc.cand, cand_start[K]);
  int64_t* const fill = grow(sc.fill, T * K);  // [T, K]: next candidate slot
  std::vector<int64_t> keep_base(static_cast<size_t>(T + 1), 0);
  for (int t = 0; t < T; ++t) {
    int64_t kept = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (needed[k]) {
        int64_t before = 0;
        for (int u = 0; u < t; ++u) before += hist[u * K + k];
        fill[t * K + k] = cand_start[k] + before;
      }
      if (k < kept_below) kept += hist[t * K + k];
    }
    const Chunk c = chunk_of(t, T, N);
    kept += std::lower_bound(straddle_kept.begin(), straddle_kept.end(), c.end) -
            std::lower_bound(straddle_kept.begin(), straddle_kept.end(), c.begin);
    keep_base[t + 1] = keep_base[t] + kept;
  }

  // Pass 2: the keep set in index order, and the candidates with their values.
#pragma omp parallel num_threads(T)
  {
    const int t = thread_id();
    const Chunk c = chunk_of(t, T, N);
    int64_t w = keep_base[t];
    int64_t* f = fill + t * K;
    auto sk = std::lower_bound(straddle_kept.begin(), straddle_kept.end(), c.begin);
    int64_t next_straddle = sk != straddle_kept.end() ? *sk : N;
    const uint16_t* b = bid;
    const uint32_t below = static_cast<uint32_t>(kept_below);
    const int64_t w_end = keep_base[t + 1];
    // One branch-free pass: append whole kept buckets to keep (the slot is overwritten
    // when i is not kept), the few kept points of the straddling bucket by cursor, and
    // compact the indices whose bucket lies in the needed span.
    thread_local std::vector<int64_t> span_store;  // this worker thread's own buffer
    int64_t* const in_span = grow(span_store, c.end - c.begin);
    const uint32_t nlo = static_cast<uint32_t>(need_lo);
    const uint32_t nspan = need_lo <= need_hi ? static_cast<uint32_t>(need_hi - need_lo) : 0;
    const bool any_needed = need_lo <= need_hi;
    int64_t m = 0;
    for (int64_t i = c.begin; i < c.end; ++i) {
      const uint32_t k = b[i];
      if (w < w_end) keep[w] = i;
      w += k < below;
      if (i == next_straddle) {
        keep[w++] = i;
        next_straddle = ++sk != straddle_kept.end() ? *sk : N;
      }
      in_span[m] = i;
      m += any_needed && k - nlo <= nspan;
    }
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = in_span[j];
      const uint16_t k = b[i];
      if (needed[k]) cand[f[k]++] = {v[i], i};
    }
  }

  // Sort the needed buckets and cut the ranges out of them.
#pragma omp parallel for num_threads(T) schedule(dynamic, 64)
  for (int64_t k = need_lo; k <= need_hi; ++k) {
    if (!needed[k]) continue;
    Point* first = cand + cand_start[k];
    Point* last = cand + cand_start[k + 1];
    thread_local std::vector<Point> tmp;
    sort_bucket(first, last, k, bucket, tmp);
    for (const Range& r : ranges) {
      const int64_t a = std::max(r.lo, start[k]), b = std::min(r.hi, start[k + 1]);
      for (int64_t rank = a; rank < b; ++rank) r.out[rank - r.lo] = first[rank - start[k]].index;
    }
  }
}

}  // namespace

void condense(const double* values, int64_t N, int64_t n_keep, int64_t n_prev, VaksMode mode,
              double eps_m, const int64_t* random_pos, int64_t* keep, int64_t* dropped,
              int64_t* dst, int64_t* src, double* eps) {
  if (N <= 0 || n_keep < 1 || n_keep > n_prev || n_prev > N) {
    throw std::invalid_argument("condense needs 1 <= n_keep <= n_prev <= N, got n_keep = " + std::to_string(n_keep) +
                                ", n_prev = " + std::to_string(n_prev) + ", N = " + std::to_string(N));
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
  for (int64_t j = 0; j < P; ++j) {
    src[j] = dropped[j];
    if (mode == VaksMode::kRandom) {
      dst[j] = keep[random_pos[j]];
      eps[j] = eps_m;
    } else {
      eps[j] = vaks_eps(j, P, eps_m);
    }
  }
}

}  // namespace cpu
}  // namespace kcd
