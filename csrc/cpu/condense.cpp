// CPU condensation (docs/algorithm.md sections 3-4) in O(N + M): the rank order pi (value
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
// The stages live in their own files: condense_zones.cpp (step 1: the sample's zones, their
// widening), condense_kernels*.cpp (pass 1 and the bitmap expansion, per instruction set),
// condense_sort.cpp (step 3). This file runs them in order (partial_rank) and writes the
// results: the kept and dropped indices and the VAKS pairs.
#include <algorithm>
#include <array>
#include <cmath>
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

struct ReleaseLargeScratch {
  Scratch& sc;
  ~ReleaseLargeScratch() {
    if (sc.bytes() > kKeptScratchBytes) sc = Scratch{};
  }
};

// The rank ranges that need order, merged: the given ranges and the keep boundary.
RankRanges wanted_ranges(const std::vector<Range>& ranges, int64_t n_keep, int64_t N) {
  RankRanges wanted;
  for (const Range& r : ranges) {
    if (r.lo < r.hi) wanted.push_back({r.lo, r.hi});
  }
  if (n_keep < N) wanted.push_back({n_keep - 1, n_keep + 1});
  std::sort(wanted.begin(), wanted.end());
  RankRanges merged;
  for (const auto& w : wanted) {
    if (!merged.empty() && w[0] <= merged.back()[1]) {
      merged.back()[1] = std::max(merged.back()[1], w[1]);
    } else {
      merged.push_back(w);
    }
  }
  if (static_cast<int>(merged.size()) > kMaxZones) throw std::logic_error("condense: more rank ranges than zones");
  return merged;
}

// The wanted range that holds the keep boundary (rank n_keep - 1), -1 when every point is kept.
int boundary_range(const RankRanges& wanted, int64_t n_keep, int64_t N) {
  int boundary = -1;
  for (size_t k = 0; k < wanted.size(); ++k) {
    if (n_keep < N && wanted[k][0] <= n_keep - 1 && n_keep - 1 < wanted[k][1]) boundary = static_cast<int>(k);
  }
  return boundary;
}

// What pass 1 found, per chunk of the points.
struct Pass1Result {
  std::vector<ClassCounts> counts;  // [T]
  std::vector<int64_t> copy_base;   // [T + 1]: chunk t's room for its members in Scratch::copy
  std::vector<int64_t> copied;      // [T]: its members copied, -1 where the room ran out
  ClassRanks class_rank{};          // the classes' rank ranges, over all points
};

// One pass 1 over the T chunks of v [N], block by block: counts, the bitmap bytes and the
// members, copied while the room sized from copy_fraction (the expected share of members)
// lasts.
void scan_once(const double* v, int64_t N, int T, Isa isa, const Pass1& p, double copy_fraction, Scratch* sc,
               uint8_t* bytes, Pass1Result* r) {
  r->counts.assign(static_cast<size_t>(T), ClassCounts{});
  r->copy_base.assign(static_cast<size_t>(T + 1), 0);
  r->copied.assign(static_cast<size_t>(T), 0);
  int64_t* const copy_base = r->copy_base.data();
  for (int t = 0; t < T; ++t) {
    const Chunk c = chunk64_of(t, T, N);
    const double len = static_cast<double>(c.end - c.begin);
    const int64_t cap = static_cast<int64_t>(std::ceil(len * (1.05 * copy_fraction + 0.01))) + 2 * kBlock;
    copy_base[t + 1] = copy_base[t] + std::min(cap, c.end - c.begin) + kSlack;
  }
  uint64_t* const cw = grow(sc->copy, copy_base[T]);
  ClassCounts* const counts = r->counts.data();
  int64_t* const copied = r->copied.data();
#pragma omp parallel for num_threads(T) schedule(static, 1)
  for (int t = 0; t < T; ++t) {
    const Chunk c = chunk64_of(t, T, N);
    ClassCounts cc;
    const int64_t room = copy_base[t + 1] - copy_base[t];
    int64_t m = 0;
    bool full = false;
    for (int64_t b = c.begin; b < c.end; b += kBlock) {
      const int64_t e = std::min(c.end, b + kBlock);
      full = full || room - m < (e - b) + kSlack;  // then stop copying; the members are copied again later
      m += scan(isa, v, b, e, p, &cc, bytes, full ? nullptr : cw + copy_base[t] + m);
    }
    counts[t] = cc;
    copied[t] = full ? -1 : m;
  }
}

void check_no_nan(const double* v, int64_t N) {
  for (int64_t i = 0; i < N; ++i) {
    if (std::isnan(v[i])) throw std::invalid_argument("values[" + std::to_string(i) + "] is nan");
  }
}

// Pass 1, at most twice: when the plan's zones miss their ranks, they widen to the classes
// that hold them and the pass repeats, which then holds by construction. Returns the
// comparisons of the pass that held.
Pass1 scan_until_covered(const double* v, int64_t N, int T, Isa isa, const RankRanges& wanted, int boundary,
                         ZonePlan* plan, Scratch* sc, uint8_t* bytes, Pass1Result* r) {
  for (int attempt = 0;; ++attempt) {
    const Pass1 p = pass1_of(*plan, boundary);
    t_stats.passes = attempt + 1;
    scan_once(v, N, T, isa, p, plan->copy_fraction, sc, bytes, r);
    ClassCounts all;
    for (const ClassCounts& cc : r->counts) all.add(cc);
    if (all.nan > 0) check_no_nan(v, N);
    r->class_rank = class_ranks(all, plan->zn, N);
    if (zones_cover(*plan, r->class_rank, wanted)) return p;
    if (attempt == 1) throw std::logic_error("condense: widened zones missed their ranks");
    widen_zones(plan, r->class_rank, wanted, N);
  }
}

// Where each chunk's members are; copies them again, to exact sizes, where pass 1's copy
// ran out of room.
Members collect_members(const double* v, int64_t N, Isa isa, const Pass1& p, const Pass1Result& r, Scratch* sc,
                        uint8_t* bytes) {
  const int T = static_cast<int>(r.counts.size());
  Members m;
  m.base.assign(static_cast<size_t>(T + 1), 0);
  bool copy_complete = true;
  for (int t = 0; t < T; ++t) {
    m.base[t + 1] = m.base[t] + r.counts[t].members(p.zn);
    copy_complete = copy_complete && r.copied[t] >= 0;
  }
  m.count = m.base[T];
  std::vector<int64_t> from(r.copy_base.begin(), r.copy_base.end() - 1);  // where chunk t's members start
  t_stats.members = m.count;
  t_stats.recopied = !copy_complete;
  if (!copy_complete) {
    uint64_t* const cw = grow(sc->copy, m.count + T * kSlack);
    for (int t = 0; t < T; ++t) from[t] = m.base[t] + t * kSlack;
#pragma omp parallel for num_threads(T) schedule(static, 1)
    for (int t = 0; t < T; ++t) {
      const Chunk c = chunk64_of(t, T, N);
      ClassCounts unused;
      scan(isa, v, c.begin, c.end, p, &unused, bytes, cw + from[t]);
    }
  }
  m.seg.resize(static_cast<size_t>(T));
  m.len.resize(static_cast<size_t>(T));
  for (int t = 0; t < T; ++t) {
    m.seg[t] = sc->copy.data() + from[t];
    m.len[t] = m.base[t + 1] - m.base[t];
  }
  return m;
}

// The sorted members by rank: zone z holds ranks [class_rank[2z + 1], class_rank[2z + 2])
// at sorted positions from zone_pos[z].
struct Ranked {
  const uint64_t* sorted;
  ClassRanks class_rank;
  std::array<int64_t, kMaxZones + 1> zone_pos{};
  Ranked(const uint64_t* s, const ClassRanks& cr, const Zones& zn) : sorted(s), class_rank(cr) {
    for (int z = 0; z < zn.count; ++z) zone_pos[z + 1] = zone_pos[z] + cr[2 * z + 2] - cr[2 * z + 1];
  }
  // The sorted member of a rank inside a zone.
  const uint64_t* at(int64_t rank) const {
    int z = 0;
    while (rank >= class_rank[2 * z + 2]) ++z;
    return sorted + zone_pos[z] + (rank - class_rank[2 * z + 1]);
  }
};

// Cuts the ranges out (each lies inside one zone).
void cut_ranges(const std::vector<Range>& ranges, const Ranked& ranked) {
  for (const Range& r : ranges) {
    if (r.lo >= r.hi) continue;
    const uint64_t* src = ranked.at(r.lo);
    const int64_t n = r.hi - r.lo;
#pragma omp parallel for num_threads(thread_count(n)) schedule(static)
    for (int64_t q = 0; q < n; ++q) r.out[q] = index_of(src[q]);
  }
}

// keep [n_keep]: the bitmap holds the points above the boundary zone; adds the members
// ranked at or before rank n_keep - 1, counts per chunk, expands.
void write_keep(const double* v, int64_t N, int64_t n_keep, Isa isa, const Members& m, const Ranked& ranked,
                uint64_t* bits, int64_t* keep) {
  const int T = m.chunks();
  if (n_keep == N) {
#pragma omp parallel for num_threads(T) schedule(static)
    for (int64_t i = 0; i < N; ++i) keep[i] = i;
    return;
  }
  const uint64_t threshold = *ranked.at(n_keep - 1);
  std::vector<int64_t> keep_base(static_cast<size_t>(T + 1), 0);
  auto words_of = [&](const Chunk& c) { return (c.end + 63) / 64 - c.begin / 64; };
#pragma omp parallel for num_threads(T) schedule(static, 1)
  for (int t = 0; t < T; ++t) {
    const Chunk c = chunk64_of(t, T, N);
    mark_kept_members(m.seg[t], m.len[t], threshold, v, bits);
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

// Writes keep [n_keep] (the top n_keep points, sorted by index) and pi[lo:hi] for each range.
void partial_rank(const double* v, int64_t N, int64_t n_keep, const std::vector<Range>& ranges, int64_t* keep) {
  const int T = thread_count(N);
  const Isa isa = active_isa();
  const RankRanges wanted = wanted_ranges(ranges, n_keep, N);
  const int boundary = boundary_range(wanted, n_keep, N);
  ZonePlan plan = plan_zones(v, N, wanted);

  // Scratch reused across calls of one thread, up to kKeptScratchBytes.
  thread_local Scratch scratch;
  ReleaseLargeScratch release{scratch};
  const int64_t words = (N + 63) / 64;
  uint64_t* const bits = grow(scratch.bits, words);
  uint8_t* const bytes = reinterpret_cast<uint8_t*>(bits);
  bits[words - 1] = 0;  // pass 1 writes the bytes up to point N; the bits past it stay clear

  t_stats = CondenseStats{};
  Pass1Result pass1;
  const Pass1 p = scan_until_covered(v, N, T, isa, wanted, boundary, &plan, &scratch, bytes, &pass1);
  const Members members = collect_members(v, N, isa, p, pass1, &scratch, bytes);
  const Ranked ranked(sort_members(members, v, &scratch), pass1.class_rank, p.zn);
  cut_ranges(ranges, ranked);
  write_keep(v, N, n_keep, isa, members, ranked, bits, keep);
}

void check_condense_args(int64_t N, int64_t n_keep, int64_t n_prev, VaksMode mode, int64_t P,
                         const int64_t* random_pos) {
  if (N <= 0 || n_keep < 1 || n_keep > n_prev || n_prev > N) {
    throw std::invalid_argument("condense needs 1 <= n_keep <= n_prev <= N, got n_keep = " + std::to_string(n_keep) +
                                ", n_prev = " + std::to_string(n_prev) + ", N = " + std::to_string(N));
  }
  if (N > static_cast<int64_t>(kIndexMask)) {
    throw std::invalid_argument("CPU condense handles N < 2**32 points, got N = " + std::to_string(N));
  }
  if (mode == VaksMode::kRandom) {
    for (int64_t j = 0; j < P; ++j) {
      if (random_pos[j] < 0 || random_pos[j] >= n_keep) {
        throw std::out_of_range("random_pos[" + std::to_string(j) + "] = " + std::to_string(random_pos[j]) +
                                " is outside [0, " + std::to_string(n_keep) + ")");
      }
    }
  }
}

}  // namespace
}  // namespace condense_detail

CondenseStats last_condense_stats() { return condense_detail::t_stats; }

void condense(const double* values, int64_t N, int64_t n_keep, int64_t n_prev, VaksMode mode,
              double eps_m, const int64_t* random_pos, int64_t* keep, int64_t* dropped,
              int64_t* dst, int64_t* src, double* eps) {
  using condense_detail::Range;
  const int64_t P = vaks_pairs(n_keep, n_prev, mode);
  condense_detail::check_condense_args(N, n_keep, n_prev, mode, P, random_pos);
  const TeamScope team(N, int64_t(1) << 16);  // every region below: at most the cores free now

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
