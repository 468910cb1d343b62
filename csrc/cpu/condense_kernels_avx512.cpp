// The CPU condensation's AVX-512 kernels (AVX-512F compress): pass 1 keys its members
// eight at a time from batches staged in L1; the expansion stores whole kept words at once.
// Compiled by target attributes, called only where the CPU has AVX-512F (condense_kernels.cpp).
#include "condense_kernels.h"

#if KCD_AVX512_PATH
#include <immintrin.h>

#include <cmath>

namespace kcd {
namespace cpu {
namespace condense_detail {
namespace {

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

}  // namespace

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

}  // namespace condense_detail
}  // namespace cpu
}  // namespace kcd
#endif  // KCD_AVX512_PATH
