// Value-adaptive knowledge summary (docs/algorithm.md section 4): the VAKS pair weights and the
// uint8 pixel blend, shared by cpu/blend.cpp, cpu/condense.cpp and the CUDA kernels.
#pragma once
#include "kcd/common.h"

namespace kcd {

// eps_j = eps_m + (1 - eps_m) * (L - j) / L for pair j of L (VAKS "low" and "high").
KCD_HD double vaks_eps(int64_t j, int64_t L, double eps_m) {
  return eps_m + (1.0 - eps_m) * static_cast<double>(L - j) / static_cast<double>(L);
}

// round_nearest(e * dst + (1 - e) * src), clamped to [0, 255]. Products and the sum are
// rounded separately (no FMA contraction) so CPU, CUDA and numpy agree bit for bit;
// ties round up (floor(v + 0.5)). Clamping v + 0.5 to [0, 255] before truncating gives
// exactly clamp(floor(v + 0.5)) (truncation is floor on [0, 255]), with no call to floor:
// the CPU loop vectorises (SSE2 min/max and cvttpd), about 10x faster than a floor per pixel.
// The rounding half of blend_px: the two products a = e * dst and b = (1 - e) * src (each
// rounded to double) -> the pixel. The CPU's per-pair table computes the products once per row
// and column and calls this for every cell (the same operations in the same order).
KCD_HD uint8_t blend_px_from_products(double a, double b) {
#if defined(__CUDA_ARCH__)
  double x = __dadd_rn(__dadd_rn(a, b), 0.5);
#else
  const double v = a + b;
  double x = v + 0.5;
#endif
  x = x > 0.0 ? x : 0.0;
  x = x < 255.0 ? x : 255.0;
  return static_cast<uint8_t>(static_cast<int32_t>(x));
}

KCD_HD uint8_t blend_px(uint8_t dst, uint8_t src, double e, double one_minus_e) {
#if defined(__CUDA_ARCH__)
  return blend_px_from_products(__dmul_rn(e, static_cast<double>(dst)), __dmul_rn(one_minus_e, static_cast<double>(src)));
#else
  return blend_px_from_products(e * static_cast<double>(dst), one_minus_e * static_cast<double>(src));
#endif
}

}  // namespace kcd
