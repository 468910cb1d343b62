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

#include "kcd/blend.h"
#include "kcd/ops.h"

namespace kcd {
namespace cpu {
namespace {

struct Range {
  int64_t lo, hi;   // ranks [lo, hi) wanted in order
  int64_t* out;     // [hi - lo] point indices
};

class Bucketing {
 public:
  Bucketing(const double* v, int64_t N) : v_(v) {
    double lo = INFINITY, hi = -INFINITY;
    bool nan = false;
    int64_t first_nan = -1;
    for (int64_t i = 0; i < N; ++i) {
      const double x = v[i];
      if (std::isnan(x)) {
        nan = true;
        first_nan = i;
        break;
      }
      if (std::isfinite(x)) {
        lo = x < lo ? x : lo;
        hi = x > hi ? x : hi;
      }
    }
    if (nan) throw std::invalid_argument("values[" + std::to_string(first_nan) + "] is nan");
    nb_ = std::max<int64_t>(1, std::min<int64_t>(int64_t(1) << 16, N / 8));
    vmin_ = lo;
    const double span = hi - lo;
    scale_ = (std::isfinite(span) && span > 0.0) ? static_cast<double>(nb_ - 1) / span : 0.0;
  }
  // Buckets in rank order: 0 holds +inf, 1..nb finite values (descending), nb + 1 -inf.
  int64_t count() const { return nb_ + 2; }
  int64_t operator()(double x) const {
    if (x == INFINITY) return 0;
    if (x == -INFINITY) return nb_ + 1;
    double b = std::floor((x - vmin_) * scale_);
    b = b < 0.0 ? 0.0 : (b > static_cast<double>(nb_ - 1) ? static_cast<double>(nb_ - 1) : b);
    return nb_ - static_cast<int64_t>(b);
  }

 private:
  const double* v_;
  int64_t nb_;
  double vmin_, scale_;
};

// Sets keep_flag[i] = (rank of i < n_keep) for all i, and writes pi[lo:hi] for each range.
void partial_rank(const double* v, int64_t N, int64_t n_keep, const std::vector<Range>& ranges,
                  std::vector<uint8_t>& keep_flag) {
  const Bucketing bucket(v, N);
  const int64_t K = bucket.count();
  std::vector<int64_t> start(static_cast<size_t>(K + 1), 0);
  for (int64_t i = 0; i < N; ++i) ++start[bucket(v[i]) + 1];
  for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];

  // A bucket is sorted when it overlaps a wanted range or straddles the keep boundary.
  std::vector<uint8_t> needed(static_cast<size_t>(K), 0);
  std::vector<int64_t> cand_start(static_cast<size_t>(K + 1), 0);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t a = start[k], b = start[k + 1];
    bool need = a < n_keep && n_keep < b;
    for (const Range& r : ranges) need = need || (a < r.hi && r.lo < b);
    needed[k] = need && b > a;
    cand_start[k + 1] = cand_start[k] + (needed[k] ? b - a : 0);
  }
  std::vector<int64_t> cand(static_cast<size_t>(cand_start[K]));
  std::vector<int64_t> fill(cand_start.begin(), cand_start.end() - 1);

  keep_flag.assign(static_cast<size_t>(N), 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t k = bucket(v[i]);
    keep_flag[i] = start[k + 1] <= n_keep;
    if (needed[k]) cand[fill[k]++] = i;
  }

  // Candidates of a bucket arrive in index order; a stable sort by value descending
  // yields (value desc, index asc), the rank order.
  const auto by_value_desc = [v](int64_t a, int64_t b) { return v[a] > v[b]; };
  for (int64_t k = 0; k < K; ++k) {
    if (!needed[k]) continue;
    int64_t* first = cand.data() + cand_start[k];
    int64_t* last = cand.data() + cand_start[k + 1];
    if (!std::is_sorted(first, last, by_value_desc)) std::stable_sort(first, last, by_value_desc);
    for (int64_t t = 0; t < last - first; ++t) {
      const int64_t rank = start[k] + t;
      if (rank < n_keep) keep_flag[first[t]] = 1;
      for (const Range& r : ranges) {
        if (r.lo <= rank && rank < r.hi) r.out[rank - r.lo] = first[t];
      }
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
  std::vector<uint8_t> flag;
  partial_rank(values, N, n_keep, ranges, flag);

  int64_t w = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (flag[i]) keep[w++] = i;
  }
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
