// Entry points of the compiled kernels, on raw pointers. The bindings (bind_*.cpp)
// unpack DLPack tensors and call these; the Python layer has already checked types,
// shapes and devices, and these re-check only what memory safety relies on.
// Shapes: B rows of logits, C classes, N knowledge points, L summary pairs,
// D bytes per stored image.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "kcd/augment.h"
#include "kcd/common.h"

namespace kcd {

enum class VaksMode : int { kOff = 0, kLow = 1, kHigh = 2, kRandom = 3 };

// Number of summary pairs of a condensation: L = n_prev - n_keep dropped points, at most
// n_keep of them paired, none when VAKS is off.
inline int64_t vaks_pairs(int64_t n_keep, int64_t n_prev, VaksMode mode) {
  if (mode == VaksMode::kOff) return 0;
  const int64_t L = n_prev - n_keep;
  return L < n_keep ? L : n_keep;
}

namespace cpu {

// logits [B, C] (row stride ld elements), indices [B], sums [N] f64, counts [N] i32.
// Validates every row first; throws (std::out_of_range / std::invalid_argument) before
// any accumulator changes.
void observe_entropy(const void* logits, FloatKind kind, int64_t B, int64_t C, int64_t ld,
                     const int64_t* indices, int64_t N, double* sums, int32_t* counts);
// student, teacher [B, C] of one kind; KL(softmax(t/T) || softmax(s/T)).
void observe_kl(const void* student, const void* teacher, FloatKind kind, int64_t B, int64_t C,
                int64_t ld_s, int64_t ld_t, const int64_t* indices, int64_t N, double* sums,
                int32_t* counts, float temperature);
// Sequences: logits [B * L, V] token rows (row stride ld; sequence b holds rows
// b*L .. b*L+L-1), mask [B * L] u8 in {0, 1}: sums[indices[b]] += the mean entropy of the
// sequence's unmasked tokens, counts[indices[b]] += 1. Throws before any accumulator
// changes on a bad index, a mask value > 1, a sequence with no unmasked token or a
// non-finite unmasked token row (masked rows are never read).
void observe_entropy_seq(const void* logits, FloatKind kind, int64_t B, int64_t L, int64_t V, int64_t ld,
                         const uint8_t* mask, const int64_t* indices, int64_t N, double* sums, int32_t* counts);
// A score per row computed by the caller: sums[indices[r]] += scores[r], counts += 1.
// Throws before any change on a bad index or a non-finite score.
void observe_scores(const double* scores, const int64_t* indices, int64_t B, int64_t N, double* sums,
                    int32_t* counts);
// out [N] = point_value(sums, counts).
void values(const double* sums, const int32_t* counts, int64_t N, double period, double alpha,
            double* out);
// The tensor back end's fused augmentation (kcd/augment.h): images [N, H, W, C] u8,
// indices [B] i64, params [B, 3] i32 (y0, x0, flip), scale / shift / fill [C] f32, out [B, C, oh, ow]
// (or [B, oh, ow, C] when nhwc_out) float32 or bfloat16. Throws before writing on a bad index
// or params out of range.
void augment(const uint8_t* images, int64_t N, const AugmentGeometry& g, const int64_t* indices,
             const int32_t* params, int64_t B, const float* scale, const float* shift, const float* fill, void* out,
             bool out_bf16, bool nhwc_out);
// images [N, D] u8, dst/src [L] i64, eps [L] f64. Checks ranges, unique dst and
// dst disjoint from src before writing.
void blend(uint8_t* images, int64_t N, int64_t D, const int64_t* dst, const int64_t* src,
           const double* eps, int64_t L);
// dst [D] u8 <- blend(dst, src [D] u8, eps): one pair of blend() in two buffers (no copies
// into an images array). Checks eps in [0, 1].
void blend_image(uint8_t* dst, const uint8_t* src, int64_t D, double eps);
// in [H, W, C] u8 -> out [OH, OW, C] u8, Pillow's bilinear filter (kcd/resize.h).
void resize_bilinear(const uint8_t* in, int64_t H, int64_t W, int64_t C, uint8_t* out, int64_t OH, int64_t OW);
// values [N]; keep [n_keep] sorted by index; dropped [n_prev - n_keep] in rank order;
// dst/src/eps [vaks_pairs]; random_pos [vaks_pairs] positions into keep (kRandom only).
void condense(const double* values, int64_t N, int64_t n_keep, int64_t n_prev, VaksMode mode,
              double eps_m, const int64_t* random_pos, int64_t* keep, int64_t* dropped,
              int64_t* dst, int64_t* src, double* eps);
// The compaction kernels condense uses: "avx512" (AVX-512F compress) or "generic"
// (branch-free scalar). set_condense_isa("auto" | "generic" | "avx512") forces one, for
// tests and benchmarks; "avx512" throws std::invalid_argument where the CPU lacks it.
const char* condense_isa();
void set_condense_isa(const std::string& name);
// What the calling thread's last condense did: zone members sorted, passes over the
// values (2 when the sample mispredicted), whether the members were copied again (the
// prediction's copy ran out of room).
struct CondenseStats {
  int64_t members = 0;
  int passes = 0;
  bool recopied = false;
};
CondenseStats last_condense_stats();
// Memory of at least `bytes` for large results: 2 MiB-aligned, on transparent huge pages
// where the OS has them, already faulted in; *mapped receives what free_pages needs.
// Uninitialised: a buffer released by free_pages is kept while the cache holds at most
// its byte limit (default 256 MiB, 4 buffers) and handed to the next request it fits.
void* alloc_pages(size_t bytes, size_t* mapped);
void free_pages(void* p, size_t mapped);
size_t cached_pages_bytes();
size_t pages_cache_limit();
size_t set_pages_cache_limit(size_t limit);  // returns the previous limit; evicts down to it
size_t empty_pages_cache();                  // returns the bytes released
bool openmp_enabled();
// The team size the kernels use: omp_get_max_threads(), or 1 in a forked child (libgomp's
// pool does not survive fork()), capped by the current op's TeamScope.
int openmp_threads();
// A team of at most `want` sized by the cores free now (threads.cpp: busy cores).
int free_cores_team(int want);
// Sizes the team of one CPU op (RAII, one per op): `work` below `threshold` runs on one
// thread; above it, on the cores free when the op starts. Every region inside the op uses
// openmp_threads(), which the scope caps.
class TeamScope {
 public:
  TeamScope(int64_t work, int64_t threshold);
  ~TeamScope();
  TeamScope(const TeamScope&) = delete;
  TeamScope& operator=(const TeamScope&) = delete;
  int team() const { return team_; }

 private:
  int previous_;
  int team_;
};

}  // namespace cpu

namespace cuda {

// Same contracts as cpu::, on device pointers, enqueued on `stream` (a cudaStream_t).
// Invalid rows are skipped on the device and counted: errors [2] i64 = {bad index,
// non-finite logits}. No host synchronisation. scratch [B] f64: the rows' scores, added to
// the bank in row order after the scoring kernel (deterministic with duplicate indices);
// the caller allocates it (torch's caching allocator), stream-ordered.
void observe_entropy(const void* logits, FloatKind kind, int64_t B, int64_t C, int64_t ld,
                     const int64_t* indices, int64_t N, double* sums, int32_t* counts,
                     int64_t* errors, double* scratch, void* stream);
void observe_kl(const void* student, const void* teacher, FloatKind kind, int64_t B, int64_t C,
                int64_t ld_s, int64_t ld_t, const int64_t* indices, int64_t N, double* sums,
                int32_t* counts, float temperature, int64_t* errors, double* scratch, void* stream,
                bool commit = true);
// scratch [B] rows (NaN: skipped) into the bank in row order: the second half of the ops
// above, for callers that look at the rows' scores first (observe_kl with commit = false:
// strict validation of a KL that overflows, refused before anything changes).
void accumulate_rows(const int64_t* indices, const double* scratch, int64_t B, double* sums, int32_t* counts,
                     void* stream);
// Bad sequences (index, mask value > 1, no unmasked token, non-finite token) are skipped
// and counted in errors[1] (errors[0] for a bad index).
void observe_entropy_seq(const void* logits, FloatKind kind, int64_t B, int64_t L, int64_t V, int64_t ld,
                         const uint8_t* mask, const int64_t* indices, int64_t N, double* sums, int32_t* counts,
                         int64_t* errors, double* scratch, void* stream);
void observe_scores(const double* scores, const int64_t* indices, int64_t B, int64_t N, double* sums,
                    int32_t* counts, int64_t* errors, double* scratch, void* stream);
void values(const double* sums, const int32_t* counts, int64_t N, double period, double alpha,
            double* out, void* stream);
// No validation on the device: the caller draws params in range.
void augment(const uint8_t* images, const AugmentGeometry& g, const int64_t* indices, const int32_t* params,
             int64_t B, const float* scale, const float* shift, const float* fill, void* out, bool out_bf16,
             bool nhwc_out, void* stream);
// A bounds guard on the device: pairs outside [0, N) or with eps outside [0, 1] are skipped
// and counted in errors [1] (no other validation: dst unique and disjoint from src is the
// caller's, as condense's output is).
void blend(uint8_t* images, int64_t N, int64_t D, const int64_t* dst, const int64_t* src,
           const double* eps, int64_t L, int64_t* errors, void* stream);
// Scratch bytes condense needs for N points (see condense_buffer_bytes in kcd/blend.h).
size_t condense_workspace_bytes(int64_t N);
// Whether `device` has an active primary context (the driver's cuDevicePrimaryCtxGetState,
// reached through the runtime, no libcuda link); false when that cannot be asked.
bool has_primary_context(int device);
void condense(const double* values, int64_t N, int64_t n_keep, int64_t n_prev, VaksMode mode,
              double eps_m, const int64_t* random_pos, void* workspace, size_t workspace_bytes,
              int64_t* keep, int64_t* dropped, int64_t* dst, int64_t* src, double* eps, void* stream);
int device_count();
int get_device();
void set_device(int device);
// Opt-in kernel variants, for measuring them against the defaults on a GPU:
// "entropy_batch" 1 (default) or 4 vectors loaded per lane before use; "blend_per_thread"
// 1 (default) or 4 chunks of 16 bytes per thread in 64-thread blocks. Same results.
void set_variant(const std::string& name, int value);


}  // namespace cuda
}  // namespace kcd
