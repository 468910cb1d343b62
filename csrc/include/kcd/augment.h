// Batched augmentation for the tensor back end (docs/algorithm.md section 5): from uint8
// NHWC storage, gather a batch's images, zero-pad, crop, flip horizontally and normalize in
// one pass (one read of the source bytes, one write of the output), shared by
// cpu/augment.cpp and cuda/augment.cu.
//
// Sample b reads image indices[b] and its params p = (y0, x0, flip): output pixel (y, x)
// takes padded-image pixel (y0 + y, x0 + (flip ? out_w - 1 - x : x)), where the padded image
// is the stored one with `pad` pixels on every side that read fill[c] (an output value:
// shift[c] for black, torchvision's padding); output channel c of a stored pixel v is
// v * scale[c] + shift[c] (scale = 1 / (255 std), shift = -mean / std). Products and sums
// are rounded separately (no FMA) so CPU, CUDA and numpy agree bit for bit.
#pragma once
#include <cstdint>
#include <cstring>

#include "kcd/common.h"

namespace kcd {

struct AugmentGeometry {
  int64_t H, W, C;        // stored image
  int64_t out_h, out_w;   // output (crop) size
  int64_t pad;            // zero padding on every side before cropping
};

// The largest valid crop origin: y0 in [0, H + 2 pad - out_h], x0 in [0, W + 2 pad - out_w].
KCD_HD int64_t max_origin_y(const AugmentGeometry& g) { return g.H + 2 * g.pad - g.out_h; }
KCD_HD int64_t max_origin_x(const AugmentGeometry& g) { return g.W + 2 * g.pad - g.out_w; }

// Stored-image column read by output column x (-1 .. W: outside reads the zero padding).
KCD_HD int64_t source_col(int64_t x, int64_t x0, bool flip, const AugmentGeometry& g) {
  return x0 + (flip ? g.out_w - 1 - x : x) - g.pad;
}

KCD_HD float normalize_px(uint8_t v, float scale, float shift) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(static_cast<float>(v), scale), shift);
#else
  const float a = static_cast<float>(v) * scale;
  return a + shift;
#endif
}

// float32 -> bfloat16, round to nearest even (inputs are finite).
KCD_HD uint16_t float_to_bf16(float f) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  std::memcpy(&u, &f, sizeof u);
#endif
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace kcd
