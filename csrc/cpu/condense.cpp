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
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

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
  return work >= (int64_t(1) << 16) ? openmp_threads() : 1;
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

enum class Isa : int { kAuto = -1, kGeneric = 0, kAvx512 = 1, kAvx2 = 2 };
std::atomic<int> g_isa{static_cast<int>(Isa::kAuto)};

bool cpu_has_avx512() {
#if KCD_AVX512_PATH
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if KCD_AVX512_PATH
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

Isa active_isa() {
  const int forced = g_isa.load(std::memory_order_relaxed);
  if (forced != static_cast<int>(Isa::kAuto)) return static_cast<Isa>(forced);
  static const Isa best = cpu_has_avx512() ? Isa::kAvx512 : (cpu_has_avx2() ? Isa::kAvx2 : Isa::kGeneric);
  return best;
}

// ---- Zones and keys ----------------------------------------------------------------------

constexpr int kMaxZones = 2;  // the wanted rank ranges merge into at most two runs
constexpr int kBlock = 4096;  // points per block of pass 1 (a multiple of 64)
constexpr int kSlack = 8;     // a vector store may write this far past the last member
constexpr int kStage = 512;   // members keyed per batch in pass 1 (AVX-512)

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

// Members are packed as key << 32 | index (N < 2^32); key = zone << 30 | position of the
// value in the zone. A stable sort by key from index order leaves ties in index order.
constexpr uint64_t kIndexMask = 0xffffffffull;
constexpr uint32_t kLocalMax = (uint32_t{1} << 30) - 1;
constexpr double kLocalSteps = static_cast<double>((uint32_t{1} << 29) - 1);

inline int64_t index_of(uint64_t c) { return static_cast<int64_t>(c & kIndexMask); }

// Descending linear position of a value in a zone spanning [lo, hi] (finite): +inf -> 0,
// finite x -> 1 + (hi - x) * scale clamped to [0, 2^29 - 1], -inf -> kLocalMax. Monotone
// (every step rounds monotonically), so key order never contradicts value order; values
// outside [lo, hi] clamp and are ordered exactly later. Halves keep hi - x finite. The
// AVX-512 pass computes the same operations lane by lane.
// The value unchanged, but opaque to the optimiser: a product passed through it is never
// fused with a later add into an FMA (one rounding instead of two), whatever -ffp-contract
// says, so the AVX-512 and scalar keys agree bit for bit (scan_avx512 does the same inline).
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

// ---- Pass 1: counts, the bitmap of points above the boundary zone, the members ---------

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
  void add(int64_t a0, int64_t b0, int64_t a1, int64_t b1, int64_t n) {
    at_or_below_hi[0] += a0;
    below_lo[0] += b0;
    at_or_below_hi[1] += a1;
    below_lo[1] += b1;
    nan += n;
  }
};

#if defined(__BYTE_ORDER__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the bitmap is written in bytes and read in words");
#endif

// Counts the classes of [begin, end) and writes the bitmap bytes of its points (bit i & 7
// of byte i >> 3: x > p.above); begin is a multiple of 8.
KCD_CLONES void count_and_mark(const double* v, int64_t begin, int64_t end, const Pass1& p, ClassCounts* cc,
                               uint8_t* bits) {
  const double h0 = p.zn.hi[0], l0 = p.zn.lo[0], h1 = p.zn.hi[1], l1 = p.zn.lo[1], ab = p.above;
  int64_t a0 = 0, b0 = 0, a1 = 0, b1 = 0, nan = 0;
  for (int64_t i = begin; i < end; ++i) {
    const double x = v[i];
    a0 += x <= h0;
    b0 += x < l0;
    a1 += x <= h1;
    b1 += x < l1;
    nan += x != x;
  }
  for (int64_t i = begin; i < end; i += 8) {
    const int64_t n = std::min<int64_t>(8, end - i);
    unsigned byte = 0;
    for (int64_t k = 0; k < n; ++k) byte |= static_cast<unsigned>(v[i + k] > ab) << k;
    bits[i >> 3] = static_cast<uint8_t>(byte);
  }
  cc->add(a0, b0, a1, b1, nan);
}

// Pass 1 over [begin, end) (begin a multiple of 8): counts, bitmap bytes and, when
// `out` is not null, the packed members (room for their count + kSlack); returns how
// many were copied.
int64_t scan_generic(const double* v, int64_t begin, int64_t end, const Pass1& p, ClassCounts* cc, uint8_t* bits,
                     uint64_t* out) {
  count_and_mark(v, begin, end, p, cc, bits);
  if (out == nullptr) return 0;
  const double h0 = p.zn.hi[0], l0 = p.zn.lo[0], h1 = p.zn.hi[1], l1 = p.zn.lo[1];
  int64_t m = 0;
  for (int64_t i = begin; i < end; ++i) {  // branch-free: the slot is overwritten unless a member
    const double x = v[i];
    out[m] = static_cast<uint64_t>(i);
    m += ((x >= l0) & (x <= h0)) | ((x >= l1) & (x <= h1));
  }
  for (int64_t j = 0; j < m; ++j) out[j] = p.word(v[out[j]], static_cast<int64_t>(out[j]));
  return m;
}

#if KCD_AVX512_PATH
// out[j] = key(x[j]) << 32 | out[j] for j < n (out holds the indices), eight at a time.
__attribute__((target("avx512f"))) void key_members_avx512(const double* x, int64_t n, const Pass1& p,
                                                            uint64_t* out) {
  const __m512d split = _mm512_set1_pd(p.split);
  const __m512d top0 = _mm512_set1_pd(p.key0.top), top1 = _mm512_set1_pd(p.key1.top);
  const __m512d scale0 = _mm512_set1_pd(p.key0.scale), scale1 = _mm512_set1_pd(p.key1.scale);
  const __m512i zb0 = _mm512_set1_epi64(p.key0.zone_bits), zb1 = _mm512_set1_epi64(p.key1.zone_bits);
  const __m512d half = _mm512_set1_pd(0.5), zero = _mm512_setzero_pd(), steps = _mm512_set1_pd(kLocalSteps);
  const __m512d pinf = _mm512_set1_pd(INFINITY), ninf = _mm512_set1_pd(-INFINITY);
  const __m512i one = _mm512_set1_epi64(1), local_max = _mm512_set1_epi64(kLocalMax);
  for (int64_t j = 0; j < n; j += 8) {
    const __mmask8 live = static_cast<__mmask8>(n - j >= 8 ? 0xff : (1u << (n - j)) - 1);
    const __m512d v = _mm512_maskz_loadu_pd(live, x + j);
    const __mmask8 z1 = _mm512_cmp_pd_mask(v, split, _CMP_LT_OQ);
    const __m512d top = _mm512_mask_blend_pd(z1, top0, top1), scale = _mm512_mask_blend_pd(z1, scale0, scale1);
    __m512d h = _mm512_mul_pd(v, half);
    asm("" : "+v"(h));  // never fused into the subtraction (see unfused)
    __m512d d = _mm512_mul_pd(_mm512_sub_pd(top, h), scale);
    d = _mm512_min_pd(_mm512_max_pd(d, zero), steps);  // max(NaN, 0) = 0, as the scalar key
    __m512i key = _mm512_add_epi64(_mm512_cvtepu32_epi64(_mm512_cvttpd_epi32(d)), one);
    key = _mm512_mask_blend_epi64(_mm512_cmp_pd_mask(v, pinf, _CMP_EQ_OQ), key, _mm512_setzero_si512());
    key = _mm512_mask_blend_epi64(_mm512_cmp_pd_mask(v, ninf, _CMP_EQ_OQ), key, local_max);
    key = _mm512_or_si512(key, _mm512_mask_blend_epi64(z1, zb0, zb1));
    const __m512i index = _mm512_maskz_loadu_epi64(live, out + j);
    _mm512_mask_storeu_epi64(out + j, live, _mm512_or_si512(_mm512_slli_epi64(key, 32), index));
  }
}

__attribute__((target("avx512f,popcnt"))) int64_t scan_avx512(const double* v, int64_t begin, int64_t end,
                                                              const Pass1& p, ClassCounts* cc, uint8_t* bits,
                                                              uint64_t* out) {
  const __m512d h0 = _mm512_set1_pd(p.zn.hi[0]), l0 = _mm512_set1_pd(p.zn.lo[0]);
  const __m512d h1 = _mm512_set1_pd(p.zn.hi[1]), l1 = _mm512_set1_pd(p.zn.lo[1]);
  const __m512d ab = _mm512_set1_pd(p.above);
  // The members' values wait in `staged` (their indices already in out) and get their keys
  // a batch at a time: about one point in seven is a member, and keying every loaded vector
  // cost a third more than the rest of the pass.
  alignas(64) double staged[kStage + 8];
  int64_t m = 0, ms = 0;  // members done: out[0, m); staged: values staged[0, ms), indices out[m, m + ms)
  __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(begin), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  const __m512i eight = _mm512_set1_epi64(8);
  int64_t a0 = 0, b0 = 0, a1 = 0, b1 = 0, nan = 0, i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m512d x = _mm512_loadu_pd(v + i);
    const unsigned c0 = _mm512_cmp_pd_mask(x, h0, _CMP_LE_OQ), d0 = _mm512_cmp_pd_mask(x, l0, _CMP_LT_OQ);
    const unsigned c1 = _mm512_cmp_pd_mask(x, h1, _CMP_LE_OQ), d1 = _mm512_cmp_pd_mask(x, l1, _CMP_LT_OQ);
    a0 += __builtin_popcount(c0);
    b0 += __builtin_popcount(d0);
    a1 += __builtin_popcount(c1);
    b1 += __builtin_popcount(d1);
    nan += __builtin_popcount(_mm512_cmp_pd_mask(x, x, _CMP_UNORD_Q));
    bits[i >> 3] = static_cast<uint8_t>(_mm512_cmp_pd_mask(x, ab, _CMP_GT_OQ));
    if (out != nullptr) {
      const __mmask8 in = static_cast<__mmask8>((c0 & ~d0) | (c1 & ~d1));
      _mm512_storeu_pd(staged + ms, _mm512_maskz_compress_pd(in, x));
      _mm512_storeu_si512(out + m + ms, _mm512_maskz_compress_epi64(in, idx));
      ms += __builtin_popcount(in);
      if (ms > kStage - 8) {
        key_members_avx512(staged, ms, p, out + m);
        m += ms;
        ms = 0;
      }
    }
    idx = _mm512_add_epi64(idx, eight);
  }
  if (out != nullptr) {
    key_members_avx512(staged, ms, p, out + m);
    m += ms;
  }
  cc->add(a0, b0, a1, b1, nan);
  _mm256_zeroupper();  // see expand_avx512
  return m + scan_generic(v, i, end, p, cc, bits, out == nullptr ? nullptr : out + m);
}
#endif

#if KCD_AVX512_PATH
// For each 4-bit mask: the 32-bit lanes that move its set 64-bit elements to the front
// (_mm256_permutevar8x32_epi32), the AVX2 stand-in for a compress.
struct Compress4 {
  int32_t lanes[16][8];
  constexpr Compress4() : lanes() {
    for (int m = 0; m < 16; ++m) {
      int n = 0;
      for (int k = 0; k < 4; ++k) {
        if (m >> k & 1) {
          lanes[m][2 * n] = 2 * k;
          lanes[m][2 * n + 1] = 2 * k + 1;
          ++n;
        }
      }
      for (int q = 2 * n; q < 8; ++q) lanes[m][q] = q;
    }
  }
};
constexpr Compress4 kCompress4;

// key_members_avx512 with four lanes: out[j] = key(x[j]) << 32 | out[j] for j < n.
__attribute__((target("avx2"))) void key_members_avx2(const double* x, int64_t n, const Pass1& p, uint64_t* out) {
  const __m256d split = _mm256_set1_pd(p.split);
  const __m256d top0 = _mm256_set1_pd(p.key0.top), top1 = _mm256_set1_pd(p.key1.top);
  const __m256d scale0 = _mm256_set1_pd(p.key0.scale), scale1 = _mm256_set1_pd(p.key1.scale);
  const __m256i zb0 = _mm256_set1_epi64x(p.key0.zone_bits), zb1 = _mm256_set1_epi64x(p.key1.zone_bits);
  const __m256d half = _mm256_set1_pd(0.5), zero = _mm256_setzero_pd(), steps = _mm256_set1_pd(kLocalSteps);
  const __m256d pinf = _mm256_set1_pd(INFINITY), ninf = _mm256_set1_pd(-INFINITY);
  const __m128i one = _mm_set1_epi32(1);
  const __m256i local_max = _mm256_set1_epi64x(kLocalMax);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m256d v = _mm256_loadu_pd(x + j);
    const __m256d z1 = _mm256_cmp_pd(v, split, _CMP_LT_OQ);
    const __m256d top = _mm256_blendv_pd(top0, top1, z1), scale = _mm256_blendv_pd(scale0, scale1, z1);
    __m256d h = _mm256_mul_pd(v, half);
    asm("" : "+x"(h));  // never fused into the subtraction (see unfused)
    __m256d d = _mm256_mul_pd(_mm256_sub_pd(top, h), scale);
    d = _mm256_min_pd(_mm256_max_pd(d, zero), steps);  // max(NaN, 0) = 0, as the scalar key
    __m256i key = _mm256_cvtepu32_epi64(_mm_add_epi32(_mm256_cvttpd_epi32(d), one));
    key = _mm256_blendv_epi8(key, _mm256_setzero_si256(), _mm256_castpd_si256(_mm256_cmp_pd(v, pinf, _CMP_EQ_OQ)));
    key = _mm256_blendv_epi8(key, local_max, _mm256_castpd_si256(_mm256_cmp_pd(v, ninf, _CMP_EQ_OQ)));
    key = _mm256_or_si256(key, _mm256_blendv_epi8(zb0, zb1, _mm256_castpd_si256(z1)));
    const __m256i index = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(out + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_or_si256(_mm256_slli_epi64(key, 32), index));
  }
  _mm256_zeroupper();  // see expand_avx512
  for (; j < n; ++j) out[j] = p.word(x[j], static_cast<int64_t>(out[j]));
}

// scan_avx512 with four-lane compares and a permutation in place of compress.
__attribute__((target("avx2,popcnt"))) int64_t scan_avx2(const double* v, int64_t begin, int64_t end,
                                                         const Pass1& p, ClassCounts* cc, uint8_t* bits,
                                                         uint64_t* out) {
  const __m256d h0 = _mm256_set1_pd(p.zn.hi[0]), l0 = _mm256_set1_pd(p.zn.lo[0]);
  const __m256d h1 = _mm256_set1_pd(p.zn.hi[1]), l1 = _mm256_set1_pd(p.zn.lo[1]);
  const __m256d ab = _mm256_set1_pd(p.above);
  alignas(32) double staged[kStage + 8];
  int64_t m = 0, ms = 0;  // members done: out[0, m); staged: values staged[0, ms), indices out[m, m + ms)
  __m256i idx = _mm256_add_epi64(_mm256_set1_epi64x(begin), _mm256_set_epi64x(3, 2, 1, 0));
  const __m256i four = _mm256_set1_epi64x(4);
  int64_t a0 = 0, b0 = 0, a1 = 0, b1 = 0, nan = 0, i = begin;
  for (; i + 8 <= end; i += 8) {
    unsigned byte = 0;
    for (int q = 0; q < 2; ++q) {
      const __m256d x = _mm256_loadu_pd(v + i + 4 * q);
      const unsigned c0 = _mm256_movemask_pd(_mm256_cmp_pd(x, h0, _CMP_LE_OQ));
      const unsigned d0 = _mm256_movemask_pd(_mm256_cmp_pd(x, l0, _CMP_LT_OQ));
      const unsigned c1 = _mm256_movemask_pd(_mm256_cmp_pd(x, h1, _CMP_LE_OQ));
      const unsigned d1 = _mm256_movemask_pd(_mm256_cmp_pd(x, l1, _CMP_LT_OQ));
      a0 += __builtin_popcount(c0);
      b0 += __builtin_popcount(d0);
      a1 += __builtin_popcount(c1);
      b1 += __builtin_popcount(d1);
      nan += __builtin_popcount(_mm256_movemask_pd(_mm256_cmp_pd(x, x, _CMP_UNORD_Q)));
      byte |= static_cast<unsigned>(_mm256_movemask_pd(_mm256_cmp_pd(x, ab, _CMP_GT_OQ))) << (4 * q);
      if (out != nullptr) {
        const unsigned in = (c0 & ~d0) | (c1 & ~d1);
        const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kCompress4.lanes[in]));
        _mm256_storeu_pd(staged + ms, _mm256_castsi256_pd(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(x), perm)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m + ms), _mm256_permutevar8x32_epi32(idx, perm));
        ms += __builtin_popcount(in);
      }
      idx = _mm256_add_epi64(idx, four);
    }
    bits[i >> 3] = static_cast<uint8_t>(byte);
    if (out != nullptr && ms > kStage - 8) {
      key_members_avx2(staged, ms, p, out + m);
      m += ms;
      ms = 0;
    }
  }
  if (out != nullptr) {
    key_members_avx2(staged, ms, p, out + m);
    m += ms;
  }
  cc->add(a0, b0, a1, b1, nan);
  _mm256_zeroupper();  // see expand_avx512
  return m + scan_generic(v, i, end, p, cc, bits, out == nullptr ? nullptr : out + m);
}
#endif

int64_t scan(Isa isa, const double* v, int64_t begin, int64_t end, const Pass1& p, ClassCounts* cc, uint8_t* bits,
             uint64_t* out) {
#if KCD_AVX512_PATH
  if (isa == Isa::kAvx512) return scan_avx512(v, begin, end, p, cc, bits, out);
  if (isa == Isa::kAvx2) return scan_avx2(v, begin, end, p, cc, bits, out);
#endif
  (void)isa;
  return scan_generic(v, begin, end, p, cc, bits, out);
}

// ---- Keep: the bitmap of the kept points, expanded to their indices ---------------------

// Sets the bits of the members w [n] ranked at or before the threshold member `ws`
// (key order, then exact value descending, then index); returns nothing, the bitmap
// words of the members' chunk belong to the caller alone.
void mark_kept_members(const uint64_t* w, int64_t n, uint64_t ws, const double* v, uint64_t* bits) {
  const uint64_t key_s = ws >> 32;
  const int64_t is = index_of(ws);
  const double vs = v[is];
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t key = w[j] >> 32;
    const int64_t i = index_of(w[j]);
    bool kept = key < key_s;
    if (key == key_s) kept = v[i] > vs || (v[i] == vs && i <= is);  // rare: equal keys
    bits[i >> 6] |= static_cast<uint64_t>(kept) << (i & 63);
  }
}

// For each byte value: the positions of its set bits, then 8 (padding), and their count.
struct ByteBits {
  uint8_t pos[256][8];
  uint8_t count[256];
  constexpr ByteBits() : pos(), count() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int k = 0; k < 8; ++k) {
        if (b >> k & 1) pos[b][n++] = static_cast<uint8_t>(k);
      }
      count[b] = static_cast<uint8_t>(n);
      for (int k = n; k < 8; ++k) pos[b][k] = 8;
    }
  }
};
constexpr ByteBits kByteBits;

// Writes base + the positions of the set bits of bits[0, words) to out [cap]; returns how
// many. Branch-free per byte of the bitmap: eight stores from a table, advance by the count.
int64_t expand_generic(const uint64_t* bits, int64_t words, int64_t base, int64_t* out, int64_t cap) {
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(bits);
  int64_t w = 0, k = 0;
  for (; k < 8 * words && w + 8 <= cap; ++k) {
    const uint8_t b = bytes[k];
    const int64_t at = base + 8 * k;
    for (int q = 0; q < 8; ++q) out[w + q] = at + kByteBits.pos[b][q];
    w += kByteBits.count[b];
  }
  for (; k < 8 * words; ++k) {  // the last few, one by one
    for (unsigned b = bytes[k]; b != 0 && w < cap; b &= b - 1) out[w++] = base + 8 * k + __builtin_ctz(b);
  }
  return w;
}

#if KCD_AVX512_PATH
__attribute__((target("avx512f,popcnt"))) int64_t expand_avx512(const uint64_t* bits, int64_t words, int64_t base,
                                                                int64_t* out, int64_t cap) {
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(bits);
  __m512i idx = _mm512_add_epi64(_mm512_set1_epi64(base), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  const __m512i all = _mm512_set1_epi64(64);
  int64_t w = 0, k = 0;
  for (; k < words && w + 64 <= cap; ++k) {
    if (bits[k] == ~uint64_t{0}) {  // common: a whole word kept
      for (int q = 0; q < 8; ++q) _mm512_storeu_si512(out + w + 8 * q, _mm512_add_epi64(idx, _mm512_set1_epi64(8 * q)));
      w += 64;
    } else {
      for (int q = 0; q < 8; ++q) {
        const __mmask8 sel = bytes[8 * k + q];
        _mm512_storeu_si512(out + w, _mm512_maskz_compress_epi64(sel, _mm512_add_epi64(idx, _mm512_set1_epi64(8 * q))));
        w += __builtin_popcount(sel);
      }
    }
    idx = _mm512_add_epi64(idx, all);
  }
  // Clean upper vector state before the SSE code: GCC may tail-call without vzeroupper, and
  // dirty upper halves slowed every later scalar double loop of the thread (the VAKS
  // weights: 0.04 -> 0.21 ms).
  _mm256_zeroupper();
  return w + expand_generic(bits + k, words - k, base + 64 * k, out + w, cap - w);
}
#endif

int64_t expand(Isa isa, const uint64_t* bits, int64_t words, int64_t base, int64_t* out, int64_t cap) {
#if KCD_AVX512_PATH
  if (isa == Isa::kAvx512) return expand_avx512(bits, words, base, out, cap);
#endif
  (void)isa;
  return expand_generic(bits, words, base, out, cap);
}

int64_t popcount_words(const uint64_t* bits, int64_t words) {
  int64_t n = 0;
  for (int64_t k = 0; k < words; ++k) n += __builtin_popcountll(bits[k]);
  return n;
}

// ---- Step 3: sorting the members ------------------------------------------------------

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
Zones predict_zones(std::vector<double>& sample, int64_t N, const std::vector<std::array<int64_t, 2>>& wanted,
                    std::vector<int>* zone_of) {
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

thread_local CondenseStats t_stats;

struct Scratch {
  std::vector<uint64_t> copy, cand, tmp, bits;
  std::vector<int64_t> radix_hist;
  size_t bytes() const {
    return (copy.capacity() + cand.capacity() + tmp.capacity() + bits.capacity() + radix_hist.capacity()) * 8;
  }
};
// A thread keeps its scratch for the next call up to this size (first-touch faults of
// fresh buffers cost as much as a pass over the data); larger scratch is released.
constexpr size_t kKeptScratchBytes = size_t{256} << 20;

// Chunk t of T over [0, n), starting on a multiple of 64: a bitmap word belongs to one chunk.
Chunk chunk64_of(int t, int T, int64_t n) {
  auto at = [&](int u) { return u == T ? n : (n * u / T) & ~int64_t{63}; };
  return {at(t), at(t + 1)};
}

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

CondenseStats last_condense_stats() { return t_stats; }

const char* condense_isa() {
  const Isa isa = active_isa();
  return isa == Isa::kAvx512 ? "avx512" : (isa == Isa::kAvx2 ? "avx2" : "generic");
}

void set_condense_isa(const std::string& name) {
  if (name == "auto") {
    g_isa = static_cast<int>(Isa::kAuto);
  } else if (name == "generic") {
    g_isa = static_cast<int>(Isa::kGeneric);
  } else if (name == "avx512") {
    if (!cpu_has_avx512()) throw std::invalid_argument("isa 'avx512': this CPU (or build) has no AVX-512F");
    g_isa = static_cast<int>(Isa::kAvx512);
  } else if (name == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("isa 'avx2': this CPU (or build) has no AVX2");
    g_isa = static_cast<int>(Isa::kAvx2);
  } else {
    throw std::invalid_argument("isa must be 'auto', 'generic', 'avx2' or 'avx512', got '" + name + "'");
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
