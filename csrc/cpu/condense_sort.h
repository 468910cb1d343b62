// Private to the CPU condensation: step 3, sorting the zone members that pass 1 copied
// (condense_sort.cpp).
#pragma once
#include <cstdint>
#include <vector>

#include "condense_internal.h"

namespace kcd {
namespace cpu {
namespace condense_detail {

constexpr int kBins = 2048;  // radix digits of 11 bits at most: a histogram stays in L1

// Stable LSD radix sort by the key (bits 32..63) of the m words held by S segments
// (seg[s] [seg_len[s]], in order), on T threads; a, tmp [m], hist [max(S, T), kBins].
// Returns where the result is (tmp).
uint64_t* radix_sort(const uint64_t* const* seg, const int64_t* seg_len, int S, uint64_t* a, uint64_t* tmp,
                     int64_t m, int64_t* hist, int T);

// Puts each run of equal keys in a[begin, end) (sorted by key, ties in index order) into
// exact value order, descending; begin and end must not split a run.
void order_equal_keys(uint64_t* a, int64_t begin, int64_t end, const double* v);

}  // namespace condense_detail
}  // namespace cpu
}  // namespace kcd
