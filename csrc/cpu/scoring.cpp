// CPU loops for value scoring: per-row entropy / KL (math in kcd/scoring.h) and the
// cost-aware value. Rows are evaluated into a scratch buffer and validated first, so a
// bad batch leaves the accumulators untouched.
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "kcd/ops.h"
#include "kcd/scoring.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KCD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KCD_CLONES
#endif

namespace kcd {
namespace cpu {
namespace {

constexpr int64_t kParallelElems = int64_t(1) << 16;  // below this, one thread is faster

// Entropy of one float32 row; NaN when the row holds a non-finite value.
KCD_CLONES double entropy_row(const float* x, int64_t C) {
  float m = -INFINITY;
  float chk = 0.0f;  // becomes NaN iff some x is +-inf or NaN
#pragma omp simd reduction(max : m) reduction(+ : chk)
  for (int64_t j = 0; j < C; ++j) {
    m = x[j] > m ? x[j] : m;
    chk += x[j] * 0.0f;
  }
  if (!std::isfinite(chk) || !std::isfinite(m)) return NAN;
  double z = 0.0, w = 0.0;  // float64 totals of float32 blocks (kcd/scoring.h: kSumBlock)
  for (int64_t j0 = 0; j0 < C; j0 += kSumBlock) {
    const int64_t j1 = C - j0 < kSumBlock ? C : j0 + kSumBlock;
    float zb = 0.0f, wb = 0.0f;
#pragma omp simd reduction(+ : zb, wb)
    for (int64_t j = j0; j < j1; ++j) {
      const float d = x[j] - m;
      const float e = exp_nonpos(d);
      zb += e;
      wb += weighted(e, d);
    }
    z += zb;
    w += wb;
  }
  return finish_entropy(z, w);
}

// Rows [0, R) of a float32 [B, C] tensor with few classes (R <= kRowBlock), vectorised
// across rows: the classes in the outer loop, one SIMD lane per row (strided loads). The
// statistics m, z, w and the finite check are entropy_row's, summed in class order;
// finish_entropy (a double log) then runs per row.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kFewClasses = 32;  // below this, rows are vectorised across rows

KCD_CLONES void entropy_rows_few(const float* x, int64_t R, int64_t C, int64_t ld, double* out) {
  float m[kRowBlock], chk[kRowBlock], z[kRowBlock], w[kRowBlock];
  for (int64_t r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    chk[r] = 0.0f;
    z[r] = 0.0f;
    w[r] = 0.0f;
  }
  for (int64_t j = 0; j < C; ++j) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      const float v = x[r * ld + j];
      m[r] = v > m[r] ? v : m[r];
      chk[r] += v * 0.0f;
    }
  }
  for (int64_t j = 0; j < C; ++j) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      const float d = x[r * ld + j] - m[r];
      const float e = exp_nonpos(d);
      z[r] += e;
      w[r] += weighted(e, d);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    out[r] = std::isfinite(chk[r]) && std::isfinite(m[r]) ? finish_entropy(z[r], w[r]) : NAN;
  }
}

// KL(softmax(t / T) || softmax(s / T)) of one float32 row pair; NaN when non-finite.
KCD_CLONES double kl_row(const float* s, const float* t, int64_t C, float inv_temp) {
  float ma = -INFINITY, mb = -INFINITY, chk = 0.0f;
#pragma omp simd reduction(max : ma, mb) reduction(+ : chk)
  for (int64_t j = 0; j < C; ++j) {
    const float a = t[j] * inv_temp, b = s[j] * inv_temp;
    ma = a > ma ? a : ma;
    mb = b > mb ? b : mb;
    chk += a * 0.0f + b * 0.0f;
  }
  if (!std::isfinite(chk) || !std::isfinite(ma) || !std::isfinite(mb)) return NAN;
  double za = 0.0, wa = 0.0, zb = 0.0;  // float64 totals of float32 blocks (kSumBlock)
  for (int64_t j0 = 0; j0 < C; j0 += kSumBlock) {
    const int64_t j1 = C - j0 < kSumBlock ? C : j0 + kSumBlock;
    float pa = 0.0f, pw = 0.0f, pb = 0.0f;
#pragma omp simd reduction(+ : pa, pw, pb)
    for (int64_t j = j0; j < j1; ++j) {
      const float a = t[j] * inv_temp, b = s[j] * inv_temp;
      const float ea = exp_nonpos(a - ma);
      pa += ea;
      pw += weighted(ea, a - b);
      pb += exp_nonpos(b - mb);
    }
    za += pa;
    wa += pw;
    zb += pb;
  }
  return finish_kl(ma, za, wa, mb, zb);
}

// Row r of a [B, ld] tensor of `kind` as float32: a pointer into the tensor for f32,
// else converted into `buf`.
const float* row_as_f32(const void* base, FloatKind kind, int64_t r, int64_t C, int64_t ld,
                        std::vector<float>& buf) {
  if (kind == FloatKind::kF32) return static_cast<const float*>(base) + r * ld;
  buf.resize(static_cast<size_t>(C));
  const uint16_t* p = static_cast<const uint16_t*>(base) + r * ld;
  if (kind == FloatKind::kF16) {
    for (int64_t j = 0; j < C; ++j) buf[j] = half_to_float(p[j]);
  } else {
    for (int64_t j = 0; j < C; ++j) buf[j] = bf16_to_float(p[j]);
  }
  return buf.data();
}

// The first row_status test (a bad index), for every row before any row is scored.
void check_indices(const int64_t* indices, int64_t B, int64_t N) {
  for (int64_t r = 0; r < B; ++r) {
    if (row_status(indices[r], N, 0.0) == kRowBadIndex) {
      throw std::out_of_range("indices[" + std::to_string(r) + "] = " + std::to_string(indices[r]) +
                              " is outside [0, " + std::to_string(N) + ")");
    }
  }
}

// Validates every row (kcd/scoring.h: row_status, the order CUDA counts them in), then adds
// them: a bad row raises before anything changes. Indices were checked first (check_indices).
void accumulate(const std::vector<double>& h, const int64_t* indices, int64_t N, double* sums, int32_t* counts,
                const char* what) {
  const int64_t B = static_cast<int64_t>(h.size());
  for (int64_t r = 0; r < B; ++r) {
    const int32_t status = row_status(indices[r], N, h[r]);
    if (status == kRowBadIndex) {
      throw std::out_of_range("indices[" + std::to_string(r) + "] = " + std::to_string(indices[r]) +
                              " is outside [0, " + std::to_string(N) + ")");
    }
    if (status != kRowOk && !std::isfinite(h[r])) {
      throw std::invalid_argument(std::string(what) + " row " + std::to_string(r) + " (point " +
                                  std::to_string(indices[r]) + ") holds a non-finite value (inf or nan)" +
                                  (std::isinf(h[r]) && std::string(what) != "scores"
                                       ? ": its score overflows (KL of logits this far apart at this temperature)"
                                       : ""));
    }
    if (status != kRowOk) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.17g", h[r]);
      throw std::invalid_argument(std::string(what) + " row " + std::to_string(r) + " (point " +
                                  std::to_string(indices[r]) + ") = " + buf +
                                  " is beyond +-1e298, the largest score the bank adds (a point's sum of 2^31 "
                                  "such scores stays finite in float64)");
    }
  }
  for (int64_t r = 0; r < B; ++r) {
    sums[indices[r]] += h[r];
    counts[indices[r]] += 1;
  }
}

}  // namespace

void observe_entropy(const void* logits, FloatKind kind, int64_t B, int64_t C, int64_t ld,
                     const int64_t* indices, int64_t N, double* sums, int32_t* counts) {
  if (B == 0) return;
  check_indices(indices, B, N);
  std::vector<double> h(static_cast<size_t>(B));
  const TeamScope team(B * C, kParallelElems);
  if (kind == FloatKind::kF32 && C < kFewClasses && team.team() == 1) {
    // few classes (CIFAR-10's C = 10 ...): per-row loops are all overhead; one SIMD lane per row
    const float* x = static_cast<const float*>(logits);
    for (int64_t r0 = 0; r0 < B; r0 += kRowBlock) {
      entropy_rows_few(x + r0 * ld, B - r0 < kRowBlock ? B - r0 : kRowBlock, C, ld, h.data() + r0);
    }
  } else {
#pragma omp parallel num_threads(openmp_threads()) if (team.team() > 1)
    {
      std::vector<float> buf;
#pragma omp for schedule(static)
      for (int64_t r = 0; r < B; ++r) h[r] = entropy_row(row_as_f32(logits, kind, r, C, ld, buf), C);
    }
  }
  accumulate(h, indices, N, sums, counts, "logits");
}

void observe_kl(const void* student, const void* teacher, FloatKind kind, int64_t B, int64_t C,
                int64_t ld_s, int64_t ld_t, const int64_t* indices, int64_t N, double* sums,
                int32_t* counts, float temperature) {
  if (B == 0) return;
  check_indices(indices, B, N);
  std::vector<double> h(static_cast<size_t>(B));
  const float inv_temp = 1.0f / temperature;
  const TeamScope team(B * C, kParallelElems);
#pragma omp parallel num_threads(openmp_threads()) if (team.team() > 1)
  {
    std::vector<float> bs, bt;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; ++r) {
      h[r] = kl_row(row_as_f32(student, kind, r, C, ld_s, bs), row_as_f32(teacher, kind, r, C, ld_t, bt), C,
                    inv_temp);
    }
  }
  accumulate(h, indices, N, sums, counts, "student_logits/teacher_logits");
}

void observe_entropy_seq(const void* logits, FloatKind kind, int64_t B, int64_t L, int64_t V, int64_t ld,
                         const uint8_t* mask, const int64_t* indices, int64_t N, double* sums, int32_t* counts) {
  if (B == 0) return;
  check_indices(indices, B, N);
  for (int64_t b = 0; b < B; ++b) {
    int64_t tokens = 0;
    for (int64_t t = 0; t < L; ++t) {
      const uint8_t m = mask[b * L + t];
      if (!mask_valid(m)) {
        throw std::invalid_argument("mask[" + std::to_string(b) + ", " + std::to_string(t) + "] = " +
                                    std::to_string(m) + " is not 0 or 1");
      }
      tokens += m;
    }
    if (tokens == 0) {
      throw std::invalid_argument("mask row " + std::to_string(b) + " (point " + std::to_string(indices[b]) +
                                  ") has no unmasked token");
    }
  }
  // token entropies of the unmasked rows, then each sequence's mean in token order
  std::vector<double> h(static_cast<size_t>(B * L), 0.0);
  const TeamScope team(B * L * V, kParallelElems);
#pragma omp parallel num_threads(openmp_threads()) if (team.team() > 1)
  {
    std::vector<float> buf;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * L; ++r) {
      if (mask[r]) h[r] = entropy_row(row_as_f32(logits, kind, r, V, ld, buf), V);
    }
  }
  std::vector<double> seq(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0.0;
    int64_t tokens = 0;
    for (int64_t t = 0; t < L; ++t) {
      if (mask[b * L + t]) {
        sum += h[b * L + t];
        ++tokens;
      }
    }
    seq[b] = sequence_value(sum, tokens);
  }
  accumulate(seq, indices, N, sums, counts, "logits");
}

void observe_scores(const double* scores, const int64_t* indices, int64_t B, int64_t N, double* sums,
                    int32_t* counts) {
  if (B == 0) return;
  check_indices(indices, B, N);
  accumulate(std::vector<double>(scores, scores + B), indices, N, sums, counts, "scores");
}

void values(const double* sums, const int32_t* counts, int64_t N, double period, double alpha,
            double* out) {
  const TeamScope team(N, kParallelElems);
#pragma omp parallel for num_threads(openmp_threads()) schedule(static) if (team.team() > 1)
  for (int64_t i = 0; i < N; ++i) out[i] = point_value(sums[i], counts[i], period, alpha);
}

}  // namespace cpu
}  // namespace kcd
