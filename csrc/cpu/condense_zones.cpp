// Step 1 of the CPU condensation: a sample of 4096 values predicts, for each wanted rank
// range, a value zone that holds it (four binomial standard deviations of slack on each
// side); where pass 1 finds that a zone misses its ranks, the zones widen to the classes
// that hold them.
#include "condense_zones.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

namespace kcd {
namespace cpu {
namespace condense_detail {
namespace {

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

// Zones predicted from the sample for rank ranges `wanted` (ascending, disjoint);
// zone_of[k] receives the zone that holds wanted[k].
Zones predict_zones(std::vector<double>& sample, int64_t N, const RankRanges& wanted, std::vector<int>* zone_of) {
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
  zone_of->clear();
  for (const auto& w : wanted) zone_of->push_back(zn.add(bound(w[1] - 1, +1), bound(w[0], -1)));
  return zn;
}

// The sample's finite range, less its two most extreme values at each end, so that an
// outlier (1e300 among values of order 1) cannot squeeze every key into one; the few
// points beyond it clamp to the zone's end keys and are ordered exactly. Empty (lo = inf,
// hi = -inf) when the sample has no finite value.
void finite_range(const std::vector<double>& sample, double* lo, double* hi) {
  std::vector<double> finite;
  for (double x : sample) {
    if (std::isfinite(x)) finite.push_back(x);
  }
  if (finite.empty()) return;
  const size_t q = std::min<size_t>(2, (finite.size() - 1) / 2);
  std::nth_element(finite.begin(), finite.begin() + q, finite.end());
  *lo = finite[q];
  std::nth_element(finite.begin(), finite.end() - 1 - q, finite.end());
  *hi = finite[finite.size() - 1 - q];
}

// The fraction of the sample inside the zones.
double fraction_inside(const std::vector<double>& sample, const Zones& zn) {
  if (sample.empty()) return 1.0;
  int64_t inside = 0;
  for (double x : sample) {
    for (int z = 0; z < zn.count; ++z) inside += zn.lo[z] <= x && x <= zn.hi[z];
  }
  return static_cast<double>(inside) / static_cast<double>(sample.size());
}

}  // namespace

ZonePlan plan_zones(const double* v, int64_t N, const RankRanges& wanted) {
  ZonePlan plan;
  std::vector<double> sample = take_sample(v, N);
  plan.zn = predict_zones(sample, N, wanted, &plan.zone_of);
  finite_range(sample, &plan.key_lo, &plan.key_hi);
  plan.copy_fraction = fraction_inside(sample, plan.zn);
  return plan;
}

Pass1 pass1_of(const ZonePlan& plan, int boundary) {
  const Zones& z = plan.zn;
  Pass1 p;
  p.zn = z;
  p.above = boundary >= 0 ? z.hi[plan.zone_of[boundary]] : INFINITY;
  for (int k = 0; k < z.count; ++k) {
    const double hi = std::isfinite(z.hi[k]) ? z.hi[k] : plan.key_hi;
    const double lo = std::isfinite(z.lo[k]) ? z.lo[k] : plan.key_lo;
    (k == 0 ? p.key0 : p.key1) = ZoneKey(lo, hi, k);
  }
  p.split = z.count > 1 ? z.lo[0] : -INFINITY;  // members below it are in zone 1
  return p;
}

ClassRanks class_ranks(const ClassCounts& all, const Zones& zn, int64_t N) {
  ClassRanks r{};
  const int n_classes = 2 * zn.count + 1;  // above zone 0, zone 0, between, zone 1, below
  r[0] = 0;
  for (int z = 0; z < zn.count; ++z) {
    r[2 * z + 1] = N - all.at_or_below_hi[z];
    r[2 * z + 2] = N - all.below_lo[z];
  }
  r[n_classes] = N;
  return r;
}

bool zones_cover(const ZonePlan& plan, const ClassRanks& class_rank, const RankRanges& wanted) {
  bool covered = true;
  for (size_t k = 0; k < wanted.size(); ++k) {
    const int z = plan.zone_of[k];
    covered = covered && class_rank[2 * z + 1] <= wanted[k][0] && wanted[k][1] <= class_rank[2 * z + 2];
  }
  return covered;
}

void widen_zones(ZonePlan* plan, const ClassRanks& class_rank, const RankRanges& wanted, int64_t N) {
  const Zones& zn = plan->zn;
  const int n_classes = 2 * zn.count + 1;
  auto upper = [&](int c) { return c == 0 ? INFINITY : (c % 2 ? zn.hi[c / 2] : zn.lo[c / 2 - 1]); };
  auto lower = [&](int c) { return c == n_classes - 1 ? -INFINITY : (c % 2 ? zn.lo[c / 2] : zn.hi[c / 2]); };
  Zones wide;
  plan->copy_fraction = 0.0;
  for (size_t k = 0; k < wanted.size(); ++k) {
    int ca = 0, cb = 0;
    while (class_rank[ca + 1] <= wanted[k][0]) ++ca;
    while (class_rank[cb + 1] < wanted[k][1]) ++cb;
    plan->copy_fraction += static_cast<double>(class_rank[cb + 1] - class_rank[ca]) / static_cast<double>(N);
    plan->zone_of[k] = wide.add(lower(cb), upper(ca));
  }
  plan->zn = wide;
}

}  // namespace condense_detail
}  // namespace cpu
}  // namespace kcd
