// CPU loop for the VAKS summary (math in kcd/blend.h): images[dst[j]] <-
// eps[j] * images[dst[j]] + (1 - eps[j]) * images[src[j]], all pairs reading the images
// as they were before the call (guaranteed by requiring dst unique and disjoint from src);
// and the same for one pair held in two buffers (the folder overlay's decoded images).
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "kcd/blend.h"
#include "kcd/ops.h"

namespace kcd {
namespace cpu {
namespace {

std::string at(const char* name, int64_t j, int64_t v) {
  return std::string(name) + "[" + std::to_string(j) + "] = " + std::to_string(v);
}

void check_pairs(int64_t N, const int64_t* dst, const int64_t* src, const double* eps, int64_t L) {
  std::vector<uint8_t> role(static_cast<size_t>(N), 0);  // 1: dst, 2: src
  for (int64_t j = 0; j < L; ++j) {
    if (dst[j] < 0 || dst[j] >= N) throw std::out_of_range(at("dst", j, dst[j]) + " is outside [0, " + std::to_string(N) + ")");
    if (src[j] < 0 || src[j] >= N) throw std::out_of_range(at("src", j, src[j]) + " is outside [0, " + std::to_string(N) + ")");
    if (!(eps[j] >= 0.0 && eps[j] <= 1.0)) {
      throw std::invalid_argument("eps[" + std::to_string(j) + "] = " + std::to_string(eps[j]) + " is outside [0, 1]");
    }
    if (role[dst[j]] == 1) throw std::invalid_argument(at("dst", j, dst[j]) + " appears twice in dst");
    role[dst[j]] = 1;
  }
  for (int64_t j = 0; j < L; ++j) {
    if (role[src[j]] == 1) {
      throw std::invalid_argument(at("src", j, src[j]) +
                                  " is also in dst: a summary pair may not read an image another pair writes");
    }
  }
}

// Pixels per image from which a pair's 256 x 256 table of blend_px results (built once per pair,
// 64 KiB) beats computing each pixel: one lookup per pixel, about 4x faster on a 400 x 350 photo.
constexpr int64_t kTableFrom = int64_t(1) << 17;

// A pair's 256 x 256 table of blend_px results: t[(d << 8) | s]. The products are computed once
// per row and column (the same doubles blend_px computes) and the cells vectorise: compiled for
// AVX-512F, AVX2 and the baseline (identical bytes on each).
__attribute__((target_clones("avx512f", "avx2", "default"))) void blend_table(uint8_t* __restrict t, double e,
                                                                               double f) {
  double fs[256];
  for (int s = 0; s < 256; ++s) fs[s] = f * static_cast<double>(s);
  for (int d = 0; d < 256; ++d) {
    const double a = e * static_cast<double>(d);
    uint8_t* row = t + (d << 8);
    for (int s = 0; s < 256; ++s) row[s] = blend_px_from_products(a, fs[s]);
  }
}

void blend_image(uint8_t* __restrict out, const uint8_t* __restrict in, int64_t D, double e, double f) {
  if (D < kTableFrom) {
    for (int64_t k = 0; k < D; ++k) out[k] = blend_px(out[k], in[k], e, f);
    return;
  }
  thread_local std::vector<uint8_t> table(256 * 256);
  uint8_t* t = table.data();
  blend_table(t, e, f);
  for (int64_t k = 0; k < D; ++k) out[k] = t[(static_cast<int>(out[k]) << 8) | in[k]];
}

}  // namespace

void blend_image(uint8_t* dst, const uint8_t* src, int64_t D, double eps) {
  if (!(eps >= 0.0 && eps <= 1.0)) throw std::invalid_argument("eps = " + std::to_string(eps) + " is outside [0, 1]");
  if (D > 0) blend_image(dst, src, D, eps, 1.0 - eps);
}

void blend(uint8_t* images, int64_t N, int64_t D, const int64_t* dst, const int64_t* src,
           const double* eps, int64_t L) {
  if (L == 0) return;
  check_pairs(N, dst, src, eps, L);
  if (D == 0) return;
  const TeamScope team(L * D, int64_t(1) << 16);
#pragma omp parallel for num_threads(openmp_threads()) schedule(static) if (team.team() > 1)
  for (int64_t j = 0; j < L; ++j) {
    uint8_t* out = images + dst[j] * D;
    const uint8_t* in = images + src[j] * D;
    blend_image(out, in, D, eps[j], 1.0 - eps[j]);
  }
}

}  // namespace cpu
}  // namespace kcd
