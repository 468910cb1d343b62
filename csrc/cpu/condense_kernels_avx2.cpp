// The CPU condensation's AVX2 kernel, for CPUs without AVX-512: pass 1 with four-lane
// compares and a permutation table in place of compress. Compiled by target attributes,
// called only where the CPU has AVX2 (condense_kernels.cpp).
#include "condense_kernels.h"

#if KCD_AVX512_PATH
#include <immintrin.h>

#include <cmath>

namespace kcd {
namespace cpu {
namespace condense_detail {
namespace {

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
  _mm256_zeroupper();  // see expand_avx512 (condense_kernels_avx512.cpp)
  for (; j < n; ++j) out[j] = p.word(x[j], static_cast<int64_t>(out[j]));
}

}  // namespace

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
  _mm256_zeroupper();  // see expand_avx512 (condense_kernels_avx512.cpp)
  return m + scan_generic(v, i, end, p, cc, bits, out == nullptr ? nullptr : out + m);
}

}  // namespace condense_detail
}  // namespace cpu
}  // namespace kcd
#endif  // KCD_AVX512_PATH
