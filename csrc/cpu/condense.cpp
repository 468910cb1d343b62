// CPU condensation (KCD_SPEC section 3-4) in O(N + M): the rank order pi (value
// descending, index ascending) is needed only inside a few rank ranges (the dropped
// points, the lowest / highest kept ones, the keep boundary), plus the set of the top
// n_keep points. A sample selection:
//   1. A sample of 4096 values predicts, for each wanted rank range, a value zone that
//      holds it (four binomial standard deviations of slack on each side).
//   2. One pass over the values counts, per chunk, the points above / inside / below
//      each zone, marks in a bitmap the points above the zone of the keep boundary
//      (they are kept whatever the exact ranks), and copies the zone members packed as
//      (32-bit key: zone, linear position of the value in the zone; 32-bit index). The
//      counts give every zone's exact rank range; where a zone misses its ranks (an
//      unrepresentative sample) the zones widen to the classes that hold them and the
//      pass repeats once, which then holds by construction.
//   3. The M members are sorted by a stable three-pass LSD radix sort on the key (the
//      first pass reads the chunks' copies in place), then by exact value inside the
//      rare runs of equal keys (ties keep index order).
//   4. The point at rank n_keep - 1 is the keep threshold: each chunk adds the bits of
//      its members ranked at or before it to the bitmap, and the bitmap expands to the
//      kept indices in index order. The values are read once (plus the sample and the
//      members of rare equal-key runs): this runs at memory speed, and after another
//      job has flushed the caches the traffic is what costs.
// Pass 1 uses AVX-512 (compress) or AVX2 (a permutation per four values) where the CPU has
// them, scalar loops elsewhere; the expansion AVX-512 or a table (set_condense_isa forces
// one, for tests).
// The stages live in their own files: condense_zones.cpp (the sample's zones),
// condense_kernels*.cpp (pass 1 and the bitmap expansion, per instruction set),
// condense_sort.cpp (step 3); this file runs them in order.
#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "condense_internal.h"
#include "condense_kernels.h"
#include "condense_sort.h"
#include "condense_zones.h"
#include "kcd/blend.h"
#include "kcd/ops.h"

namespace kcd {
namespace cpu {
namespace condense_detail {
namespace {

struct Range {
  int64_t lo, hi;  // ranks [lo, hi) wanted in order
  int64_t* out;    // [hi - lo] point indices
};

thread_local CondenseStats t_stats;

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
  int boundary = -1;  // the wanted range that holds the keep boundary
  for (size_t k = 0; k < wanted.size(); ++k) {
    if (n_keep < N && wanted[k][0] <= n_keep - 1 && n_keep - 1 < wanted[k][1]) boundary = static_cast<int>(k);
  }

  std::vector<double> sample = take_sample(v, N);
  std::vector<int> zone_of;
  Zones zn = predict_zones(sample, N, wanted, &zone_of);
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
  const int64_t words = (N + 63) / 64;
  uint64_t* const bits = grow(sc.bits, words);
  uint8_t* const bytes = reinterpret_cast<uint8_t*>(bits);
  bits[words - 1] = 0;  // pass 1 writes the bytes up to point N; the bits past it stay clear

  // Pass 1 (at most twice): counts, the bitmap, the packed zone members.
  Pass1 p;
  auto compare_with = [&](const Zones& z) {
    p.zn = z;
    p.above = boundary >= 0 ? z.hi[zone_of[boundary]] : INFINITY;
    for (int k = 0; k < z.count; ++k) {
      const double hi = std::isfinite(z.hi[k]) ? z.hi[k] : sample_hi;
      const double lo = std::isfinite(z.lo[k]) ? z.lo[k] : sample_lo;
      (k == 0 ? p.key0 : p.key1) = ZoneKey(lo, hi, k);
    }
    p.split = z.count > 1 ? z.lo[0] : -INFINITY;  // members below it are in zone 1
  };
  compare_with(zn);
  std::vector<ClassCounts> counts(static_cast<size_t>(T));
  std::vector<int64_t> copy_base(static_cast<size_t>(T + 1), 0), copied(static_cast<size_t>(T), 0);
  std::array<int64_t, 2 * kMaxZones + 2> class_rank{};  // class c holds ranks [class_rank[c], class_rank[c + 1])
  t_stats = CondenseStats{};
  for (int attempt = 0;; ++attempt) {
    t_stats.passes = attempt + 1;
    for (int t = 0; t < T; ++t) {
      const Chunk c = chunk64_of(t, T, N);
      const double len = static_cast<double>(c.end - c.begin);
      const int64_t cap = static_cast<int64_t>(std::ceil(len * (1.05 * copy_fraction + 0.01))) + 2 * kBlock;
      copy_base[t + 1] = copy_base[t] + std::min(cap, c.end - c.begin) + kSlack;
    }
    uint64_t* const cw = grow(sc.copy, copy_base[T]);
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t) {
      const Chunk c = chunk64_of(t, T, N);
      ClassCounts cc;
      const int64_t room = copy_base[t + 1] - copy_base[t];
      int64_t m = 0;
      bool full = false;
      for (int64_t b = c.begin; b < c.end; b += kBlock) {
        const int64_t e = std::min(c.end, b + kBlock);
        full = full || room - m < (e - b) + kSlack;  // then stop copying; the members are copied again below
        m += scan(isa, v, b, e, p, &cc, bytes, full ? nullptr : cw + copy_base[t] + m);
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
    bool covered = true;  // each wanted range inside its own zone
    for (size_t k = 0; k < wanted.size(); ++k) {
      const int z = zone_of[k];
      covered = covered && class_rank[2 * z + 1] <= wanted[k][0] && wanted[k][1] <= class_rank[2 * z + 2];
    }
    if (covered) break;
    if (attempt == 1) throw std::logic_error("condense: widened zones missed their ranks");
    // Widen: each wanted range takes the value bounds of the classes that hold its ranks
    // (a superset of its ranks by construction).
    auto upper = [&](int c) { return c == 0 ? INFINITY : (c % 2 ? zn.hi[c / 2] : zn.lo[c / 2 - 1]); };
    auto lower = [&](int c) { return c == n_classes - 1 ? -INFINITY : (c % 2 ? zn.lo[c / 2] : zn.hi[c / 2]); };
    Zones wide;
    copy_fraction = 0.0;
    for (size_t k = 0; k < wanted.size(); ++k) {
      int ca = 0, cb = 0;
      while (class_rank[ca + 1] <= wanted[k][0]) ++ca;
      while (class_rank[cb + 1] < wanted[k][1]) ++cb;
      copy_fraction += static_cast<double>(class_rank[cb + 1] - class_rank[ca]) / static_cast<double>(N);
      zone_of[k] = wide.add(lower(cb), upper(ca));
    }
    zn = wide;
    compare_with(zn);
  }

  // Zone z holds ranks [class_rank[2z + 1], class_rank[2z + 2]) and sorted positions from
  // zone_pos[z]; chunk t holds member_base[t + 1] - member_base[t] of them.
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
  std::vector<int64_t> from(copy_base.begin(), copy_base.end() - 1);  // where chunk t's members start
  t_stats.members = M;
  t_stats.recopied = !copy_complete;
  if (!copy_complete) {  // the copy ran out of room: copy again, to exact sizes
    uint64_t* const cw = grow(sc.copy, M + T * kSlack);
    for (int t = 0; t < T; ++t) from[t] = member_base[t] + t * kSlack;
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t) {
      const Chunk c = chunk64_of(t, T, N);
      ClassCounts unused;
      scan(isa, v, c.begin, c.end, p, &unused, bytes, cw + from[t]);
    }
  }
  std::vector<const uint64_t*> seg(static_cast<size_t>(T));  // chunk t's members [seg_len[t]], in index order
  std::vector<int64_t> seg_len(static_cast<size_t>(T));
  for (int t = 0; t < T; ++t) {
    seg[t] = sc.copy.data() + from[t];
    seg_len[t] = member_base[t + 1] - member_base[t];
  }

  // Sort the members.
  uint64_t* cand = nullptr;
  if (M > 0) {
    const int TS = thread_count(M);
    if (M <= 512) {
      cand = grow(sc.cand, M);
      for (int t = 0; t < T; ++t) std::copy(seg[t], seg[t] + seg_len[t], cand + member_base[t]);
      std::sort(cand, cand + M);  // (key, index): ties in index order, as the radix sort leaves them
    } else {
      cand = radix_sort(seg.data(), seg_len.data(), T, grow(sc.cand, M), grow(sc.tmp, M), M,
                        grow(sc.radix_hist, int64_t(std::max(T, TS)) * kBins), TS);
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

  // Keep: the bitmap holds the points above the boundary zone; add the members ranked at
  // or before rank n_keep - 1, count per chunk, expand.
  if (n_keep == N) {
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t i = 0; i < N; ++i) keep[i] = i;
    return;
  }
  const uint64_t threshold = *at_rank(n_keep - 1);
  std::vector<int64_t> keep_base(static_cast<size_t>(T + 1), 0);
  auto words_of = [&](const Chunk& c) { return (c.end + 63) / 64 - c.begin / 64; };
#pragma omp parallel for num_threads(T) schedule(static, 1)
  for (int t = 0; t < T; ++t) {
    const Chunk c = chunk64_of(t, T, N);
    mark_kept_members(seg[t], seg_len[t], threshold, v, bits);
    keep_base[t + 1] = popcount_words(bits + c.begin / 64, words_of(c));
  }
  for (int t = 0; t < T; ++t) keep_base[t + 1] += keep_base[t];
  if (keep_base[T] != n_keep) throw std::logic_error("condense: the keep threshold selected a wrong count");
#pragma omp parallel for num_threads(T) schedule(static, 1)
  for (int t = 0; t < T; ++t) {
    const Chunk c = chunk64_of(t, T, N);
    expand(isa, bits + c.begin / 64, words_of(c), c.begin, keep + keep_base[t], keep_base[t + 1] - keep_base[t]);
  }
}

}  // namespace
}  // namespace condense_detail

CondenseStats last_condense_stats() { return condense_detail::t_stats; }

void condense(const double* values, int64_t N, int64_t n_keep, int64_t n_prev, VaksMode mode,
              double eps_m, const int64_t* random_pos, int64_t* keep, int64_t* dropped,
              int64_t* dst, int64_t* src, double* eps) {
  if (N <= 0 || n_keep < 1 || n_keep > n_prev || n_prev > N) {
    throw std::invalid_argument("condense needs 1 <= n_keep <= n_prev <= N, got n_keep = " + std::to_string(n_keep) +
                                ", n_prev = " + std::to_string(n_prev) + ", N = " + std::to_string(N));
  }
  if (N > static_cast<int64_t>(condense_detail::kIndexMask)) {
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

  using condense_detail::Range;
  std::vector<Range> ranges{{n_keep, n_prev, dropped}};
  if (mode == VaksMode::kLow) ranges.push_back({n_keep - P, n_keep, dst});  // the P lowest kept
  if (mode == VaksMode::kHigh) ranges.push_back({0, P, dst});               // the P highest kept
  condense_detail::partial_rank(values, N, n_keep, ranges, keep);
  const bool random = mode == VaksMode::kRandom;
#pragma omp parallel for num_threads(condense_detail::thread_count(P)) schedule(static)
  for (int64_t j = 0; j < P; ++j) {
    src[j] = dropped[j];
    if (random) dst[j] = keep[random_pos[j]];
    eps[j] = random ? eps_m : vaks_eps(j, P, eps_m);
  }
}

}  // namespace cpu
}  // namespace kcd