// The value of a knowledge point (docs/algorithm.md section 1): per-row prediction entropy,
// per-row KL(teacher || student), and the cost-aware value v = (S/n) * (n/T)^alpha.
// One definition of the math, used by the CPU loops (cpu/scoring.cpp) and the CUDA
// kernels (cuda/scoring.cu). Both evaluate a row in two passes: the row maximum, then
// the shifted sums, combined by the finish_* functions below.
#pragma once
#include "kcd/common.h"

namespace kcd {

// exp(x) for x <= 0, branch-free so that the CPU loops vectorise (Cephes expf
// polynomial, ~2 ulp). Inputs below -87 (where expf leaves the normal range) give 0, also
// for x = -inf (x - m overflowed for extreme but finite logits), so that an extreme row's
// negligible terms contribute nothing (see weighted). CUDA uses expf directly (denormals
// below -87: the same to float32 precision of any sum that holds exp(0) = 1).
KCD_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float xc = x < -87.0f ? -87.0f : x;
  // round(x / ln 2) by the 1.5 * 2^23 trick: vectorises everywhere (floorf does not
  // without SSE4.1); |x - fx ln 2| <= ln 2 / 2 either way.
  const float fx = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fx);
  const float e = y * bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  return x < -87.0f ? 0.0f : e;
#endif
}

// e * d for a term e = exp_nonpos(d): 0 when e is 0, whatever d (d = -inf when x - m
// overflowed: 0 * -inf would be NaN). Extreme but finite rows such as [3e38, -3e38] then
// score their true entropy (0) on the CPU and on CUDA alike.
KCD_HD float weighted(float e, float d) { return e > 0.0f ? e * d : 0.0f; }

// Terms a row sums in float32 before the partial sum joins a float64 total (z and w below):
// a float32 sum of many terms saturates (2^24 ones per lane: C = 2^30 zero logits scored
// ln 2^28 instead of ln 2^30) and drifts by ~n ulp. With blocks of kSumBlock terms (per
// SIMD lane on the CPU: at most kSumBlock / 8; per CUDA lane: one vector chunk or
// kSumBlock / 32 terms) every row scores within 1e-6 relative of the float64 sum for any C
// (tests/test_ops.py: 2^26 zero logits score ln 2^26 exactly). Rows of C <= kSumBlock sum
// exactly as before (one block).
constexpr int64_t kSumBlock = 1024;

// Entropy from the row max m, z = sum exp(x - m) and w = sum exp(x - m) * (x - m):
// h = logsumexp(x) - sum softmax(x) * x = log(z) - w / z. Never NaN for finite rows
// (z >= 1), unlike -(p * log p).sum(). Clamped at 0 against rounding.
KCD_HD double finish_entropy(double z, double w) {
  const double h = log(z) - w / z;
  return h > 0.0 ? h : 0.0;
}

// KL(p_t || p_s) with a = teacher / T, b = student / T:
// sum p_t (a - b) - logsumexp(a) + logsumexp(b)
//   = wa / za - (ma + log za) + (mb + log zb),
// za = sum exp(a - ma), wa = sum exp(a - ma) * (a - b), zb = sum exp(b - mb).
// +inf when a finite row's KL overflows float32 terms (teacher 3e38, student -3e38, T = 1):
// row_status then refuses the row, on the CPU and on CUDA alike.
KCD_HD double finish_kl(float ma, double za, double wa, float mb, double zb) {
  const double kl = wa / za - (static_cast<double>(ma) + log(za)) + (static_cast<double>(mb) + log(zb));
  return kl > 0.0 ? kl : 0.0;
}

// Streaming form of the same row statistics for one-pass kernels (CUDA): a running
// max m, z = sum exp(x - m) and w = sum exp(x - m) (x - m) (float64 totals of float32
// partial sums, see kSumBlock), rescaled when m grows, and merged across lanes.
// finish_entropy(z, w) is then the two-pass form's value.
struct RowStats {
  float m = -INFINITY;
  double z = 0.0;
  double w = 0.0;
};

// Moves stats to a new max m2 >= s.m: z' = z e^(m - m2), w' = e^(m - m2) (w + (m - m2) z)
// (0 when the old terms vanish against the new max, d = -inf included).
KCD_HD void rescale(RowStats& s, float m2) {
  if (s.z > 0.0) {
    const float d = s.m - m2;
    const double f = exp_nonpos(d);
    s.w = f > 0.0 ? f * (s.w + static_cast<double>(d) * s.z) : 0.0;
    s.z = f * s.z;
  }
  s.m = m2;
}

KCD_HD RowStats merge(RowStats a, RowStats b) {
  if (b.z == 0.0) return a;
  if (a.z == 0.0) return b;
  const float m = a.m > b.m ? a.m : b.m;
  rescale(a, m);
  rescale(b, m);
  return RowStats{m, a.z + b.z, a.w + b.w};
}

// Paper Eq. 13: v = (S / n) * (n / T)^alpha; an unobserved point (n == 0) is +inf.
KCD_HD double point_value(double sum, int32_t count, double period, double alpha) {
  if (count <= 0) return INFINITY;
  const double n = static_cast<double>(count);
  return (sum / n) * pow(n / period, alpha);
}

// A sequence's value (masked scoring, docs/algorithm.md section 1): the mean entropy of
// its unmasked tokens, summed in token order; NaN for a sequence with no unmasked token
// (the callers refuse it: on the CPU before anything changes, on CUDA counted as a bad row).
KCD_HD double sequence_value(double token_entropy_sum, int64_t tokens) {
  return tokens > 0 ? token_entropy_sum / static_cast<double>(tokens) : NAN;
}

// A mask entry: 0 (padding, not read) or 1 (a token that counts); anything else is a bad row.
KCD_HD bool mask_valid(uint8_t m) { return m <= 1; }

// A row's status, one classification for the CPU loops and the CUDA kernels, in this order:
// an index outside [0, N) first (whatever the row holds), then a score that is not a finite
// number within +-kScoreLimit (a non-finite logit or mask problem gives NaN, a KL that
// overflows +inf, a caller's score of 1e308 is too large), else ok. The CPU raises the
// first bad row of a batch (any bad index before any bad score) before anything changes;
// CUDA skips the row and counts it in errors[0] (bad index) or errors[1] (the rest).
constexpr int32_t kRowOk = 0;
constexpr int32_t kRowBadIndex = 1;
constexpr int32_t kRowNonFinite = 2;

// The largest |score| a row may add to the bank: a point's sum of up to 2^31 - 1 of them
// (counts are int32) stays finite in float64 (2^31 * 1e298 < 1.8e308), so no sum
// overflows to inf. Entropies (<= ln C) and finite KLs (< 1e40) are far below it.
constexpr double kScoreLimit = 1e298;

KCD_HD int32_t row_status(int64_t point, int64_t N, double score) {
  if (point < 0 || point >= N) return kRowBadIndex;
  if (!(fabs(score) <= kScoreLimit)) return kRowNonFinite;  // NaN and +-inf included
  return kRowOk;
}

}  // namespace kcd
