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

// Monotone bucketing of values: bucket 0 holds +inf, 1..nb the finite values from the
// largest down (linear in [lo, hi], values outside clamped to the end buckets), nb + 1
// holds -inf and values below lo. Any lo < hi keeps buckets ordered by value, so ranks
// of different buckets never interleave and only buckets that overlap a wanted rank
// range need sorting; [lo, hi] only decides how evenly points spread over buckets.
class Bucketing {
 public:
  static constexpr int64_t kMaxBuckets = 65534;  // + 2 end buckets: ids fit uint16_t

  Bucketing(int64_t nb, double lo, double hi) : nb_(nb), lo_(lo) {
    const double span = hi - lo;
    scale_ = (std::isfinite(span) && span > 0.0) ? static_cast<double>(nb_) / span : 0.0;
  }
  int64_t count() const { return nb_ + 2; }
  uint16_t operator()(double x) const {
    // t is in [0, nb] for finite x in [lo, hi]; truncation is floor there, and the
    // comparisons map +inf (t = +inf) to 0 and -inf / nan (t < 0 or nan) to nb + 1.
    const double t = (x - lo_) * scale_;
    const int64_t b = t >= static_cast<double>(nb_ - 1) ? nb_ - 1 : static_cast<int64_t>(t >= 0.0 ? t : -1.0);
    const int64_t id = x == INFINITY ? 0 : (b < 0 ? nb_ + 1 : nb_ - b);
    return static_cast<uint16_t>(id);
  }

 private:
  int64_t nb_;
  double lo_, scale_;
};

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

// Writes keep [n_keep] (the top n_keep points, sorted by index) and pi[lo:hi] for each
// range: two streaming passes over the values, one over the bucket ids, plus sorting the
// buckets that overlap the ranges.
void partial_rank(const double* v, int64_t N, int64_t n_keep, const std::vector<Range>& ranges, int64_t* keep) {
  const int T = thread_count(N);
  const auto [lo, hi] = sample_range(v, N);
  const Bucketing bucket(std::max<int64_t>(1, std::min<int64_t>(Bucketing::kMaxBuckets, N / 16)), lo, hi);
  const int64_t K = bucket.count();

  // Pass 1: bucket of every point, per-chunk histograms, NaN count.
  // Scratch reused across calls of one thread: first-touch page faults of fresh
  // buffers cost as much as a pass over the data.
  // (thread_local storage: the parallel regions below use the raw pointers only.)
  thread_local std::vector<uint16_t> bid_store;
  if (static_cast<int64_t>(bid_store.size()) < N) bid_store.resize(static_cast<size_t>(N));
  uint16_t* const bid = bid_store.data();
  std::vector<std::vector<int64_t>> hist(static_cast<size_t>(T));
  std::vector<int64_t> nans(static_cast<size_t>(T), 0);
#pragma omp parallel num_threads(T)
  {
    const int t = thread_id();
    const Chunk c = chunk_of(t, T, N);
    hist[t].assign(static_cast<size_t>(K), 0);
    int64_t* h = hist[t].data();
    uint16_t* out = bid;
    int64_t nan_count = 0;
#pragma omp simd reduction(+ : nan_count)
    for (int64_t i = c.begin; i < c.end; ++i) {
      out[i] = bucket(v[i]);
      nan_count += v[i] != v[i];
    }
    for (int64_t i = c.begin; i < c.end; ++i) ++h[out[i]];
    nans[t] = nan_count;
  }
  for (int t = 0; t < T; ++t) {
    if (nans[t] == 0) continue;
    for (int64_t i = 0; i < N; ++i) {
      if (std::isnan(v[i])) throw std::invalid_argument("values[" + std::to_string(i) + "] is nan");
    }
  }
  std::vector<int64_t> start(static_cast<size_t>(K + 1), 0);
  for (int64_t k = 0; k < K; ++k) {
    int64_t total = 0;
    for (int t = 0; t < T; ++t) total += hist[t][k];
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
  std::vector<uint8_t> needed(static_cast<size_t>(K), 0);
  std::vector<int64_t> cand_start(static_cast<size_t>(K + 1), 0);
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
  thread_local std::vector<Point> cand_store;
  if (static_cast<int64_t>(cand_store.size()) < cand_start[K]) cand_store.resize(static_cast<size_t>(cand_start[K]));
  Point* const cand = cand_store.data();
  std::vector<std::vector<int64_t>> fill(static_cast<size_t>(T));
  std::vector<int64_t> keep_base(static_cast<size_t>(T + 1), 0);
  for (int t = 0; t < T; ++t) {
    fill[t].assign(static_cast<size_t>(K), 0);
    int64_t kept = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (needed[k]) {
        int64_t before = 0;
        for (int u = 0; u < t; ++u) before += hist[u][k];
        fill[t][k] = cand_start[k] + before;
      }
      if (k < kept_below) kept += hist[t][k];
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
    int64_t* f = fill[t].data();
    auto sk = std::lower_bound(straddle_kept.begin(), straddle_kept.end(), c.begin);
    int64_t next_straddle = sk != straddle_kept.end() ? *sk : N;
    const uint16_t* b = bid;
    const uint32_t below = static_cast<uint32_t>(kept_below);
    const int64_t w_end = keep_base[t + 1];
    for (int64_t i = c.begin; i < c.end; ++i) {
      // branch-free append of whole kept buckets (the slot is overwritten when i is not
      // kept); the few kept points of the straddling bucket by cursor
      if (w < w_end) keep[w] = i;
      w += static_cast<uint32_t>(b[i]) < below;
      if (i == next_straddle) {
        keep[w++] = i;
        next_straddle = ++sk != straddle_kept.end() ? *sk : N;
      }
    }
    if (need_lo <= need_hi) {
      const uint16_t nlo = static_cast<uint16_t>(need_lo), span = static_cast<uint16_t>(need_hi - need_lo);
      for (int64_t i = c.begin; i < c.end; ++i) {
        const uint16_t k = b[i];
        if (static_cast<uint16_t>(k - nlo) <= span && needed[k]) cand[f[k]++] = {v[i], i};
      }
    }
  }

  // Sort the needed buckets and cut the ranges out of them.
#pragma omp parallel for num_threads(T) schedule(dynamic, 64)
  for (int64_t k = need_lo; k <= need_hi; ++k) {
    if (!needed[k]) continue;
    Point* first = cand + cand_start[k];
    Point* last = cand + cand_start[k + 1];
    sort_points(first, last);
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
  const int64_t L = n_prev - n_keep;
  const int64_t P = vaks_pairs(n_keep, n_prev, mode);
  if (mode == VaksMode::kRandom) {
    for (int64_t j = 0; j < P; ++j) {
      if (random_pos[j] < 0 || random_pos[j] >= n_keep) {
        throw std::out_of_range("random_pos[" + std::to_string(j) + "] = " + std::to_string(random_pos[j]) +
                                " is outside [0, " + std::to_string(n_keep) + ")");
      }
    }
  }

  std::vector<Range> ranges;
  std::vector<int64_t> low_and_dropped;
  if (mode == VaksMode::kLow) {
    // pi[n_keep - P : n_prev]: the P lowest kept points, then the dropped ones.
    low_and_dropped.resize(static_cast<size_t>(P + L));
    ranges.push_back({n_keep - P, n_prev, low_and_dropped.data()});
  } else {
    ranges.push_back({n_keep, n_prev, dropped});
    if (mode == VaksMode::kHigh) ranges.push_back({0, P, dst});
  }
  partial_rank(values, N, n_keep, ranges, keep);
  if (mode == VaksMode::kLow) {
    std::copy(low_and_dropped.begin(), low_and_dropped.begin() + P, dst);
    std::copy(low_and_dropped.begin() + P, low_and_dropped.end(), dropped);
  }
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
