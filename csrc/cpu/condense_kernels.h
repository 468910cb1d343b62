// Private to the CPU condensation: the kernels of its passes over the points, in one
// version per instruction set, and the switch between them.
//   Pass 1 (scan): counts the classes of a block of points, writes the bitmap bytes of
//   the points above the keep boundary's zone and copies the zone members, packed.
//   Keep: sets the bits of the kept members, expands the bitmap to the kept indices.
// condense_kernels.cpp: the switch, the dispatch and the generic (scalar) kernels;
// condense_kernels_avx512.cpp and condense_kernels_avx2.cpp: the vector kernels, each
// compiled for its instruction set by function attributes (the build adds no -m flags).
#pragma once
#include <cstdint>

#include "condense_internal.h"
#include "condense_zones.h"

#if defined(__BYTE_ORDER__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the bitmap is written in bytes and read in words");
#endif

namespace kcd {
namespace cpu {
namespace condense_detail {

enum class Isa : int { kAuto = -1, kGeneric = 0, kAvx512 = 1, kAvx2 = 2 };

// The kernels that run: the forced ones (set_condense_isa), else the best the CPU has.
Isa active_isa();

// Pass 1 over [begin, end) (begin a multiple of 8): adds the class counts to *cc, writes
// the bitmap bytes of its points (bit i & 7 of byte i >> 3: x > p.above) and, when `out`
// is not null, the packed members (room for their count + kSlack); returns how many were
// copied.
int64_t scan(Isa isa, const double* v, int64_t begin, int64_t end, const Pass1& p, ClassCounts* cc, uint8_t* bits,
             uint64_t* out);

// Sets the bits of the members w [n] ranked at or before the threshold member `ws`
// (key order, then exact value descending, then index); the bitmap words of the members'
// chunk belong to the caller alone.
void mark_kept_members(const uint64_t* w, int64_t n, uint64_t ws, const double* v, uint64_t* bits);

// Writes base + the positions of the set bits of bits[0, words) to out [cap]; returns how many.
int64_t expand(Isa isa, const uint64_t* bits, int64_t words, int64_t base, int64_t* out, int64_t cap);

int64_t popcount_words(const uint64_t* bits, int64_t words);

// The versions behind scan and expand (the vector ones defined with their target attributes).
int64_t scan_generic(const double* v, int64_t begin, int64_t end, const Pass1& p, ClassCounts* cc, uint8_t* bits,
                     uint64_t* out);
int64_t expand_generic(const uint64_t* bits, int64_t words, int64_t base, int64_t* out, int64_t cap);
#if KCD_AVX512_PATH
int64_t scan_avx512(const double* v, int64_t begin, int64_t end, const Pass1& p, ClassCounts* cc, uint8_t* bits,
                    uint64_t* out);
int64_t expand_avx512(const uint64_t* bits, int64_t words, int64_t base, int64_t* out, int64_t cap);
int64_t scan_avx2(const double* v, int64_t begin, int64_t end, const Pass1& p, ClassCounts* cc, uint8_t* bits,
                  uint64_t* out);
#endif

}  // namespace condense_detail
}  // namespace cpu
}  // namespace kcd
