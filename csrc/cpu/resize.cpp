// CPU loops of the overlay's bilinear resize (filter and arithmetic in kcd/resize.h). Two
// separable passes through a temporary image, in Pillow 13's order: vertical first when the
// height shrinks by more than twice what the width does (OH < H and H - OH > 2 (W - OW)),
// else horizontal first (the horizontal pass then covers only the rows the vertical pass
// reads). The vertical pass runs over whole rows in blocks of int32 accumulators held in
// vector registers (AVX-512F / AVX2 / baseline clones); wide enough images take the
// horizontal pass through a transpose and the same vertical loop.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kcd/ops.h"
#include "kcd/resize.h"

namespace kcd {
namespace cpu {
namespace {

// rows [y0, y1) of in [*, W, C] -> out [y1 - y0, OW, C]
template <int kC>
void horizontal(const uint8_t* in, int64_t W, int64_t C_dyn, int64_t y0, int64_t y1, const ResizeTaps& t,
                uint8_t* out, int64_t OW) {
  const int64_t C = kC > 0 ? kC : C_dyn;
  for (int64_t y = y0; y < y1; ++y) {
    const uint8_t* src = in + y * W * C;
    uint8_t* o = out + (y - y0) * OW * C;
    for (int64_t xx = 0; xx < OW; ++xx) {
      const int32_t* k = t.coef.data() + xx * t.ksize;
      const uint8_t* p = src + static_cast<int64_t>(t.first[xx]) * C;
      const int n = t.count[xx];
      if constexpr (kC == 3) {
        int32_t s0 = 1 << (kResizeBits - 1), s1 = s0, s2 = s0;
        for (int x = 0; x < n; ++x) {
          s0 += static_cast<int32_t>(p[3 * x]) * k[x];
          s1 += static_cast<int32_t>(p[3 * x + 1]) * k[x];
          s2 += static_cast<int32_t>(p[3 * x + 2]) * k[x];
        }
        o[3 * xx] = resize_clip8(s0);
        o[3 * xx + 1] = resize_clip8(s1);
        o[3 * xx + 2] = resize_clip8(s2);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          int32_t s = 1 << (kResizeBits - 1);
          for (int x = 0; x < n; ++x) s += static_cast<int32_t>(p[x * C + c]) * k[x];
          o[xx * C + c] = resize_clip8(s);
        }
      }
    }
  }
}

// One output row: out[i] = clip8(half + sum_y rows[y][i] * k[y]) for i < n, the taps'
// sums in tap order (Pillow's). Blocks of kBlock bytes keep their accumulators in registers
// across the taps; compiled for AVX-512F, AVX2 and the baseline, picked at load time (the
// same integer sums: identical bytes on every path).
constexpr int64_t kVBlock = 64;

__attribute__((target_clones("avx512f", "avx2", "default"))) void vertical_row(
    const uint8_t* base, int64_t row, const int32_t* k, int taps, uint8_t* o) {
  int64_t i0 = 0;
  for (; i0 + kVBlock <= row; i0 += kVBlock) {
    int32_t acc[kVBlock];
    for (int64_t i = 0; i < kVBlock; ++i) acc[i] = 1 << (kResizeBits - 1);
    for (int y = 0; y < taps; ++y) {
      const uint8_t* r = base + y * row + i0;
      const int32_t w = k[y];
      for (int64_t i = 0; i < kVBlock; ++i) acc[i] += static_cast<int32_t>(r[i]) * w;
    }
    for (int64_t i = 0; i < kVBlock; ++i) o[i0 + i] = resize_clip8(acc[i]);
  }
  for (int64_t i = i0; i < row; ++i) {
    int32_t s = 1 << (kResizeBits - 1);
    for (int y = 0; y < taps; ++y) s += static_cast<int32_t>(base[y * row + i]) * k[y];
    o[i] = resize_clip8(s);
  }
}

// in [*, row bytes] (its row 0 is source row `offset`) -> out [OH, row bytes]
void vertical(const uint8_t* in, int64_t row, int64_t offset, const ResizeTaps& t, uint8_t* out, int64_t OH) {
  for (int64_t yy = 0; yy < OH; ++yy) {
    vertical_row(in + (t.first[yy] - offset) * row, row, t.coef.data() + yy * t.ksize, t.count[yy], out + yy * row);
  }
}

// [rows, cols, C] -> [cols, rows, C] (pixels of C bytes)
void transpose(const uint8_t* in, int64_t rows, int64_t cols, int64_t C, uint8_t* out) {
  constexpr int64_t kBlock = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t c1 = std::min(cols, c0 + kBlock);
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* src = in + r * cols * C;
        if (C == 3 && r + 1 < rows) {
          // 4-byte moves: the 4th byte read is the next pixel's (in bounds: not the last row) and
          // the 4th byte written is pixel (c, r + 1)'s first, which this loop writes later (rows
          // ascend within a block, blocks ascend); the last row below moves 3 bytes
          for (int64_t c = c0; c < c1; ++c) {
            uint32_t v;
            std::memcpy(&v, src + c * 3, 4);
            std::memcpy(out + (c * rows + r) * 3, &v, 4);
          }
        } else if (C == 3) {
          for (int64_t c = c0; c < c1; ++c) {
            uint8_t* dst = out + (c * rows + r) * 3;
            dst[0] = src[c * 3];
            dst[1] = src[c * 3 + 1];
            dst[2] = src[c * 3 + 2];
          }
        } else {
          for (int64_t c = c0; c < c1; ++c) {
            for (int64_t k = 0; k < C; ++k) out[(c * rows + r) * C + k] = src[c * C + k];
          }
        }
      }
    }
  }
}

// Rows [y0, y1) of in [*, W, C] -> out [y1 - y0, OW, C]. Wide enough images go through a
// transpose, the vectorised vertical loop over the columns, and a transpose back (the same
// sums in the same order: identical bytes, about 2x faster than a loop per output pixel).
void horizontal_any(const uint8_t* in, int64_t W, int64_t C, int64_t y0, int64_t y1, const ResizeTaps& t,
                    uint8_t* out, int64_t OW) {
  const int64_t rows = y1 - y0;
  if (rows >= 16) {
    // per-thread scratch, kept between calls (no page faults per image)
    thread_local std::vector<uint8_t> cols, done;
    cols.resize(static_cast<size_t>(W * rows * C));
    done.resize(static_cast<size_t>(OW * rows * C));
    transpose(in + y0 * W * C, rows, W, C, cols.data());
    vertical(cols.data(), rows * C, 0, t, done.data(), OW);
    transpose(done.data(), OW, rows, C, out);
  } else if (C == 3) {
    horizontal<3>(in, W, C, y0, y1, t, out, OW);
  } else {
    horizontal<0>(in, W, C, y0, y1, t, out, OW);
  }
}

}  // namespace

void resize_bilinear(const uint8_t* in, int64_t H, int64_t W, int64_t C, uint8_t* out, int64_t OH, int64_t OW) {
  if (H < 1 || W < 1 || OH < 1 || OW < 1 || C < 1) {
    throw std::invalid_argument("resize needs sizes >= 1, got " + std::to_string(H) + "x" + std::to_string(W) +
                                " -> " + std::to_string(OH) + "x" + std::to_string(OW));
  }
  const bool horiz = OW != W, vert = OH != H;
  if (!horiz && !vert) {
    std::copy(in, in + H * W * C, out);
    return;
  }
  if (!vert) {
    horizontal_any(in, W, C, 0, H, resize_taps(static_cast<int>(W), static_cast<int>(OW)), out, OW);
    return;
  }
  const ResizeTaps tv = resize_taps(static_cast<int>(H), static_cast<int>(OH));
  if (!horiz) {
    vertical(in, W * C, 0, tv, out, OH);
    return;
  }
  const ResizeTaps th = resize_taps(static_cast<int>(W), static_cast<int>(OW));
  thread_local std::vector<uint8_t> tmp;
  if (resize_vertical_first(H, W, OH, OW)) {
    tmp.resize(static_cast<size_t>(OH * W * C));
    vertical(in, W * C, 0, tv, tmp.data(), OH);
    horizontal_any(tmp.data(), W, C, 0, OH, th, out, OW);
    return;
  }
  const int64_t y0 = tv.first[0], y1 = tv.first[OH - 1] + tv.count[OH - 1];  // rows the vertical pass reads
  tmp.resize(static_cast<size_t>((y1 - y0) * OW * C));
  horizontal_any(in, W, C, y0, y1, th, tmp.data(), OW);
  vertical(tmp.data(), OW * C, y0, tv, out, OH);
}

}  // namespace cpu
}  // namespace kcd
