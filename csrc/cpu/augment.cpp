// CPU loop of the tensor back end's fused augmentation (math in kcd/augment.h). Params are
// validated first, so a bad batch writes nothing.
#include <stdexcept>
#include <string>
#include <vector>

#include "kcd/augment.h"
#include "kcd/ops.h"

namespace kcd {
namespace cpu {
namespace {

template <typename T>
inline T store(float f);
template <>
inline float store<float>(float f) {
  return f;
}
template <>
inline uint16_t store<uint16_t>(float f) {
  return float_to_bf16(f);
}

// One output row of sample b: columns [0, xa) and [xb, ow) read the zero padding, columns in
// between read stored pixels (source_col, branch-free).
template <typename T, bool kNHWC>
void run(const uint8_t* images, const AugmentGeometry& g, const int64_t* indices, const int32_t* params, int64_t B,
         const float* lut, const float* fill, T* out) {
  const int64_t C = g.C, oh = g.out_h, ow = g.out_w, per = oh * ow * C;
  const TeamScope team(B * per, int64_t(1) << 18);
#pragma omp parallel for num_threads(openmp_threads()) schedule(static) if (team.team() > 1)
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* img = images + indices[b] * g.H * g.W * C;
    const int64_t y0 = params[3 * b], x0 = params[3 * b + 1];
    const bool flip = params[3 * b + 2] != 0;
    // source_col(x) = x0 - pad + x, or x0 - pad + ow - 1 - x when flipped; valid while in [0, W)
    int64_t xa = flip ? x0 + ow - g.pad - g.W : g.pad - x0;
    int64_t xb = flip ? x0 + ow - g.pad : g.W + g.pad - x0;
    xa = xa < 0 ? 0 : (xa > ow ? ow : xa);
    xb = xb < xa ? xa : (xb > ow ? ow : xb);
    T* o = out + b * per;
    for (int64_t y = 0; y < oh; ++y) {
      const int64_t sy = y0 + y - g.pad;
      const bool row_in = sy >= 0 && sy < g.H;
      const uint8_t* row = img + (row_in ? sy : 0) * g.W * C;
      for (int64_t c = 0; c < C; ++c) {
        const float* t = lut + c * 256;
        const T pad_value = store<T>(fill[c]);
        T* orow = kNHWC ? o + y * ow * C + c : o + (c * oh + y) * ow;
        const int64_t step = kNHWC ? C : 1;
        if (!row_in) {
          for (int64_t x = 0; x < ow; ++x) orow[x * step] = pad_value;
          continue;
        }
        for (int64_t x = 0; x < xa; ++x) orow[x * step] = pad_value;
        if (flip) {
          const uint8_t* src = row + (x0 - g.pad + ow - 1) * C + c;
          for (int64_t x = xa; x < xb; ++x) orow[x * step] = store<T>(t[src[-x * C]]);
        } else {
          const uint8_t* src = row + (x0 - g.pad) * C + c;
          for (int64_t x = xa; x < xb; ++x) orow[x * step] = store<T>(t[src[x * C]]);
        }
        for (int64_t x = xb; x < ow; ++x) orow[x * step] = pad_value;
      }
    }
  }
}

}  // namespace

void augment(const uint8_t* images, int64_t N, const AugmentGeometry& g, const int64_t* indices,
             const int32_t* params, int64_t B, const float* scale, const float* shift, const float* fill, void* out,
             bool out_bf16, bool nhwc_out) {
  for (int64_t b = 0; b < B; ++b) {
    if (indices[b] < 0 || indices[b] >= N) {
      throw std::out_of_range("indices[" + std::to_string(b) + "] = " + std::to_string(indices[b]) +
                              " is outside [0, " + std::to_string(N) + ")");
    }
    const int32_t* p = params + 3 * b;
    if (p[0] < 0 || p[0] > max_origin_y(g) || p[1] < 0 || p[1] > max_origin_x(g) || (p[2] != 0 && p[2] != 1)) {
      throw std::invalid_argument("params[" + std::to_string(b) + "] = (" + std::to_string(p[0]) + ", " +
                                  std::to_string(p[1]) + ", " + std::to_string(p[2]) +
                                  ") is not a crop origin in [0, " + std::to_string(max_origin_y(g)) + "] x [0, " +
                                  std::to_string(max_origin_x(g)) + "] with flip 0 or 1");
    }
  }
  // every output value of a stored pixel is normalize_px(v, scale[c], shift[c]) of a uint8 v: a
  // table per channel (bit-identical to computing it); the padding writes fill[c]
  std::vector<float> lut(static_cast<size_t>(256 * g.C));
  for (int64_t c = 0; c < g.C; ++c) {
    for (int v = 0; v < 256; ++v) lut[c * 256 + v] = normalize_px(static_cast<uint8_t>(v), scale[c], shift[c]);
  }
  if (out_bf16) {
    if (nhwc_out) run<uint16_t, true>(images, g, indices, params, B, lut.data(), fill, static_cast<uint16_t*>(out));
    else run<uint16_t, false>(images, g, indices, params, B, lut.data(), fill, static_cast<uint16_t*>(out));
  } else {
    if (nhwc_out) run<float, true>(images, g, indices, params, B, lut.data(), fill, static_cast<float*>(out));
    else run<float, false>(images, g, indices, params, B, lut.data(), fill, static_cast<float*>(out));
  }
}

}  // namespace cpu
}  // namespace kcd
