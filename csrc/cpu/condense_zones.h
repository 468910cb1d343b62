// Private to the CPU condensation: value zones predicted from a sample for the wanted rank
// ranges (condense_zones.cpp), the members' keys inside them, and the classes of values
// they split the points into (counted by pass 1, condense_kernels.h).
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "condense_internal.h"

namespace kcd {
namespace cpu {
namespace condense_detail {

// Rank ranges [lo, hi), ascending and disjoint.
using RankRanges = std::vector<std::array<int64_t, 2>>;

// Value zones, descending and disjoint: zone z = [lo[z], hi[z]]. Unused zones have NaN
// bounds, which no comparison matches.
struct Zones {
  int count = 0;
  double lo[kMaxZones], hi[kMaxZones];
  Zones() {
    for (int z = 0; z < kMaxZones; ++z) lo[z] = hi[z] = NAN;
  }
  // Appends [lo_, hi_] (no higher than the last zone's top), merged into the last zone
  // when they overlap; returns the zone that holds it.
  int add(double lo_, double hi_) {
    if (count > 0 && hi_ >= lo[count - 1]) {
      lo[count - 1] = std::min(lo[count - 1], lo_);
      hi[count - 1] = std::max(hi[count - 1], hi_);
    } else {
      if (count == kMaxZones) throw std::logic_error("condense: more zones than rank ranges");
      lo[count] = lo_;
      hi[count] = hi_;
      ++count;
    }
    return count - 1;
  }
};

// A member's key = zone << 30 | position of its value in the zone (kIndexMask: the
// index below it).
constexpr uint32_t kLocalMax = (uint32_t{1} << 30) - 1;
constexpr double kLocalSteps = static_cast<double>((uint32_t{1} << 29) - 1);

// Descending linear position of a value in a zone spanning [lo, hi] (finite): +inf -> 0,
// finite x -> 1 + (hi - x) * scale clamped to [0, 2^29 - 1], -inf -> kLocalMax. Monotone
// (every step rounds monotonically), so key order never contradicts value order; values
// outside [lo, hi] clamp and are ordered exactly later. Halves keep hi - x finite. The
// AVX-512 and AVX2 passes compute the same operations lane by lane.
// The value unchanged, but opaque to the optimiser: a product passed through it is never
// fused with a later add into an FMA (one rounding instead of two), whatever -ffp-contract
// says, so the vector and scalar keys agree bit for bit (the vector kernels do the same inline).
inline double unfused(double v) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm("" : "+x"(v));
#endif
  return v;
}

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
    double d = (top - unfused(x * 0.5)) * scale;
    d = d >= 0.0 ? d : 0.0;
    d = d <= kLocalSteps ? d : kLocalSteps;
    const uint32_t pos = 1 + static_cast<uint32_t>(static_cast<int32_t>(d));
    return zone_bits | (x == INFINITY ? 0 : (x == -INFINITY ? kLocalMax : pos));
  }
};

// What pass 1 compares against: the zones, the top of the keep boundary's zone (points
// above it are kept: their bits are set), the members' keys (zone 1 below `split`).
struct Pass1 {
  Zones zn;
  double above = INFINITY;
  ZoneKey key0, key1;
  double split = -INFINITY;
  uint64_t word(double x, int64_t i) const {
    const uint32_t k = x < split ? key1.key(x) : key0.key(x);
    return static_cast<uint64_t>(k) << 32 | static_cast<uint64_t>(i);
  }
};

// Counts of pass 1: at_or_below_hi[z] = #(x <= hi[z]), below_lo[z] = #(x < lo[z]). They
// split the points into classes by value, descending: above zone 0, zone 0, between,
// zone 1, below; class c holds ranks [class_rank[c], class_rank[c + 1]) (ClassRanks).
struct ClassCounts {
  int64_t at_or_below_hi[kMaxZones] = {0, 0}, below_lo[kMaxZones] = {0, 0}, nan = 0;
  void add(const ClassCounts& o) {
    for (int z = 0; z < kMaxZones; ++z) {
      at_or_below_hi[z] += o.at_or_below_hi[z];
      below_lo[z] += o.below_lo[z];
    }
    nan += o.nan;
  }
  void add(int64_t a0, int64_t b0, int64_t a1, int64_t b1, int64_t n) {
    at_or_below_hi[0] += a0;
    below_lo[0] += b0;
    at_or_below_hi[1] += a1;
    below_lo[1] += b1;
    nan += n;
  }
  // Points inside the zones.
  int64_t members(const Zones& zn) const {
    int64_t m = 0;
    for (int z = 0; z < zn.count; ++z) m += at_or_below_hi[z] - below_lo[z];
    return m;
  }
};

// Class c holds ranks [r[c], r[c + 1]); zone z is class 2z + 1.
using ClassRanks = std::array<int64_t, 2 * kMaxZones + 2>;

// The zones of the wanted rank ranges, as the sample predicts them, or widened after a
// pass that found them missing their ranks.
struct ZonePlan {
  Zones zn;
  std::vector<int> zone_of;  // [wanted]: the zone that holds wanted[k]
  // The finite range that stands in for infinite zone bounds in the keys (the sample's,
  // less its two most extreme values at each end).
  double key_lo = INFINITY, key_hi = -INFINITY;
  double copy_fraction = 1.0;  // the expected fraction of points inside the zones
};

// The sample's prediction for `wanted` (ascending, disjoint, at most kMaxZones runs once merged).
ZonePlan plan_zones(const double* v, int64_t N, const RankRanges& wanted);

// Pass 1's comparisons for the plan's zones; `boundary` is the wanted range that holds
// the keep boundary (-1: none, every point is kept).
Pass1 pass1_of(const ZonePlan& plan, int boundary);

// The classes' rank ranges from the counts of all N points.
ClassRanks class_ranks(const ClassCounts& all, const Zones& zn, int64_t N);

// Whether each wanted range lies inside its own zone.
bool zones_cover(const ZonePlan& plan, const ClassRanks& class_rank, const RankRanges& wanted);

// Widens the zones: each wanted range takes the value bounds of the classes that hold its
// ranks (a superset of its ranks by construction).
void widen_zones(ZonePlan* plan, const ClassRanks& class_rank, const RankRanges& wanted, int64_t N);

}  // namespace condense_detail
}  // namespace cpu
}  // namespace kcd
