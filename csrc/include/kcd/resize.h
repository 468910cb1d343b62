// Bilinear image resize for the folder overlay's VAKS pairs (docs/algorithm.md section 4: a
// dropped image is resized to the kept image's size before they are blended). The filter and
// the arithmetic are Pillow's `Image.resize(size, BILINEAR)` (libImaging/Resample.c): a
// triangle filter whose support widens with the downscale factor (antialiased), coefficients
// computed in double, normalised, rounded to 22-bit fixed point, two separable passes in
// Pillow 13's order (resize_vertical_first), each output rounded half up and clamped. Same
// inputs, same bytes as Pillow >= 13 (tests compare against it), on packed uint8 [H, W, C]
// images instead of Pillow's 4-byte pixels.
#pragma once
#include <vector>

#include "kcd/common.h"

namespace kcd {

constexpr int kResizeBits = 22;  // Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2

// The taps of one pass: out[i] reads in[first[i] .. first[i] + count[i]) with weights
// coef[i * ksize + t] (fixed point, kResizeBits).
struct ResizeTaps {
  int ksize = 0;
  std::vector<int32_t> first, count, coef;
};

inline double bilinear_weight(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for in_size -> out_size (box = the
// whole input).
inline ResizeTaps resize_taps(int in_size, int out_size) {
  ResizeTaps t;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;  // the bilinear filter's support is 1
  t.ksize = static_cast<int>(ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.coef.assign(static_cast<size_t>(out_size) * t.ksize, 0);
  std::vector<double> k(t.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      const double w = bilinear_weight((x + xmin - center + 0.5) * ss);
      k[x] = w;
      ww += w;
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = k[x] * (1 << kResizeBits);
      t.coef[static_cast<size_t>(xx) * t.ksize + x] = static_cast<int32_t>(k[x] < 0 ? -0.5 + v : 0.5 + v);
    }
    t.first[xx] = xmin;
    t.count[xx] = xmax;
  }
  return t;
}

// Pillow 13's order of the two passes: vertical first when the height shrinks by more than
// twice what the width does (older Pillow: always horizontal first; both orders round the
// intermediate image to uint8, so the order changes some pixels by one level).
inline bool resize_vertical_first(int64_t H, int64_t W, int64_t OH, int64_t OW) {
  return OH < H && (H - OH) > 2 * (W - OW);
}

// Pillow's clip8: a fixed-point sum (with the half already added) -> [0, 255].
KCD_HD uint8_t resize_clip8(int32_t ss) {
  const int32_t v = ss >> kResizeBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

}  // namespace kcd
