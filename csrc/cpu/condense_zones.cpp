// Step 1 of the CPU condensation: a sample of 4096 values predicts, for each wanted rank
// range, a value zone that holds it (four binomial standard deviations of slack on each
// side).
#include "condense_zones.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

namespace kcd {
namespace cpu {
namespace condense_detail {

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

}  // namespace condense_detail
}  // namespace cpu
}  // namespace kcd
