// The CPU condensation's kernels: which instruction set runs (set_condense_isa forces one,
// for tests and benchmarks), the dispatch to its kernels, and the generic (scalar,
// branch-free) kernels, which every CPU runs and the vector kernels finish their tails with.
#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

#include "condense_kernels.h"

#if KCD_AVX512_PATH
#define KCD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KCD_CLONES
#endif

namespace kcd {
namespace cpu {
namespace condense_detail {
namespace {

// ---- Which kernels run --------------------------------------------------------------------

std::atomic<int> g_isa{static_cast<int>(Isa::kAuto)};

bool cpu_has_avx512() {
#if KCD_AVX512_PATH
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if KCD_AVX512_PATH
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

// ---- Generic kernels ----------------------------------------------------------------------

// Counts the classes of [begin, end) and writes the bitmap bytes of its points (bit i & 7
// of byte i >> 3: x > p.above); begin is a multiple of 8.
KCD_CLONES void count_and_mark(const double* v, int64_t begin, int64_t end, const Pass1& p, ClassCounts* cc,
                               uint8_t* bits) {
  const double h0 = p.zn.hi[0], l0 = p.zn.lo[0], h1 = p.zn.hi[1], l1 = p.zn.lo[1], ab = p.above;
  int64_t a0 = 0, b0 = 0, a1 = 0, b1 = 0, nan = 0;
  for (int64_t i = begin; i < end; ++i) {
    const double x = v[i];
    a0 += x <= h0;
    b0 += x < l0;
    a1 += x <= h1;
    b1 += x < l1;
    nan += x != x;
  }
  for (int64_t i = begin; i < end; i += 8) {
    const int64_t n = std::min<int64_t>(8, end - i);
    unsigned byte = 0;
    for (int64_t k = 0; k < n; ++k) byte |= static_cast<unsigned>(v[i + k] > ab) << k;
    bits[i >> 3] = static_cast<uint8_t>(byte);
  }
  cc->add(a0, b0, a1, b1, nan);
}

// For each byte value: the positions of its set bits, then 8 (padding), and their count.
struct ByteBits {
  uint8_t pos[256][8];
  uint8_t count[256];
  constexpr ByteBits() : pos(), count() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int k = 0; k < 8; ++k) {
        if (b >> k & 1) pos[b][n++] = static_cast<uint8_t>(k);
      }
      count[b] = static_cast<uint8_t>(n);
      for (int k = n; k < 8; ++k) pos[b][k] = 8;
    }
  }
};
constexpr ByteBits kByteBits;

}  // namespace

Isa active_isa() {
  const int forced = g_isa.load(std::memory_order_relaxed);
  if (forced != static_cast<int>(Isa::kAuto)) return static_cast<Isa>(forced);
  static const Isa best = cpu_has_avx512() ? Isa::kAvx512 : (cpu_has_avx2() ? Isa::kAvx2 : Isa::kGeneric);
  return best;
}

int64_t scan_generic(const double* v, int64_t begin, int64_t end, const Pass1& p, ClassCounts* cc, uint8_t* bits,
                     uint64_t* out) {
  count_and_mark(v, begin, end, p, cc, bits);
  if (out == nullptr) return 0;
  const double h0 = p.zn.hi[0], l0 = p.zn.lo[0], h1 = p.zn.hi[1], l1 = p.zn.lo[1];
  int64_t m = 0;
  for (int64_t i = begin; i < end; ++i) {  // branch-free: the slot is overwritten unless a member
    const double x = v[i];
    out[m] = static_cast<uint64_t>(i);
    m += ((x >= l0) & (x <= h0)) | ((x >= l1) & (x <= h1));
  }
  for (int64_t j = 0; j < m; ++j) out[j] = p.word(v[out[j]], static_cast<int64_t>(out[j]));
  return m;
}

int64_t scan(Isa isa, const double* v, int64_t begin, int64_t end, const Pass1& p, ClassCounts* cc, uint8_t* bits,
             uint64_t* out) {
#if KCD_AVX512_PATH
  if (isa == Isa::kAvx512) return scan_avx512(v, begin, end, p, cc, bits, out);
  if (isa == Isa::kAvx2) return scan_avx2(v, begin, end, p, cc, bits, out);
#endif
  (void)isa;
  return scan_generic(v, begin, end, p, cc, bits, out);
}

void mark_kept_members(const uint64_t* w, int64_t n, uint64_t ws, const double* v, uint64_t* bits) {
  const uint64_t key_s = ws >> 32;
  const int64_t is = index_of(ws);
  const double vs = v[is];
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t key = w[j] >> 32;
    const int64_t i = index_of(w[j]);
    bool kept = key < key_s;
    if (key == key_s) kept = v[i] > vs || (v[i] == vs && i <= is);  // rare: equal keys
    bits[i >> 6] |= static_cast<uint64_t>(kept) << (i & 63);
  }
}

// Branch-free per byte of the bitmap: eight stores from a table, advance by the count.
int64_t expand_generic(const uint64_t* bits, int64_t words, int64_t base, int64_t* out, int64_t cap) {
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(bits);
  int64_t w = 0, k = 0;
  for (; k < 8 * words && w + 8 <= cap; ++k) {
    const uint8_t b = bytes[k];
    const int64_t at = base + 8 * k;
    for (int q = 0; q < 8; ++q) out[w + q] = at + kByteBits.pos[b][q];
    w += kByteBits.count[b];
  }
  for (; k < 8 * words; ++k) {  // the last few, one by one
    for (unsigned b = bytes[k]; b != 0 && w < cap; b &= b - 1) out[w++] = base + 8 * k + __builtin_ctz(b);
  }
  return w;
}

int64_t expand(Isa isa, const uint64_t* bits, int64_t words, int64_t base, int64_t* out, int64_t cap) {
#if KCD_AVX512_PATH
  if (isa == Isa::kAvx512) return expand_avx512(bits, words, base, out, cap);
#endif
  (void)isa;
  return expand_generic(bits, words, base, out, cap);
}

int64_t popcount_words(const uint64_t* bits, int64_t words) {
  int64_t n = 0;
  for (int64_t k = 0; k < words; ++k) n += __builtin_popcountll(bits[k]);
  return n;
}

}  // namespace condense_detail

const char* condense_isa() {
  using namespace condense_detail;
  const Isa isa = active_isa();
  return isa == Isa::kAvx512 ? "avx512" : (isa == Isa::kAvx2 ? "avx2" : "generic");
}

void set_condense_isa(const std::string& name) {
  using namespace condense_detail;
  if (name == "auto") {
    g_isa = static_cast<int>(Isa::kAuto);
  } else if (name == "generic") {
    g_isa = static_cast<int>(Isa::kGeneric);
  } else if (name == "avx512") {
    if (!cpu_has_avx512()) throw std::invalid_argument("isa 'avx512': this CPU (or build) has no AVX-512F");
    g_isa = static_cast<int>(Isa::kAvx512);
  } else if (name == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("isa 'avx2': this CPU (or build) has no AVX2");
    g_isa = static_cast<int>(Isa::kAvx2);
  } else {
    throw std::invalid_argument("isa must be 'auto', 'generic', 'avx2' or 'avx512', got '" + name + "'");
  }
}

}  // namespace cpu
}  // namespace kcd
